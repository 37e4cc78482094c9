"""RUN folders: their layout, their per-lap records, and how a run is created or resumed.

A RUN folder holds ``config.yaml`` (the effective configuration), ``run.json`` (what data it
belongs to), ``recon/lap_NNN/`` (the reconstructions of every lap), ``checkpoints/`` (the
models), ``metrics.jsonl`` (one JSON record per event), ``samples/`` (pictures) and, while a
model trains, ``state/mstep.safetensors``. ``em-train`` and ``train-uncond`` create and check
RUN folders through the same :meth:`Run.prepare`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from diffem_cli.config.run import Extensions, RunConfig, config_from_dict
from diffem_cli.core.errors import DiffemError
from diffem_cli.io.store import write_text_atomic

WRITTEN = ("checkpoints", "recon", "samples", "state", "metrics.jsonl", "metrics.png", "gaussian.safetensors")


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
        """Append one record to ``metrics.jsonl`` and flush it to disk."""
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

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

    def has_results(self) -> bool:
        """Whether the RUN holds any finished work (a lap record or a checkpoint)."""
        if self.lap_records() or any(r.get("event") == "done" for r in self.records()):
            return True
        return self.ckpt_dir.exists() and any(self.ckpt_dir.glob("*.safetensors"))

    def prepare(
        self, cfg: RunConfig, info: dict[str, Any], force: bool, ignore: tuple[str, ...] = ()
    ) -> None:
        """Create the RUN folder, or check that an existing one belongs to this data and config.

        ``info`` (written to ``run.json``) must hold a ``fingerprint`` of the data. A RUN with
        finished work and another fingerprint or configuration (keys in ``ignore`` aside) is
        refused unless ``force``; a RUN with no finished work is simply re-configured.
        """
        if self.root.exists() and not self.root.is_dir():
            raise DiffemError(f"RUN {self.root} is a file, not a folder")
        if not self.root.parent.exists():
            raise DiffemError(f"folder {self.root.parent} does not exist")
        if self.root.exists() and any(self.root.iterdir()):
            if not self.config_file.exists() and not self.info_file.exists() and not self.has_results():
                if not force:
                    raise DiffemError(
                        f"{self.root} exists and is not a diffem run (use --force or another RUN)"
                    )
            elif force:
                self._clear()
            elif self.has_results():
                self._check_same(cfg, info, ignore)
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

    def _check_same(self, cfg: RunConfig, info: dict[str, Any], ignore: tuple[str, ...]) -> None:
        try:
            old = json.loads(self.info_file.read_text())
            sections = Extensions({k: type(v) for k, v in cfg.options.items()})  # the same option sections
            old_cfg = config_from_dict(yaml.safe_load(self.config_file.read_text()) or {}, sections).to_dict()
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
        for key in ignore:
            section, _, name = key.partition(".")
            old_cfg.get(section, {}).pop(name, None)
            new_cfg.get(section, {}).pop(name, None)
        diff = first_difference(old_cfg, new_cfg)
        if diff:
            raise DiffemError(
                f"{self.root} holds another configuration ({diff}); use another RUN or --force to start over"
            )

    def _clear(self) -> None:
        """Remove what diffem wrote in the RUN (and nothing else)."""
        for child in WRITTEN:
            p = self.root / child
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()


def first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    """The first key at which two nested dicts differ, as ``"key: old in RUN, new now"``."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
            if d:
                return d
        return None
    return None if a == b else f"{prefix.rstrip('.')}: {a!r} in RUN, {b!r} now"
