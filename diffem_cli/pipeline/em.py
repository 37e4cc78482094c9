"""The lap driver: lap 0, then M-step and E-step for every lap, resumable from disk.

It knows laps, resume, evaluation and logging; what is trained and how posteriors are drawn
belongs to the method (:mod:`diffem_cli.methods`, ``em.method`` / ``--method``). A lap is
complete when its checkpoint (laps >= 1), its reconstructions and its record in
``metrics.jsonl`` exist; a rerun skips complete laps, writes a missing record from what is on
disk, redoes a missing E-step from its checkpoint, and resumes an M-step from its last epoch.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffem_cli.config.run import RunConfig
from diffem_cli.core.errors import DiffemError
from diffem_cli.core.runtime import Context, pick_device
from diffem_cli.diffusion.checkpoint import Checkpoint, build_model, load_checkpoint, save_checkpoint
from diffem_cli.diffusion.sampling import sample_nfe
from diffem_cli.diffusion.schedule import SCHEDULE
from diffem_cli.io.observations import Observations, load_clean, load_recon, save_recon
from diffem_cli.io.store import clean_stale, read_manifest
from diffem_cli.methods import get_method
from diffem_cli.methods.base import Method
from diffem_cli.pipeline.runs import Run

Logger = Callable[[str], None]


def initial_reconstructions(
    data: Observations, cfg: RunConfig, run: Run, device: torch.device
) -> dict[str, Any]:
    """Lap 0: Gaussian-posterior samples for linear channels, else the channel's own start."""
    init = cfg.em.init
    if init == "auto":
        init = "gaussian" if data.channel.linear else "observation"
    t0 = time.perf_counter()
    if init == "gaussian":
        if not data.channel.linear:
            raise DiffemError(
                f"em.init=gaussian needs a linear channel; {data.channel.name!r} has no linear form"
            )
        from diffem_cli.diffusion.checkpoint import save_tensors
        from diffem_cli.gaussian.model import fit_gaussian, gaussian_start

        prior = fit_gaussian(
            data.channel,
            data.batches(),
            data.shape,
            iters=cfg.em.gaussian_iters,
            rank=cfg.em.gaussian_rank,
            generator=torch.Generator().manual_seed(cfg.seed),
            device=device,
        )
        x = torch.cat(
            list(gaussian_start(prior, data.channel, data.batches(), data.shape, cfg.seed, device=device))
        )
        save_tensors(run.root / "gaussian.safetensors", prior.to_tensors(), {"kind": "gaussian-prior"})
    elif init == "observation":
        x = torch.cat([data.channel.start(b, data.shape) for b in data.batches()()])
    else:
        raise DiffemError(f"unknown em.init {init!r} (auto, gaussian, observation)")
    return {"x": x.float(), "init": init, "seconds": time.perf_counter() - t0}


def check_checkpoint_for(meta: dict[str, Any], data: Observations, path: Path | None) -> None:
    """A checkpoint must match the observations' data shape, and a conditional one their
    channel (its whole spec) and conditioning size."""
    if tuple(meta["data"]["shape"]) != data.shape:
        raise DiffemError(
            f"{path} was trained on data of shape {tuple(meta['data']['shape'])}, "
            f"these observations have shape {data.shape}"
        )
    if meta["kind"] != "conditional":
        return
    from diffem_cli.io.registry import same_channel

    diff = same_channel(
        meta.get("channel") or {}, data.channel.spec(), ("the checkpoint", "the observations")
    )
    if diff:
        raise DiffemError(f"{path} was trained for another channel than these observations: {diff}")
    ours = data.channel.spec()
    if data.channel.cond_size(data.shape) != int(meta.get("cond_size", -1)):
        raise DiffemError(f"{path} expects another conditioning size than channel {ours['name']!r} gives")


def _warm_sampler(warm: Checkpoint, method: Method, data: Observations, cfg: RunConfig) -> Method:
    """Which method draws lap 0 from a warm start: a conditional checkpoint samples itself; an
    unconditional prior is used through the method's own guidance, or MMPS (linear channels)."""
    from diffem_cli.methods import REGISTRY

    if warm.kind == "conditional":
        return REGISTRY["diffem"](cfg)
    if method.kind == "unconditional":
        return method
    if data.channel.linear:
        return REGISTRY["em-mmps"](cfg)
    if "dps-em" in REGISTRY:
        return REGISTRY["dps-em"](cfg)
    raise DiffemError(
        f"an unconditional warm start needs a linear channel for MMPS; {data.channel.name!r} has none"
    )


