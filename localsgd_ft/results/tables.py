"""The end-of-run table (what the lighthouse role prints and report/summary.txt holds), and text columns.

Every number comes from ``summary.json``; ``compare`` lays out its tables with the same helpers.
"""

from __future__ import annotations

from typing import Any, List, Sequence

from localsgd_ft.contract import Summary, SummaryLike


def fmt(value: Any, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def columns(rows: Sequence[Sequence[str]]) -> List[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]




def _workers(summary: Summary) -> str:
    """' (every worker: 4)' when groups have several workers: the identity covers all of them."""
    count = sum(len(g.worker_params_sha256 or []) for g in summary.groups() if g.succeeded)
    return f" (every worker: {count})" if count > len(summary.replica_groups) else ""


def _group_rows(summary: Summary) -> List[List[str]]:
    rows = [["group", "accuracy", "steps", "syncs_committed", "syncs_failed", "restarts", "samples/s", "sent_MB",
             "status"]]
    for g, rep in sorted(summary.replica_groups.items(), key=lambda kv: int(kv[0])):
        attempted, committed = rep.syncs_attempted, rep.syncs_committed
        failed = attempted - committed if attempted is not None and committed is not None else None
        status = "ok" if rep.succeeded else "lost" if rep.lost else "unfinished"
        rows.append([g, fmt(rep.final_test_accuracy, ".4f"), fmt(rep.steps), fmt(committed),
                     fmt(failed), fmt(rep.restarts), fmt(rep.samples_per_s, ".1f"),
                     fmt(None if rep.sync_bytes is None else rep.sync_bytes / 2**20, ".1f"), status])
    return rows


def summary_table(summary: SummaryLike) -> str:
    """The end-of-run table, every number taken from ``summary``."""
    s = Summary.of(summary)
    verdict = "SUCCEEDED" if s.succeeded else "FAILED"
    lines = [f"run {s.name} ({s.algorithm}): {verdict}"
             + (f" ({s.failure_reason})" if s.failure_reason else "")
             + f"; final test accuracy {fmt(s.final_test_accuracy, '.4f')}"
             + f"; parameters identical: {'yes' if s.params_identical else 'no'}{_workers(s)}"
             + f"; wall time {fmt(s.wall_time_s, '.1f')} s"]
    lines += columns(_group_rows(s))
    by_kind = ", ".join(f"{k}: {n}" for k, n in sorted(s.faults.by_kind.items())) or "none"
    lines.append(f"failures: {s.faults.injected} injected of {s.faults.planned} planned "
                 f"({by_kind}); lighthouse restarts: {s.lighthouse_restarts}")
    if s.recoveries:
        rows = [["failure", "kind", "group", "step", "recovered", "recovery_s", "survivor_stall_s"]]
        for r in s.recoveries:
            rows.append([f"#{r.fault_id}", str(r.kind), "lighthouse" if r.group is None else str(r.group),
                         fmt(r.step), "yes" if r.recovered else "no", fmt(r.recovery_s, ".2f"),
                         fmt(r.survivor_stall_s, ".2f")])
        lines += columns(rows)
    return "\n".join(lines)
