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

from localsgd_ft.results.metrics import MetricsLog, metrics_path, read_all, read_events
from localsgd_ft.results.plots import (PLOTS, _markers, _plot_accuracy, _plot_loss, _plot_quorum, _plot_throughput,
                                       _start_time, last_step, value_at)
from localsgd_ft.results.report import main, make_report
from localsgd_ft.results.tables import summary_table

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
        _, acc, steps, committed, failed, restarts, rate, sent, _status = rows[g]
        assert float(acc) == round(rep["final_test_accuracy"], 4)
        assert int(steps) == rep["steps"] and int(committed) == rep["syncs_committed"]
        assert int(failed) == rep["syncs_attempted"] - rep["syncs_committed"]
        assert int(restarts) == rep["restarts"] and float(rate) == rep["samples_per_s"]
        assert sent == ("-" if rep.get("sync_bytes") is None else f"{rep['sync_bytes'] / 2**20:.1f}")
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


def test_metrics_names_that_lead_to_a_device_are_skipped(tmp_path, capsys):
    """A link to /dev/full (the full-disk test) or /dev/zero would be read forever; /dev/null stands in."""
    log = MetricsLog(metrics_path(tmp_path, 0), 0)
    log.add("start", 0, flush=True)
    metrics_path(tmp_path, 1).symlink_to("/dev/null")
    assert list(read_all(tmp_path)) == [0]
    assert "group_1.jsonl: not a regular file" in capsys.readouterr().err


def test_table_of_a_failed_run_with_a_lost_group():
    summary = json.loads(json.dumps(SUMMARY))
    summary.update(succeeded=False, failure_reason="too few groups", final_test_accuracy=None)
    summary["replica_groups"]["1"] = {"exit_code": 1, "succeeded": False, "lost": True}
    table = summary_table(summary)
    assert "FAILED (too few groups)" in table
    assert _group_rows(table)["1"] == ["1", "-", "-", "-", "-", "-", "-", "-", "lost"]


def test_table_says_every_worker_is_identical_when_groups_have_several():
    summary = json.loads(json.dumps(SUMMARY))
    assert "(every worker" not in summary_table(summary)  # one worker per group: nothing to add
    for g in summary["replica_groups"].values():
        g["worker_params_sha256"] = ["h", "h"]
    assert "parameters identical: yes (every worker: 4)" in summary_table(summary)


# ---------------------------------------------------------------------------- the plots, one Axes at a time

def _ev(t: float, kind: str, group: int, step: int = 0, **fields) -> dict:
    return {"t": t, "kind": kind, "group": group, "step": step, **fields}


def _axes():
    from matplotlib.figure import Figure  # no pyplot: no backend or display involved

    return Figure().add_subplot()


def _labels(ax) -> List[str]:
    return ax.get_legend_handles_labels()[1]


def _named(labels: List[str], group: int) -> List[str]:
    return [label for label in labels if re.match(rf"group {group}\b", label)]


def _marker_ys(ax, marker: str) -> Dict[float, float]:
    """x -> y of the point markers (restart "x", recovered "^") drawn on ``ax``."""
    return {float(x): float(y) for line in ax.lines if line.get_marker() == marker
            for x, y in zip(line.get_xdata(), line.get_ydata())}


def _sparse_metrics() -> Dict[int, List[dict]]:
    """Group 0 healthy; group 1 killed before its first sync, then restarted; group 2 never got further
    than starting (twice)."""
    return {
        0: [_ev(1000.0, "start", 0, restart=0, max_steps=600),
            _ev(1001.0, "sync", 0, quorum_id=1, quorum_size=2, committed=True),
            _ev(1002.0, "train", 0, 100, loss=1.0, samples_per_s=1200.0, quorum_size=2),
            _ev(1003.0, "eval", 0, 100, test_accuracy=0.5),
            _ev(1006.0, "train", 0, 200, loss=0.5, samples_per_s=1000.0, quorum_size=1)],
        1: [_ev(1000.0, "start", 1, restart=0, max_steps=600),
            _ev(1000.5, "fault", 1, 10, fault="kill", fault_id=0, target=1),
            _ev(1004.0, "start", 1, 100, restart=1, max_steps=600),
            _ev(1004.5, "recovered", 1, 110, healed_from=0),
            _ev(1005.0, "train", 1, 150, loss=0.7, samples_per_s=900.0, quorum_size=2)],
        2: [_ev(1000.0, "start", 2, restart=0, max_steps=600),
            _ev(1004.0, "start", 2, restart=1, max_steps=600)],
    }


def test_value_at_takes_the_latest_value_before_else_the_earliest_after():
    points = [(10.0, 1.0), (20.0, 2.0), (20.0, 3.0), (30.0, 4.0)]
    assert value_at(points, 25.0) == 3.0  # of two points at the same time, the last one written
    assert value_at(points, 20.0) == 3.0 and value_at(points, 99.0) == 4.0
    assert value_at(points, 5.0) == 1.0  # nothing before: the first value, not 0
    assert value_at(list(reversed(points[:2])), 15.0) == 1.0  # order of the list does not matter
    assert value_at([], 5.0) is None