def em_train(
    data_path: Path,
    run_path: Path,
    cfg: RunConfig,
    *,
    laps: int | None = None,
    method: str | None = None,
    warm_start: Path | None = None,
    eval_clean: Path | None = None,
    clean: Path | None = None,
    device: str | None = None,
    force: bool = False,
    log: Logger = print,
    ctx: Context | None = None,
) -> list[dict[str, Any]]:
    """Run (or resume) ``laps`` laps of the configured method; returns the per-lap records."""
    laps = cfg.em.laps if laps is None else laps
    if laps < 1:
        raise DiffemError(f"--laps must be >= 1, got {laps}")
    cfg = copy.deepcopy(cfg)
    cfg.em.laps = laps
    if method is not None:
        cfg.em.method = method
    ctx = ctx or Context(0, 1, pick_device(device))
    data = Observations(data_path)
    data.channel.check_data(data.shape)
    _check_config(cfg, data)
    m = get_method(cfg.em.method, cfg)
    m.check(data)
    evaluation = load_clean(eval_clean, data) if eval_clean else None
    if m.needs_clean and clean is None:
        raise DiffemError(f"method {m.name!r} needs clean data: pass --clean DIR")
    train_clean = load_clean(clean, data, "--clean") if clean else None
    warm = load_checkpoint(warm_start) if warm_start else None
    if warm is not None:
        check_checkpoint_for(warm.meta, data, warm_start)
        if warm.kind == m.kind and warm.meta["network"] != cfg.network:  # fine-tuning keeps its architecture
            log(f"network: the warm start's {json.dumps(warm.meta['network'])}")
            cfg.network = dict(warm.meta["network"])
        m = get_method(cfg.em.method, cfg)
    run = Run(run_path)
    from diffem_cli.io.lock import hold_lock

    with hold_lock(run.root, "em-train") if ctx.is_main else contextlib.nullcontext():
        if ctx.is_main:
            if run.root.is_dir():
                clean_stale(run.root, locked=True)
            info = {
                "data": str(data.path.resolve()),
                "fingerprint": data.fingerprint,
                "channel": data.channel.spec(),
                "method": m.name,
            }
            run.prepare(cfg, info, force, ignore=("em.laps",))
        ctx.barrier()
        driver = _Driver(run, data, cfg, m, ctx, log, evaluation, train_clean, warm)
        records = driver.execute(laps)
    return records


def _check_config(cfg: RunConfig, data: Observations) -> None:
    try:
        from diffem_cli.config.run import check_config_for_data
    except ImportError:
        return
    check_config_for_data(cfg, data.channel, data.shape)


