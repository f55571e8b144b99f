"""Replica groups of several workers, for real: torchrun with 2 processes per group, DDP inside, gloo.

Each run here has 4 trainer processes on this machine's 2 cores, so the runs
are short; every one still checks that all 4 workers end bit-identical.
"""

from __future__ import annotations

import os
import re
import signal

import pytest
from conftest import (assert_rejoin_hashes_match, finish, finish_with_a_worker_killed, read_summary, small_config,
                      trainer_pid, wait_gone, wait_no_processes, write_config)

from localsgd_ft.config import parse_config
from localsgd_ft.launch.lifecycle import processes_of_run
from localsgd_ft.storage import checkpoints as checkpoint

pytestmark = pytest.mark.integration


def two_by_two(tmp_path, cifar_root, **over):
    cfg = small_config(tmp_path, cifar_root, **over)
    cfg["replica_groups"].update(workers=2, cpus=2)
    return cfg


def assert_every_worker_identical(summary: dict, groups: int = 2, workers: int = 2) -> None:
    assert summary["succeeded"], summary["failure_reason"]
    assert summary["params_identical"]
    hashes = set()
    for g in map(str, range(groups)):
        group = summary["replica_groups"][g]
        assert group["ranks_identical"] is True, group
        assert len(group["worker_params_sha256"]) == workers, group
        hashes.update(group["worker_params_sha256"])
    assert len(hashes) == 1, hashes


def test_two_groups_of_two_workers_end_identical_and_learn_like_one_worker(tmp_path, cifar_root, torchx_run):
    # The same global batch (2 groups x 64 samples a step) made of one or of two workers per group.
    results = {}
    for workers, batch in ((2, 32), (1, 64)):
        cfg = small_config(tmp_path / f"w{workers}", cifar_root, data={"batch_size": batch},
                           train={"max_steps": 150, "eval_every": 0})
        cfg["replica_groups"].update(workers=workers, cpus=workers)
        path = write_config(tmp_path, cfg, name=f"w{workers}.yaml")
        run = torchx_run(path)
        assert finish(run, path) == 0, run.tail()
        results[workers] = read_summary(cfg)
    two, one = results[2], results[1]
    assert_every_worker_identical(two)
    for g in two["replica_groups"].values():
        assert g["steps"] == 150 and g["restarts"] == 0
        assert g["syncs_committed"] == 150 // 10 + 1
    assert two["final_test_accuracy"] > 0.5, two  # chance is 0.1
    assert abs(two["final_test_accuracy"] - one["final_test_accuracy"]) <= 0.1, (two, one)
    # DDP inside a group: a worker's sync sends the whole model, as with one worker.
    per_sync = [r["replica_groups"]["0"]["sync_bytes"] / r["replica_groups"]["0"]["syncs_attempted"] for r in (two, one)]
    assert per_sync[0] == per_sync[1] > 0, per_sync


@pytest.mark.parametrize("recovery", ["sync", "async"])
def test_worker_1_of_group_0_killed_the_group_restarts_and_rejoins(tmp_path, cifar_root, torchx_run, recovery):
    cfg = two_by_two(tmp_path, cifar_root, localsgd={"recovery": recovery}, train={"max_steps": 600},
                     checkpoint={"every_syncs": 1})
    _, summary = finish_with_a_worker_killed(torchx_run, tmp_path, cfg, group=0, step=60, rank=1, timeout=300)
    g0, g1 = summary["replica_groups"]["0"], summary["replica_groups"]["1"]
    assert g0["restarts"] == 1 and g1["restarts"] == 0, (g0, g1)
    assert g0["steps"] < g1["steps"]  # rejoined mid-run with the live weights, every worker from its peer rank
    assert_every_worker_identical(summary)
    # Healed live from group 1, or (async, a checkpoint at every sync) resumed from one as current as group 1:
    # either way identical to group 1 at its first full commit.
    assert_rejoin_hashes_match(summary, group=0)


def test_planned_failures_hit_the_worker_they_name(tmp_path, cifar_root, torchx_run):
    """A hang of worker 1 freezes its group and is reported as recovered; a kill inside the sync restarts it."""
    cfg = two_by_two(tmp_path, cifar_root, train={"max_steps": 600}, faults={"enabled": True, "schedule": [
        {"kind": "hang", "group": 0, "worker": 1, "at_step": 105, "duration_s": 3},
        {"kind": "kill_during_sync", "group": 1, "worker": 1, "at_step": 305},
    ]})
    path = write_config(tmp_path, cfg)
    run = torchx_run(path)
    assert finish(run, path, timeout=300) == 0, run.tail()
    assert any("group 0 worker 1 FAULT #0: injecting hang" in line for line in run.lines), run.tail()
    assert any("group 1 worker 1 FAULT #1: injecting kill_during_sync" in line for line in run.lines)

    summary = read_summary(cfg)
    assert_every_worker_identical(summary)
    assert summary["faults"]["injected"] == 2
    assert [e["worker"] for e in summary["events"] if e["kind"] == "fault"] == [1, 1]
    assert summary["replica_groups"]["1"]["restarts"] == 1 and summary["replica_groups"]["0"]["restarts"] == 0
    assert all(r["recovered"] for r in summary["recoveries"]), summary["recoveries"]


