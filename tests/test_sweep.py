"""Sweeps and comparisons: grid parsing and labels (pure), compare on old-style outputs, a real sweep."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, small_config, write_config

from localsgd_ft.config import ConfigError, load_config
from localsgd_ft.results.compare import Run, compare, label_runs
from localsgd_ft.results.sweep import parse_grid, point_name, points


def test_grid_values_split_at_commas_and_bad_grids_are_refused():
    assert parse_grid(["localsgd.sync_every=10, 50", "localsgd.recovery=sync,async"]) == [
        ("localsgd.sync_every", ["10", "50"]), ("localsgd.recovery", ["sync", "async"])]
    for bad in (["sync_every"], ["a.b=1,,2"], ["a.b=1", "a.b=2"]):
        with pytest.raises(ConfigError, match="--grid"):
            parse_grid(bad)
    assert point_name("smoke", [("localsgd.sync_every", "10"), ("localsgd.recovery", "async")]) == \
        "smoke-sync_every10-recoveryasync"
    # A value a name cannot hold as it is gets a hash of the exact values after its readable form.
    assert re.fullmatch(r"smoke-sync_every10-root_x_y-[0-9a-f]{8}",
                        point_name("smoke", [("localsgd.sync_every", "10"), ("data.root", "/x/y")]))


def test_distinct_points_get_distinct_names_and_directories(tmp_path, cifar_root):
    """120.5 and 120_5 (YAML 1.1: 1205) once both became ..._120_5: the second point was skipped as the first."""
    names = {point_name("x", [("localsgd.quorum_timeout_s", v)]) for v in ("120.5", "120_5", "120-5", "120/5")}
    assert len(names) == 4 and "x-quorum_timeout_s120_5" in names
    long = [point_name("n" * 40, [("localsgd.quorum_timeout_s", v)]) for v in ("1200", "1201")]
    assert len(set(long)) == 2 and all(len(n) <= 48 for n in long)  # too long for a name: shortened, then hashed
    path = write_config(tmp_path, small_config(tmp_path, cifar_root))
    todo = points(path, parse_grid(["localsgd.quorum_timeout_s=120.5,120_5"]), [], tmp_path / "sweep")
    assert len({p["output_dir"] for p in todo}) == 2
    assert [load_config(path, overrides=p["overrides"]).localsgd.quorum_timeout_s for p in todo] == [120.5, 1205]


def test_one_value_written_twice_is_refused():
    with pytest.raises(ConfigError, match=r"'10' and '1_0' are the same value \(10\) in YAML"):
        parse_grid(["localsgd.sync_every=10,1_0"])
    with pytest.raises(ConfigError, match="are the same value"):
        parse_grid(["localsgd.recovery=sync,'sync'"])
    assert parse_grid(["optimizer.lr=1,1.0"]) == [("optimizer.lr", ["1", "1.0"])]  # an int and a float: two points


def test_points_sharing_a_name_are_refused_before_anything_runs():
    from localsgd_ft.results.sweep import _refuse_shared_names

    with pytest.raises(ConfigError, match=r"would both be named x-a1 \(one output directory\)"):
        _refuse_shared_names([{"name": "x-a1", "point": {"a": "1"}}, {"name": "x-a1", "point": {"a": "01"}}])


def _old_run(run_dir: Path, sync_every: int, accuracy: float) -> Path:
    """An output directory as runs made before sync_bytes and metrics existed left it."""
    run_dir.mkdir(parents=True)
    summary = {"name": run_dir.name, "succeeded": True, "final_test_accuracy": accuracy, "wall_time_s": 12.0,
               "faults": {"injected": 0}, "recoveries": [],
               "config": {"name": run_dir.name, "output_dir": str(run_dir), "localsgd": {"sync_every": sync_every},
                          "lighthouse": {"port": 1000 + sync_every}},
               "replica_groups": {"0": {"steps": 100, "samples_per_s": 900.0, "syncs_committed": 10}}}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def test_compare_labels_runs_by_what_differs_and_reads_old_outputs(tmp_path):
    dirs = [_old_run(tmp_path / "a", 10, 0.9), _old_run(tmp_path / "b", 50, 0.8)]
    assert label_runs([Run(d) for d in dirs]) == ["localsgd.sync_every=10", "localsgd.sync_every=50"]
    table, files = compare(dirs, tmp_path / "cmp")
    assert [f.name for f in files] == ["compare.md", "accuracy.png", "throughput.png"]
    rows = [line.split() for line in table.splitlines()]
    assert rows[1][:3] == ["localsgd.sync_every=10", "0.9000", "12.0"] and rows[1][5] == "-"  # no sync_bytes
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "they differ in: localsgd.sync_every" in md and "| localsgd.sync_every=50 | 0.8000 |" in md


def test_compare_without_a_summary_names_the_directory(tmp_path):
    res = subprocess.run([sys.executable, "-m", "localsgd_ft.compare", str(tmp_path)], capture_output=True,
                         text=True, cwd=REPO, timeout=60)
    assert res.returncode == 2 and "no summary.json here" in res.stderr and str(tmp_path) in res.stderr


@pytest.mark.integration
def test_a_real_sweep_records_each_point_survives_a_failed_one_and_resumes(tmp_path, cifar_root):
    cfg = small_config(tmp_path, cifar_root, train={"max_steps": 100, "eval_every": 50, "log_every": 50})
    path = write_config(tmp_path, cfg)
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "localsgd_ft.sweep", str(path), "--out", str(out),
           "--grid", "localsgd.sync_every=10,20", "--grid", f"data.root={cifar_root},{tmp_path / 'missing'}",
           "train.eval_every=50"]
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert first.returncode == 1, first.stdout[-3000:] + first.stderr[-3000:]  # two points have no data
    record = json.loads((out / "sweep.json").read_text())
    status = {p["name"]: p["status"] for p in record["points"]}
    assert list(status.values()) == ["SUCCEEDED", "FAILED", "SUCCEEDED", "FAILED"], status
    assert "sweep: point 4/4" in first.stdout and first.stdout.count(": FAILED (exit 1)") == 2
    assert str(tmp_path / "missing") in first.stdout  # each failed point's own one-line reason
    ok = [Path(p["output_dir"]) for p in record["points"] if p["status"] == "SUCCEEDED"]
    for run_dir, sync_every in zip(ok, (10, 20)):
        recorded = yaml.safe_load((run_dir / "config.yaml").read_text())  # what the run ran, overrides included
        assert recorded["localsgd"]["sync_every"] == sync_every and recorded["train"]["eval_every"] == 50
        assert recorded["name"] == run_dir.name and json.loads((run_dir / "summary.json").read_text())["succeeded"]
    md = (out / "compare" / "compare.md").read_text()
    assert "| localsgd.sync_every=10 |" in md and "| localsgd.sync_every=20 |" in md
    assert all((out / "compare" / f).stat().st_size > 10_000 for f in ("accuracy.png", "throughput.png"))

    mtimes = [(d / "summary.json").stat().st_mtime for d in ok]
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert again.returncode == 1
    assert again.stdout.count("already SUCCEEDED") == 2 and [(d / "summary.json").stat().st_mtime for d in ok] == mtimes


@pytest.mark.integration
@pytest.mark.slow  # a second real sweep; the naming itself: test_distinct_points_get_distinct_names_and_directories
def test_a_real_sweep_runs_values_that_read_alike_into_their_own_directories(tmp_path, cifar_root):
    """Before point names carried a hash, 30.5 and 30_5 shared one directory and the second point was skipped
    as 'already SUCCEEDED', reporting the first point's run as its own."""
    cfg = small_config(tmp_path, cifar_root, train={"max_steps": 20, "eval_every": 0, "log_every": 10})
    path = write_config(tmp_path, cfg)
    out = tmp_path / "sweep"
    res = subprocess.run([sys.executable, "-m", "localsgd_ft.sweep", str(path), "--out", str(out),
                          "--grid", "localsgd.quorum_timeout_s=30.5,30_5"],
                         capture_output=True, text=True, cwd=REPO, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "already SUCCEEDED" not in res.stdout
    record = json.loads((out / "sweep.json").read_text())
    dirs = [Path(p["output_dir"]) for p in record["points"]]
    assert len(set(dirs)) == 2 and [p["status"] for p in record["points"]] == ["SUCCEEDED", "SUCCEEDED"]
    ran = [yaml.safe_load((d / "config.yaml").read_text())["localsgd"]["quorum_timeout_s"] for d in dirs]
    assert ran == [30.5, 305]  # YAML 1.1 reads 30_5 as the integer 305


def test_a_point_directory_holding_another_config_is_refused_before_anything_runs(tmp_path, cifar_root):
    from localsgd_ft.config import load_config, resolved_yaml
    from localsgd_ft.results.sweep import check_not_reused, points

    path = write_config(tmp_path, small_config(tmp_path, cifar_root))
    todo = points(path, parse_grid(["localsgd.sync_every=10,20"]), ["train.eval_every=50"], tmp_path / "sweep")
    check_not_reused(todo, path)  # nothing there yet
    earlier = load_config(path, overrides=[*todo[0]["overrides"][:-3], "train.eval_every=20",
                                           *todo[0]["overrides"][-3:]])
    Path(todo[0]["output_dir"]).mkdir(parents=True)
    (Path(todo[0]["output_dir"]) / "config.yaml").write_text(resolved_yaml(earlier, str(path)))
    with pytest.raises(ConfigError, match=r"holds a run of another config \(it differs in train.eval_every\)"):
        check_not_reused(todo, path)


def test_cluster_points_are_waited_for_unless_detached(tmp_path):
    from localsgd_ft.results.sweep import main, torchx_command

    local = torchx_command(Path("x.yaml"), ["a.b=1"], "local_cwd", "", detach=False)
    assert local[1:] == ["run", "-s", "local_cwd", "--", "--config", "x.yaml", "a.b=1"]
    slurm = torchx_command(Path("x.yaml"), ["a.b=1"], "slurm", "partition=p", detach=False)
    assert slurm[1:] == ["run", "-s", "slurm", "-cfg", "partition=p", "--wait", "--log", "--", "--config",
                         "x.yaml", "a.b=1"]
    assert "--wait" not in torchx_command(Path("x.yaml"), [], "slurm", "", detach=True)
    with pytest.raises(SystemExit):
        main([str(tmp_path / "x.yaml"), "--grid", "a.b=1", "--detach"])  # local runs cannot be detached


def test_a_detached_sweep_run_again_does_not_submit_its_points_twice(tmp_path, cifar_root, monkeypatch):
    from localsgd_ft.results import sweep

    path = write_config(tmp_path, small_config(tmp_path, cifar_root))
    calls = []
    monkeypatch.setattr(sweep, "_torchx", lambda cmd: calls.append(cmd) or (0, f"slurm://torchx/{len(calls)}"))
    grid = parse_grid(["localsgd.sync_every=10,20"])
    args = dict(scheduler="slurm", detach=True)
    assert sweep.run_sweep(path, grid, [], tmp_path / "sweep", **args) == 0 and len(calls) == 2
    assert "--wait" not in calls[0]
    record = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [p["status"] for p in record["points"]] == ["SUBMITTED", "SUBMITTED"]
    assert sweep.run_sweep(path, grid, [], tmp_path / "sweep", **args) == 0 and len(calls) == 2  # not again
    assert sweep.run_sweep(path, grid, [], tmp_path / "sweep", resubmit=True, **args) == 0 and len(calls) == 4
