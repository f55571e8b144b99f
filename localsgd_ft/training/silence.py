"""Stop waiting for a sync whose peer fell silent, within seconds, whatever ``localsgd.timeout_s`` is.

A peer that dies on the same host resets its connections at once; one whose host goes dark, whose link is
cut, or that is frozen answers nothing, and a gloo collective waits for it until its timeout. torchft 0.2.0
drops such a peer from the *next* quorum after the lighthouse's heartbeat timeout, but nothing ends the
collective in flight, and ``ProcessGroupGloo.abort()`` itself waits for it (docs/fault-tolerance.md has
the reproduction). So this guard wraps the Manager's allreduce: a wait that lasts beyond ``GRACE_S`` asks
the completion service every ``POLL_S`` which groups are silent (a role not heard from, or a trainer that
stopped beating, for ``lighthouse.heartbeat_timeout_ms``); when one of the sync's quorum is, or when the
service itself has been unreachable that long (this group is the one cut off), the wait ends: the error
is reported to the Manager (the sync does not commit, the weights stay as they were) and the process
group is set aside, unaborted, when the next quorum reconfigures, so that nothing waits for the stuck
collective. A peer that comes back in time still finds its partner there, and its collective completes.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, List, Optional, Set

from localsgd_ft.contract import EventKind

log = logging.getLogger("localsgd_ft.silence")

GRACE_S = 0.5  # a collective that ends sooner is never looked at (on loopback a sync takes milliseconds)
POLL_S = 0.5  # how often a long wait asks which groups are silent
KEPT = 16  # process groups set aside at most; the oldest one's collective has timed out long before


class SilentPeer(RuntimeError):
    """A sync's peer fell silent (or this group was cut off): the sync is given up."""


class SilenceGuard:
    """Wraps ``manager.allreduce`` (torchft 0.2.0's Manager) so that a long wait can end on silence.

    ``silent()`` returns the groups the completion service counts silent (raises when it cannot be
    reached); ``on_abandon(silent, waited_s, why)`` is told of every sync given up (metrics, an event).
    """

    def __init__(self, manager: Any, group: int, group_size: int, silent_after_s: float,
                 silent: Callable[[], List[int]],
                 on_abandon: Optional[Callable[[List[int], float, str], None]] = None) -> None:
        self.manager, self.group, self.group_size = manager, group, group_size
        self.silent_after_s = silent_after_s
        self._silent, self._on_abandon = silent, on_abandon
        self._stuck: Any = None  # the process group whose collective was given up, until it is set aside
        self.set_aside: List[Any] = []  # those set aside, kept alive (never aborted: that would wait)
        wrapper = manager._pg
        if not hasattr(wrapper, "configure") or not hasattr(wrapper, "_pg"):
            raise RuntimeError("this torchft's process group has no _pg to set aside; "
                               "localsgd_ft.training.silence needs updating")
        allreduce, configure = manager.allreduce, wrapper.configure

        def guarded_allreduce(*args: Any, **kwargs: Any) -> Any:
            work = allreduce(*args, **kwargs)
            pg = wrapper._pg  # after the call: an async quorum may have reconfigured it inside
            # Only torchft's managed work waits on a collective; an errored Manager returns a dummy one.
            return _GuardedWork(work, self, pg) if hasattr(work, "_work") and pg is not None else work

        def configure_aside(*args: Any, **kwargs: Any) -> Any:
            # The next quorum's process group replaces the stuck one: torchft's configure would abort it,
            # and wait for its collective, so it is moved out of the way (and kept) first.
            if wrapper._pg is not None and wrapper._pg is self._stuck:
                self.set_aside = (self.set_aside + [wrapper._pg])[-KEPT:]
                wrapper._pg = self._stuck = None
            return configure(*args, **kwargs)

        manager.allreduce, wrapper.configure = guarded_allreduce, configure_aside

    def given_up(self) -> bool:
        """Whether this sync was given up (the Manager's error is ours; torchft clears it at the next quorum)."""
        return isinstance(getattr(self.manager.errored(), "original_exception", None), SilentPeer)

    def peers(self) -> Optional[Set[int]]:
        """The other groups in the current quorum's process group (None: torchft does not say; any other)."""
        ranks = getattr(self.manager._pg, "_global_ranks", None)
        return {int(r) // self.group_size for r in ranks} - {self.group} if ranks else None

    def watch(self, done: threading.Event, started: float) -> Optional[str]:
        """Wait for ``done``; the reason to give up the sync (None: it ended by itself)."""
        peers = self.peers()
        contact = time.monotonic()
        while not done.wait(POLL_S):
            try:
                silent = sorted(set(self._silent()) - {self.group})
                silent = [g for g in silent if peers is None or g in peers]
                contact = time.monotonic()
            except Exception as e:
                if time.monotonic() - contact > self.silent_after_s:
                    return self._give_up([], started, f"the lighthouse role has not answered for "
                                                      f"{time.monotonic() - contact:.1f} s ({e}): this group is "
                                                      "cut off")
                continue
            if silent:
                return self._give_up(silent, started, f"group(s) {silent} of this sync's quorum fell silent")
        return None

    def _give_up(self, silent: List[int], started: float, why: str) -> str:
        waited = time.monotonic() - started
        line = f"gave up a sync after {waited:.1f} s: {why}"
        log.warning("group %d: %s", self.group, line)
        self.manager.report_error(SilentPeer(line))
        if self._on_abandon is not None:
            try:
                self._on_abandon(silent, waited, why)
            except Exception as e:
                log.warning("could not report the abandoned sync: %s", e)
        return line

    def stuck(self, pg: Any) -> None:
        """``pg``'s collective was given up: set it aside when the next quorum reconfigures."""
        self._stuck = pg


class _GuardedWork:
    """torchft's managed work, whose ``wait`` ends early when the guard says the sync is lost to silence."""

    def __init__(self, work: Any, guard: SilenceGuard, pg: Any) -> None:
        self._inner, self._guard, self._pg = work, guard, pg
        self._started = time.monotonic()

    def wait(self, timeout: Any = None) -> bool:
        guard = self._guard
        if guard.given_up():  # another collective of this sync was given up: so is this one
            return False
        done = threading.Event()
        self._inner._work.get_future().add_done_callback(lambda _fut: done.set())
        if not done.wait(GRACE_S) and guard.watch(done, self._started) is not None:
            guard.stuck(self._pg)
            return False
        return self._inner.wait(timeout) if timeout is not None else self._inner.wait()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def report_abandoned(completion: Any, group: int, metrics: Callable[[], Any], step: Callable[[], int]
                     ) -> Callable[[List[int], float, str], None]:
    """What the trainer's worker 0 does with an abandoned sync: a metrics line and an event."""

    def tell(silent: List[int], waited_s: float, why: str) -> None:
        fields = dict(silent=silent, waited_s=round(waited_s, 3))
        log = metrics()
        if log is not None:
            log.add(EventKind.SYNC_ABANDONED, step(), flush=True, **fields)
        if silent:  # cut off, the service cannot hear it: the metrics line is the record
            completion.event(group, EventKind.SYNC_ABANDONED, deadline_s=1.0, step=step(), **fields)

    return tell
