"""``export``: a checkpoint as a folder other tools load, and loading such folders back.

- Unconditional image model: a ``DDPMPipeline`` folder (``model_index.json``, ``unet/``,
  ``scheduler/``) that ``diffusers.DDPMPipeline.from_pretrained(folder)`` samples with no diffem
  import, plus a model card (README.md).
- Conditional image model: ``unet/`` and ``scheduler/`` in diffusers' format, plus
  ``diffem.json`` describing the conditioning (channel spec, conditioning size): ``reconstruct``
  accepts the folder as CKPT.
- Vector models: ``model.safetensors`` plus ``diffem.json``; diffem loads them back.

A checkpoint's auxiliary tensors (``aux.*``, e.g. EM-MMPS's Gaussian moments) go to
``diffem_aux.safetensors`` at the top of the folder, with the diffem metadata. ``diffem.json``
records the checksum of every weights and auxiliary file (``checksums``), verified by
:func:`load_export`, which rebuilds the checkpoint (weights, auxiliary tensors, metadata).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffem_cli.core.errors import DiffemError
from diffem_cli.diffusion.checkpoint import (
    AUX_PREFIX,
    FORMAT,
    Checkpoint,
    apply_umask,
    build_model,
    check_finite_weights,
    load_checkpoint,
    load_tensors,
    save_tensors,
    tensors_checksum,
)
from diffem_cli.diffusion.schedule import ddpm_scheduler
from diffem_cli.io.store import atomic_path

META_FILE = "diffem.json"
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
"""The weights file ``UNet2DModel.save_pretrained`` writes (safetensors, the default)."""
VECTOR_WEIGHTS = "model.safetensors"
AUX_FILE = "diffem_aux.safetensors"
"""A checkpoint's auxiliary tensors (full ``aux.`` names), present only when it has some."""
CHECKSUMS_KEY = "checksums"
"""``diffem.json`` entry: ``{relative file: tensors_checksum of its tensors}``."""


def load_model_source(path: Path) -> Checkpoint:
    """A checkpoint file, or a folder written by ``export`` (see :func:`load_export`), as a Checkpoint."""
    path = Path(path)
    return load_export(path) if path.is_dir() else load_checkpoint(path)


def load_export(folder: Path) -> Checkpoint:
    """Rebuild the checkpoint an ``export`` folder holds: weights, auxiliary tensors and metadata.

    Everything is read from the local folder (never from the Hugging Face Hub, whatever the path
    looks like) and only from safetensors files, so no code runs: a folder lacking its weights is
    a one-line error, and so is a file whose tensors differ from the checksum ``diffem.json``
    records (folders exported before checksums were recorded load unverified). The weights' shapes
    are checked against the network later, by ``build_model``, before any network is allocated.
    """
    path = Path(folder)
    meta_file = path / META_FILE
    if not meta_file.exists():
        raise DiffemError(f"{path} is a folder without {META_FILE}: not a diffem export")
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        meta = {}
    if (
        not isinstance(meta, dict)
        or meta.get("format") != FORMAT
        or {"kind", "network", "data"} - set(meta)
        or not isinstance(meta["network"], dict)
    ):
        raise DiffemError(f"{path} is not a model folder written by 'diffem export'")
    checksums = meta.pop(CHECKSUMS_KEY, None) or {}
    if meta["network"].get("type") == "unet":
        weights = path / "unet" / UNET_WEIGHTS
        if not weights.is_file():
            missing = "the folder is missing" if not (path / "unet").is_dir() else f"it lacks {UNET_WEIGHTS}"
            raise DiffemError(f"{path / 'unet'} cannot be loaded ({missing})")
        unet_tensors = _load_verified(path, f"unet/{UNET_WEIGHTS}", checksums)
        tensors = {f"unet.{k}": v for k, v in unet_tensors.items()}
    else:
        tensors = _load_verified(path, VECTOR_WEIGHTS, checksums)
    if (path / AUX_FILE).exists() or AUX_FILE in checksums:
        aux = _load_verified(path, AUX_FILE, checksums)
        foreign = sorted(k for k in aux if not k.startswith(AUX_PREFIX))
        if foreign:
            raise DiffemError(f"{path / AUX_FILE} holds a tensor {foreign[0]!r} that is not auxiliary")
        tensors.update(aux)
    check_finite_weights(tensors, path)
    return Checkpoint(tensors, meta)


