"""Durable checkpoints: written atomically at a sync boundary, validated and chosen on resume.

A checkpoint is two files in the checkpoint directory:

- ``step_<STEP>.pt``: model, optimizer and torchft Manager state, the training
  step and the data position (``torch.save``; loaded with ``weights_only=True``);
- ``step_<STEP>.json``: written after the ``.pt`` is complete: its SHA-256, the
  step, the committed-sync count, when, and the config it was made with.

Both are written to a temporary file, fsynced and renamed, so a kill mid-write
leaves either no checkpoint or an earlier one, never one that loads wrong. A
checkpoint is valid only if its ``.json`` parses and its ``.pt`` matches the
checksum, which is checked before anything is unpickled. Invalid ones are
reported and skipped, never deleted.

This module imports torch only when saving or loading: the torchx component
uses it to check a resume before launching.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from localsgd_ft.config import ConfigError, ExperimentConfig, to_dict
from localsgd_ft.storage.atomic import file_digest, fsync_dir, write_json_atomic

# Config keys a checkpoint cannot outlive: changing one changes what the saved
# state means. Everything else (max_steps, eval cadence, timeouts, faults, ...) may change.
INCOMPATIBLE_KEYS = [
    "replica_groups.count",
    "model.arch",
    "model.width",
    "optimizer.name",
    "localsgd.algorithm",
    "localsgd.sync_every",
    "localsgd.fragments",
    "localsgd.recovery",
    "data.batch_size",
    "train.seed",
]


@dataclass
class Found:
    """A valid checkpoint on disk."""

    path: Path  # the .pt file
    meta: Dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.meta["step"])


_ABSENT = object()


def _lookup(d: Dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part, _ABSENT) if isinstance(d, dict) else _ABSENT
    return d


def check_compatible(cfg: ExperimentConfig, found: Found) -> None:
    """Raise ConfigError if ``cfg`` cannot continue from ``found``."""
    now, then, defaults = to_dict(cfg), found.meta.get("config", {}), to_dict(ExperimentConfig())

    def saved(key: str) -> Any:
        # A key the checkpoint's config lacks came later, with a default that keeps the old meaning.
        value = _lookup(then, key)
        return _lookup(defaults, key) if value is _ABSENT else value

    changed = [(k, saved(k), _lookup(now, k)) for k in INCOMPATIBLE_KEYS if saved(k) != _lookup(now, k)]
    if changed:
        what = "; ".join(f"{k} was {old!r}, the config says {new!r}" for k, old, new in changed)
        raise ConfigError(
            f"cannot resume from checkpoint {found.path}: {what}. Restore those settings to resume, "
            "or start over with `torchx run -- --fresh True ...` or checkpoint.resume: false "
            "(the old checkpoints are then set aside, not deleted)"
        )


def list_valid(directory: Path, warn: bool = True) -> List[Found]:
    """Valid checkpoints in ``directory``, newest step first; invalid ones are reported (not deleted)."""
    found = []
    for meta_path in sorted(Path(directory).glob("step_*.json")):
        pt = meta_path.with_suffix(".pt")
        problem = None
        try:
            meta = json.loads(meta_path.read_text())
            if not pt.is_file():
                problem = "its .pt file is missing"
            elif file_digest(pt, "sha256") != meta["sha256"]:
                problem = "its .pt file does not match the recorded SHA-256 (truncated or corrupt)"
        except (OSError, ValueError, KeyError, TypeError) as e:
            problem = f"unreadable metadata ({type(e).__name__}: {e})"
        if problem:
            if warn:
                print(f"WARNING: skipping checkpoint {pt}: {problem}", flush=True)
            continue
        found.append(Found(pt, meta))
    return sorted(found, key=lambda f: f.step, reverse=True)


def latest(directory: Path, warn: bool = True) -> Optional[Found]:
    valid = list_valid(directory, warn)
    return valid[0] if valid else None


def load(found: Found, device: Any) -> Dict[str, Any]:
    """The checkpoint's payload; its checksum is verified again right before unpickling."""
    import torch

    if file_digest(found.path, "sha256") != found.meta["sha256"]:
        raise ConfigError(f"checkpoint {found.path} changed on disk since it was validated")
    return torch.load(found.path, map_location=device, weights_only=True)


def save(cfg: ExperimentConfig, payload: Dict[str, Any], step: int, sync: int) -> Path:
    """Write ``payload`` as the checkpoint of training step ``step``; once it is durable, prune to checkpoint.keep.

    Raises OSError (a full disk, a quota) with no partial checkpoint left under a valid-looking name.
    """
    import torch

    directory = cfg.checkpoint_dir
    directory.mkdir(parents=True, exist_ok=True)
    pt = directory / f"step_{step:09d}.pt"
    fd, tmp = tempfile.mkstemp(prefix=f".{pt.name}.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, pt)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    meta = {"step": step, "sync": sync, "sha256": file_digest(pt, "sha256"), "time": time.time(), "file": pt.name,
            "config": to_dict(cfg)}
    write_json_atomic(pt.with_suffix(".json"), meta)  # fsyncs the directory: both names are durable now
    prune(directory, cfg.checkpoint.keep, step)
    return pt


_STEP_OF = re.compile(r"^\.?step_(\d+)\.")


def prune(directory: Path, keep: int, newest: int) -> None:
    """Keep the newest ``keep`` valid checkpoints; remove the rest, and what killed or failed writes left
    behind for steps before ``newest`` (temporary files, a ``.pt`` whose ``.json`` never landed).
    Invalid checkpoints (a ``.json`` whose ``.pt`` does not match) stay, as evidence."""
    for old in list_valid(directory, warn=False)[keep:]:
        old.path.with_suffix(".json").unlink(missing_ok=True)  # metadata first: never a valid-looking orphan
        old.path.unlink(missing_ok=True)
    for path in directory.iterdir():
        m = _STEP_OF.match(path.name)
        if not m or int(m.group(1)) >= newest:
            continue
        temporary = path.name.startswith(".")
        orphan = path.suffix == ".pt" and not path.with_suffix(".json").exists()
        if temporary or orphan:
            path.unlink(missing_ok=True)
    fsync_dir(directory)


def check_extends(cfg: ExperimentConfig, found: Found) -> None:
    """Refuse a new launch that would resume at or past its end: it would train nothing and report success."""
    if found.step >= cfg.train.max_steps:
        raise ConfigError(
            f"the newest checkpoint ({found.path}) is at step {found.step}, and train.max_steps is "
            f"{cfg.train.max_steps}: this run would train nothing. To train further, raise train.max_steps "
            f"above {found.step}; to start over, run with `torchx run -- --fresh True ...` (the old checkpoints "
            "are set aside, not deleted)")


def resume_point(cfg: ExperimentConfig, start_over: bool) -> Tuple[Optional[Found], str]:
    """The checkpoint to resume from (None: from scratch) and a line saying so."""
    if not cfg.checkpoint.enabled:
        return None, "checkpoints are off (checkpoint.enabled: false): starting from scratch"
    if start_over:
        return None, "starting over (--fresh or checkpoint.resume: false): old checkpoints are not used"
    found = latest(cfg.checkpoint_dir)
    if found is None:
        return None, f"no valid checkpoint in {cfg.checkpoint_dir}: starting from scratch"
    check_compatible(cfg, found)
    if found.step >= cfg.train.max_steps:  # a restart after the end (a new launch is refused: check_extends)
        return found, (f"resuming from checkpoint {found.path} (step {found.step}), at or past train.max_steps "
                       f"({cfg.train.max_steps}): nothing is left to train")
    return found, f"resuming from checkpoint {found.path} (step {found.step})"
