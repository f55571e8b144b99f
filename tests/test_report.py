"""Metrics files and the run report: unit tests on a hand-made output dir, and real 2-group runs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

from conftest import REPO, small_config, wait_no_processes, write_config
from localsgd_ft.metrics import MetricsLog, metrics_path, read_all, read_events
from localsgd_ft.report import PLOTS, main, make_report, summary_table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _group_rows(table: str) -> Dict[str, List[str]]:
    """The per-group rows of the summary table, by group id."""
    lines = table.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("group "))
    rows = {}
    for line in lines[start + 1:]:
        if line.startswith("failures:"):
            break
        cells = line.split()
        rows[cells[0]] = cells
    return rows


def _assert_table_matches(table: str, summary: dict) -> None:
    rows = _group_rows(table)
    assert set(rows) == set(summary["replica_groups"])
    for g, rep in summary["replica_groups"].items():
        _, acc, steps, committed, failed, restarts, rate, _status = rows[g]
        assert float(acc) == round(rep["final_test_accuracy"], 4)
        assert int(steps) == rep["steps"] and int(committed) == rep["syncs_committed"]
        assert int(failed) == rep["syncs_attempted"] - rep["syncs_committed"]
        assert int(restarts) == rep["restarts"] and float(rate) == rep["samples_per_s"]
    for r in summary["recoveries"]:
        row = next(line.split() for line in table.splitlines() if line.startswith(f"#{r['fault_id']} "))
        assert row[1] == r["kind"] and float(row[5]) == round(r["recovery_s"], 2)
        assert float(row[6]) == round(r["survivor_stall_s"], 2)
    assert f"{summary['faults']['injected']} injected of {summary['faults']['planned']} planned" in table


def _assert_pngs(report_dir: Path) -> None:
    for name in PLOTS:
        data = (report_dir / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, name  # a real picture, not an empty canvas


# ---------------------------------------------------------------------------- a hand-made run

def _group(result: dict) -> dict:
    return {"exit_code": 0, "succeeded": True, "lost": False, "params_sha256": "h", "final_test_accuracy": 0.91234,
            **result}


SUMMARY = {
    "name": "hand", "succeeded": True, "failure_reason": None, "final_test_accuracy": 0.91234,
    "params_identical": True, "wall_time_s": 42.5, "lighthouse_restarts": 0,
    "faults": {"planned": 1, "injected": 1, "by_kind": {"kill": 1}},
    "recoveries": [{"fault_id": 0, "kind": "kill", "group": 1, "step": 50, "recovered": True,
                    "recovery_s": 4.126, "survivor_stall_s": 0.8}],
    "events": [{"group": 1, "kind": "fault", "fault": "kill", "fault_id": 0, "target": 1, "step": 50,
                "time": 1005.0}],
    "replica_groups": {
        "0": _group({"steps": 100, "syncs_committed": 11, "syncs_attempted": 11, "restarts": 0,
                     "samples_per_s": 1234.5}),
        "1": _group({"steps": 40, "syncs_committed": 4, "syncs_attempted": 5, "restarts": 1,
                     "samples_per_s": 1100.0}),
    },
}


def _write_run(run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.json").write_text(json.dumps(SUMMARY))
    for g in (0, 1):
        lines = [{"t": 1000.0, "kind": "start", "group": g, "step": 0, "restart": 0},
                 {"t": 1000.1, "kind": "sync", "group": g, "step": 0, "quorum_id": 1, "quorum_size": 2,
                  "committed": True}]
        lines += [{"t": 1000.0 + s / 10, "kind": "train", "group": g, "step": s, "loss": 2.0 / s,
                   "samples_per_s": 1200.0 + g, "quorum_size": 2} for s in range(10, 50, 10)]
        lines.append({"t": 1004.0, "kind": "eval", "group": g, "step": 40, "test_accuracy": 0.6})
        if g == 0:
            lines += [{"t": 1006.0, "kind": "sync", "group": 0, "step": 60, "quorum_id": 2, "quorum_size": 1},
                      {"t": 1009.2, "kind": "sync", "group": 0, "step": 90, "quorum_id": 3, "quorum_size": 2},
                      {"t": 1009.2, "kind": "recovered", "group": 0, "step": 90, "participants": 2}]
            lines += [{"t": 1000.0 + s / 10, "kind": "train", "group": 0, "step": s, "loss": 2.0 / s,
                       "samples_per_s": 1150.0, "quorum_size": 1 if s < 90 else 2} for s in range(60, 110, 10)]
        else:
            lines += [{"t": 1005.0, "kind": "fault", "group": 1, "step": 50, "fault": "kill", "fault_id": 0,
                       "target": 1},
                      {"t": 1008.0, "kind": "start", "group": 1, "step": 0, "restart": 1},
                      {"t": 1009.1, "kind": "recovered", "group": 1, "step": 90, "participants": 2,
                       "healed_from": 0}]
        lines.append({"t": 1010.0, "kind": "end", "group": g, "step": 100, "test_accuracy": 0.91234})
        path = metrics_path(run_dir, g)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(e) + "\n" for e in lines) + '{"t": 1011, "kind": "tru')  # killed mid-line


def test_report_writes_pngs_and_a_table_equal_to_summary_json(tmp_path, capsys):
    _write_run(tmp_path)
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    _assert_pngs(tmp_path / "report")
    table = (tmp_path / "report" / "summary.txt").read_text()
    assert table.strip() in out
    _assert_table_matches(table, SUMMARY)
    assert _group_rows(table)["1"][4] == "1"  # one failed sync
    assert "summary.json" in out and str(tmp_path / "report") in out


def test_report_without_summary_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "localsgd_ft.report", str(tmp_path)], capture_output=True,
                          text=True, cwd=REPO)
    assert proc.returncode == 2
    assert "no summary.json here" in proc.stderr and str(tmp_path) in proc.stderr


def test_report_without_metrics_prints_the_table_only(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps(SUMMARY))
    table, files = make_report(tmp_path)
    assert [f.name for f in files] == ["summary.txt"]
    _assert_table_matches(table, SUMMARY)


def test_metrics_are_buffered_until_flushed_and_partial_lines_skipped(tmp_path):
    log = MetricsLog(metrics_path(tmp_path, 3), 3)
    log.add("train", 10, loss=1.0)
    assert not log.path.exists() or log.path.read_text() == ""  # nothing written per event
    log.add("eval", 10, flush=True, test_accuracy=0.5)
    events = read_events(log.path)
    assert [(e["kind"], e["group"], e["step"]) for e in events] == [("train", 3, 10), ("eval", 3, 10)]
    with open(log.path, "a") as f:
        f.write('{"t": 1, "kind"')
    assert read_all(tmp_path) == {3: events}


def test_table_of_a_failed_run_with_a_lost_group():
    summary = json.loads(json.dumps(SUMMARY))
    summary.update(succeeded=False, failure_reason="too few groups", final_test_accuracy=None)
    summary["replica_groups"]["1"] = {"exit_code": 1, "succeeded": False, "lost": True}
    table = summary_table(summary)
    assert "FAILED (too few groups)" in table
    assert _group_rows(table)["1"] == ["1", "-", "-", "-", "-", "-", "-", "lost"]


# ---------------------------------------------------------------------------- real runs

@pytest.mark.integration
@pytest.mark.parametrize("fault", [True, False], ids=["kill", "no-fault"])
def test_real_run_writes_metrics_and_report(tmp_path, cifar_root, torchx_run, fault):
    faults = {"enabled": True, "schedule": [{"kind": "kill", "group": 1, "at_step": 250}]} if fault else {}
    cfg = small_config(tmp_path, cifar_root, train={"max_steps": 600, "eval_every": 200, "log_every": 50},
                       faults=faults)
    path = write_config(tmp_path, cfg)
    run = torchx_run(path)
    assert run.wait(240) == 0, run.tail()
    assert wait_no_processes(path) == []
    out = Path(cfg["output_dir"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["succeeded"], summary["failure_reason"]

    # The progress line, and the dashboard address at the start.
    assert any(re.search(r"group 0 step 200 train_step 200/600 \(33%\) loss \S+ acc [0-9.]+ samples/s \d+ "
                         r"quorum \d/2 committed_syncs \d+ eta \S+", line) for line in run.lines), run.tail(200)
    assert any(f"dashboard: http://localhost:{cfg['lighthouse']['port']}/" in line for line in run.lines)

    metrics = read_all(out)
    assert set(metrics) == {0, 1}
    for g, events in metrics.items():
        kinds = [e["kind"] for e in events]
        rep = summary["replica_groups"][str(g)]
        assert kinds[0] == "start" and events[0]["restart"] == 0 and kinds[-1] == "end"
        end = events[-1]
        assert end["step"] == 600 and end["test_accuracy"] == rep["final_test_accuracy"]
        assert (end["syncs_committed"], end["syncs_attempted"]) == (rep["syncs_committed"], rep["syncs_attempted"])
        train = [e for e in events if e["kind"] == "train"]
        assert train and all(e["loss"] >= 0 and e["samples_per_s"] > 0 and e["lr"] == 0.02 for e in train)
        assert {e["quorum_size"] for e in events if e["kind"] == "sync"} >= {2}
        last_start = max(i for i, k in enumerate(kinds) if k == "start")
        evals = [e["local_step"] for e in events[last_start:] if e["kind"] == "eval"]
        assert evals == [e["step"] for e in rep["evals"]]  # the summary holds the last incarnation's
        assert all(e["t"] <= f["t"] for e, f in zip(events, events[1:]) if e["kind"] != "fault")
    m0, m1 = metrics[0], metrics[1]
    if fault:
        (kill,) = [e for e in m1 if e["kind"] == "fault"]
        assert kill["fault"] == "kill" and kill["step"] == 250
        restarts = [e for e in m1 if e["kind"] == "start" and e["restart"] == 1]
        assert len(restarts) == 1 and restarts[0]["t"] > kill["t"]
        back = [e for e in m1 if e["kind"] == "recovered"]
        assert back and back[0]["healed_from"] == 0 and back[0]["t"] > restarts[0]["t"]
        # The survivor saw the quorum shrink to itself and grow back.
        sizes = [e["quorum_size"] for e in m0 if e["kind"] == "sync"]
        assert 1 in sizes and sizes[-1] == 2, sizes
        assert any(e["kind"] == "recovered" for e in m0)
    else:
        assert not any(e["kind"] == "fault" for e in m0 + m1)
        for events in (m0, m1):  # on a busy machine a slow sync counts as a stall, and its end as a recovery
            kinds = [e["kind"] for e in events]
            for i, k in enumerate(kinds):
                if k == "recovered":
                    assert "sync_stall" in kinds[:i], kinds
        assert [e["kind"] for e in m0 + m1].count("start") == 2

    report_dir = out / "report"
    _assert_pngs(report_dir)
    table = (report_dir / "summary.txt").read_text()
    _assert_table_matches(table, summary)
    # The end of the console: the table, then where the report and summary.json are.
    console = "\n".join(run.lines)
    for row in table.splitlines():
        assert row in console
    verdict = next(line for line in run.lines if "lighthouse: training SUCCEEDED" in line)
    assert f"summary: {out / 'summary.json'}" in verdict and f"report: {report_dir}" in verdict
