"""summary.json: the run's outcome, built by the lighthouse role from what the groups reported.

Besides each group's result it answers the fault-tolerance questions: which
failures were injected (by kind), which groups were lost, and for each failure
how long the hit group took to its first committed sync with full membership
(``recovery_s``) and how long the other groups stalled meanwhile
(``survivor_stall_s``). All times come from the lighthouse role's clock (events
are stamped when they arrive), so they compare across hosts.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any, Dict, List, Mapping, Optional

from localsgd_ft.config import ExperimentConfig, to_dict
from localsgd_ft.contract import (CheckpointEntry, CheckpointEvent, CheckpointFailedEvent, FaultCounts, FaultEvent,
                                  GroupSummary, RecoveredEvent, Recovery, ResumedEvent, Snapshot, Summary,
                                  SyncStallEvent, TrainerResult)

# How long after a failure's recovery a survivor's stall report may still arrive.
STALL_REPORT_SLACK_S = 5.0


def _recoveries(events: List[Any]) -> List[Recovery]:
    # The service stamps every event it stores; one without a time (a snapshot made by hand) cannot be paired.
    timed = [e for e in events if e.time is not None]
    faults = [e for e in timed if isinstance(e, FaultEvent)]
    recovered = [e for e in timed if isinstance(e, RecoveredEvent)]
    stalls = [e for e in timed if isinstance(e, SyncStallEvent)]
    # A stall belongs to the latest failure before it ended: when failures come closer together
    # than a recovery takes, each stall is still counted once, for the failure that caused it.
    cause = {id(s): max((i for i, f in enumerate(faults) if f.time <= s.time), default=None) for s in stalls}
    out = []
    for i, f in enumerate(faults):
        t, target, is_lh = f.time, f.target, f.fault == "lighthouse"
        back = next((r for r in recovered if r.time > t and (is_lh or r.group == target)), None)
        end = (back.time if back else t + 3600) + STALL_REPORT_SLACK_S
        survivors = [s.duration_s for s in stalls if cause[id(s)] == i
                     and s.time <= end and (is_lh or s.group != target)]
        out.append(Recovery(
            fault_id=f.fault_id, kind=f.fault, moment=f.moment, group=None if is_lh else target, step=f.step,
            recovered=back is not None, recovery_s=round(back.time - t, 3) if back else None,
            survivor_stall_s=round(max(survivors), 3) if survivors else 0.0,
        ))
    return out


def _ranks_identical(result: TrainerResult) -> Optional[bool]:
    """Whether all workers of a group ended with the same parameters (None: the group reported none)."""
    every = result.worker_params_sha256
    if not every:
        return None if result.params_sha256 is None else True
    return len(set(every)) == 1 and every[0] == result.params_sha256


def _hashes(ok: List[GroupSummary]) -> set:
    """The final parameters of every worker of every group that trained to the end (worker 0's alone in
    older results)."""
    return {h for g in ok for h in g.worker_params_sha256 or [g.params_sha256]}


def _groups(cfg: ExperimentConfig, snapshot: Snapshot) -> Dict[str, GroupSummary]:
    """Each group's result, and what is computed here, after it: a report cannot claim those."""
    groups: Dict[str, GroupSummary] = {}
    for g in range(cfg.replica_groups.count):
        report = snapshot.finished.get(g)
        result = (report.result if report is not None else None) or TrainerResult()
        exit_code = report.exit_code if report is not None else None
        groups[str(g)] = GroupSummary(
            **result.wire(), exit_code=exit_code,
            succeeded=exit_code == 0 and result.params_sha256 is not None, lost=exit_code not in (0, None),
            ranks_identical=_ranks_identical(result))
    return groups


