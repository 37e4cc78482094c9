"""The DiffEM loop: orchestration of laps (start, M-steps, E-steps), resumable from disk.

A RUN folder holds ``config.yaml`` (the effective configuration), ``run.json`` (what data it
belongs to), ``recon/lap_NNN/`` (the reconstructions of every lap, ``datasets`` folders),
``checkpoints/lap_NNN.safetensors`` (EMA weights of the conditional model, NNN >= 1),
``metrics.jsonl``, ``samples/lap_NNN.png`` and, while a lap trains, ``state/mstep.safetensors``.
A lap is complete when both its checkpoint and its reconstructions exist; a rerun skips complete
laps, redoes a missing E-step from its checkpoint, and resumes an M-step from its last epoch.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from diffem_channels import Channel, sample_seeds
from diffem_cli.checkpoint import build_model, load_checkpoint, save_checkpoint
from diffem_cli.config import RunConfig, config_from_dict
from diffem_cli.diffusion import SCHEDULE
from diffem_cli.errors import DiffemError
from diffem_cli.estep import clip_range_for, posterior_samples
from diffem_cli.nets import build_network
from diffem_cli.store import columns, fingerprint_dataset, read_dataset, write_dataset, write_text_atomic
from diffem_cli.train import train_denoiser

Logger = Callable[[str], None]


def pick_device(name: str | None = None) -> torch.device:
    """``cuda`` when available unless ``name`` forces one (``cpu``, ``cuda``, ``cuda:1``)."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DiffemError(f"--device {name}: CUDA is not available on this machine")
    try:
        return torch.device(name)
    except RuntimeError:
        raise DiffemError(f"unknown device {name!r} (use cpu, cuda or cuda:N)") from None


class Observations:
    """An observations folder loaded in memory: its channel, data shape and tensors."""

    def __init__(self, path: Path):
        from diffem_cli.registry import channel_from_spec

        ds, manifest = read_dataset(path)
        if manifest.get("kind") != "observations" or "channel" not in manifest:
            raise DiffemError(f"{path} is not an observations folder written by 'diffem corrupt'")
        self.path = Path(path)
        self.manifest = manifest
        self.channel: Channel = channel_from_spec(manifest["channel"])
        self.shape = tuple(int(s) for s in manifest["data_shape"])
        self.kind = manifest.get("data_kind", "vector" if len(self.shape) == 1 else "image")
        self.value_range = manifest.get("value_range")
        names = [c for c in ds.column_names if c != "index"]
        self.obs = columns(ds, names)
        self.index = columns(ds, ["index"])["index"] if "index" in ds.column_names else torch.arange(len(ds))
        self.fingerprint = fingerprint_dataset(path)

    def __len__(self) -> int:
        return len(self.index)

    def data_meta(self) -> dict[str, Any]:
        return {
            "shape": list(self.shape),
            "kind": self.kind,
            "value_range": self.value_range,
            "fingerprint": self.fingerprint,
            "source": self.manifest.get("source"),
        }

    def batches(self, size: int = 4096) -> Callable[[], Any]:
        def gen():
            for s in range(0, len(self), size):
                yield {k: v[s : s + size] for k, v in self.obs.items()}

        return gen


def _lap_name(lap: int) -> str:
    return f"lap_{lap:03d}"


