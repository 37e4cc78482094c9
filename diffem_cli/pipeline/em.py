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
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffem_cli.config.run import RunConfig
from diffem_cli.core.errors import DiffemError
from diffem_cli.core.logs import get_logger
from diffem_cli.core.runtime import Context, pick_device
from diffem_cli.core.tracking import Tracking
from diffem_cli.diffusion.checkpoint import build_model, load_checkpoint, save_checkpoint
from diffem_cli.diffusion.compiled import maybe_compile
from diffem_cli.diffusion.denoise import Denoiser, KeepObserved
from diffem_cli.diffusion.nets import build_network
from diffem_cli.diffusion.residual import zero_output
from diffem_cli.diffusion.sampling import SampleConfig, clip_range_for, draw, sample_nfe
from diffem_cli.diffusion.schedule import SCHEDULE
from diffem_cli.io import provenance
from diffem_cli.io.observations import Observations, load_clean, load_recon, save_recon
from diffem_cli.io.store import clean_stale, read_manifest
from diffem_cli.methods import Method, get_method, method_classes
from diffem_cli.methods.base import Make, lap_seed
from diffem_cli.methods.registry import checkpoint_method_name, method_for_checkpoint
from diffem_cli.metrics.consistency import mean_observed_residual
from diffem_cli.pipeline.monitor import Monitor
from diffem_cli.pipeline.run_options import remembered_paths
from diffem_cli.pipeline.runs import Run

Logger = Callable[[str], None]
notices = get_logger(__name__)


def initial_reconstructions(
    data: Observations, cfg: RunConfig, run: Run, device: torch.device
) -> dict[str, Any]:
    """Lap 0: Gaussian-posterior samples for linear channels, else the channel's own start;
    ``shrinkage``: how much a full-covariance Gaussian was shrunk (``em.gaussian_shrinkage``)."""
    init = cfg.em.init
    if init == "auto":
        init = "gaussian" if data.channel.linear else "observation"
    t0 = time.perf_counter()
    out: dict[str, Any] = {}
    if init == "gaussian":
        if not data.channel.linear:
            raise DiffemError(
                f"em.init=gaussian needs a linear channel; {data.channel.name!r} has no linear form"
            )
        from diffem_cli.diffusion.checkpoint import save_tensors
        from diffem_cli.gaussian.fit import choose_start_shrinkage, fit_gaussian, gaussian_start
        from diffem_cli.gaussian.shrinkage import apply_shrinkage

        def fit(batches: Callable[[], Any]) -> Any:
            return fit_gaussian(
                data.channel,
                batches,
                data.shape,
                iters=cfg.em.gaussian_iters,
                rank=cfg.em.gaussian_rank,
                full_max_dim=cfg.em.gaussian_full_max_dim,
                generator=torch.Generator().manual_seed(cfg.seed),
                device=device,
                residual=cfg.em.gaussian_residual,
            )

        prior, out["shrinkage"] = apply_shrinkage(
            fit(data.batches()),
            data.shape,
            "em.gaussian_shrinkage",
            cfg.em.gaussian_shrinkage,
            lambda: choose_start_shrinkage(data.channel, data.batches(), data.shape, fit, device=device),
        )
        x = torch.cat(
            list(gaussian_start(prior, data.channel, data.batches(), data.shape, cfg.seed, device=device))
        )
        save_tensors(run.root / "gaussian.safetensors", prior.to_tensors(), {"kind": "gaussian-prior"})
    elif init == "observation":
        x = torch.cat([data.channel.start(b, data.shape) for b in data.batches()()])
    else:
        raise DiffemError(f"unknown em.init {init!r} (auto, gaussian, observation)")
    x = x.float()
    if data.kind == "image":  # lap 1 conditions on values inside the data's range, like real observations
        lo, hi = data.value_range or (-1.0, 1.0)
        x = x.clamp(float(lo), float(hi))
    if cfg.sample.keep_observed:
        x = keep_rows(x, data)
    return {**out, "x": x, "init": init, "seconds": time.perf_counter() - t0}


