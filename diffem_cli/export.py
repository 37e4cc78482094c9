"""``export``: a checkpoint as a folder other tools load, and loading such folders back.

- Unconditional image model: a ``DDPMPipeline`` folder (``model_index.json``, ``unet/``,
  ``scheduler/``) that ``diffusers.DDPMPipeline.from_pretrained(folder)`` samples with no diffem
  import, plus a model card (README.md).
- Conditional image model: ``unet/`` and ``scheduler/`` in diffusers' format, plus
  ``diffem.json`` describing the conditioning (channel spec, conditioning size): ``reconstruct``
  accepts the folder as CKPT.
- Vector models: ``model.safetensors`` plus ``diffem.json``; diffem loads them back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffem_cli.checkpoint import FORMAT, Checkpoint, build_model, load_checkpoint, load_tensors
from diffem_cli.diffusion import ddpm_scheduler
from diffem_cli.errors import DiffemError
from diffem_cli.store import atomic_path

META_FILE = "diffem.json"


def load_model_source(path: Path) -> Checkpoint:
    """A checkpoint file, or a folder written by ``export``, as a Checkpoint."""
    path = Path(path)
    if not path.is_dir():
        return load_checkpoint(path)
    meta_file = path / META_FILE
    if not meta_file.exists():
        raise DiffemError(f"{path} is a folder without {META_FILE}: not a diffem export")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError:
        meta = {}
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or {"kind", "network", "data"} - set(meta):
        raise DiffemError(f"{path} is not a model folder written by 'diffem export'")
    if meta["network"].get("type") == "unet":
        from diffusers import UNet2DModel

        try:
            unet = UNet2DModel.from_pretrained(str(path / "unet"))
        except (OSError, ValueError) as e:
            raise DiffemError(f"{path / 'unet'} cannot be loaded ({str(e).splitlines()[0]})") from None
        tensors = {f"unet.{k}": v for k, v in unet.state_dict().items()}
    else:
        tensors, _ = load_tensors(path / "model.safetensors")
    return Checkpoint(tensors, meta)


def _model_card(meta: dict[str, Any]) -> str:
    data = meta.get("data", {})
    channel = meta.get("channel") or meta.get("trained_on_channel") or {}
    metrics = meta.get("metrics") or {}
    lines = [
        "---",
        "library_name: diffusers",
        "tags: [diffem, diffusion, unconditional-image-generation]"
        if meta["kind"] == "unconditional"
        else "tags: [diffem, diffusion, posterior-sampling]",
        "---",
        "",
        f"# diffem {meta['kind']} diffusion model",
        "",
        "Trained with diffem (DiffEM, arXiv:2510.12691) from corrupted observations only.",
        "",
        f"- data: shape {data.get('shape')}, kind {data.get('kind')}, value range {data.get('value_range')}, "
        f"source {json.dumps(data.get('source'))}",
        f"- corruption channel: {channel.get('name')} with parameters {json.dumps(channel.get('params'))}",
        f"- EM laps: {meta.get('laps', meta.get('lap'))}",
        f"- network: {json.dumps(meta.get('network'))}",
        f"- schedule: {json.dumps(meta.get('schedule'))}",
        f"- metrics: {json.dumps(metrics) if metrics else 'none recorded'}",
        "",
    ]
    if meta["kind"] == "unconditional" and meta["network"]["type"] == "unet":
        lines += [
            "```python",
            "from diffusers import DDPMPipeline",
            "pipe = DDPMPipeline.from_pretrained('.')",
            "images = pipe(batch_size=16, num_inference_steps=1000).images",
            "```",
            "",
        ]
    else:
        lines += ["Load and sample with diffem: `diffem reconstruct`/`diffem sample` accept this folder.", ""]
    return "\n".join(lines)


def export_checkpoint(ckpt_path: Path, out: Path, *, force: bool = False) -> dict[str, Any]:
    """Export a diffem checkpoint to ``out`` (see module docstring for the layouts)."""
    ckpt = load_checkpoint(ckpt_path)
    meta = dict(ckpt.meta)
    model = build_model(ckpt)
    with atomic_path(out, force) as target:
        target.mkdir()
        if meta["network"]["type"] == "unet":
            unet = model.unet
            value_range = meta["data"].get("value_range") or [-1, 1]
            scheduler = ddpm_scheduler(float(max(abs(v) for v in value_range)))
            if meta["kind"] == "unconditional":
                from diffusers import DDPMPipeline

                DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(target))
            else:
                unet.save_pretrained(str(target / "unet"))
                scheduler.save_pretrained(str(target / "scheduler"))
        else:
            from safetensors.torch import save_file

            save_file(
                {k: v.contiguous() for k, v in model.state_dict().items()}, str(target / "model.safetensors")
            )
        (target / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        (target / "README.md").write_text(_model_card(meta))
    return meta