def _failure_reason(cfg: ExperimentConfig, snapshot: Snapshot, groups: Dict[str, GroupSummary],
                    role_error: Optional[str], stopped: bool) -> Optional[str]:
    """Why the run failed (None: it succeeded), with the errors of the groups that failed."""
    ok = [g for g in groups.values() if g.succeeded]
    reason: Optional[str] = None
    if role_error:
        reason = role_error
    elif snapshot.abort:
        reason = snapshot.abort
    elif stopped or len(snapshot.finished) < cfg.replica_groups.count:
        reason = "stopped before every replica group finished"
    elif len(ok) < cfg.lighthouse.min_replicas:
        reason = f"{len(ok)} replica group(s) trained to the end, fewer than lighthouse.min_replicas"
    elif not all(g.ranks_identical for g in ok):
        reason = ("the workers of replica group(s) " + ", ".join(n for n, g in groups.items() if g.succeeded
                                                                and not g.ranks_identical)
                  + " finished with different parameters")
    elif len(_hashes(ok)) > 1:
        reason = "replica groups finished with different parameters"
    # Groups that could not even start (e.g. no GPU) said why: that is the reason to show, unless an
    # abort's reason already quotes them.
    failed = {int(g): rep.error for g, rep in groups.items() if not rep.succeeded and rep.error}
    quoted = reason == snapshot.abort and any(snapshot.abort_quoted.get(g) == e for g, e in failed.items())
    if reason and failed and not quoted:
        reason = f"{reason}; " + "; ".join(f"group {g}: {e}" for g, e in failed.items())
    return reason


def summarize(cfg: ExperimentConfig, reports: Mapping[str, Any], started_at: float, config_path: str,
              lighthouse_restarts: int, lighthouse_rss_mb: float, run_id: str = "",
              role_error: Optional[str] = None, stopped: bool = False) -> Summary:
    """summary.json from ``reports`` (:meth:`CompletionState.snapshot`: finished, events, abort, completed)."""
    snapshot = Snapshot.model_validate(reports)
    groups = _groups(cfg, snapshot)
    reason = _failure_reason(cfg, snapshot, groups, role_error, stopped)
    ok = [g for g in groups.values() if g.succeeded]
    lost = [int(g) for g, rep in groups.items() if rep.lost]
    events = snapshot.events
    injected = [e for e in events if isinstance(e, FaultEvent)]
    resumed = [e.step for e in events if isinstance(e, ResumedEvent)]
    return Summary(
        name=cfg.name,
        algorithm=cfg.localsgd.algorithm,
        run_id=run_id,
        config_path=config_path,
        succeeded=reason is None,
        stopped=stopped,  # by a signal (Ctrl-C, a cancel, the client gone): resumable
        failure_reason=reason,
        final_test_accuracy=ok[0].final_test_accuracy if ok else None,
        params_identical=len(ok) > 0 and len(_hashes(ok)) == 1,
        lost_groups=lost,
        lost_reasons={str(g): groups[str(g)].error or "torchrun exited with "
                      f"{groups[str(g)].exit_code} (replica_groups.max_restarts exhausted)" for g in lost},
        completed=snapshot.completed,
        resumed_from_step=min(resumed) if resumed else 0,
        checkpoints_written=[CheckpointEntry(step=e.step, sync=e.sync, group=e.group)
                             for e in events if isinstance(e, CheckpointEvent)],
        checkpoints_stopped=next((f"group {e.group} at step {e.step}: {e.error}" for e in events
                                  if isinstance(e, CheckpointFailedEvent)), None),
        wall_time_s=round(time.time() - started_at, 3),
        lighthouse_peak_rss_mb=lighthouse_rss_mb,
        lighthouse_restarts=lighthouse_restarts,
        faults=FaultCounts(planned=len(cfg.fault_plan), injected=len(injected),
                           by_kind=dict(Counter(e.fault for e in injected))),
        recoveries=_recoveries(events),
        events=events,
        replica_groups=groups,
        config=to_dict(cfg),
    )


def build_summary(cfg: ExperimentConfig, reports: Mapping[str, Any], started_at: float, config_path: str,
                  lighthouse_restarts: int, lighthouse_rss_mb: float, **keywords: Any) -> Dict[str, Any]:
    """summary.json's JSON values (:func:`summarize`, dumped as written)."""
    return summarize(cfg, reports, started_at, config_path, lighthouse_restarts, lighthouse_rss_mb, **keywords).wire()
