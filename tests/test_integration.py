"""Real runs: the torchx CLI, the torchft lighthouse, torchrun, gloo, on the CIFAR-format fixture."""

from __future__ import annotations

import re

import pytest
from conftest import (assert_rejoin_hashes_match, finish, finish_with_a_worker_killed, kill_trainer_at, model_bytes,
                      read_summary, small_config, wait_no_processes, write_config)

from localsgd_ft.config import parse_config

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("recovery", ["sync", "async"])
def test_two_groups_train_and_agree(tmp_path, cifar_root, torchx_run, recovery):
    cfg = small_config(tmp_path, cifar_root, localsgd={"recovery": recovery})
    path = write_config(tmp_path, cfg)
    run = torchx_run(path)
    code = finish(run, path)
    assert code == 0, run.tail()
    assert any("Job finished: SUCCEEDED" in line for line in run.lines), run.tail()
    # The log lines users of torchft's example know.
    assert any("LocalSGD: Number of local optimizer steps completed: 100" in line for line in run.lines)
    assert any("got lighthouse quorum" in line for line in run.lines)

    summary = read_summary(cfg)
    groups = summary["replica_groups"]
    assert set(groups) == {"0", "1"}
    assert summary["succeeded"] and summary["params_identical"]
    assert groups["0"]["params_sha256"] == groups["1"]["params_sha256"]
    assert summary["final_test_accuracy"] > 0.5, summary  # chance is 0.1
    assert summary["algorithm"] == "localsgd"
    whole_model = model_bytes(cfg)
    for g in groups.values():
        assert g["steps"] == 200 and g["restarts"] == 0
        assert g["syncs_committed"] == 200 // 10 + (1 if recovery == "sync" else 0)
        assert g["sync_bytes"] == g["syncs_attempted"] * whole_model  # every parameter, once per sync


@pytest.mark.parametrize("recovery", ["sync", "async"])
def test_killed_worker_is_restarted_and_rejoins(tmp_path, cifar_root, torchx_run, recovery):
    # A checkpoint at every sync: the restarted group finds one at (or near) the live step, and
    # must still heal from the live group instead of trusting the file.
    cfg = small_config(tmp_path, cifar_root, localsgd={"recovery": recovery}, train={"max_steps": 1200},
                       checkpoint={"every_syncs": 1})
    run, summary = finish_with_a_worker_killed(torchx_run, tmp_path, cfg, group=1, step=100)
    g0, g1 = summary["replica_groups"]["0"], summary["replica_groups"]["1"]
    assert g1["restarts"] == 1 and g0["restarts"] == 0
    assert g0["params_sha256"] == g1["params_sha256"]
    assert g1["steps"] < g0["steps"]  # the restarted group rejoined mid-run with the live weights
    assert summary["final_test_accuracy"] > 0.5, (summary, run.tail(200))
    assert_rejoin_hashes_match(summary, group=1)


def test_group_out_of_restarts_is_lost_and_the_rest_finish(tmp_path, cifar_root, torchx_run):
    cfg = small_config(tmp_path, cifar_root, replica_groups={"max_restarts": 0}, train={"max_steps": 600})
    path = write_config(tmp_path, cfg)
    run = torchx_run(path)
    kill_trainer_at(run, path, group=1, step=50)
    code = finish(run, path)
    assert code == 0, run.tail()  # min_replicas 1: group 0 may finish alone
    summary = read_summary(cfg)
    assert summary["succeeded"] and summary["lost_groups"] == [1]
    assert summary["replica_groups"]["1"]["exit_code"] != 0 and summary["replica_groups"]["0"]["succeeded"]
    assert any("lost replica groups: [1]" in line for line in run.lines)


def test_too_few_groups_left_fails_fast_with_the_reason(tmp_path, cifar_root, torchx_run):
    cfg = small_config(tmp_path, cifar_root, replica_groups={"max_restarts": 0}, lighthouse={"min_replicas": 2},
                       train={"max_steps": 1200})
    path = write_config(tmp_path, cfg)
    run = torchx_run(path)
    kill_trainer_at(run, path, group=1, step=50)
    code = finish(run, path)
    assert code != 0 and any("Job finished: FAILED" in line for line in run.lines), run.tail()
    summary = read_summary(cfg)
    assert not summary["succeeded"] and "lighthouse.min_replicas (2)" in summary["failure_reason"]
    assert summary["replica_groups"]["0"]["exit_code"] != 0  # stopped, not left waiting for a quorum
    assert summary["wall_time_s"] < 60  # well before its 1200 steps (quorum timeout 30 s) could pass


def test_lighthouse_killed_and_restarted_mid_run(tmp_path, cifar_root, torchx_run):
    cfg = small_config(tmp_path, cifar_root, train={"max_steps": 600},  # automatic quorum retries, every 0.5 s
                       faults={"enabled": True, "schedule": [{"kind": "lighthouse", "at_step": 200, "duration_s": 3}]})
    path = write_config(tmp_path, cfg)
    run = torchx_run(path)
    code = finish(run, path)
    assert code == 0, run.tail()
    summary = read_summary(cfg)
    assert summary["faults"]["by_kind"] == {"lighthouse": 1} and summary["lighthouse_restarts"] == 1
    assert summary["params_identical"]
    for g in summary["replica_groups"].values():
        assert g["restarts"] == 0 and g["global_syncs"] == 600 // 10 + 1
        # Nothing committed is lost. The restarted lighthouse may form its first quorum with only the
        # group that asked first; until the other is back (its next quorum try 0.5 s later, or its
        # manager reconnecting) the first commits syncs alone, and the other heals from it, skipping
        # those syncs' local steps. This tiny model does about ten syncs a second on a loaded CI host
        # (a clean CI run once skipped 11), so the bound is a few seconds' worth, not a count of tries.
        assert 600 - 200 <= g["steps"] - 10 * (g["syncs_attempted"] - g["syncs_committed"]) <= 600
    (rec,) = summary["recoveries"]
    assert rec["kind"] == "lighthouse" and rec["recovered"] and rec["recovery_s"] >= 2.5