def test_quorum_legend_names_every_group_even_without_a_first_lifetime_quorum():
    metrics = _sparse_metrics()
    ax = _axes()
    _plot_quorum(ax, metrics, _markers(metrics, {}), _start_time(metrics), 3)
    labels = _labels(ax)
    assert _named(labels, 0) == ["group 0"]
    assert _named(labels, 1) == ["group 1"]  # drawn by its second lifetime only
    assert _named(labels, 2) == ["group 2 (no sync recorded)"]


def test_loss_accuracy_and_throughput_legends_name_every_group():
    metrics = _sparse_metrics()
    markers, t0 = _markers(metrics, {}), _start_time(metrics)
    for plot in (lambda ax: _plot_loss(ax, metrics, markers, 600),
                 lambda ax: _plot_accuracy(ax, metrics, markers, 600),
                 lambda ax: _plot_throughput(ax, metrics, markers, t0)):
        ax = _axes()
        plot(ax)
        labels = _labels(ax)
        for g in metrics:
            assert len(_named(labels, g)) == 1, (g, labels)
        assert any("no " in label and "recorded" in label for label in _named(labels, 2)), labels


def test_step_axes_span_the_whole_run():
    metrics = {0: [_ev(1000.0, "start", 0, restart=0, max_steps=600),
                   _ev(1001.0, "train", 0, 380, loss=1.0, samples_per_s=1.0),
                   _ev(1002.0, "eval", 0, 400, test_accuracy=0.5)]}
    summary = {"config": {"train": {"max_steps": 800}}}
    assert last_step(metrics, summary) == 800
    assert last_step(metrics, {}) == 600  # the start event's max_steps
    assert last_step({0: metrics[0][1:]}, {}) == 400  # the largest step recorded
    for plot in (_plot_loss, _plot_accuracy):
        ax = _axes()
        plot(ax, metrics, _markers(metrics, summary), last_step(metrics, summary))
        assert ax.get_xlim() == (0, 800), plot.__name__


def test_markers_before_a_groups_first_value_sit_on_its_line_not_at_zero():
    # Groups 1 and 2 restart at t 1004. Group 1's first values come after (quorum 2, 900 samples/s at t 1005);
    # group 2 has none, so its marker takes the mean of the others' values then (quorum 2; (1200 + 900) / 2).
    metrics = _sparse_metrics()
    markers, t0 = _markers(metrics, {}), _start_time(metrics)
    ax = _axes()
    _plot_quorum(ax, metrics, markers, t0, 3)
    ys = sorted(y for line in ax.lines if line.get_marker() == "x" for y in line.get_ydata())
    assert ys == pytest.approx([2.0, 2.04])  # plus the per-group offsets of 3 groups: 0 and 0.04
    ax = _axes()
    _plot_throughput(ax, metrics, markers, t0)
    ys = sorted(y for line in ax.lines if line.get_marker() == "x" for y in line.get_ydata())
    assert ys == pytest.approx([900.0, 1050.0])
    assert _marker_ys(ax, "^") == {1004.5 - t0: pytest.approx(900.0)}  # a recovery before its first rate


def test_markers_of_a_run_without_any_value_are_mid_axis():
    metrics = {0: [_ev(1000.0, "start", 0, restart=0), _ev(1001.0, "start", 0, restart=1)]}
    markers, t0 = _markers(metrics, {}), _start_time(metrics)
    ax = _axes()
    _plot_quorum(ax, metrics, markers, t0, 2)
    assert _marker_ys(ax, "x") == {1.0: pytest.approx(1.0)}  # half of 2 groups
    ax = _axes()
    _plot_throughput(ax, metrics, markers, t0)
    (y,) = _marker_ys(ax, "x").values()
    assert y > 0


def test_report_of_sparse_groups_writes_every_plot(tmp_path):
    metrics = _sparse_metrics()
    (tmp_path / "summary.json").write_text(json.dumps({**SUMMARY, "replica_groups": {}}))
    for g, events in metrics.items():
        path = metrics_path(tmp_path, g)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(e) + "\n" for e in events))
    _table, files = make_report(tmp_path)
    assert [f.name for f in files] == ["summary.txt", *PLOTS]
    _assert_pngs(tmp_path / "report")


# ---------------------------------------------------------------------------- real runs

@pytest.mark.integration
@pytest.mark.parametrize("fault", [True, False], ids=["kill", "no-fault"])
def test_real_run_writes_metrics_and_report(tmp_path, cifar_root, torchx_run, fault):
    faults = {"enabled": True, "schedule": [{"kind": "kill", "group": 1, "at_step": 250}]} if fault else {}
    cfg = small_config(tmp_path, cifar_root, train={"max_steps": 600, "eval_every": 200, "log_every": 50},
                       faults=faults)
    path = write_config(tmp_path, cfg)
    hog = None if fault else subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        run = torchx_run(path)
        assert run.wait(240) == 0, run.tail()
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
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
        # A noisy machine (a CPU hog beside two groups on two cores, evaluations every 200 steps) and no
        # failure: no stall, no recovery, nothing for the plots to mark.
        kinds = [e["kind"] for e in m0 + m1]
        assert not {"fault", "sync_stall", "recovered"} & set(kinds), kinds
        assert summary["recoveries"] == [] and kinds.count("start") == 2

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
