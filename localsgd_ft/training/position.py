"""Where one replica group stands in the run, and when it stops.

The torchft Manager counts committed syncs; some of them trained nothing (in
sync recovery mode each job start begins with one alignment sync), and that
``offset`` travels with live recovery and checkpoints. So:

    training step = (committed syncs - offset) x steps per sync + local steps since the last sync

(steps per sync: ``sync_every``, or one fragment's share of it with Streaming
DiLoCo, which syncs one fragment at a time.)

Every group stops once ``training_syncs`` training syncs are committed. Count
and offset are agreed through the quorum (a recovering group inherits both),
so all live groups stop after the same commit, with identical parameters.
"""

from __future__ import annotations

from typing import Any


class Position:
    def __init__(self, steps_per_sync: int, training_syncs: int, offset: int) -> None:
        self.steps_per_sync = steps_per_sync
        self.training_syncs = training_syncs
        self.offset = offset  # committed syncs that trained nothing
        self.local_steps = 0  # optimizer steps of this process
        self.manager: Any = None  # set once the Manager exists (it needs the live state that holds us)

    @property
    def global_syncs(self) -> int:
        """Syncs committed in the run so far, as the Manager counts them."""
        return self.manager.current_step()

    @property
    def syncs(self) -> int:
        """Committed syncs that trained."""
        return self.global_syncs - self.offset

    def step(self) -> int:
        """The training step: committed training syncs x steps per sync + local steps since the last sync."""
        return max(0, self.syncs * self.steps_per_sync + self.local_steps % self.steps_per_sync)

    def at_sync(self) -> bool:
        """Whether the optimizer step just taken ended a sync interval."""
        return self.local_steps % self.steps_per_sync == 0

    def done(self) -> bool:
        return self.syncs >= self.training_syncs
