"""The completion service's state: which groups started, finished, were lost; the run's events."""

from __future__ import annotations

import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

from localsgd_ft.contract import HEARTBEAT_S, EventKind, FinalSync, GroupReport, SilentNode, Status, TrainerResult

# After a node of a multi-node group fails, how long its siblings (heartbeating every HEARTBEAT_S) have
# to report or be heard from, before the group finishes as failed without them.
FAILED_GROUP_GRACE_S = 3 * HEARTBEAT_S


class RequestError(ValueError):
    """A request the service refuses; ``code`` is the HTTP status."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class CompletionState:
    """What the groups have reported so far; thread-safe (read it through the methods)."""

    def __init__(self, expected: int, run: str = "", faults: Optional[Dict[int, str]] = None,
                 nodes: int = 1, silent_after_s: float = 5.0) -> None:
        self.expected = expected
        self.silent_after_s = silent_after_s  # lighthouse.heartbeat_timeout_ms: a group this quiet is silent
        self.nodes = nodes  # replica roles (nodes) per group
        self.run = run
        self.faults: Dict[int, str] = dict(faults or {})  # fault id -> kind: what may be reported
        self.ready = False
        self.incarnations: Dict[int, List[str]] = {}  # group -> the ids of its incarnations, in start order
        self.finished: Dict[int, dict] = {}
        self.node_reports: Dict[int, Dict[int, dict]] = {}  # group -> node -> its /finished report
        self.failing: Dict[int, float] = {}  # group -> when a node of it first reported a failure
        self.events: List[dict] = []
        self.fired: set[int] = set()
        self.abort: Optional[str] = None
        self.abort_quoted: Dict[int, str] = {}  # group -> its error, as the abort's reason quotes it
        self.completed: Optional[dict] = None
        self.incarnation = 0  # how many times the torchft lighthouse was started (see localsgd_ft.training.quorums)
        self.last_seen: Dict[Tuple[int, int], float] = {}  # (group, node) -> monotonic time of its last heartbeat
        self.trainer_quiet: Dict[Tuple[int, int], Optional[float]] = {}  # (group, node) -> as its last heartbeat said
        self.refused: Dict[Tuple[int, int], str] = {}  # (group, node) -> why its /finished was refused
        self.on_event: Optional[Callable[[dict], None]] = None  # called for every new event
        self._cond = threading.Condition()

    def open(self) -> None:
        with self._cond:
            self.ready = True
            self._cond.notify_all()

    def new_incarnation(self) -> None:
        """Count a (re)start of the torchft lighthouse: called before it can form any quorum."""
        with self._cond:
            self.incarnation += 1

    def heartbeat(self, group: int, node: int = 0, trainer_quiet_s: Optional[float] = None) -> None:
        with self._cond:
            self.last_seen[(group, node)] = time.monotonic()
            self.trainer_quiet[(group, node)] = trainer_quiet_s

    def silent_nodes(self) -> List[Tuple[int, int, float]]:
        """(group, node, seconds) of every node of a group still training that has been silent for
        ``silent_after_s``: the node's role, or a trainer on it.

        A node's silence runs from its role's last heartbeat; its trainers' from the moment that heartbeat
        says the quietest of them last showed it lives. A node not heard from yet is not silent: it is
        starting (its loss is :meth:`declare_never_seen_lost`'s to judge).
        """
        now = time.monotonic()
        with self._cond:
            quiet = [(g, n, now - self.last_seen[(g, n)] + (self.trainer_quiet.get((g, n)) or 0.0))
                     for g in self._open_groups() for n in self._unreported(g) if (g, n) in self.last_seen]
        return [(g, n, s) for g, n, s in quiet if s > self.silent_after_s]

    def silent_groups(self) -> List[int]:
        """Groups still training of which a node, or a trainer on it, is silent (:meth:`silent_nodes`)."""
        return sorted({g for g, _, _ in self.silent_nodes()})

    def mark_started(self, group: int, incarnation: str = "") -> int:
        """Group ``group`` is up; returns how many of its incarnations started before this one."""
        with self._cond:
            seen = self.incarnations.setdefault(group, [])
            if incarnation not in seen:
                seen.append(incarnation)
            self._cond.notify_all()
            return seen.index(incarnation)

    def refuse_report(self, group: int, node: int, reason: str) -> None:
        """Node ``node`` of ``group`` reported its end but the report was refused: should it fall silent, that
        is the reason its group is lost, not a vanished role."""
        with self._cond:
            self.refused[(group, node)] = reason

    def remember_fired(self, fault_ids: List[int]) -> None:
        """Failures an earlier job of this run fired: a report of one is refused, so it never fires again."""
        with self._cond:
            self.fired.update(fault_ids)

    def fired_ids(self) -> List[int]:
        with self._cond:
            return sorted(self.fired)

    def add_event(self, event: dict) -> bool:
        """Record ``event``; False if it repeats an already fired ``fault_id``."""
        with self._cond:
            fid = event.get("fault_id")
            if event.get("kind") == EventKind.FAULT:
                if fid in self.fired:
                    return False
                self.fired.add(fid)
            event["time"] = time.time()  # the lighthouse's clock, never the sender's
            self.events.append(event)
            self._cond.notify_all()
        if self.on_event is not None:
            self.on_event(event)
        return True

    def planned(self, fault_id: int, fault: str) -> bool:
        """Whether this run's plan holds failure ``fault_id`` of kind ``fault`` (only those may be reported)."""
        return self.faults.get(fault_id) == fault

    def mark_completed(self, final: FinalSync) -> None:
        """The first group to commit the final sync sets the run's final state; later ones only confirm it."""
        with self._cond:
            if self.completed is None:
                self.completed = final.wire()
                self._cond.notify_all()

    def mark_finished(self, group: int, report: dict, node: int = 0) -> None:
        """Node ``node`` of ``group`` ended with ``report`` (a :class:`GroupReport`'s JSON)."""
        with self._cond:
            earlier = self.finished.get(group)
            # The first report stands, except a loss we only inferred from silence: a role that
            # comes back and reports is better evidence.
            if earlier is not None and not GroupReport.model_validate(earlier).declared_lost:
                return
            reports = self.node_reports.setdefault(group, {})
            reports[node] = report
            if len(reports) < self.nodes:
                if GroupReport.model_validate(report).exit_code != 0 and earlier is None:
                    self.failing.setdefault(group, time.monotonic())  # settled by settle_failing()
                return  # the other nodes are still running (or, lost, only all of them can say otherwise)
            self.failing.pop(group, None)
            self.finished[group] = merge_node_reports(group, reports).wire()
            self._cond.notify_all()

    def settle_failing(self, grace_s: float = FAILED_GROUP_GRACE_S) -> List[int]:
        """Finish the groups a node of which failed ``grace_s`` ago while others have not reported.

        A sibling that has not heartbeated since the failure is gone, and is why
        the group failed (a node that loses its peer fails within seconds): the
        reason names it.
        """
        now = time.monotonic()
        settled = []
        with self._cond:
            for group, since in list(self.failing.items()):
                if group in self.finished:
                    del self.failing[group]
                    continue
                if now - since < grace_s:
                    continue
                merged = merge_node_reports(group, self.node_reports[group])
                gone = [n for n in self._unreported(group) if self.last_seen.get((group, n), 0.0) < since]
                if gone:
                    silent = now - self.last_seen.get((group, gone[0]), since)
                    blamed = TrainerResult.failed(merged.result, f"role lost: no heartbeat from node {gone[0]} for "
                                                                 f"{silent:.0f} s; the group cannot go on without it")
                    merged = merged.model_copy(update={"result": blamed})
                self.finished[group] = merged.wire()
                del self.failing[group]
                settled.append(group)
            if settled:
                self._cond.notify_all()
        return settled

    def declare_silent_lost(self, timeout_s: float) -> List[Tuple[int, str]]:
        """Groups a node of which has heartbeated before but not for ``timeout_s``: mark them finished as lost;
        each with the reason (a refused report, if that was the last thing heard from it)."""
        now = time.monotonic()
        with self._cond:
            silent: Dict[int, Tuple[int, float]] = {}
            for g in self._open_groups():
                late = [(n, now - self.last_seen[(g, n)]) for n in self._unreported(g)
                        if (g, n) in self.last_seen and now - self.last_seen[(g, n)] > timeout_s]
                if late:
                    silent[g] = late[0]
            reasons = {g: self._silence(g, n, s) for g, (n, s) in silent.items()}
            self._mark_lost(reasons)
        return sorted(reasons.items())

    def _silence(self, group: int, node: int, silent_s: float) -> str:
        """Why a silent node's group is lost (caller holds the lock)."""
        refused = self.refused.get((group, node))
        if refused is not None:
            return (f"its report of how it ended{self._from_node(node)} was refused by the completion service "
                    f"({refused}); silent for {silent_s:.0f} s since")
        return f"role lost: no heartbeat{self._from_node(node)} for {silent_s:.0f} s"

    def declare_never_seen_lost(self, after_s: float) -> List[int]:
        """Groups a node of which never made contact (no heartbeat, no report): mark them finished as lost."""
        with self._cond:
            unseen: Dict[int, int] = {}
            for g in self._open_groups():
                never = [n for n in self._unreported(g) if (g, n) not in self.last_seen]
                if never:
                    unseen[g] = never[0]
            self._mark_lost({g: f"role lost: it{self._from_node(n)} never reached the lighthouse role in "
                                f"{after_s:.0f} s" for g, n in unseen.items()})
        return sorted(unseen)

    def _open_groups(self) -> List[int]:
        """Groups that have not finished (caller holds the lock)."""
        return [g for g in range(self.expected) if g not in self.finished]

    def _unreported(self, group: int) -> List[int]:
        """The nodes of ``group`` that have not reported their end (caller holds the lock)."""
        return [n for n in range(self.nodes) if n not in self.node_reports.get(group, {})]

    def _from_node(self, node: int) -> str:
        return f" from node {node}" if self.nodes > 1 else ""

    def _mark_lost(self, reasons: Dict[int, str]) -> None:
        """Record groups as lost by inference (caller holds the lock); a later report of theirs replaces it."""
        for g, reason in reasons.items():
            self.finished[g] = GroupReport(group=g, exit_code=-1, declared_lost=True,
                                           result=TrainerResult(error=reason)).wire()
        if reasons:
            self._cond.notify_all()

    def set_abort(self, reason: str, quoted: Optional[Dict[int, str]] = None) -> bool:
        """Abort the run with ``reason``, which quotes the errors ``quoted`` (group -> error); False if it was
        already aborted (the first reason stands)."""
        with self._cond:
            if self.abort is not None:
                return False
            self.abort = reason
            self.abort_quoted = dict(quoted or {})
            self._cond.notify_all()
            return True

    def status(self) -> dict:
        nodes = self.silent_nodes()
        with self._cond:
            return Status(silent=sorted({g for g, _, _ in nodes}), run=self.run, started=sorted(self.incarnations),
                          expected=self.expected, fired=sorted(self.fired), finished=sorted(self.finished),
                          abort=self.abort, completed=self.completed, lighthouse_incarnation=self.incarnation,
                          silent_nodes=[SilentNode(group=g, node=n, silent_s=round(q, 3)) for g, n, q in nodes]
                          if self.nodes > 1 else []).wire()

    def snapshot(self, events: bool = True) -> dict:
        """Copies of what was reported, taken under the lock (for the summary and the verdict).

        ``events=False`` leaves the event log out (it grows with every failure; the checks the
        lighthouse role makes twice a second do not need it).
        """
        with self._cond:
            return {"finished": {g: dict(r) for g, r in self.finished.items()},
                    "events": [dict(e) for e in self.events] if events else [], "abort": self.abort,
                    "abort_quoted": dict(self.abort_quoted),
                    "completed": dict(self.completed) if self.completed else None}

    def wait(self, predicate: Callable[[], bool], timeout: Optional[float] = None) -> bool:
        """Wait until ``predicate()`` (evaluated under the lock) holds, or ``timeout``."""
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def all_finished(self) -> bool:
        with self._cond:
            return len(self.finished) >= self.expected


def merge_node_reports(group: int, reports: Dict[int, dict]) -> GroupReport:
    """One group's report from its nodes' reports: the first failure's exit code, worker 0's result.

    The result is the one that has parameters (the node that ran worker 0), else
    the first that names an error.
    """
    ordered = [GroupReport.model_validate(reports[n]) for n in sorted(reports)]
    failed = [r for r in ordered if r.exit_code != 0]
    with_params = [r.result for r in ordered if r.result is not None and r.result.params_sha256]
    with_error = [r.result for r in ordered if r.result is not None and r.result.error]
    # A failed group's reason beats a stale success; a group that finished brings worker 0's result.
    preferred = with_error + with_params if failed else with_params + with_error
    several = {"nodes_reported": sorted(reports)} if len(reports) > 1 else {}
    return GroupReport(group=group, exit_code=failed[0].exit_code if failed else 0,
                       result=preferred[0] if preferred else None, **several)