class Run:
    """Paths and bookkeeping of one RUN folder."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.ckpt_dir = self.root / "checkpoints"
        self.recon_dir = self.root / "recon"
        self.samples_dir = self.root / "samples"
        self.state = self.root / "state" / "mstep.safetensors"
        self.metrics = self.root / "metrics.jsonl"

    def checkpoint(self, lap: int) -> Path:
        return self.ckpt_dir / f"{_lap_name(lap)}.safetensors"

    def recon(self, lap: int) -> Path:
        return self.recon_dir / _lap_name(lap)

    def log(self, record: dict[str, Any]) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def records(self) -> list[dict[str, Any]]:
        if not self.metrics.exists():
            return []
        out = []
        for line in self.metrics.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def prepare(self, cfg: RunConfig, data: Observations, force: bool) -> None:
        """Create the RUN folder, or check that an existing one belongs to this data and config."""
        if not self.root.parent.exists():
            raise DiffemError(f"folder {self.root.parent} does not exist")
        info = {
            "data": str(data.path.resolve()),
            "fingerprint": data.fingerprint,
            "channel": data.channel.spec(),
        }
        cfg_file, info_file = self.root / "config.yaml", self.root / "run.json"
        if self.root.exists() and any(self.root.iterdir()) and not force:
            if not cfg_file.exists() or not info_file.exists():
                raise DiffemError(f"{self.root} exists and is not a diffem run (use --force or another RUN)")
            old = json.loads(info_file.read_text())
            if old.get("fingerprint") != data.fingerprint:
                raise DiffemError(
                    f"{self.root} was trained on other observations ({old.get('data')}); "
                    "use another RUN or --force"
                )
            old_cfg = config_from_dict(yaml.safe_load(cfg_file.read_text()) or {}).to_dict()
            new_cfg = cfg.to_dict()
            old_cfg["em"].pop("laps"), new_cfg["em"].pop("laps")
            diff = _first_difference(old_cfg, new_cfg)
            if diff:
                raise DiffemError(
                    f"{self.root} holds another configuration ({diff}); "
                    "use another RUN or --force to start over"
                )
        elif self.root.exists() and force:
            import shutil

            for child in ("checkpoints", "recon", "samples", "state", "metrics.jsonl"):
                p = self.root / child
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
        for d in (self.root, self.ckpt_dir, self.recon_dir, self.samples_dir, self.state.parent):
            d.mkdir(parents=True, exist_ok=True)
        for path, text in (
            (cfg_file, yaml.safe_dump(cfg.to_dict(), sort_keys=False)),
            (info_file, json.dumps(info, indent=2) + "\n"),
        ):
            if not path.exists() or path.read_text() != text:  # a finished run re-run changes no file
                write_text_atomic(path, text)


def _first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = _first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
            if d:
                return d
        return None
    return None if a == b else f"{prefix.rstrip('.')}: {a!r} in RUN, {b!r} now"


def save_recon(
    path: Path,
    x: torch.Tensor,
    index: torch.Tensor,
    meta: dict[str, Any],
    force: bool = True,
    extra: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write reconstructions (columns ``x``, ``index`` and any ``extra``) as a datasets folder."""
    chunk = 8192
    cols = {"x": x, "index": index, **(extra or {})}

    def chunks():
        for s in range(0, len(x), chunk):
            yield {k: v[s : s + chunk] for k, v in cols.items()}

    write_dataset(path, chunks(), {"kind": "reconstructions", **meta}, force=force)


def load_recon(path: Path) -> tuple[torch.Tensor, dict[str, Any]]:
    """Read the ``x`` column of a reconstructions (or clean data) folder."""
    ds, manifest = read_dataset(path)
    return columns(ds, ["x"])["x"], manifest


def initial_reconstructions(data: Observations, cfg: RunConfig, run: Run, log: Logger) -> dict[str, Any]:
    """Lap 0: exact Gaussian-posterior samples for linear channels, else the channel's start."""
    init = cfg.em.init
    if init == "auto":
        init = "gaussian" if data.channel.linear else "observation"
    t0 = time.perf_counter()
    if init == "gaussian":
        if not data.channel.linear:
            raise DiffemError(
                f"em.init=gaussian needs a linear channel; {data.channel.name!r} has no linear form"
            )
        from diffem_cli.gaussian import fit_gaussian, gaussian_start

        prior = fit_gaussian(
            data.channel,
            data.batches(),
            data.shape,
            iters=cfg.em.gaussian_iters,
            rank=cfg.em.gaussian_rank,
            generator=torch.Generator().manual_seed(cfg.seed),
        )
        x = torch.cat(list(gaussian_start(prior, data.channel, data.batches(), data.shape, cfg.seed)))
        from safetensors.torch import save_file

        save_file(
            {k: v.contiguous() for k, v in prior.to_tensors().items()}, str(run.root / "gaussian.safetensors")
        )
    elif init == "observation":
        x = torch.cat([data.channel.start(b, data.shape) for b in data.batches()()])
    else:
        raise DiffemError(f"unknown em.init {init!r} (auto, gaussian, observation)")
    seconds = time.perf_counter() - t0
    log(f"lap 0: {init} start in {seconds:.1f} s")
    return {"x": x.float(), "init": init, "seconds": seconds}