def check_checkpoint_for(
    meta: dict[str, Any], data: Observations, path: Path | None, method: Method | None = None
) -> None:
    """A checkpoint must match the observations' data shape, and a conditional one their
    channel (its whole spec) and the conditioning size ``method`` (default: the checkpoint's own,
    configured as it was) gives for them."""
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
    method = method or method_for_checkpoint(meta)
    spec = method.model_spec(data)
    if spec.cond_size != int(meta.get("cond_size", -1)):
        raise DiffemError(
            f"{path} expects another conditioning size than method {method.name!r} gives for channel "
            f"{data.channel.name!r} (are its cond.* settings the checkpoint's?)"
        )
    if spec.residual != bool(meta.get("residual", False)):
        raise DiffemError(
            f"{path} was trained {'with' if meta.get('residual') else 'without'} cond.residual, "
            f"method {method.name!r} is set {'with' if spec.residual else 'without'} it"
        )


def warm_sampler(warm_meta: dict[str, Any], method: Method, data: Observations, cfg: RunConfig) -> Method:
    """Which method draws lap 0 from a warm start: the run's own method when its model is of the
    checkpoint's kind; else the method that wrote the checkpoint, or else the first installed
    method (in listing order) whose model is of that kind, that can serve the observations
    (configured by the run's option sections)."""
    kind = warm_meta["kind"]
    if method.kind == kind:
        return method
    classes = method_classes()
    own = checkpoint_method_name(warm_meta)
    names = ([own] if own in classes else []) + [n for n in classes if n != own]
    for name in names:
        if classes[name].kind != kind:
            continue
        candidate = (
            method_for_checkpoint(warm_meta, cfg.options) if name == own else classes[name].from_config(cfg)
        )
        try:
            candidate.check(data)
        except DiffemError:
            continue
        return candidate
    raise DiffemError(
        f"no installed method can sample the warm start's {kind} model for channel {data.channel.name!r}"
    )


