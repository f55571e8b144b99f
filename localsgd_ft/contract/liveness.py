"""How a trainer shows its replica role that it lives: one file per worker, its pid inside, its mtime the last beat.

The trainer beats from a thread of its own (:mod:`localsgd_ft.training.liveness`), so a trainer waiting in
a collective, a quorum or a heal keeps beating; one frozen (SIGSTOP, a stuck driver call, a stuck read that
holds the interpreter) stops. The role reads the files (:mod:`localsgd_ft.launch.trainer_watch`) on its own
host: no network, no clock but the host's. Standard library only.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List

BEAT_S = 0.5  # how often a trainer beats


def pulse_path(directory: Path, local_rank: int) -> Path:
    """The file worker ``local_rank`` of this node beats on."""
    return Path(directory) / f"worker-{local_rank}.pid"


@dataclass(frozen=True)
class Pulse:
    """One worker's last sign of life, as its file tells it."""

    local_rank: int
    pid: int
    quiet_s: float  # seconds since its last beat


def read_pulses(directory: Path) -> List[Pulse]:
    """Every worker's pulse in ``directory`` (files that cannot be read, or do not hold a pid, are skipped)."""
    now = time.time()
    pulses = []
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    for name in names:
        if not (name.startswith("worker-") and name.endswith(".pid")):
            continue
        try:
            rank = int(name[len("worker-"):-len(".pid")])
            path = Path(directory) / name
            mtime = path.stat().st_mtime
            pid = int(path.read_text().strip())
        except (OSError, ValueError):
            continue  # being replaced by a new incarnation's, or not ours
        pulses.append(Pulse(rank, pid, max(0.0, now - mtime)))
    return pulses