class _Driver:
    """One em-train invocation: the laps, in order, each completed or skipped."""

    def __init__(self, run, data, cfg, method, ctx, log, evaluation, clean, warm):
        self.run, self.data, self.cfg, self.m, self.ctx = run, data, cfg, method, ctx
        self.log, self.evaluation, self.clean, self.warm = log, evaluation, clean, warm
        self.base_meta = {
            "kind": method.kind,
            "network": cfg.network,
            "cond_size": method.cond_size(data),
            "channel": data.channel.spec(),
            "data": data.data_meta(),
            "schedule": SCHEDULE,
            **method.meta(),
        }

    def execute(self, laps: int) -> list[dict[str, Any]]:
        done = self.run_records()
        for lap in range(0, laps + 1):
            if lap in done and self._complete(lap):
                if self.ctx.is_main and not self.run.picture(lap).exists():
                    self._picture(lap)
                continue
            rec = self.lap0() if lap == 0 else self.lap(lap, laps)
            rec.update(self._evaluate(lap))
            if self.ctx.is_main:
                self._picture(lap)
                self.run.log(rec)
            self.ctx.barrier()
            done[lap] = rec
            self.log(describe(rec))
        records = [done[k] for k in sorted(done) if k <= laps]
        if self.evaluation is not None and self.ctx.is_main:
            from diffem_cli.pipeline.report import save_metric_curves

            save_metric_curves(self.run.root / "metrics.png", records)
        return records

    def run_records(self) -> dict[int, dict[str, Any]]:
        return self.run.lap_records()

    def _complete(self, lap: int) -> bool:
        """A lap with a record, reconstructions and (laps >= 1) a checkpoint needs no work."""
        recon = (self.run.recon(lap) / "diffem.json").exists()
        return recon and (lap == 0 or self.run.checkpoint(lap).exists())

    def _recon_manifest(self, lap: int) -> dict[str, Any] | None:
        path = self.run.recon(lap)
        return read_manifest(path) if (path / "diffem.json").exists() else None

    def lap0(self) -> dict[str, Any]:
        manifest = self._recon_manifest(0)
        if manifest is None:
            start = None
            if self.warm is not None:  # sharded posterior sampling: every rank takes part
                t0 = time.perf_counter()
                sampler = _warm_sampler(self.warm, self.m, self.data, self.cfg)
                sampler.load_aux(self.warm.aux)
                x = sampler.posterior(
                    build_model(self.warm),
                    self.data,
                    self.cfg.sample,
                    seed_parts=(self.cfg.seed, 0),
                    device=self.ctx.device,
                    label="lap 0: warm start",
                    ctx=self.ctx,
                )
                start = {"x": x, "init": "warm-start", "seconds": time.perf_counter() - t0}
            elif self.ctx.is_main:  # the Gaussian fit runs once; the other ranks wait, then read it
                start = initial_reconstructions(self.data, self.cfg, self.run, self.ctx.device)
            if self.ctx.is_main:
                manifest = {**self.recon_meta(0), "init": start["init"], "init_s": start["seconds"]}
                save_recon(self.run.recon(0), start["x"], self.data.index, manifest)
                self.log(f"lap 0: {start['init']} start in {start['seconds']:.1f} s")
            self.ctx.barrier()
            manifest = manifest or self._recon_manifest(0)
        return {"event": "lap", "lap": 0, "init": manifest.get("init"), "init_s": manifest.get("init_s")}

    def lap(self, lap: int, laps: int) -> dict[str, Any]:
        rec: dict[str, Any] = {"event": "lap", "lap": lap}
        if not self.run.checkpoint(lap).exists():
            rec.update(self.mstep(lap, laps))
        else:  # trained before an interruption: its deterministic summary, not its timings
            rec.update(load_checkpoint(self.run.checkpoint(lap)).meta.get("train") or {})
        manifest = self._recon_manifest(lap)
        if manifest is None:
            manifest = self.estep(lap)
        keys = ("estep_s", "nfe", "estep_samples_per_s", "dps_scale")
        rec.update({k: manifest[k] for k in keys if k in manifest})
        return rec

    def _initial_model(self, lap: int, laps: int) -> nn.Module:
        if lap > 1 and self.m.fine_tunes(lap, laps):
            return build_model(load_checkpoint(self.run.checkpoint(lap - 1)))
        if lap == 1 and self.warm is not None and self.warm.kind == self.m.kind:
            if int(self.warm.meta.get("cond_size", 0)) == self.m.cond_size(self.data):
                return build_model(self.warm)
        return self.m.build(self.data)

    def mstep(self, lap: int, laps: int) -> dict[str, Any]:
        from diffem_cli.diffusion.train import train_denoiser

        prev, _ = load_recon(self.run.recon(lap - 1))
        model = self._initial_model(lap, laps).train()
        t0 = time.perf_counter()
        tensors, refresh = self.m.training_data(self.data, prev, lap, self.clean)
        corrupt_s = time.perf_counter() - t0

        def on_epoch(info: dict[str, Any]) -> None:
            if self.ctx.is_main:
                self.run.log({"event": "epoch", "lap": lap, **info})

        result = train_denoiser(
            model,
            tensors,
            self.cfg.train,
            loss=self.m.loss(),
            seed=self.cfg.seed + lap,
            device=self.ctx.device,
            state_path=self.run.state,  # read by every rank, written by the main one
            tag={"lap": lap, "fingerprint": self.data.fingerprint, "method": self.m.name},
            label=f"lap {lap} M-step",
            on_epoch=on_epoch,
            refresh=refresh,
            refresh_every=self.cfg.em.recorrupt_every,
            log=self.log,
            ctx=self.ctx,
        )
        rows = len(next(iter(tensors.values())))
        summary = {"loss": result.last_loss, "steps": result.steps}
        if self.ctx.is_main:
            save_checkpoint(
                self.run.checkpoint(lap),
                result.ema_model,
                {**self.base_meta, "lap": lap, "train": summary},
                aux=self.m.aux_tensors(),
            )
            self.run.state.unlink(missing_ok=True)
        self.ctx.barrier()
        return {
            **summary,
            "corrupt_s": corrupt_s,
            "mstep_s": time.perf_counter() - t0,
            "examples_per_s": result.steps * min(self.cfg.train.batch_size, rows) / max(result.seconds, 1e-9),
        }

    def estep(self, lap: int) -> dict[str, Any]:
        ckpt = load_checkpoint(self.run.checkpoint(lap))
        self.m.load_aux(ckpt.aux)
        model = build_model(ckpt)
        t0 = time.perf_counter()
        x = self.m.posterior(
            model,
            self.data,
            self.cfg.sample,
            seed_parts=(self.cfg.seed, lap),
            device=self.ctx.device,
            label=f"lap {lap} E-step",
            ctx=self.ctx,
        )
        seconds = time.perf_counter() - t0
        manifest = {
            **self.recon_meta(lap),
            "sampler": self.cfg.sample.sampler,
            "steps": self.cfg.sample.steps,
            "estep_s": seconds,
            "nfe": sample_nfe(self.cfg.sample.steps, self.cfg.sample.corrections),
            "estep_samples_per_s": len(x) / max(seconds, 1e-9),
            **self.m.estep_record(),
        }
        if self.ctx.is_main:
            save_recon(self.run.recon(lap), x, self.data.index, manifest)
        self.ctx.barrier()
        return manifest

    def recon_meta(self, lap: int) -> dict[str, Any]:
        """What a lap's reconstructions folder records of where it comes from."""
        return {
            "lap": lap,
            "method": self.m.name,
            "channel": self.data.channel.spec(),
            "source": self.data.manifest.get("source"),
            "observations_fingerprint": self.data.fingerprint,
            "data_shape": list(self.data.shape),
            "data_kind": self.data.kind,
            "value_range": self.data.value_range,
        }

    def _evaluate(self, lap: int) -> dict[str, float]:
        if self.evaluation is None or not self.ctx.is_main:  # the main rank alone logs the record
            return {}
        x, _ = load_recon(self.run.recon(lap))
        return evaluate_against(x, self.evaluation, self.data, self.cfg)

    def _picture(self, lap: int) -> None:
        x, _ = load_recon(self.run.recon(lap))
        lap_picture(self.run.picture(lap), lap, x, self.data)


