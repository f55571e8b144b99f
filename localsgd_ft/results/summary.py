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
from typing import Dict, List, Optional

from localsgd_ft.config import ExperimentConfig, to_dict

# How long after a failure's recovery a survivor's stall report may still arrive.
STALL_REPORT_SLACK_S = 5.0


def _recoveries(events: List[dict]) -> List[dict]:
    faults = [e for e in events if e.get("kind") == "fault"]
    recovered = [e for e in events if e.get("kind") == "recovered"]
    stalls = [e for e in events if e.get("kind") == "sync_stall"]
    # A stall belongs to the latest failure before it ended: when failures come closer together
    # than a recovery takes, each stall is still counted once, for the failure that caused it.
    cause = {id(s): max((i for i, f in enumerate(faults) if f["time"] <= s["time"]), default=None) for s in stalls}
    out = []
    for i, f in enumerate(faults):
        t, target, is_lh = f["time"], f.get("target"), f.get("fault") == "lighthouse"
        back = next((r for r in recovered if r["time"] > t and (is_lh or r.get("group") == target)), None)
        end = (back["time"] if back else t + 3600) + STALL_REPORT_SLACK_S
        survivors = [s["duration_s"] for s in stalls if cause[id(s)] == i
                     and s["time"] <= end and (is_lh or s.get("group") != target)]
        out.append({
            "fault_id": f.get("fault_id"),
            "kind": f.get("fault"),
            "moment": f.get("moment", "step"),
            "group": None if is_lh else target,
            "step": f.get("step"),
            "recovered": back is not None,
            "recovery_s": round(back["time"] - t, 3) if back else None,
            "survivor_stall_s": round(max(survivors), 3) if survivors else 0.0,
        })
    return out


def _ranks_identical(result: dict) -> Optional[bool]:
    """Whether all workers of a group ended with the same parameters (None: the group reported none)."""
    every = result.get("worker_params_sha256")
    if not every:
        return None if "params_sha256" not in result else True
    return len(set(every)) == 1 and every[0] == result.get("params_sha256")


def build_summary(cfg: ExperimentConfig, reports: dict, started_at: float, config_path: str,
                  lighthouse_restarts: int, lighthouse_rss_mb: float, run_id: str = "",
                  role_error: Optional[str] = None, stopped: bool = False) -> dict:
    """summary.json from ``reports`` (:meth:`CompletionState.snapshot`: finished, events, abort, completed)."""
    finished, events = reports["finished"], reports["events"]
    groups: Dict[str, dict] = {}
    for g in range(cfg.replica_groups.count):
        report = finished.get(g) or {}
        result = report.get("result") or {}
        exit_code = report.get("exit_code")
        groups[str(g)] = {
            **result,
            # Computed here, after the result: a report cannot claim them.
            "exit_code": exit_code,
            "succeeded": exit_code == 0 and "params_sha256" in result,
            "lost": exit_code not in (0, None),
            "ranks_identical": _ranks_identical(result),
        }
    ok = [g for g in groups.values() if g["succeeded"]]
    lost = [int(g) for g, rep in groups.items() if rep["lost"]]
    # Every worker of every group that trained to the end (worker 0's alone in older results).
    hashes = {h for g in ok for h in g.get("worker_params_sha256") or [g["params_sha256"]]}
    reason: Optional[str] = None
    if role_error:
        reason = role_error
    elif reports["abort"]:
        reason = reports["abort"]
    elif stopped or len(finished) < cfg.replica_groups.count:
        reason = "stopped before every replica group finished"
    elif len(ok) < cfg.lighthouse.min_replicas:
        reason = f"{len(ok)} replica group(s) trained to the end, fewer than lighthouse.min_replicas"
    elif not all(g["ranks_identical"] for g in ok):
        reason = ("the workers of replica group(s) " + ", ".join(n for n, g in groups.items() if g["succeeded"]
                                                                and not g["ranks_identical"])
                  + " finished with different parameters")
    elif len(hashes) > 1:
        reason = "replica groups finished with different parameters"
    # Groups that could not even start (e.g. no GPU) said why: that is the reason to show.
    errors = [f"group {g}: {rep['error']}" for g, rep in groups.items() if not rep["succeeded"] and rep.get("error")]
    if reason and errors and not any(e in reason for e in errors):
        reason = f"{reason}; " + "; ".join(errors)
    injected = [e for e in events if e.get("kind") == "fault"]
    resumed = [e["step"] for e in events if e.get("kind") == "resumed"]
    return {
        "name": cfg.name,
        "algorithm": cfg.localsgd.algorithm,
        "run_id": run_id,
        "config_path": config_path,
        "succeeded": reason is None,
        "stopped": stopped,  # by a signal (Ctrl-C, a cancel, the client gone): resumable
        "failure_reason": reason,
        "final_test_accuracy": ok[0]["final_test_accuracy"] if ok else None,
        "params_identical": len(ok) > 0 and len(hashes) == 1,
        "lost_groups": lost,
        "lost_reasons": {str(g): groups[str(g)].get("error") or "torchrun exited with "
                         f"{groups[str(g)]['exit_code']} (replica_groups.max_restarts exhausted)" for g in lost},
        "completed": reports.get("completed"),
        "resumed_from_step": min(resumed) if resumed else 0,
        "checkpoints_written": [{"step": e["step"], "sync": e.get("sync"), "group": e["group"]}
                                for e in events if e.get("kind") == "checkpoint"],
        "wall_time_s": round(time.time() - started_at, 3),
        "lighthouse_peak_rss_mb": lighthouse_rss_mb,
        "lighthouse_restarts": lighthouse_restarts,
        "faults": {
            "planned": len(cfg.fault_plan),
            "injected": len(injected),
            "by_kind": dict(Counter(e.get("fault") for e in injected)),
        },
        "recoveries": _recoveries(events),
        "events": events,
        "replica_groups": groups,
        "config": to_dict(cfg),
    }