def posterior_samples(
    method: Method,
    model: nn.Module,
    aux: dict[str, torch.Tensor],
    data: Observations,
    sample: SampleConfig,
    *,
    seed_parts: tuple[int, ...],
    device: torch.device,
    label: str,
    ctx: Context | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """One posterior sample per observation (CPU, rows aligned with ``data``) by ``method`` with
    ``model`` and the checkpoint's ``aux`` tensors, through the one sampling loop; and the
    E-step's record (e.g. a chosen guidance weight, and the network passes it took:
    ``estep_forwards``, ``estep_vjps``, in samples)."""
    from diffem_cli.pipeline.accounting import CountingNetwork

    counter = CountingNetwork(maybe_compile(model.to(device).eval(), sample.compile, device))
    post = method.posterior(counter, data, aux)
    rows = {**data.obs, **post.extra}

    def draw_first(make: Make, n: int | torch.Tensor, note: str = "") -> torch.Tensor:
        picked = n.long() if isinstance(n, torch.Tensor) else None  # row indices, or the first n

        def for_rows(start: int, stop: int):
            at = slice(start, stop) if picked is None else picked[start:stop]
            return make({k: v[at].to(device) for k, v in rows.items()})

        return draw(
            for_rows,
            len(picked) if picked is not None else n,
            data.shape,
            sampler=sample.sampler,
            steps=sample.steps,
            batch_size=sample.batch_size,
            seed_parts=seed_parts,
            device=device,
            clip_range=clip_range_for(data.kind, data.value_range),
            label=f"{label}: {note}" if note else label,
            ctx=ctx,
            corrections=sample.corrections,
            corrector_tau=sample.corrector_tau,
            spacing=sample.spacing,
        )

    def keeping(inner: Make) -> Make:
        def make(obs: dict[str, torch.Tensor]) -> Denoiser:
            exact = data.channel.exact_entries(obs)
            return inner(obs) if exact is None else KeepObserved(inner(obs), exact, obs["y"])

        return make

    make, record = post.make, dict(post.record)
    if post.choose is not None:
        make, chosen = post.choose(draw_first)  # chosen on the free sampler: pinned entries fit any choice
        record.update(chosen)
    if make is None:
        raise DiffemError(f"method {method.name!r} gave neither a denoiser factory nor a way to choose one")
    if not sample.keep_observed:
        x = draw_first(make, len(data))
    else:
        x = keep_rows(draw_first(keeping(make), len(data)), data)
    if sample.project:
        x = project_rows(x, data)
    record.update({f"estep_{k}": v for k, v in counter.totals(ctx).items()})
    return x, record


def sampling_record(sample: SampleConfig) -> dict[str, Any]:
    """What a checkpoint records of how its run drew samples (all but ``batch_size``, a matter of
    memory), so that ``reconstruct`` and ``sample`` draw the same way unless told otherwise."""
    return {k: v for k, v in dataclasses.asdict(sample).items() if k != "batch_size"}


def residual_record(data: Observations, x: torch.Tensor) -> dict[str, float]:
    """``observed_residual``: the mean ``||A x - y|| / sqrt(m)`` of reconstructions ``x`` (linear
    channels; a label-free check of the E-step: near the noise level, 0 on pinned entries)."""
    if not data.channel.linear:
        return {}
    return {"observed_residual": mean_observed_residual(data.channel, data.obs, x)}


def keep_rows(x: torch.Tensor, data: Observations, batch_size: int = 4096) -> torch.Tensor:
    """Samples ``x`` of the first ``len(x)`` observations with ``y`` written back, bit for bit, on
    the entries the channel gives exactly (the sampler's last step may leave them near ``y``)."""
    out = x.clone()
    for start in range(0, len(x), batch_size):
        stop = min(start + batch_size, len(x))
        obs = {k: v[start:stop] for k, v in data.obs.items()}
        exact = data.channel.exact_entries(obs)
        if exact is not None:
            out[start:stop] = torch.where(exact > 0, obs["y"].to(x.dtype), x[start:stop])
    return out


def project_rows(x: torch.Tensor, data: Observations, batch_size: int = 4096) -> torch.Tensor:
    """Samples ``x`` of the first ``len(x)`` observations projected onto ``{x : A x = y}``
    (``sample.project``), batch by batch."""
    from diffem_cli.gaussian.data_consistency import project_onto_observations

    out = x.clone()
    for start in range(0, len(x), batch_size):
        stop = min(start + batch_size, len(x))
        obs = {k: v[start:stop] for k, v in data.obs.items()}
        out[start:stop] = project_onto_observations(data.channel, obs, x[start:stop])
    return out


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
    log: Logger = notices.info,
    ctx: Context | None = None,
    track: tuple[str, ...] = (),
) -> list[dict[str, Any]]:
    """Run (or resume) ``laps`` laps of the configured method; returns the per-lap records.

    ``track`` names the trackers (:mod:`diffem_cli.core.tracking`) that receive the configuration,
    per-epoch loss and learning rate, lap records and pictures (main process only, in RUN/logs).

    ``laps=0`` computes the start (lap 0) alone and leaves ``em.laps`` as configured. Without
    ``force``, the ``eval_clean``, ``clean`` and ``warm_start`` a RUN was run with
    (:func:`~diffem_cli.pipeline.run_options.remembered_paths`) serve again when not given.
    """
    laps = cfg.em.laps if laps is None else laps
    if laps < 0:
        raise DiffemError(f"--laps must be >= 0, got {laps}")
    cfg = copy.deepcopy(cfg)
    if laps:
        cfg.em.laps = laps
    if method is not None:
        cfg.em.method = method
    given = {"eval_clean": eval_clean, "clean": clean, "warm_start": warm_start}
    for key, path in ({} if force else remembered_paths(run_path)).items():
        option = "--" + key.replace("_", "-")
        if given[key] is not None:
            continue
        if path.exists():
            given[key] = path
            log(f"{option} {path} (the RUN's own)")
        else:
            log(f"{option}: the RUN's {path} no longer exists; going on without it")
    eval_clean, clean, warm_start = given["eval_clean"], given["clean"], given["warm_start"]
    ctx = ctx or Context(0, 1, pick_device(device))
    data = Observations(data_path)
    data.channel.check_data(data.shape)
    _check_config(cfg, data)
    m = get_method(cfg.em.method, cfg)
    m.check(data)
    evaluation = load_clean(eval_clean, data, paired=data.kind == "image") if eval_clean else None
    if m.needs_clean and clean is None:
        raise DiffemError(f"method {m.name!r} needs clean data: pass --clean DIR")
    train_clean = load_clean(clean, data, "--clean") if clean else None
    warm = load_checkpoint(warm_start) if warm_start else None
    if warm is not None:
        check_checkpoint_for(warm.meta, data, warm_start, m if warm.kind == m.kind else None)
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
                "paths": {k: str(Path(v).resolve()) for k, v in given.items() if v is not None},
            }
            lacked = run.prepare(cfg, info, force, ignore=("em.laps",))
            note = run.lacked_note(lacked, cfg, {"train", "sample", "em", "eval", "seed", *m.options})
            if note:
                log(note)
            run.redo_broken(len(data), log)  # a lap is done only when its files verify
        ctx.barrier()
        with Tracking(track if ctx.is_main else (), run.root / "logs", run_name=run.root.name) as tracking:
            tracking.config(cfg.to_dict())
            sources = [provenance.input_ref(p) for p in (warm_start, clean) if p is not None]
            driver = _Driver(run, data, cfg, m, ctx, log, evaluation, train_clean, warm, tracking, sources)
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

    def __init__(self, run, data, cfg, method, ctx, log, evaluation, clean, warm, tracking=None, sources=()):
        self.run, self.data, self.cfg, self.m, self.ctx = run, data, cfg, method, ctx
        self.sources = [provenance.input_ref(data.path, fingerprint=data.fingerprint), *sources]
        self.tracking = tracking or Tracking()
        self.log, self.evaluation, self.clean, self.warm = log, evaluation, clean, warm
        self.said: set[str] = set()  # the notices every lap would repeat, shown once per run
        self.monitor = Monitor(data, cfg.seed, cfg.eval.n_points)  # the label-free monitor of every lap
        self.spec = method.model_spec(data)
        self.base_meta = {
            "kind": self.spec.kind,
            "network": cfg.network,
            "cond_size": self.spec.cond_size,
            "residual": self.spec.residual,
            "channel": data.channel.spec(),
            "data": data.data_meta(),
            "schedule": SCHEDULE,
            "method": method.name,
            "method_config": method.config_record(cfg),
            "sample": sampling_record(cfg.sample),
            **method.checkpoint_meta(data),
        }

    def execute(self, laps: int) -> list[dict[str, Any]]:
        done = self.run_records()
        computed = False
        for lap in range(0, laps + 1):
            if lap in done and self._complete(lap):
                if self.ctx.is_main and not self.run.picture(lap).exists():
                    self._picture(lap)
                continue
            rec = self.lap0() if lap == 0 else self.lap(lap, laps)
            rec.update(self._monitor(lap))
            rec.update(self._evaluate(lap))
            if lap == laps:
                rec.update(self._posterior_quality(lap))
            if self.ctx.is_main:
                self._picture(lap)
                self.run.log(rec)
                self._track(lap, rec)
            self.ctx.barrier()
            done[lap] = rec
            computed = True
            self.log(describe(rec))
        records = [done[k] for k in sorted(done) if k <= laps]
        curves = self.run.root / "metrics.png"
        if self.ctx.is_main and (computed or not curves.exists()):  # a finished RUN is left untouched
            from diffem_cli.pipeline.report import save_metric_curves

            save_metric_curves(curves, records)
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
                sampler = warm_sampler(self.warm.meta, self.m, self.data, self.cfg)
                x, _ = posterior_samples(
                    sampler,
                    build_model(self.warm),
                    self.warm.aux,
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
                manifest = {
                    **self.recon_meta(0),
                    "init": start["init"],
                    "init_s": start["seconds"],
                    **({"init_shrinkage": start["shrinkage"]} if "shrinkage" in start else {}),
                    **residual_record(self.data, start["x"]),
                }
                save_recon(self.run.recon(0), start["x"], self.data.index, manifest, **self.data_rows())
                shrunk = f", covariance shrunk by {start['shrinkage']:g}" if start.get("shrinkage") else ""
                self.log(f"lap 0: {start['init']} start in {start['seconds']:.1f} s{shrunk}")
            self.ctx.barrier()
            manifest = manifest or self._recon_manifest(0)
        rec = {"event": "lap", "lap": 0, "init": manifest.get("init"), "init_s": manifest.get("init_s")}
        return {**rec, **{k: manifest[k] for k in ("observed_residual", "init_shrinkage") if k in manifest}}

    def lap(self, lap: int, laps: int) -> dict[str, Any]:
        rec: dict[str, Any] = {"event": "lap", "lap": lap}
        if not self.run.checkpoint(lap).exists():
            rec.update(self.mstep(lap, laps))
        else:  # trained before an interruption: its deterministic summary, not its timings
            rec.update(load_checkpoint(self.run.checkpoint(lap)).meta.get("train") or {})
        manifest = self._recon_manifest(lap)
        if manifest is None:
            manifest = self.estep(lap)
        keys = (
            "estep_s",
            "nfe",
            "estep_samples_per_s",
            "estep_forwards",
            "estep_vjps",
            "dps_scale",
            "observed_residual",
        )
        rec.update({k: manifest[k] for k in keys if k in manifest})
        return rec

    def _initial_model(self, lap: int, fine_tune: bool) -> nn.Module:
        if lap > 1 and fine_tune:
            prev = load_checkpoint(self.run.checkpoint(lap - 1))
            if int(prev.meta.get("cond_size", 0)) != self.spec.cond_size:
                raise DiffemError(
                    f"lap {lap - 1}'s checkpoint takes another conditioning than this run's settings give "
                    "(written before cond.gaussian_mean defaulted to auto?): continue this RUN with "
                    "--set cond.gaussian_mean=off"
                )
            return build_model(prev)
        if lap == 1 and self.warm is not None and self.warm.kind == self.spec.kind:
            if int(self.warm.meta.get("cond_size", 0)) == self.spec.cond_size:
                return build_model(self.warm)
        torch.manual_seed(self.cfg.seed)  # a fresh network starts the same everywhere
        net = build_network(self.cfg.network, self.data.shape, self.spec.cond_size)
        return zero_output(net) if self.spec.residual else net

    def mstep(self, lap: int, laps: int) -> dict[str, Any]:
        from diffem_cli.diffusion.train import train_denoiser

        prev, _ = load_recon(self.run.recon(lap - 1))
        t0 = time.perf_counter()
        step = self.m.mstep(self.data, prev, lap, laps, self.clean, self.cfg)
        tensors = step.tensors
        corrupt_s = time.perf_counter() - t0
        model = self._initial_model(lap, step.fine_tune).train()

        def on_epoch(info: dict[str, Any]) -> None:
            if self.ctx.is_main:
                self.run.log({"event": "epoch", "lap": lap, **info})
                step = (lap - 1) * self.cfg.train.epochs + info["epoch"]
                self.tracking.scalars({"train/loss": info["loss"], "train/lr": info["lr"]}, step)

        result = train_denoiser(
            model,
            tensors,
            self.cfg.train,
            loss=step.loss,
            seed=lap_seed(self.cfg.seed, lap, "mstep"),
            device=self.ctx.device,
            state_path=self.run.state,  # read by every rank, written by the main one
            tag={"lap": lap, "fingerprint": self.data.fingerprint, "method": self.m.name},
            label=f"lap {lap} M-step",
            on_epoch=on_epoch,
            refresh=step.refresh,
            refresh_every=self.cfg.em.recorrupt_every,
            log=self._train_log(f"lap {lap} M-step"),
            ctx=self.ctx,
        )
        rows = len(next(iter(tensors.values())))
        # every step trains on a full batch of min(batch_size, rows) examples (the loop drops the rest)
        examples = result.steps * min(self.cfg.train.batch_size, rows)
        summary = {"loss": result.last_loss, "steps": result.steps, "examples": examples}
        if self.ctx.is_main:
            save_checkpoint(
                self.run.checkpoint(lap),
                result.ema_model,
                {**self.base_meta, "lap": lap, "train": summary, **self.lineage(lap)},
                aux=step.aux,
            )
            self.run.state.unlink(missing_ok=True)
        self.ctx.barrier()
        return {
            **summary,
            "corrupt_s": corrupt_s,
            "mstep_s": time.perf_counter() - t0,
            "examples_per_s": examples / max(result.seconds, 1e-9),
        }

    def _train_log(self, label: str) -> Logger:
        """The M-step's logger: a warm-up notice that only the lap in its ``label`` tells apart from
        an earlier lap's is shown once per run."""

        def log(message: str) -> None:
            key = message.removeprefix(f"{label}: ")
            if "warm-up" in key and key in self.said:
                return
            self.said.add(key)
            self.log(message)

        return log

    def estep(self, lap: int) -> dict[str, Any]:
        ckpt = load_checkpoint(self.run.checkpoint(lap))
        model = build_model(ckpt)
        t0 = time.perf_counter()
        x, record = posterior_samples(
            self.m,
            model,
            ckpt.aux,
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
            **residual_record(self.data, x),
            **record,
        }
        if self.ctx.is_main:
            save_recon(self.run.recon(lap), x, self.data.index, manifest, **self.data_rows())
        self.ctx.barrier()
        return manifest

    def data_rows(self) -> dict[str, Any]:
        """The observations' file names and labels, which every lap's reconstructions carry (row
        ``i`` reconstructs observation ``i``)."""
        return {"rows": self.data.rows, "row_features": self.data.row_features}

    def lineage(self, lap: int) -> dict[str, Any]:
        """Lap ``lap``'s provenance entry: the observations' (and warm start's) chain, then this
        em-train step (method, lap, RUN, seed and configuration)."""
        done = provenance.step(
            "em-train",
            inputs=self.sources,
            channel=self.data.channel.spec(),
            params={"seed": self.cfg.seed, "config": self.cfg.to_dict()},
            method=self.m.name,
            laps=lap,
            run=self.run.root,
        )
        warm = provenance.chain_of(self.warm.meta if self.warm is not None else None)
        return {provenance.KEY: provenance.extend(provenance.chain_of(self.data.manifest), warm, then=done)}

    def recon_meta(self, lap: int) -> dict[str, Any]:
        """What a lap's reconstructions folder records of where it comes from."""
        return {
            **self.lineage(lap),
            "lap": lap,
            "method": self.m.name,
            "channel": self.data.channel.spec(),
            "source": self.data.manifest.get("source"),
            "observations_fingerprint": self.data.fingerprint,
            "data_shape": list(self.data.shape),
            "data_kind": self.data.kind,
            "value_range": self.data.value_range,
        }

    def _monitor(self, lap: int) -> dict[str, float]:
        if not self.ctx.is_main:  # the main rank alone logs the record
            return {}
        x, _ = load_recon(self.run.recon(lap))
        return self.monitor(x, lap)

    def _evaluate(self, lap: int) -> dict[str, float]:
        if self.evaluation is None or not self.ctx.is_main:  # the main rank alone logs the record
            return {}
        x, _ = load_recon(self.run.recon(lap))
        return evaluate_against(x, self.evaluation, self.data, self.cfg)

    def _posterior_quality(self, lap: int) -> dict[str, float]:
        # per-observation scores need clean rows paired with the observations: load_clean pairs
        # them for images; vector data are scored against a reference set (distributions)
        if self.evaluation is None or not self.ctx.is_main or lap < 1 or self.cfg.eval.posterior_n == 0:
            return {}
        if self.data.kind != "image":
            return {}
        from diffem_cli.pipeline.report import spread_file

        ckpt = load_checkpoint(self.run.checkpoint(lap))
        seed = lap_seed(self.cfg.seed, lap, "posterior-quality")
        model, keep = build_model(ckpt), spread_file(self.run.root, lap)
        return posterior_quality_record(
            self.m, model, ckpt.aux, self.data, self.evaluation, self.cfg, seed, self.ctx.device, keep=keep
        )

    def _track(self, lap: int, rec: dict[str, Any]) -> None:
        """A lap's numbers and picture to the trackers, at its last epoch: one step axis, epochs."""
        step = lap * self.cfg.train.epochs
        self.tracking.scalars({f"lap/{k}": v for k, v in rec.items() if k != "lap"}, step)
        self.tracking.image("samples", self.run.picture(lap), step)

    def _picture(self, lap: int) -> None:
        x, _ = load_recon(self.run.recon(lap))
        lap_picture(self.run.picture(lap), lap, x, self.data, self.evaluation)


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


def posterior_quality_record(
    method: Method,
    model: nn.Module,
    aux: dict[str, torch.Tensor],
    data: Observations,
    clean: torch.Tensor,
    cfg: RunConfig,
    seed: int,
    device: torch.device,
    keep: Path | None = None,
) -> dict[str, float]:
    """Posterior-quality metrics (:mod:`diffem_cli.metrics.posterior_quality`, keys ``post_*``) of
    ``eval.posterior_k`` samples of each of the first ``eval.posterior_n`` observations, drawn by
    :func:`posterior_samples` on the observations repeated K times (each copy its own noise).
    ``keep``: where to keep the first observations' spread for ``report.png``
    (:func:`~diffem_cli.pipeline.report.save_spread`)."""
    from diffem_cli.metrics.posterior_quality import posterior_quality

    n, k = min(cfg.eval.posterior_n, len(data)), cfg.eval.posterior_k
    first = {name: v[:n] for name, v in data.obs.items()}
    rows = copy.copy(data)
    rows.obs = {name: torch.cat([v] * k) for name, v in first.items()}
    rows.index = torch.cat([data.index[:n]] * k)
    t0 = time.perf_counter()
    x, _ = posterior_samples(
        method, model, aux, rows, cfg.sample, seed_parts=(seed,), device=device, label="posterior quality"
    )
    samples = x.reshape(k, n, *data.shape)
    if keep is not None:
        from diffem_cli.pipeline.report import save_spread

        save_spread(keep, samples, data.index[:n])
    values = posterior_quality(
        samples,
        clean[:n],
        exact=data.channel.exact_entries(first),
        channel=data.channel,
        obs=first,
        value_range=data.value_range if data.kind == "image" else None,
    )
    return {**{f"post_{name}": v for name, v in values.items()}, "post_s": time.perf_counter() - t0}


def describe(rec: dict[str, Any]) -> str:
    """One log line for a lap record."""
    parts = [f"lap {rec['lap']}"]
    for key in ("init_s", "mstep_s", "estep_s"):
        if rec.get(key) is not None:
            parts.append(f"{key[:-2]} {rec[key]:.1f} s")
    if "loss" in rec:
        parts.append(f"loss {rec['loss']:.4f}")
    if rec.get("obs_sw2") is not None:  # the label-free monitor, beside its floor
        parts.append(f"obs_sw2 {rec['obs_sw2']:.4g} (floor {rec['obs_sw2_floor']:.4g})")
    parts += [f"{k[5:]} {v:.4g}" for k, v in rec.items() if k.startswith("eval_") and k != "eval_s"]
    return " | ".join(parts)


def lap_picture(
    path: Path, lap: int, x: torch.Tensor, data: Observations, clean: torch.Tensor | None = None
) -> None:
    """A lap's picture: the clean data (when known) above the reconstructions, as pairwise
    scatter plots (vectors) or with the observations between them, missing entries hatched
    (images)."""
    from diffem_cli.pipeline import plots

    if data.kind == "vector":
        sets = {"clean": clean} if clean is not None else {}
        plots.save_pairwise_scatter({**sets, f"lap {lap}": x}, path)
        return
    k = min(16, len(x))
    rows, labels, held = [], [], []
    if clean is not None:
        rows.append(clean[:k])
        labels.append("clean")
        held.append(None)
    seen = plots.observation_row(data.channel, {n: v[:k] for n, v in data.obs.items()}, data.shape)
    if seen is not None:
        rows.append(seen[0])
        labels.append("observation")
        held.append(seen[1])
    rows.append(x[:k])
    labels.append(f"lap {lap}")
    held.append(None)
    value_range = tuple(data.value_range or (-1, 1))
    plots.save_image_grid(rows, path, labels=labels, value_range=value_range, observed=held)
