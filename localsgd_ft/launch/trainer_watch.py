"""A replica role's watch over its trainers: their silence, for the heartbeat, and an end to a frozen one.

Each trainer beats on a file of this node's own (:mod:`localsgd_ft.contract.liveness`). The role tells the
lighthouse role how long the quietest has been silent with every heartbeat (so peers stop waiting for it in
a sync after ``lighthouse.heartbeat_timeout_ms``), and SIGKILLs one silent for
``replica_groups.trainer_timeout_s``: torchrun then restarts the group (a counted restart) or, with no
restart left, gives up, and the group is lost with that reason. Without this a trainer frozen while its role
lives holds the run forever: its role's heartbeat goes on, and torchrun waits.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Callable, List, Optional

from localsgd_ft.contract.liveness import Pulse, pulse_path, read_pulses
from localsgd_ft.contract.names import LIVENESS_DIR_ENV
from localsgd_ft.launch import lifecycle


def _running(pid: int, run: str) -> bool:
    """Whether ``pid`` is a live (not zombie) process of run ``run``: a stale file never names a stranger."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X") and lifecycle.is_of_run(pid, run)


class TrainerWatch:
    """This node's trainers, as their pulse files tell: how long the quietest is silent; an end to a frozen one.

    ``on_frozen(local_rank, quiet_s)`` is called after each kill (the role reports it as an event).
    """

    def __init__(self, group: int, timeout_s: float, run: str,
                 on_frozen: Optional[Callable[[int, float], None]] = None) -> None:
        self.group, self.timeout_s, self.run = group, timeout_s, run
        self.on_frozen = on_frozen
        self.directory = Path(tempfile.mkdtemp(prefix=f"localsgd-ft-liveness-{group}-"))
        self.ended: List[str] = []  # one line per trainer this watch ended

    def env(self) -> dict:
        """What torchrun's workers need to beat: the directory."""
        return {LIVENESS_DIR_ENV: str(self.directory)}

    def check(self) -> Optional[float]:
        """End every trainer silent past the bound; the quietest survivor's silence (None: none runs)."""
        alive = [p for p in read_pulses(self.directory) if _running(p.pid, self.run)]
        quiet = []
        for pulse in alive:
            if pulse.quiet_s > self.timeout_s:
                self._end(pulse)
            else:
                quiet.append(pulse.quiet_s)
        return max(quiet) if quiet else None

    def end_all(self, why: str) -> int:
        """End every trainer of this node for ``why`` (another node of the group fell silent); how many ran."""
        alive = [p for p in read_pulses(self.directory) if _running(p.pid, self.run)]
        for pulse in alive:
            self._kill(pulse, f"trainer worker {pulse.local_rank} (pid {pulse.pid}): {why}")
        return len(alive)

    def _end(self, pulse: Pulse) -> None:
        line = (f"trainer worker {pulse.local_rank} (pid {pulse.pid}) showed no sign of life for "
                f"{pulse.quiet_s:.0f} s (replica_groups.trainer_timeout_s {self.timeout_s:g})")
        if self._kill(pulse, line) and self.on_frozen is not None:
            self.on_frozen(pulse.local_rank, pulse.quiet_s)

    def _kill(self, pulse: Pulse, line: str) -> bool:
        """SIGKILL ``pulse``'s trainer and forget its pulse; False if it was already gone."""
        print(f"replica {self.group}: {line}: ending it so that torchrun restarts the group", file=sys.stderr,
              flush=True)
        try:
            os.kill(pulse.pid, signal.SIGKILL)
        except ProcessLookupError:
            return False
        pulse_path(self.directory, pulse.local_rank).unlink(missing_ok=True)
        self.ended.append(line)
        return True

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