def test_whole_app_killed_resumes_every_worker_from_the_checkpoint(tmp_path, cifar_root, torchx_run):
    cfg = two_by_two(tmp_path, cifar_root, train={"max_steps": 500}, checkpoint={"every_syncs": 10})
    path = write_config(tmp_path, cfg)
    first = torchx_run(path)
    first.wait_for_line(lambda line: re.search(r"checkpoint written: .* \(step 200\)", line) is not None, timeout=180)
    first.kill()
    assert wait_no_processes(path) == [] and wait_gone(first.run_id) == []
    expected = checkpoint.list_valid(parse_config(cfg).checkpoint_dir)[0].step
    assert expected >= 200

    second = torchx_run(path)
    assert finish(second, path, timeout=300) == 0, second.tail()
    summary = read_summary(cfg)
    assert_every_worker_identical(summary)
    assert summary["resumed_from_step"] == expected
    for g in summary["replica_groups"].values():
        assert g["resumed_from_step"] == expected
        assert g["steps"] - 10 * (g["syncs_attempted"] - g["syncs_committed"]) == 500 - expected, g


def test_killed_client_leaves_no_worker_and_a_lost_group_is_noticed(tmp_path, cifar_root, torchx_run):
    # A group's whole tree SIGKILLed (its node gone): the run notices and the other group finishes.
    cfg = two_by_two(tmp_path, cifar_root, lighthouse={"role_timeout_s": 8}, train={"max_steps": 400})
    path = write_config(tmp_path, cfg)
    run = torchx_run(path)
    run.wait_for_line(lambda line: re.search(r"group 1 step 30 ", line) is not None, timeout=120)
    tree = [p for p in processes_of_run(run.run_id) if b"REPLICA_GROUP_ID=1"
            in open(f"/proc/{p}/environ", "rb").read().split(b"\0")]
    assert trainer_pid(path, 1, rank=1) in tree and len(tree) >= 4  # wrapper, torchrun, 2 workers
    for pid in tree:
        os.kill(pid, signal.SIGKILL)
    run.wait(240)
    summary = read_summary(cfg)
    assert summary["succeeded"] and summary["lost_groups"] == [1], summary["failure_reason"]
    assert summary["replica_groups"]["0"]["ranks_identical"] is True
    assert wait_gone(run.run_id, 15) == []

    # Now the client itself dies mid-run: nothing of the run, no worker of any rank, is left.
    client_killed_leaves_nothing(tmp_path, cfg, torchx_run)


def client_killed_leaves_nothing(tmp_path, cfg, torchx_run) -> None:
    """SIGKILL the torchx client of a long run of ``cfg`` mid-run: no process of the run, of any rank, is left."""
    cfg["train"]["max_steps"] = 3000
    path = write_config(tmp_path, cfg)
    run = torchx_run(path)
    run.wait_for_line(lambda line: re.search(r"group 0 step 30 ", line) is not None, timeout=120)
    assert trainer_pid(path, 0, rank=1) and trainer_pid(path, 1, rank=1)  # every rank was running
    os.kill(run.proc.pid, signal.SIGKILL)
    assert wait_gone(run.run_id, 20) == []


# ---------------------------------------------------------------------------
# Groups of several nodes (on local_cwd every node is this host)


def two_nodes(tmp_path, cifar_root, **over):
    cfg = small_config(tmp_path, cifar_root, **over)
    cfg["replica_groups"].update(nodes=2)
    return cfg


def _wrapper_of_node(run_id: str, group: int, node: int) -> int:
    """The replica role process of node ``node`` of group ``group``."""
    found = []
    for pid in processes_of_run(run_id):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if b"localsgd_ft.replica" in cmd and cmd[cmd.index(b"--group") + 1] == str(group).encode() \
                and cmd[cmd.index(b"--node") + 1] == str(node).encode():
            found.append(pid)
    (pid,) = found
    return pid


def test_two_groups_of_two_nodes_train_to_the_end_and_survive_a_worker_loss(tmp_path, cifar_root, torchx_run):
    cfg = two_nodes(tmp_path, cifar_root, train={"max_steps": 400})
    # Worker 1 of group 0 runs under one node's torchrun: both agents of the group restart together.
    _, summary = finish_with_a_worker_killed(torchx_run, tmp_path, cfg, group=0, step=60, rank=1, timeout=300)
    assert_every_worker_identical(summary)
    g0, g1 = summary["replica_groups"]["0"], summary["replica_groups"]["1"]
    assert g0["restarts"] >= 1 and g1["restarts"] == 0, (g0, g1)
    assert g0["steps"] < g1["steps"] == 400


def test_a_lost_node_loses_its_group_and_nothing_is_left(tmp_path, cifar_root, torchx_run):
    cfg = two_nodes(tmp_path, cifar_root, lighthouse={"role_timeout_s": 8}, train={"max_steps": 300})
    path = write_config(tmp_path, cfg)
    run = torchx_run(path)
    run.wait_for_line(lambda line: re.search(r"group 1 step 30 ", line) is not None, timeout=120)
    os.kill(_wrapper_of_node(run.run_id, 1, 1), signal.SIGKILL)  # node 1 of group 1 is gone
    run.wait(240)
    summary = read_summary(cfg)
    assert summary["succeeded"] and summary["lost_groups"] == [1], summary["failure_reason"]
    # Declared after role_timeout_s of silence, or when node 0 fails first (node 1 may have hosted the
    # group's rendezvous): either way the reason names the node that went.
    assert summary["lost_reasons"]["1"].startswith("role lost: no heartbeat from node 1"), summary["lost_reasons"]
    assert summary["replica_groups"]["0"]["steps"] == 300
    assert summary["replica_groups"]["0"]["ranks_identical"] is True
    assert wait_gone(run.run_id, 30) == []

    # The client itself SIGKILLed mid-run: no agent or worker of any node is left.
    client_killed_leaves_nothing(tmp_path, cfg, torchx_run)