# Failures every 300 steps (about 7 s): each group is back (about 4-5 s) before the next one.
CHAOS = [
    {"kind": "kill", "group": 1, "at_step": 200},
    {"kind": "kill", "group": 0, "at_step": 500},
    {"kind": "kill", "group": 1, "at_step": 800},
    {"kind": "hang", "group": 0, "at_step": 1100, "duration_s": 3},
    {"kind": "kill", "group": 0, "at_step": 1400},
    {"kind": "kill_during_sync", "group": 1, "at_step": 1700},
    {"kind": "kill", "group": 1, "at_step": 2000},
]


def test_chaos_run_finishes_with_nothing_lost(tmp_path, cifar_root, torchx_run):
    over = {"replica_groups": {"max_restarts": 6}, "train": {"max_steps": 2400, "eval_every": 0}}
    calm = small_config(tmp_path / "calm", cifar_root, **over)
    chaos = small_config(tmp_path / "chaos", cifar_root, **over, faults={"enabled": True, "schedule": CHAOS})
    results = {}
    for name, cfg in (("calm", calm), ("chaos", chaos)):
        (tmp_path / name).mkdir()
        path = write_config(tmp_path / name, cfg)
        run = torchx_run(path)
        assert finish(run, path) == 0, run.tail()
        results[name] = read_summary(cfg)
    s = results["chaos"]
    assert s["succeeded"] and s["params_identical"], s["replica_groups"]
    assert s["faults"] == {"planned": 7, "injected": 7, "by_kind": {"kill": 5, "hang": 1, "kill_during_sync": 1}}
    restarts = {g: rep["restarts"] for g, rep in s["replica_groups"].items()}
    assert restarts == {"0": 2, "1": 4}, restarts  # every kill restarted its group once; a hang restarts nothing
    assert all(r["recovered"] for r in s["recoveries"]), s["recoveries"]
    assert abs(s["final_test_accuracy"] - results["calm"]["final_test_accuracy"]) <= 0.03


@pytest.mark.parametrize("recovery", ["sync", "async"])
def test_whole_app_killed_resumes_from_last_checkpoint(tmp_path, cifar_root, torchx_run, recovery):
    from conftest import wait_gone

    from localsgd_ft.storage import checkpoints as checkpoint

    cfg = small_config(tmp_path, cifar_root, localsgd={"recovery": recovery}, train={"max_steps": 1000},
                       checkpoint={"every_syncs": 10, "keep": 3})
    path = write_config(tmp_path, cfg)
    first = torchx_run(path)
    first.wait_for_line(lambda line: re.search(r"checkpoint written: .* \(step 400\)", line) is not None, timeout=180)
    first.kill()  # every process of the app, as a preemption would
    assert wait_no_processes(path) == [] and wait_gone(first.run_id) == []
    ckpt_dir = parse_config(cfg).checkpoint_dir
    steps_on_disk = [f.step for f in checkpoint.list_valid(ckpt_dir)]
    assert steps_on_disk and steps_on_disk[0] >= 400
    expected = steps_on_disk[0]
    if recovery == "sync":  # also: a truncated newest checkpoint falls back to the one before
        newest = checkpoint.list_valid(ckpt_dir)[0].path
        newest.write_bytes(newest.read_bytes()[:100])
        expected = steps_on_disk[1]

    second = torchx_run(path)  # the same command again
    assert finish(second, path) == 0, second.tail()
    assert any("resuming from checkpoint" in line and f"(step {expected})" in line for line in second.lines)
    if recovery == "sync":
        assert any("WARNING: skipping checkpoint" in line for line in second.lines)
    summary = read_summary(cfg)
    assert summary["succeeded"] and summary["params_identical"] and summary["resumed_from_step"] == expected
    for g in summary["replica_groups"].values():
        assert g["resumed_from_step"] == expected
        # The steps after the checkpoint are redone, none skipped: every committed sync trained sync_every steps.
        assert g["steps"] - 10 * (g["syncs_attempted"] - g["syncs_committed"]) == 1000 - expected, g
    assert summary["final_test_accuracy"] > 0.8
    assert summary["checkpoints_written"] and min(c["step"] for c in summary["checkpoints_written"]) > expected


def test_gpu_path_options_run_on_cpu(tmp_path, cifar_root, torchx_run):
    """channels_last + bf16 autocast (the GPU path's options) train for real and keep groups identical."""
    cfg = small_config(tmp_path, cifar_root, train={"max_steps": 100, "eval_every": 0, "channels_last": True,
                                                    "bf16": True})
    path = write_config(tmp_path, cfg)
    run = torchx_run(path)
    assert finish(run, path) == 0, run.tail()
    summary = read_summary(cfg)
    assert summary["succeeded"] and summary["params_identical"]
    assert summary["final_test_accuracy"] > 0.3, summary["final_test_accuracy"]