def _load_verified(folder: Path, name: str, checksums: dict[str, str]) -> dict[str, Any]:
    """The tensors of ``folder/name``, checked against the checksum recorded for ``name`` if any."""
    tensors, _ = load_tensors(folder / name)
    expected = checksums.get(name)
    if expected is not None and tensors_checksum(tensors) != expected:
        raise DiffemError(f"{folder / name}: checksum mismatch with {META_FILE} (the file was modified)")
    return tensors


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def provenance(meta: dict[str, Any]) -> dict[str, Any]:
    """Where a model comes from: corruption channel, EM laps, data source and fingerprint, metrics.

    Taken from the checkpoint's metadata; an unconditional model trained on ``RUN/recon/lap_NNN``
    whose metadata lacks the channel or source gets them from that folder's manifest and from the
    RUN's ``run.json`` (and the observations manifest it names), when they are still on disk.
    """
    data = meta.get("data") or {}
    channel = meta.get("channel") or meta.get("trained_on_channel")
    laps = meta.get("laps", meta.get("lap"))
    source = data.get("source")
    observations = None
    trained_on = meta.get("trained_on")
    if trained_on and (channel is None or source is None or laps is None):
        folder = Path(trained_on)
        manifest = _read_json(folder / "diffem.json")
        channel = channel or manifest.get("channel")
        source = source or manifest.get("source")
        laps = laps if laps is not None else manifest.get("lap")
        run_info = _read_json(folder.parent.parent / "run.json") if folder.parent.name == "recon" else {}
        if run_info:
            channel = channel or run_info.get("channel")
            observations = run_info.get("data")
            if laps is None and folder.name.startswith("lap_") and folder.name[4:].isdigit():
                laps = int(folder.name[4:])
            if source is None and observations:
                source = _read_json(Path(observations) / "diffem.json").get("source")
    metrics = dict(meta.get("metrics") or {})
    train = meta.get("train") or {}
    if "loss" in train and "train_loss" not in metrics:
        metrics["train_loss"] = train["loss"]
    return {
        "channel": channel,
        "laps": laps,
        "source": source,
        "fingerprint": data.get("fingerprint"),
        "trained_on": trained_on,
        "observations": observations,
        "metrics": metrics,
    }


def _describe_source(source: Any) -> str:
    if isinstance(source, dict):
        spec = source.get("spec")
        n = source.get("n")
        return f"{spec} ({n} samples)" if spec and n is not None else json.dumps(source, sort_keys=True)
    return "not recorded" if source is None else str(source)