def em_train(
    data_path: Path,
    run_path: Path,
    cfg: RunConfig,
    *,
    laps: int | None = None,
    warm_start: Path | None = None,
    eval_clean: Path | None = None,
    device: str | None = None,
    force: bool = False,
    log: Logger = print,
) -> list[dict[str, Any]]:
    """Run (or resume) DiffEM for ``laps`` laps; returns the per-lap records."""
    laps = cfg.em.laps if laps is None else laps
    if laps < 1:
        raise DiffemError(f"--laps must be >= 1, got {laps}")
    cfg = copy.deepcopy(cfg)
    cfg.em.laps = laps
    dev = pick_device(device)
    data = Observations(data_path)
    data.channel.check_data(data.shape)
    clean = _load_clean(eval_clean, data) if eval_clean else None
    warm = load_checkpoint(warm_start) if warm_start else None
    if warm is not None:
        _check_compatible(warm.meta, data, warm_start)
        if warm.meta["network"] != cfg.network:  # fine-tuning keeps the warm start's architecture
            log(f"network: the warm start's {json.dumps(warm.meta['network'])}")
            cfg.network = dict(warm.meta["network"])
    run = Run(run_path)
    run.prepare(cfg, data, force)
    cond_size = data.channel.cond_size(data.shape)
    clip = clip_range_for(data.kind, data.value_range)
    base_meta = {
        "kind": "conditional",
        "network": cfg.network,
        "cond_size": cond_size,
        "channel": data.channel.spec(),
        "data": data.data_meta(),
        "schedule": SCHEDULE,
    }
    done = {r["lap"]: r for r in run.records() if r.get("event") == "lap"}

    # Lap 0
    if not (run.recon(0) / "diffem.json").exists():
        if warm is not None:
            t0 = time.perf_counter()
            x = posterior_samples(
                build_model(warm),
                data.channel,
                data.obs,
                data.shape,
                cfg.sample,
                seed=cfg.seed,
                tag=0,
                device=dev,
                clip_range=clip,
                label="warm start",
            )
            start = {"x": x, "init": "warm-start", "seconds": time.perf_counter() - t0}
        else:
            start = initial_reconstructions(data, cfg, run, log)
        save_recon(run.recon(0), start["x"], data.index, {"lap": 0, "init": start["init"]})
        rec = {"event": "lap", "lap": 0, "init": start["init"], "init_s": start["seconds"]}
        rec.update(_evaluate(start["x"], clean, data, cfg))
        _lap_picture(run, 0, start["x"], data)
        run.log(rec)
        done[0] = rec
        log(_describe(rec))

    for lap in range(1, laps + 1):
        if run.checkpoint(lap).exists() and (run.recon(lap) / "diffem.json").exists():
            continue
        prev, _ = load_recon(run.recon(lap - 1))
        rec: dict[str, Any] = {"event": "lap", "lap": lap}
        if not run.checkpoint(lap).exists():
            if lap > 1:
                model = build_model(load_checkpoint(run.checkpoint(lap - 1))).train()
            elif warm is not None:
                model = build_model(warm).train()
            else:
                model = _seeded_network(cfg, data.shape, cond_size)
            t0 = time.perf_counter()
            from diffem_cli.corrupt import recorrupt

            fresh = recorrupt(data.channel, prev, cfg.seed, lap, data.index)
            cond = data.channel.condition(fresh, data.shape)
            rec["corrupt_s"] = time.perf_counter() - t0

            def on_epoch(info: dict[str, Any], lap: int = lap) -> None:
                run.log({"event": "epoch", "lap": lap, **info})

            def refresh(r: int, lap: int = lap, prev: torch.Tensor = prev) -> torch.Tensor:
                more = data.channel.corrupt(prev, sample_seeds(cfg.seed, data.index, lap, r))
                return data.channel.condition(more, data.shape)

            result = train_denoiser(
                model,
                prev,
                cond,
                cfg.train,
                seed=cfg.seed + lap,
                device=dev,
                state_path=run.state,
                tag={"lap": lap, "fingerprint": data.fingerprint},
                label=f"lap {lap} M-step",
                on_epoch=on_epoch,
                refresh=refresh,
                refresh_every=cfg.em.recorrupt_every,
            )
            save_checkpoint(run.checkpoint(lap), result.ema_model, {**base_meta, "lap": lap})
            run.state.unlink(missing_ok=True)
            rec.update(
                {
                    "mstep_s": time.perf_counter() - t0,
                    "loss": result.last_loss,
                    "steps": result.steps,
                    "examples_per_s": result.steps * min(cfg.train.batch_size, len(prev)) / result.seconds,
                }
            )
        model = build_model(load_checkpoint(run.checkpoint(lap)))
        t0 = time.perf_counter()
        x = posterior_samples(
            model,
            data.channel,
            data.obs,
            data.shape,
            cfg.sample,
            seed=cfg.seed,
            tag=lap,
            device=dev,
            clip_range=clip,
            label=f"lap {lap} E-step",
        )
        rec["estep_s"] = time.perf_counter() - t0
        rec["nfe"] = cfg.sample.steps
        rec["estep_samples_per_s"] = len(x) / rec["estep_s"]
        save_recon(
            run.recon(lap),
            x,
            data.index,
            {"lap": lap, "sampler": cfg.sample.sampler, "steps": cfg.sample.steps},
        )
        rec.update(_evaluate(x, clean, data, cfg))
        _lap_picture(run, lap, x, data)
        run.log(rec)
        done[lap] = rec
        log(_describe(rec))
    if clean is not None:
        _curves(run, [done[k] for k in sorted(done) if k <= laps])
    return [done[k] for k in sorted(done) if k <= laps]


