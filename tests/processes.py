"""The processes of a run as tests and benchmarks see them in /proc: which are trainers, what a process
started, whether it still lives, and signalling a set of them that may be ending meanwhile."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Dict, Iterable, List, Optional


def signal_all(pids: Iterable[int], sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to each of ``pids``; one already gone is skipped."""
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def is_trainer(pid: int, group: Optional[int] = None, rank: Optional[int] = None) -> bool:
    """Whether ``pid`` is a trainer: a torchrun worker (torchrun gave it LOCAL_RANK) running the training
    script; not torchrun nor the replica role, whose command lines name the script too. ``group`` and
    ``rank``: only that group's, that worker's."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False  # ended meanwhile, or not ours to read
    return (b"train_localsgd.py" in cmd and b"torch.distributed.run" not in cmd
            and any(e.startswith(b"LOCAL_RANK=") for e in env)
            and (group is None or f"REPLICA_GROUP_ID={group}".encode() in env)
            and (rank is None or f"RANK={rank}".encode() in env))


def state(pid: int) -> str:
    """A process's state letter ('' once it is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][:1]
    except OSError:
        return ""


def descendants(pid: int) -> List[int]:
    """Every process ``pid`` started, and those they started, that is still its descendant now."""
    children: Dict[int, List[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(") ", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            found.append(c)
            todo.append(c)
    return found
