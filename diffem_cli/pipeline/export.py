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
records the checksum of every weights and auxiliary file (``checksums``) and its own (``checksum``,
over its other entries, so over the files too), verified by :func:`load_export`, which rebuilds the
checkpoint (weights, auxiliary tensors, metadata): like a checkpoint, an export whose files or
metadata were modified is refused, and one without a checksum is used only when trusted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffem_cli.core.errors import DiffemError
from diffem_cli.diffusion.checkpoint import (
    AUX_PREFIX,
    CHECKSUM_KEY,
    FORMAT,
    Checkpoint,
    apply_umask,
    build_model,
    check_finite_weights,
    load_checkpoint,
    load_tensors,
    refuse_unverified,
    save_tensors,
    tensors_checksum,
)
from diffem_cli.diffusion.schedule import ddpm_scheduler
from diffem_cli.io.provenance import KEY as PROVENANCE_KEY
from diffem_cli.io.provenance import chain_of, extend, input_ref, last, step, step_text
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
    a one-line error, and so are an edited ``diffem.json`` and a file whose tensors differ from the
    checksum it records. A folder without a checksum (exported by an older diffem, or with the key
    removed) is refused unless the user trusts it (``DIFFEM_TRUST_UNVERIFIED=1``). The weights'
    shapes are checked against the network later, by ``build_model``, before any network is
    allocated.
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
    expected = meta.pop(CHECKSUM_KEY, None)
    if expected is None:
        refuse_unverified(path)
    elif _meta_checksum(meta) != expected:
        raise DiffemError(f"{meta_file}: checksum mismatch (the file was modified or corrupted)")
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
    """The tensors of ``folder/name``, checked against the checksum recorded for ``name`` (a
    trusted export without checksums records none)."""
    tensors, _ = load_tensors(folder / name)
    expected = checksums.get(name)
    if checksums and expected is None:
        raise DiffemError(f"{folder / name} has no checksum in {META_FILE} (not a file the export wrote)")
    if expected is not None and tensors_checksum(tensors) != expected:
        raise DiffemError(f"{folder / name}: checksum mismatch with {META_FILE} (the file was modified)")
    return tensors


def _meta_checksum(entries: dict[str, Any]) -> str:
    """The checksum of ``diffem.json``'s entries (the files' ``checksums`` among them), computed
    as a checkpoint's metadata is (:func:`tensors_checksum`), over no tensors."""
    return tensors_checksum({}, {k: json.dumps(v, sort_keys=True) for k, v in entries.items()})


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def origin(meta: dict[str, Any]) -> dict[str, Any]:
    """Where a model comes from: source, corruption channel, EM method, laps and RUN, fingerprint,
    metrics, and the provenance chain.

    Read from the chain the metadata records (:mod:`diffem_cli.io.provenance`); a checkpoint written
    before chains were recorded falls back on its own entries, and an unconditional model trained on
    ``RUN/recon/lap_NNN`` on that folder's manifest and the RUN's ``run.json`` (and the observations
    manifest it names), when they are still on disk.
    """
    chain = chain_of(meta)
    data = meta.get("data") or {}
    em = last(chain, "em-train")
    corrupt = last(chain, "corrupt")
    channel = next((s["channel"] for s in reversed(chain) if s.get("channel")), None)
    channel = channel or meta.get("channel") or meta.get("trained_on_channel")
    laps = em["laps"] if em else meta.get("laps", meta.get("lap"))
    source = ((corrupt or {}).get("params") or {}).get("source") or data.get("source")
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
    own_method = meta.get("method") if meta.get("kind") == "conditional" else None
    metrics = dict(meta.get("metrics") or {})
    train = meta.get("train") or {}
    if "loss" in train and "train_loss" not in metrics:
        metrics["train_loss"] = train["loss"]
    return {
        "channel": channel,
        "laps": laps,
        "em_method": em["method"] if em else own_method,
        "run": em["run"] if em else None,
        "source": source,
        "fingerprint": data.get("fingerprint"),
        "trained_on": trained_on,
        "observations": observations,
        "metrics": metrics,
        "chain": chain,
    }


def _describe_source(source: Any) -> str:
    if isinstance(source, dict):
        spec = source.get("spec")
        n = source.get("n")
        return f"{spec} ({n} samples)" if spec and n is not None else json.dumps(source, sort_keys=True)
    return "not recorded" if source is None else str(source)


