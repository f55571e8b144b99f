"""Setting a previous run's files aside: only ever renames, only files known to be ours, on one filesystem.

Starting a run sets aside what the previous job in the same output directory
left (its summary, config, metrics, report, results), and ``--fresh`` sets
aside its checkpoints. Nothing is deleted and nothing is copied:

- The files move into ``set-aside-<time>/`` inside the very directory that
  holds them, with ``os.rename``: a rename never copies, and a directory that
  is a mount point (a volume at ``checkpoint.dir``) stays where it is, with its
  files moved within it. A rename that fails (another filesystem mounted below,
  a busy file) undoes the renames already made and refuses with the reason.
- In a checkpoint directory only this project's checkpoint files move; a
  directory that also holds anything else (``checkpoint.dir: outputs`` would
  hold every experiment) is refused before anything moves.
- Set-aside directories are kept until someone removes them:
  ``python -m localsgd_ft.cleanup OUTPUT_DIR`` lists them with their sizes and,
  with ``--delete``, removes all but the newest ``--keep``.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Tuple

from localsgd_ft.storage.atomic import fsync_dir
from localsgd_ft.storage.fired_faults import FIRED_FILE
from localsgd_ft.storage.ownership import OWNER_FILE

PREFIX = "set-aside-"
# What a checkpoint directory may hold: checkpoints, their temporary files (a writer killed
# mid-write), the record of fired failures, the run's claim, and earlier set-aside folders.
CHECKPOINT_FILES = ("step_*.pt", "step_*.json", ".step_*.pt.*", ".step_*.json.*", FIRED_FILE, f".{FIRED_FILE}.*")
OURS = CHECKPOINT_FILES + (OWNER_FILE, f"{OWNER_FILE}.stale-*", f"{PREFIX}*")
SHOWN = 3  # foreign names quoted in a refusal: enough to recognise the directory


class SetAsideError(RuntimeError):
    """Setting aside was refused or could not be done; nothing was moved."""


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _target(directory: Path) -> Path:
    base = directory / f"{PREFIX}{time.strftime('%Y%m%d-%H%M%S')}"
    target, n = base, 1
    while target.exists():
        target, n = base.with_name(f"{base.name}-{n}"), n + 1
    return target


def _rename_all(directory: Path, names: List[str]) -> Optional[Path]:
    """Rename ``names`` (entries of ``directory``) into a new set-aside folder there; all or none."""
    if not names:
        return None
    target = _target(directory)
    target.mkdir()
    done: List[str] = []
    try:
        for name in names:
            src = directory / name
            if src.lstat().st_dev != target.stat().st_dev:
                raise SetAsideError(f"{src} is on another filesystem than {directory} (a mount below it): "
                                    "setting it aside would need a copy, and copies are never made; nothing was moved")
            try:
                os.rename(src, target / name)
            except OSError as e:
                raise SetAsideError(f"cannot rename {src} into {target} ({e.strerror}); nothing was moved") from None
            done.append(name)
    except BaseException:
        for name in reversed(done):  # undo: the directory is as it was
            try:
                os.rename(target / name, directory / name)
            except OSError:
                pass
        try:
            target.rmdir()
        except OSError:
            pass
        raise
    fsync_dir(target)
    fsync_dir(directory)
    return target


def set_aside_outputs(run_dir: Path, names: Iterable[str]) -> Optional[Path]:
    """Set aside the entries ``names`` of ``run_dir`` that exist (a previous job's outputs); the folder, or None."""
    run_dir = Path(run_dir)
    present = [n for n in names if os.path.lexists(run_dir / n)]
    return _rename_all(run_dir, present)


def checkpoint_entries(directory: Path) -> Tuple[List[str], List[str]]:
    """(this project's checkpoint files, anything else) in ``directory``, names sorted."""
    names = sorted(os.listdir(directory)) if Path(directory).is_dir() else []
    ours = [n for n in names if _matches(n, CHECKPOINT_FILES)]
    foreign = [n for n in names if not _matches(n, OURS)]
    return ours, foreign


def check_checkpoints(directory: Path) -> List[str]:
    """This project's checkpoint files in ``directory``; SetAsideError if it also holds anything else."""
    directory = Path(directory)
    ours, foreign = checkpoint_entries(directory)
    if foreign:
        shown = ", ".join(foreign[:SHOWN]) + (f" and {len(foreign) - SHOWN} more" if len(foreign) > SHOWN else "")
        raise SetAsideError(
            f"cannot start over: checkpoint directory {directory} also holds files that are not this project's "
            f"checkpoints ({shown}), so it is not a directory of its own; nothing was moved. Point "
            "checkpoint.dir at a directory that holds only this experiment's checkpoints")
    return ours


def set_aside_checkpoints(directory: Path) -> Optional[Path]:
    """Start over: move this project's checkpoint files into a set-aside folder; refuse on foreign files."""
    return _rename_all(Path(directory), check_checkpoints(directory))


@dataclass(frozen=True)
class SetAside:
    """One set-aside folder."""

    path: Path
    bytes: int


def _size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def find(directory: Path, depth: int = 2) -> List[SetAside]:
    """Set-aside folders at most ``depth`` levels below ``directory`` (outputs and checkpoints), oldest first."""
    found: List[Path] = []
    level = [Path(directory)]
    for _ in range(depth):
        nxt: List[Path] = []
        for d in level:
            try:
                entries = sorted(p for p in d.iterdir() if p.is_dir() and not p.is_symlink())
            except OSError:
                continue
            found.extend(p for p in entries if p.name.startswith(PREFIX))
            nxt.extend(p for p in entries if not p.name.startswith(PREFIX))
        level = nxt
    return [SetAside(p, _size(p)) for p in sorted(found, key=lambda p: (p.parent, p.name))]


def remove(folders: List[SetAside], keep: int) -> List[SetAside]:
    """Delete all but the newest ``keep`` set-aside folders of each directory; the ones deleted."""
    by_parent: dict = {}
    for f in folders:
        by_parent.setdefault(f.path.parent, []).append(f)
    removed = []
    for group in by_parent.values():
        for f in group[:max(0, len(group) - keep)]:
            shutil.rmtree(f.path)
            removed.append(f)
    return removed


def main(argv: Optional[List[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m localsgd_ft.cleanup",
        description="List the set-aside folders (set-aside-<time>) of earlier runs under each directory (an "
                    "output_dir/name and its checkpoints); with --delete, remove all but the newest --keep of "
                    "each directory. Nothing is removed without --delete.")
    parser.add_argument("directories", nargs="+", type=Path, help="run directories (output_dir/name) or checkpoint.dir")
    parser.add_argument("--keep", type=int, default=1, help="how many of the newest to keep per directory (default 1)")
    parser.add_argument("--delete", action="store_true", help="remove the others (default: only list)")
    args = parser.parse_args(argv)
    if args.keep < 0:
        parser.error("--keep must be 0 or more")
    folders = list({f.path: f for d in args.directories for f in find(d)}.values())
    for f in folders:
        print(f"{f.bytes / 2**20:10.1f} MB  {f.path}")
    print(f"{len(folders)} set-aside folder(s), {sum(f.bytes for f in folders) / 2**20:.1f} MB")
    if args.delete:
        gone = remove(folders, args.keep)
        print(f"removed {len(gone)} folder(s), {sum(f.bytes for f in gone) / 2**20:.1f} MB; kept the newest "
              f"{args.keep} of each directory")
    return 0