def evaluate_against(
    x: torch.Tensor, clean: torch.Tensor, data: Observations, cfg: RunConfig
) -> dict[str, float]:
    """The configured metrics of reconstructions ``x`` against clean data, keys ``eval_*``."""
    from diffem_cli.metrics.evaluate import evaluate_tensors

    t0 = time.perf_counter()
    kwargs: dict[str, Any] = {}
    if data.kind == "image":
        kwargs = {"sample_index": data.index, "reference_index": data.index, "value_range": data.value_range}
    metrics = evaluate_tensors(x, clean, cfg.eval.metrics or None, n_points=cfg.eval.n_points, **kwargs)
    return {**{f"eval_{k}": v for k, v in metrics.items()}, "eval_s": time.perf_counter() - t0}


def describe(rec: dict[str, Any]) -> str:
    """One log line for a lap record."""
    parts = [f"lap {rec['lap']}"]
    for key in ("init_s", "mstep_s", "estep_s"):
        if rec.get(key) is not None:
            parts.append(f"{key[:-2]} {rec[key]:.1f} s")
    if "loss" in rec:
        parts.append(f"loss {rec['loss']:.4f}")
    parts += [f"{k[5:]} {v:.4g}" for k, v in rec.items() if k.startswith("eval_") and k != "eval_s"]
    return " | ".join(parts)


def lap_picture(path: Path, lap: int, x: torch.Tensor, data: Observations) -> None:
    """A lap's picture: a pairwise scatter (vectors) or observations above reconstructions."""
    from diffem_cli.pipeline import plots

    if data.kind == "vector":
        plots.save_pairwise_scatter({f"lap {lap}": x}, path)
        return
    k = min(16, len(x))
    rows, labels = [], []
    y = data.obs.get("y")
    if y is not None and tuple(y.shape[1:]) == data.shape:
        rows.append(y[:k])
        labels.append("observation")
    rows.append(x[:k])
    labels.append(f"lap {lap}")
    plots.save_image_grid(rows, path, labels=labels, value_range=tuple(data.value_range or (-1, 1)))
