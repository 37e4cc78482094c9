"""RUN folders: their layout, their per-lap records, and how a run is created or resumed.

A RUN folder holds ``config.yaml`` (the effective configuration), ``run.json`` (what data it
belongs to), ``recon/lap_NNN/`` (the reconstructions of every lap), ``checkpoints/`` (the
models), ``metrics.jsonl`` (one JSON record per event), ``samples/`` (pictures) and, while a
model trains, ``state/mstep.safetensors``. ``em-train`` and ``train-uncond`` create and check
RUN folders through the same :meth:`Run.prepare`.

Nothing on disk is trusted blindly: :meth:`Run.broken` verifies a lap's checkpoint (its checksum)
and reconstructions (checksum and row count), records are appended whole
(:func:`~diffem_cli.io.store.append_record`), and an epoch whose training state was saved but
whose record a kill lost gets its record back from that state (:meth:`Run.prepare`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from diffem_cli.config.run import Extensions, RunConfig, config_from_dict, missing_keys
from diffem_cli.core.errors import DiffemError
from diffem_cli.diffusion.checkpoint import load_tensors, refuse_unverified, verify_file
from diffem_cli.io.store import (
    MANIFEST,
    append_record,
    is_run_skeleton,
    read_dataset,
    verify_dataset,
    write_text_atomic,
)

WRITTEN = (
    *("checkpoints", "recon", "samples", "state", "logs", "uncond", "samples-uncond"),
    *("metrics.jsonl", "metrics.png", "metrics.pdf", "gaussian.safetensors", "report.json", "report.png"),
)
"""What diffem writes in a RUN (em-train, train-uncond, report, compare's unconditional samples,
the trackers' logs): all that starting it over with ``--force`` removes, and nothing else."""


def lap_name(lap: int) -> str:
    """``lap_007`` for lap 7: the name of a lap's checkpoint, reconstructions and picture."""
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
        self.config_file = self.root / "config.yaml"
        self.info_file = self.root / "run.json"

    def checkpoint(self, lap: int) -> Path:
        return self.ckpt_dir / f"{lap_name(lap)}.safetensors"

    def recon(self, lap: int) -> Path:
        return self.recon_dir / lap_name(lap)

    def picture(self, lap: int) -> Path:
        return self.samples_dir / f"{lap_name(lap)}.png"

    def log(self, record: dict[str, Any]) -> None:
        """Append one record to ``metrics.jsonl`` and flush it to disk (a fragment of a record cut
        short by a kill or a full disk is dropped first)."""
        append_record(self.metrics, record)

    def records(self) -> list[dict[str, Any]]:
        """Every complete record of ``metrics.jsonl`` (a line cut short by a kill is skipped)."""
        if not self.metrics.exists():
            return []
        out = []
        for line in self.metrics.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
        return out

    def lap_records(self) -> dict[int, dict[str, Any]]:
        """The last ``lap`` record of each lap."""
        return {int(r["lap"]): r for r in self.records() if r.get("event") == "lap" and "lap" in r}

    def broken(self, lap: int, rows: int | None = None, *, missing: bool = False) -> list[tuple[Path, str]]:
        """The files of ``lap`` that fail verification, each with one line saying why.

        Checked: the checkpoint (laps >= 1; read whole against its checksum) and the
        reconstructions (readable, their checksum when they carry one, ``rows`` rows when given).
        Absent files count only with ``missing``. A checkpoint that carries no checksum is refused
        (a one-line DiffemError) unless the user trusts it (``DIFFEM_TRUST_UNVERIFIED=1``).
        """
        out: list[tuple[Path, str]] = []
        ckpt = self.checkpoint(lap)
        if lap >= 1 and ckpt.exists():
            verified = True
            try:
                verified = verify_file(ckpt)
            except DiffemError as e:
                out.append((ckpt, _first_line(e)))
            if not verified:
                refuse_unverified(ckpt)
        elif lap >= 1 and missing:
            out.append((ckpt, f"{ckpt} is missing"))
        recon = self.recon(lap)
        if (recon / MANIFEST).exists():
            why = _recon_problem(recon, rows)
            if why is not None:
                out.append((recon, why))
        elif missing:
            out.append((recon, f"{recon} is missing or incomplete (no {MANIFEST})"))
        return out

    def verify_laps(self) -> None:
        """Refuse (one line) a RUN whose recorded laps' checkpoints or reconstructions are missing
        or fail verification (:meth:`broken`): rerunning em-train redoes them."""
        for lap in sorted(self.lap_records()):
            bad = self.broken(lap, missing=True)
            if bad:
                raise DiffemError(f"{bad[0][1]}; rerun em-train on {self.root} to redo lap {lap}")

    def redo_broken(self, rows: int | None, log: Any) -> list[int]:
        """Remove every lap's files that fail verification (:meth:`broken`), so that the next
        em-train redoes them from the last good files (a lap's reconstructions from its checkpoint,
        a checkpoint from the reconstructions before it); one log line each. Returns those laps."""
        laps = set(self.lap_records())
        laps |= {int(p.stem[4:]) for p in self.ckpt_dir.glob("lap_*.safetensors") if p.stem[4:].isdigit()}
        laps |= {int(p.name[4:]) for p in self.recon_dir.glob("lap_*") if p.name[4:].isdigit()}
        redone = []
        for lap in sorted(laps):
            for path, why in self.broken(lap, rows):
                log(f"lap {lap}: {why}; redoing it")
                remove_path(path)
                redone.append(lap)
        return sorted(set(redone))

    def redo_broken_checkpoint(self, path: Path, log: Any) -> bool:
        """Remove the checkpoint ``path`` if it fails its checksum (one log line), so that it is
        trained again; a checkpoint without a checksum is refused unless trusted. Returns whether
        it was removed."""
        path = Path(path)
        if not path.exists():
            return False
        try:
            verified = verify_file(path)
        except DiffemError as e:
            log(f"{_first_line(e)}; training it again")
            remove_path(path)
            return True
        if not verified:
            refuse_unverified(path)
        return False

    def has_results(self) -> bool:
        """Whether the RUN holds any finished work (a lap record, a checkpoint, or a training state
        to resume: a ``train-uncond`` killed mid-training has only that)."""
        if self.lap_records() or any(r.get("event") == "done" for r in self.records()):
            return True
        if self.state.exists():
            return True
        return self.ckpt_dir.exists() and any(self.ckpt_dir.glob("*.safetensors"))

    def prepare(
        self, cfg: RunConfig, info: dict[str, Any], force: bool, ignore: tuple[str, ...] = ()
    ) -> tuple[str, ...]:
        """Create the RUN folder, or check that an existing one belongs to this data and config.

        ``info`` (written to ``run.json``) must hold a ``fingerprint`` of the data. A RUN with
        finished work and another fingerprint or configuration (keys in ``ignore`` aside) is
        refused unless ``force``; a RUN with no finished work is simply re-configured. A folder
        that is not a RUN (no ``config.yaml``, ``run.json`` or results) is refused, ``force`` or
        not: ``--force`` starts over only what diffem wrote.

        Returns the dotted keys an existing RUN's ``config.yaml`` lacks (written by a diffem
        before those keys existed): they constrain nothing, the work still to do takes ``cfg``'s
        values for them, and the rewritten ``config.yaml`` records those.
        """
        if self.root.exists() and not self.root.is_dir():
            raise DiffemError(f"RUN {self.root} is a file, not a folder")
        if not self.root.parent.exists():
            raise DiffemError(f"folder {self.root.parent} does not exist")
        lacked: tuple[str, ...] = ()
        # a skeleton (created, then killed before its run.json) is simply filled in
        if self.root.exists() and any(self.root.iterdir()) and not is_run_skeleton(self.root):
            if not self.config_file.exists() and not self.info_file.exists() and not self.has_results():
                raise DiffemError(
                    f"{self.root} exists and is not a diffem run (it holds no config.yaml or run.json); "
                    "--force replaces only a diffem RUN: give a new or empty RUN folder"
                )
            if force:
                self._clear()
            elif self.has_results():
                lacked = self._check_same(cfg, info, ignore)
            else:
                self._clear()
        for d in (self.root, self.ckpt_dir, self.recon_dir, self.samples_dir, self.state.parent):
            d.mkdir(parents=True, exist_ok=True)
        for path, text in (
            (self.info_file, json.dumps(info, indent=2) + "\n"),
            (self.config_file, yaml.safe_dump(cfg.to_dict(), sort_keys=False)),
        ):
            if not path.exists() or path.read_text() != text:  # a finished run re-run changes no file
                write_text_atomic(path, text)
        self._settle_state()
        return lacked

    def _settle_state(self) -> None:
        """Put the training state left by a kill in order: an epoch it holds whose record was lost
        (a kill between saving the state and appending the record) gets its record, taken from
        the state; a state whose phase already saved its checkpoint is removed.

        The state's ``tag`` names its phase: ``lap`` for an em-train M-step, ``uncond`` for
        train-uncond (see ``pipeline.em`` and ``pipeline.uncond``)."""
        if not self.state.exists():
            return
        try:
            _, meta = load_tensors(self.state)
            tag, epoch = meta.get("tag") or {}, int(meta["epoch"])
            step, loss = int(meta["step"]), float(meta["loss"])
        except (DiffemError, KeyError, TypeError, ValueError):
            return  # an unreadable state: training restarts its phase and says so
        phase = {"lap": tag["lap"]} if "lap" in tag else {}
        logged = any(
            r.get("event") == "epoch" and r.get("epoch") == epoch and r.get("lap") == phase.get("lap")
            for r in self.records()
        )
        if not logged:
            self.log(
                {"event": "epoch", **phase, "epoch": epoch, "step": step, "loss": loss, "recovered": True}
            )
        done = self.checkpoint(int(tag["lap"])) if "lap" in tag else self.ckpt_dir / "uncond.safetensors"
        if ("lap" in tag or "uncond" in tag) and done.exists():
            self.state.unlink()

    def lacked_note(self, lacked: tuple[str, ...], cfg: RunConfig, sections: set[str]) -> str | None:
        """One log line naming the keys of ``sections`` (dotted prefixes) that this RUN's
        ``config.yaml`` lacked (:meth:`prepare`) and the values the work still to do takes, or None."""
        keys = [k for k in lacked if k.partition(".")[0] in sections]
        if not keys:
            return None
        full = cfg.to_dict()
        values = ", ".join(f"{k}={_value(full, k)}" for k in keys)
        return (
            f"{self.config_file} predates {len(keys)} key(s); what is still to run takes {values} "
            "(the defaults, unless --set gives others)"
        )

    def _check_same(self, cfg: RunConfig, info: dict[str, Any], ignore: tuple[str, ...]) -> tuple[str, ...]:
        try:
            old = json.loads(self.info_file.read_text())
            sections = Extensions({k: type(v) for k, v in cfg.options.items()})  # the same option sections
            written = yaml.safe_load(self.config_file.read_text()) or {}
            old_cfg = config_from_dict(written, sections).to_dict()
        except (OSError, ValueError, yaml.YAMLError, DiffemError) as e:
            raise DiffemError(
                f"{self.root}: its run.json or config.yaml is unreadable ({str(e).splitlines()[0]}); "
                "use --force to start over"
            ) from None
        if old.get("fingerprint") != info.get("fingerprint"):
            what = "reconstructions" if "recon" in info else "observations"
            raise DiffemError(
                f"{self.root} was trained on other {what} ({old.get('data') or old.get('recon')}); "
                "use another RUN or --force"
            )
        if old.get("channel") is not None and old.get("channel") != info.get("channel"):
            raise DiffemError(f"{self.root} was trained for another channel spec; use another RUN or --force")
        new_cfg = cfg.to_dict()
        lacked = missing_keys(written, new_cfg)
        for key in (*ignore, *lacked):
            section, _, name = key.partition(".")
            for cfg_dict in (old_cfg, new_cfg):
                if not name:  # a top-level key (``seed``)
                    cfg_dict.pop(section, None)
                elif isinstance(cfg_dict.get(section), dict):
                    cfg_dict[section].pop(name, None)
        diff = first_difference(old_cfg, new_cfg)
        if diff:
            key, held, given = diff
            both = held is not None and given is not None
            resume = f"--set {key}={set_text(held)} resumes it, " if both else ""
            raise DiffemError(
                f"{self.root} holds another configuration ({key}: {held!r} in RUN, {given!r} now); "
                f"{resume}or use another RUN, or --force to start over"
            )
        return lacked

    def _clear(self) -> None:
        """Remove what diffem wrote in the RUN (and nothing else)."""
        for child in WRITTEN:
            p = self.root / child
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()


def remove_path(path: Path) -> None:
    """Remove a file or a folder tree."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _value(full: dict[str, Any], key: str) -> Any:
    section, _, name = key.partition(".")
    return full[section][name] if name else full[section]


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _recon_problem(path: Path, rows: int | None) -> str | None:
    """Why the reconstructions folder ``path`` does not verify, or None."""
    try:
        ds, manifest = read_dataset(path)
        verify_dataset(path, manifest)
    except DiffemError as e:
        return _first_line(e)
    if manifest.get("num_rows") is not None and manifest["num_rows"] != len(ds):
        return f"{path} holds {len(ds)} rows, its {MANIFEST} says {manifest['num_rows']}"
    if rows is not None and len(ds) != rows:
        return f"{path} holds {len(ds)} rows for {rows} observations"
    return None


def first_difference(a: Any, b: Any, prefix: str = "") -> tuple[str, Any, Any] | None:
    """The first dotted key at which two nested dicts differ, with its value in each (None where
    one lacks it)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
            if d:
                return d
        return None
    return None if a == b else (prefix.rstrip("."), a, b)


def set_text(value: Any) -> str:
    """``value`` as ``--set KEY=TEXT`` reads it back (YAML): strings bare, the rest as JSON, which
    YAML reads."""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
