"""Accounting for every sync of one replica group: commits, quorum changes, stalls and recoveries.

It reports a disrupted group's first full-quorum commit as ``recovered`` and a sync clearly slower than
usual as ``sync_stall``, so that a marker always means something happened (the rules:
docs/fault-tolerance.md, on recovery_s and survivor_stall_s; the thresholds are :class:`StallDetector`'s).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable, Deque, Optional, Tuple

from localsgd_ft.contract import EventKind
from localsgd_ft.launch.completion.client import CompletionClient
from localsgd_ft.results.metrics import MetricsLog


class ForeignQuorum(RuntimeError):
    """The quorum holds groups that are not this run's."""


class StallDetector:
    """Tells stalls from ordinary jitter (see the module docstring); the history holds ordinary syncs only."""

    FACTOR = 4.0  # unexplained stall: this many times the usual sync time ...
    MIN_FLOOR_S = 1.0  # ... and at least this long (or half the heartbeat timeout)
    SLOW_FACTOR = 2.0  # a disrupted group's sync: this many times the usual time ...
    SLOW_MIN_S = 0.1  # ... and at least this long
    PERCENTILE = 0.95
    WARMUP = 8  # ordinary syncs seen before an unexplained stall can be called
    HISTORY = 100

    def __init__(self, heartbeat_timeout_s: float) -> None:
        self.floor_s = max(self.MIN_FLOOR_S, heartbeat_timeout_s / 2)
        self.recent: Deque[float] = deque(maxlen=self.HISTORY)

    def usual_s(self) -> Optional[float]:
        """The 95th percentile of recent ordinary syncs (None during warm-up)."""
        if len(self.recent) < self.WARMUP:
            return None
        ordered = sorted(self.recent)
        return ordered[min(len(ordered) - 1, int(self.PERCENTILE * len(ordered)))]

    def is_stall(self, duration_s: float, disrupted: bool = False, committed: bool = True) -> bool:
        """Whether a sync of ``duration_s`` stalled, given whether the group is disrupted for a known reason
        and whether the sync committed. One that did not was all cost (on a slow link, a sync given up for a
        silent peer lasts about as long as a usual one): it stalls once it lasted SLOW_MIN_S."""
        if not committed:
            return duration_s >= self.SLOW_MIN_S
        usual = self.usual_s()
        if disrupted:
            return duration_s >= max(self.SLOW_MIN_S, self.SLOW_FACTOR * (usual or 0.0))
        stalled = usual is not None and duration_s >= max(self.floor_s, self.FACTOR * usual)
        if not stalled:
            self.recent.append(duration_s)
        return stalled


class SyncMonitor:
    """Watches every sync of one group and reports what the run needs to know about it.

    Stalls, recoveries, failed syncs and every change of the quorum (id or
    size) go to the group's metrics log; stalls and recoveries also go to the
    lighthouse role (for the summary's recovery times), unless ``completion``
    is None (a worker other than the group's worker 0, which reports for it).
    """

    def __init__(self, group: int, num_groups: int, completion: Optional[CompletionClient], heartbeat_timeout_s: float,
                 disrupted: bool, fingerprint: Callable[[], str], metrics: Optional[MetricsLog],
                 healed_from: Callable[[], Optional[int]],
                 lighthouse_restarted: Callable[[], Optional[float]] = lambda: None) -> None:
        self.group, self.num_groups, self.completion = group, num_groups, completion
        self.fingerprint = fingerprint  # parameters' hash, sent with "recovered" so rejoins can be checked
        self.metrics = metrics
        self.healed_from = healed_from  # the group whose live state we last loaded (None: none yet)
        # When the quorum request that found a restarted lighthouse began (None: no restart since last asked).
        self.lighthouse_restarted = lighthouse_restarted
        self.stalls = StallDetector(heartbeat_timeout_s)
        self.disrupted = disrupted
        self.disrupted_at: Optional[float] = time.monotonic() if disrupted else None
        self.attempted = self.committed = 0
        self.total_s = self.max_s = 0.0
        self.quorum_s = self.commit_s = 0.0  # of total_s: waiting for quorums, agreeing to commit
        self.quorum: Tuple[int, int] = (-1, 0)  # (id, size) of the last sync's quorum

    def disrupt(self, since: Optional[float] = None) -> None:
        """Mark the group disrupted (from ``since``, a monotonic time; default now)."""
        if not self.disrupted:
            self.disrupted, self.disrupted_at = True, time.monotonic() if since is None else since

    @property
    def full(self) -> bool:
        """Whether the last sync's quorum held every group of the run."""
        return self.quorum[1] >= self.num_groups

    def after_sync(self, manager: Any, step: int, local_step: int, duration: float, committed: bool,
                   quorum_s: float = 0.0, commit_s: float = 0.0) -> None:
        """Account for the sync that just ended; ``step`` is the training step after it; ``quorum_s`` and
        ``commit_s``: the seconds of it spent waiting for the quorum and agreeing to commit."""
        self.attempted += 1
        self.committed += committed
        self.total_s += duration
        self.quorum_s += quorum_s
        self.commit_s += commit_s
        self.max_s = max(self.max_s, duration)
        participants = manager.num_participants()
        if participants > self.num_groups:
            # Impossible with replica ids that carry the run id; if it happens, this run's weights
            # were averaged with a stranger's: stop rather than train on.
            raise ForeignQuorum(
                f"the quorum has {participants} members but this run has {self.num_groups} replica groups: "
                "groups of another run joined this lighthouse; stop the other run and start this one again")
        # torchft has no public accessor for the quorum id; it is the one value that tells a new
        # quorum of the same size (a group swapped) from the old one, so we read the private field.
        quorum = (int(getattr(manager, "_quorum_id", -1)), participants)
        if quorum != self.quorum or not committed:
            self.quorum = quorum
            self._record("sync", step, local_step=local_step, committed=committed, duration_s=round(duration, 3),
                         quorum_id=quorum[0], quorum_size=participants, global_sync=manager.current_step())
        restarted_at = self.lighthouse_restarted()
        if restarted_at is not None:
            self.disrupt(since=restarted_at)
        whole = committed and participants == self.num_groups  # a sync as if nothing had happened
        if not whole:
            self.disrupt(since=time.monotonic() - duration)
        if self.stalls.is_stall(duration, disrupted=self.disrupted, committed=committed):
            self.disrupt(since=time.monotonic() - duration)
            self._report(EventKind.SYNC_STALL, step=step, local_step=local_step, duration_s=round(duration, 3),
                         committed=committed, participants=participants)
        if whole and self.disrupted:
            self.disrupted = False
            since = round(time.monotonic() - self.disrupted_at, 3) if self.disrupted_at is not None else None
            self._report(EventKind.RECOVERED, step=step, local_step=local_step, participants=participants,
                         global_sync=manager.current_step(), params_sha256=self.fingerprint(),
                         healed_from=self.healed_from(), disrupted_s=since)

    def _record(self, kind: str, step: int, flush: bool = False, **fields: Any) -> None:
        if self.metrics is not None:
            self.metrics.add(kind, step, flush=flush, **fields)

    def _report(self, kind: EventKind, step: int, **fields: Any) -> None:
        self._record(kind, step, flush=kind == EventKind.RECOVERED, **fields)
        if self.completion is not None:
            self.completion.report(self.group, kind, step=step, **fields)