def _model_card(meta: dict[str, Any], aux: list[str]) -> str:
    data = meta.get("data", {})
    prov = provenance(meta)
    channel = prov["channel"] or {}
    image = meta["network"].get("type") == "unet"
    pipeline = image and meta["kind"] == "unconditional"
    task = "unconditional-image-generation" if pipeline else "posterior-sampling"
    tags = ["diffem", "diffusion", task, "images" if image else "vector-data"]
    header = ["---"]
    if image:
        header.append("library_name: diffusers")  # only image models are diffusers (UNet2DModel) folders
    header += [f"tags: [{', '.join(tags)}]", "---", ""]
    if channel:
        chan = f"{channel.get('name')} with parameters {json.dumps(channel.get('params'), sort_keys=True)}"
    else:
        chan = "not recorded"
    if meta["kind"] == "conditional":
        laps = f"lap {prov['laps']}" if prov["laps"] is not None else "not recorded"
    else:
        laps = (
            f"reconstructions of EM lap {prov['laps']}" if prov["laps"] is not None else "not from an EM lap"
        )
    lines = header + [
        f"# diffem {meta['kind']} diffusion model ({'images' if image else 'vectors'})",
        "",
        "Trained with diffem (DiffEM, arXiv:2510.12691) from corrupted observations only.",
        "",
        f"- data: shape {data.get('shape')}, kind {data.get('kind')}, value range {data.get('value_range')}",
        f"- data source: {_describe_source(prov['source'])}",
        f"- data fingerprint: {prov['fingerprint'] or 'not recorded'}",
        f"- corruption channel: {chan}",
        f"- EM laps: {laps}",
    ]
    if prov["trained_on"]:
        lines.append(f"- trained on: {prov['trained_on']}")
    if meta.get("method"):
        lines.append(f"- method: {meta['method']}")
    if aux:
        lines.append(f"- auxiliary tensors ({AUX_FILE}): {', '.join(sorted(aux))}")
    lines += [
        f"- network: {json.dumps(meta.get('network'), sort_keys=True)}",
        f"- schedule: {json.dumps(meta.get('schedule'), sort_keys=True)}",
        f"- metrics: {json.dumps(prov['metrics'], sort_keys=True) if prov['metrics'] else 'none recorded'}",
        "",
    ]
    if pipeline:
        lines += [
            "```python",
            "from diffusers import DDPMPipeline",
            "pipe = DDPMPipeline.from_pretrained('.')",
            "images = pipe(batch_size=16, num_inference_steps=50).images",
            "```",
            "",
            "The scheduler uses trailing timestep spacing, so few-step sampling starts at t = 999.",
            "",
        ]
    else:
        lines += ["Load and sample with diffem: `diffem reconstruct`/`diffem sample` accept this folder.", ""]
    return "\n".join(lines)


def export_checkpoint(ckpt_path: Path, out: Path, *, force: bool = False) -> dict[str, Any]:
    """Export a diffem checkpoint to ``out`` (see module docstring for the layouts)."""
    ckpt = load_checkpoint(ckpt_path)
    info = ckpt.info
    meta = dict(ckpt.meta)
    model = build_model(ckpt)
    with atomic_path(out, force) as target:
        target.mkdir()
        if info.network["type"] == "unet":
            unet = model.unet
            value_range = info.data.range_list() or [-1, 1]
            # trailing spacing: DDPMPipeline(num_inference_steps=N) starts from t = 999, not 1000 - 1000/N
            scheduler = ddpm_scheduler(float(max(abs(v) for v in value_range)), timestep_spacing="trailing")
            if info.kind == "unconditional":
                from diffusers import DDPMPipeline

                DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(target))
            else:
                unet.save_pretrained(str(target / "unet"))
                scheduler.save_pretrained(str(target / "scheduler"))
            files = [f"unet/{UNET_WEIGHTS}"]
        else:
            from safetensors.torch import save_file

            save_file(
                {k: v.contiguous() for k, v in model.state_dict().items()}, str(target / VECTOR_WEIGHTS)
            )
            files = [VECTOR_WEIGHTS]
        aux = {k: v for k, v in ckpt.tensors.items() if k.startswith(AUX_PREFIX)}
        if aux:
            save_tensors(target / AUX_FILE, aux, meta)
            files.append(AUX_FILE)
        # checksums of the tensors as written, read back: what load_export verifies
        checksums = {name: tensors_checksum(load_tensors(target / name)[0]) for name in files}
        meta["provenance"] = provenance(meta)
        written = {**meta, CHECKSUMS_KEY: checksums}
        (target / META_FILE).write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")
        (target / "README.md").write_text(_model_card(meta, list(ckpt.aux)))
        apply_umask(target)  # safetensors writes 0600; exported models are meant to be shared
    return meta