def _seeded_network(cfg: RunConfig, shape: tuple[int, ...], cond_size: int) -> torch.nn.Module:
    torch.manual_seed(cfg.seed)
    return build_network(cfg.network, shape, cond_size)


def _check_compatible(meta: dict[str, Any], data: Observations, path: Path | None) -> None:
    """A conditional checkpoint must come from the same channel and data shape as the observations."""
    if meta["kind"] != "conditional":
        raise DiffemError(
            f"{path} is an unconditional model; warm starts and reconstruct need a conditional one"
        )
    if tuple(meta["data"]["shape"]) != data.shape:
        raise DiffemError(
            f"{path} was trained on data of shape {tuple(meta['data']['shape'])}, "
            f"these observations have shape {data.shape}"
        )
    theirs, ours = meta.get("channel", {}), data.channel.spec()
    if theirs.get("name") != ours["name"]:
        raise DiffemError(
            f"{path} was trained for channel {theirs.get('name')!r}, "
            f"these observations come from {ours['name']!r}"
        )
    if data.channel.cond_size(data.shape) != int(meta.get("cond_size", -1)):
        raise DiffemError(f"{path} expects another conditioning size than channel {ours['name']!r} gives")


def _load_clean(path: Path, data: Observations) -> torch.Tensor:
    x, _ = load_recon(path)
    if tuple(x.shape[1:]) != data.shape:
        raise DiffemError(
            f"--eval-clean {path} holds data of shape {tuple(x.shape[1:])}, observations are {data.shape}"
        )
    return x


def _evaluate(
    x: torch.Tensor, clean: torch.Tensor | None, data: Observations, cfg: RunConfig
) -> dict[str, float]:
    if clean is None:
        return {}
    from diffem_cli.evaluate import evaluate_tensors

    t0 = time.perf_counter()
    kwargs: dict[str, Any] = {}
    if data.kind == "image":
        kwargs = {"sample_index": data.index, "reference_index": data.index, "value_range": data.value_range}
    metrics = evaluate_tensors(x, clean, cfg.eval.metrics or None, n_points=cfg.eval.n_points, **kwargs)
    return {**{f"eval_{k}": v for k, v in metrics.items()}, "eval_s": time.perf_counter() - t0}


def _describe(rec: dict[str, Any]) -> str:
    parts = [f"lap {rec['lap']}"]
    for key in ("init_s", "mstep_s", "estep_s"):
        if key in rec:
            parts.append(f"{key[:-2]} {rec[key]:.1f} s")
    if "loss" in rec:
        parts.append(f"loss {rec['loss']:.4f}")
    parts += [f"{k[5:]} {v:.4g}" for k, v in rec.items() if k.startswith("eval_") and k != "eval_s"]
    return " | ".join(parts)


def _lap_picture(run: Run, lap: int, x: torch.Tensor, data: Observations) -> None:
    from diffem_cli import plots

    path = run.samples_dir / f"{_lap_name(lap)}.png"
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


def _curves(run: Run, records: list[dict[str, Any]]) -> None:
    from diffem_cli.report import save_metric_curves

    save_metric_curves(run.root / "metrics.png", records)