def hub_dataset(source: Any) -> str | None:
    """The Hugging Face Hub dataset a source spec ``hf:NAME[:SPLIT]`` names, else None."""
    spec = source.get("spec") if isinstance(source, dict) else source
    if not isinstance(spec, str) or not spec.startswith("hf:"):
        return None
    return spec[3:].split(":")[0] or None


def _front_matter(meta: dict[str, Any], prov: dict[str, Any], license_id: str) -> dict[str, Any]:
    """The card's YAML front matter (Hub metadata).

    Image models are diffusers folders (``library_name: diffusers``): an unconditional one is a
    ``DDPMPipeline`` (``unconditional-image-generation``), a conditional one restores an image from
    its observation (``image-to-image``). Vector models get neither: diffusers cannot load them and
    no Hub task describes sampling low-dimensional vectors, so a tag would mislead.
    """
    image = meta["network"].get("type") == "unet"
    unconditional = meta["kind"] == "unconditional"
    front: dict[str, Any] = {"license": license_id}
    if image:
        front["library_name"] = "diffusers"
        front["pipeline_tag"] = "unconditional-image-generation" if unconditional else "image-to-image"
    task = "unconditional-generation" if unconditional else "posterior-sampling"
    front["tags"] = ["diffem", "diffusion", task, "images" if image else "vector-data"]
    dataset = hub_dataset(prov["source"])
    if dataset:
        front["datasets"] = [dataset]
    return front


def _model_card(meta: dict[str, Any], aux: list[str], license_id: str, repo: str | None) -> str:
    import yaml

    data = meta.get("data", {})
    prov = origin(meta)
    channel = prov["channel"] or {}
    image = meta["network"].get("type") == "unet"
    unconditional = meta["kind"] == "unconditional"
    what = "images" if image else "vectors"
    shape = "x".join(str(s) for s in data.get("shape") or [])
    if channel:
        chan = f"{channel.get('name')} with parameters {json.dumps(channel.get('params'), sort_keys=True)}"
    else:
        chan = "not recorded"
    if meta["kind"] == "conditional":
        laps = f"lap {prov['laps']}" if prov["laps"] is not None else "not recorded"
        summary = (
            f"A conditional diffusion model that draws clean {what} of shape {shape} given their "
            f"observation through the corruption channel {channel.get('name', '(not recorded)')}: "
            "posterior samples, for restoring corrupted data."
        )
    else:
        laps = (
            f"reconstructions of EM lap {prov['laps']}" if prov["laps"] is not None else "not from an EM lap"
        )
        summary = f"An unconditional diffusion model of clean {what} of shape {shape}."
    front = yaml.safe_dump(_front_matter(meta, prov, license_id), sort_keys=False, default_flow_style=None)
    lines = [
        "---",
        front.rstrip("\n"),
        "---",
        "",
        f"# diffem {meta['kind']} diffusion model ({what})",
        "",
        summary,
        "It was learnt with diffem (DiffEM, arXiv:2510.12691) from corrupted observations only: "
        "no clean sample was used in training.",
        "",
    ]
    if license_id == "other":
        lines += [
            "**License: not set.** `other` is a placeholder: whoever publishes this model must choose its "
            "license (`diffem export --license ID`, or edit `license` above), and the license of the "
            "training data applies.",
            "",
        ]
    lines += [
        "## How it was made",
        "",
        f"- data: shape {data.get('shape')}, kind {data.get('kind')}, value range {data.get('value_range')}",
        f"- data source: {_describe_source(prov['source'])}",
        f"- data fingerprint: {prov['fingerprint'] or 'not recorded'}",
        f"- corruption channel: {chan}",
        f"- EM method: {prov['em_method'] or 'not recorded'}",
        f"- EM laps: {laps}",
    ]
    if prov["run"]:
        lines.append(f"- EM RUN: {Path(prov['run']).name}")
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
        "## Provenance",
        "",
    ]
    if prov["chain"]:
        lines += [f"{i}. {step_text(s)}" for i, s in enumerate(prov["chain"], 1)]
        lines += ["", f"Every step, with its inputs' checksums, is in `{META_FILE}` under `provenance`.", ""]
    else:
        lines += ["Not recorded (the checkpoint predates provenance records).", ""]
    where = repr(repo) if repo else "'PATH/TO/THIS/FOLDER'"
    lines += ["## How to use it", ""]
    if image and unconditional:
        lines += [
            "```python",
            "from diffusers import DDPMPipeline",
            f"pipe = DDPMPipeline.from_pretrained({where})",
            "images = pipe(batch_size=16, num_inference_steps=50).images",
            "```",
            "",
            "The scheduler uses trailing timestep spacing, so few-step sampling starts at t = 999. "
            "With diffem: `diffem sample THIS_FOLDER OUT -n 16`.",
            "",
        ]
    elif unconditional:
        lines += ["Sample with diffem (diffusers cannot load it): `diffem sample THIS_FOLDER OUT`.", ""]
    else:
        lines += [
            "Load and sample with diffem: `diffem reconstruct THIS_FOLDER OBSERVATIONS OUT` draws a clean "
            "sample for each observation of the same channel and data shape"
            + (" (the `unet/` and `scheduler/` folders are in diffusers' format)." if image else "."),
            "",
        ]
    lines += [
        "## Limits",
        "",
        "- It knows the data only through the corruption above: what the channel hides from every "
        "observation cannot be learnt, and errors in the channel's parameters bias the model.",
        "- Its quality depends on the number of EM laps, the number of observations and the network's "
        "size; the metrics above are those its run recorded, not a benchmark.",
        "- It models the data it was trained on (shape, value range, source); it is not a general-purpose "
        "generator, and inherits that data's biases and license.",
    ]
    if not unconditional:
        lines.append("- It serves observations of exactly its channel and data shape; diffem refuses others.")
    return "\n".join(lines) + "\n"


def export_checkpoint(
    ckpt_path: Path, out: Path, *, force: bool = False, license_id: str = "other", repo: str | None = None
) -> dict[str, Any]:
    """Export a diffem checkpoint to ``out`` (see module docstring for the layouts), with a model
    card whose front matter carries ``license_id`` and whose example loads from ``repo`` (a Hub
    repository id) when given; the export step joins the checkpoint's provenance chain."""
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
        done = step(
            "export",
            inputs=[input_ref(ckpt_path)],
            channel=meta.get("channel"),
            params={"license": license_id, "repo": repo},
            method=meta.get("method"),
            laps=meta.get("lap"),
        )
        meta[PROVENANCE_KEY] = extend(chain_of(meta), then=done)
        written = {**meta, CHECKSUMS_KEY: checksums}
        written[CHECKSUM_KEY] = _meta_checksum(written)
        (target / META_FILE).write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")
        (target / "README.md").write_text(_model_card(meta, list(ckpt.aux), license_id, repo))
        apply_umask(target)  # safetensors writes 0600; exported models are meant to be shared
    return meta


CONNECTION_ERRORS = frozenset(
    {"ConnectError", "ConnectTimeout", "ConnectionError", "NetworkError", "TransportError", "Timeout"}
)
"""Names of the transport errors the Hub client raises when the Hub cannot be reached (``httpx``,
``requests``), matched by name so that no client library is imported here."""


def _unreachable(e: BaseException) -> bool:
    """Whether ``e`` (or an error behind it) says the Hub could not be reached."""
    current: BaseException | None = e
    seen: set[int] = set()
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ConnectionError | TimeoutError):
            return True
        if any(c.__name__ in CONNECTION_ERRORS for c in type(current).__mro__):
            return True
        current = current.__cause__ or current.__context__
    return False


def push_to_hub(folder: Path, repo: str) -> str:
    """Upload an export folder to the Hugging Face Hub model repository ``repo`` (created if need
    be); returns its URL. Offline, not logged in, unreachable or refused: a one-line DiffemError
    that says the local export is kept."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError

    kept = f"the export is kept in {folder}"
    if constants.HF_HUB_OFFLINE:
        raise DiffemError(f"cannot push to the Hub repo {repo}: offline (HF_HUB_OFFLINE is set); {kept}")
    if huggingface_hub.get_token() is None:
        raise DiffemError(
            f"cannot push to the Hub repo {repo}: not logged in (run 'hf auth login' or set HF_TOKEN); {kept}"
        )
    try:
        url = huggingface_hub.create_repo(repo, repo_type="model", exist_ok=True)
        huggingface_hub.upload_folder(
            repo_id=repo, folder_path=str(folder), repo_type="model", commit_message="diffem export"
        )
    except Exception as e:  # the client's errors: its own HTTP errors, transport errors, offline mode
        if _unreachable(e):
            raise DiffemError(
                f"cannot push to the Hub repo {repo}: the Hugging Face Hub cannot be reached "
                f"(offline?); {kept}"
            ) from None
        if isinstance(e, HfHubHTTPError):
            status = getattr(e.response, "status_code", None)
            if status in (401, 403):
                reason = "not logged in, or the token may not write to it"
            else:
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DiffemError(f"cannot push to the Hub repo {repo}: {reason}; {kept}") from None
        raise
    return str(url)
