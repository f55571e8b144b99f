"""Silence, detected within seconds: a trainer frozen while its role lives, a peer frozen mid-collective.

On one host a dead process resets its connections at once; a frozen one (SIGSTOP, as a host that went dark
or a driver call that never returns) answers nothing. These runs freeze real trainers and check that the
run notices from the trainers' own signs of life and the completion service's silent groups, not from
``localsgd.timeout_s`` or never.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import finish, read_summary, small_config, trainer_pid, write_config

from localsgd_ft.contract import SilentNode, Status
from localsgd_ft.contract.liveness import read_pulses
from localsgd_ft.contract.names import LIVENESS_DIR_ENV, RUN_ID_ENV
from localsgd_ft.launch.completion.state import CompletionState
from localsgd_ft.launch.trainer_watch import TrainerWatch

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------- pure logic

def test_a_group_is_silent_when_its_role_or_its_trainer_is_quiet_past_the_bound(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("localsgd_ft.launch.completion.state.time.monotonic", lambda: clock[0])
    state = CompletionState(3, silent_after_s=5.0)
    state.heartbeat(0, 0, trainer_quiet_s=0.2)
    state.heartbeat(1, 0, trainer_quiet_s=4.5)  # its trainer is quiet, its role is not
    # group 2 never heartbeated: starting, not silent
    assert state.silent_groups() == []
    clock[0] += 1.0  # group 1: trainer quiet 4.5 s as of 1 s ago
    assert state.silent_groups() == [1]
    clock[0] += 4.5  # group 0's role now silent too
    assert state.silent_groups() == [0, 1]
    state.heartbeat(0, 0, trainer_quiet_s=None)  # back, and no trainer runs (restarting)
    state.mark_finished(1, {"group": 1, "exit_code": 0})
    assert state.silent_groups() == []  # a finished group is never silent
    assert state.status()["silent"] == []


def test_the_status_names_which_node_of_a_group_is_silent(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("localsgd_ft.launch.completion.state.time.monotonic", lambda: clock[0])
    state = CompletionState(2, nodes=2, silent_after_s=2.0)
    for group in (0, 1):
        for node in (0, 1):
            state.heartbeat(group, node, trainer_quiet_s=0.1)
    clock[0] += 1.0
    for group, node in ((0, 0), (0, 1), (1, 0)):  # group 1's node 1 went dark
        state.heartbeat(group, node, trainer_quiet_s=0.1)
    assert state.status()["silent_nodes"] == []
    clock[0] += 1.5
    status = Status.model_validate(state.status())
    assert status.silent == [1]
    assert [(s.group, s.node) for s in status.silent_nodes] == [(1, 1)] and status.silent_nodes[0].silent_s == 2.6
    one_node = CompletionState(1, silent_after_s=2.0)
    one_node.heartbeat(0, 0)
    clock[0] += 3.0
    assert one_node.status()["silent"] == [0] and one_node.status()["silent_nodes"] == []  # nothing to tell apart


# ---------------------------------------------------------------------------- a real process, its pulse, its end

def _beating_child(directory: Path, run: str) -> subprocess.Popen:
    code = ("import time\nfrom localsgd_ft.training.liveness import Pulse\nPulse().start()\n"
            "print('beating', flush=True)\ntime.sleep(120)\n")
    env = {**os.environ, LIVENESS_DIR_ENV: str(directory), RUN_ID_ENV: run, "LOCAL_RANK": "0"}
    child = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "beating"
    return child


def test_the_watch_ends_a_stopped_trainer_and_spares_a_beating_one():
    frozen = []
    watch = TrainerWatch(0, timeout_s=3.0, run="watchtest", on_frozen=lambda rank, q: frozen.append((rank, q)))
    child = _beating_child(watch.directory, "watchtest")
    try:
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:  # beating: never ended, always recently heard
            quiet = watch.check()
            assert quiet is not None and quiet < 2.0
            time.sleep(0.5)
        assert child.poll() is None and frozen == []
        os.kill(child.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 15
        while child.poll() is None and time.monotonic() < deadline:
            quiet = watch.check()
            time.sleep(0.25)
        assert child.wait(5) == -signal.SIGKILL
        assert frozen and frozen[0][0] == 0 and frozen[0][1] > 3.0
        assert watch.ended and "no sign of life" in watch.ended[0]
        assert read_pulses(watch.directory) == []
    finally:
        child.kill()
        watch.close()
    assert not watch.directory.exists()


def test_the_watch_never_signals_a_process_of_another_run():
    watch = TrainerWatch(0, timeout_s=3.0, run="mine")
    child = _beating_child(watch.directory, "someone-else")
    try:
        os.kill(child.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            assert watch.check() is None  # not ours: neither counted nor ended
            time.sleep(0.5)
        assert child.poll() is None
    finally:
        child.kill()
        watch.close()


def test_a_group_out_of_restarts_after_a_frozen_trainer_is_lost_with_that_reason(tmp_path, cifar_root):
    """What the role reports when torchrun gave up after the watch ended a trainer: the frozen line is the reason;
    a reason the trainer left itself stands."""
    from localsgd_ft.config import parse_config
    from localsgd_ft.contract import TrainerResult
    from localsgd_ft.launch.replica_role import _report_end

    class Client:
        url = "http://test"

        def __init__(self):
            self.reports = []

        def finished(self, group, code, result, deadline_s, node):
            self.reports.append((code, result))

    cfg = parse_config(small_config(tmp_path, cifar_root))
    line = "trainer worker 0 (pid 7) showed no sign of life for 31 s (replica_groups.trainer_timeout_s 30)"
    client = Client()
    _report_end(cfg, client, 1, 0, 1, None, None, [line])
    _report_end(cfg, client, 1, 0, 1, TrainerResult(error="diverged"), None, [line])
    _report_end(cfg, client, 1, 0, 0, TrainerResult(params_sha256="0" * 64), None, [line])  # restarted, finished
    (c1, r1), (c2, r2), (c3, r3) = client.reports
    assert c1 == 1 and r1.error.startswith(line) and "no restart left (replica_groups.max_restarts 2)" in r1.error
    assert r2.error == "diverged"
    assert c3 == 0 and r3.error is None


def test_a_role_cut_off_from_the_lighthouse_exits_0_on_slurm_only(tmp_path, cifar_root, monkeypatch):
    """On Slurm one non-zero exit ends every role (torchx's `srun --kill-on-bad-exit=1`): a partitioned group's
    role that gave up on the lighthouse role must not take the groups still training with it (a 20-s partition
    on the CI cluster did). Elsewhere its exit code still tells that the lighthouse role was unreachable."""
    from localsgd_ft.config import parse_config
    from localsgd_ft.contract.names import StopReason
    from localsgd_ft.launch.addresses import free_port_pair
    from localsgd_ft.launch.completion.client import CompletionClient
    from localsgd_ft.launch.replica_role import Stop, _report_end

    cfg = parse_config(small_config(tmp_path, cifar_root))
    nobody = CompletionClient(f"http://127.0.0.1:{free_port_pair()}", "token")  # a real client, no service
    cut_off = Stop(StopReason.UNREACHABLE, "the lighthouse role has been unreachable for 11 s")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert _report_end(cfg, nobody, 1, 0, -9, None, cut_off) != 0
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    assert _report_end(cfg, nobody, 1, 0, -9, None, cut_off) == 0
    # Any other stop that could not be reported still fails the role, on Slurm too.
    assert _report_end(cfg, nobody, 1, 0, -15, None, Stop(StopReason.SIGNAL, "received SIGTERM")) != 0


def test_a_silent_node_of_the_group_ends_this_nodes_trainers_and_is_the_reason(tmp_path, cifar_root):
    """The role of a node whose sibling fell silent ends its own trainers (a real beating process) and tells
    the service; a silent node of another group, or a status naming this node itself, ends nothing; when
    torchrun then fails, the silent sibling is the group's reason."""
    from localsgd_ft.config import parse_config
    from localsgd_ft.launch.replica_role import Heartbeat, _report_end

    class Client:
        url = "http://test"

        def __init__(self):
            self.events, self.reports = [], []

        def event(self, group, kind, deadline_s, node, **fields):
            self.events.append((group, kind, node, fields))

        def finished(self, group, code, result, deadline_s, node):
            self.reports.append((code, result))

    cfg = parse_config(small_config(tmp_path, cifar_root, replica_groups={"count": 2, "nodes": 2}))
    client = Client()
    beat = Heartbeat(cfg, 1, client, node=0)
    beat.watch = watch = TrainerWatch(1, timeout_s=30.0, run="siblingtest")
    child = _beating_child(watch.directory, "siblingtest")

    def status(*silent):
        return Status(run="r", started=[0, 1], expected=2, fired=[], finished=[], abort=None, completed=None,
                      lighthouse_incarnation=1, silent=sorted({g for g, _ in silent}),
                      silent_nodes=[SilentNode(group=g, node=n, silent_s=2.5) for g, n in silent])

    try:
        beat._end_for_silent_sibling(status((0, 1), (1, 0)))  # another group's node; this very node
        assert child.poll() is None and client.events == [] and beat.sibling_lost is None
        beat._end_for_silent_sibling(status((1, 1)))
        assert child.wait(5) == -signal.SIGKILL
        assert client.events == [(1, "node_silent", 0, {"silent_node": 1, "silent_s": 2.5, "workers": 1})]
        assert beat.sibling_lost.startswith("node 1 of this group has been silent for 2.5 s")
        beat._end_for_silent_sibling(status((1, 1)))  # none runs now (torchrun waits for the nodes): no event
        assert len(client.events) == 1
    finally:
        child.kill()
        watch.close()
    _report_end(cfg, client, 1, 0, 1, None, None, watch.ended, beat.sibling_lost)
    code, result = client.reports[0]
    assert code == 1 and result.error.startswith("this node ended its trainers: node 1 of this group has been "
                                                 "silent") and "could not bring the group back" in result.error


# ---------------------------------------------------------------------------- real runs

@pytest.mark.integration
def test_a_trainer_frozen_for_good_is_ended_restarted_and_the_run_ends(tmp_path, cifar_root, torchx_run):
    """SIGSTOP group 1's trainer and never continue it (its role lives): before, the run never ended."""
    cfg = small_config(tmp_path, cifar_root, train={"max_steps": 400},
                       replica_groups={"trainer_timeout_s": 5})
    path = write_config(tmp_path, cfg)
    run = torchx_run(path)
    run.wait_for_line(lambda line: "group 1 step 60 " in line, timeout=180)
    os.kill(trainer_pid(path, 1), signal.SIGSTOP)
    run.wait_for_line(lambda line: "showed no sign of life" in line, timeout=60)
    assert finish(run, path, timeout=300) == 0, run.tail()
    summary = read_summary(cfg)
    assert summary["succeeded"] and summary["params_identical"], summary["failure_reason"]
    frozen = [e for e in summary["events"] if e["kind"] == "trainer_frozen"]
    assert [e["group"] for e in frozen] == [1] and frozen[0]["quiet_s"] > 5
    assert summary["replica_groups"]["1"]["restarts"] >= 1


@pytest.mark.integration
def test_a_peer_frozen_mid_collective_costs_its_survivor_seconds_not_the_timeout(tmp_path, cifar_root, torchx_run):
    """Group 1 freezes just before it sends its part of a sync, for 25 s; the collective timeout is 60 s.

    Before, group 0 waited in the collective until group 1 came back (25 s); now it gives the sync up once
    the completion service counts group 1 silent (heartbeat timeout 1 s), and the summary's recovery of the
    hang says so."""
    timeout_s, hang_s = 60, 25
    cfg = small_config(tmp_path, cifar_root, train={"max_steps": 400},
                       localsgd={"timeout_s": timeout_s, "quorum_timeout_s": 120},
                       replica_groups={"trainer_timeout_s": 120},
                       faults={"enabled": True, "schedule": [
                           {"kind": "hang", "group": 1, "at_step": 50, "duration_s": hang_s, "moment": "allreduce"}]})
    path = write_config(tmp_path, cfg)
    run = torchx_run(path)
    assert finish(run, path, timeout=400) == 0, run.tail()
    summary = read_summary(cfg)
    assert summary["succeeded"] and summary["params_identical"], summary["failure_reason"]
    abandoned = [e for e in summary["events"] if e["kind"] == "sync_abandoned"]
    assert abandoned and abandoned[0]["group"] == 0 and abandoned[0]["silent"] == [1], summary["events"]
    (hang,) = [r for r in summary["recoveries"] if r["kind"] == "hang"]
    # The survivor's longest stall: the heartbeat timeout and a quorum, far from the hang or the timeout.
    assert hang["survivor_stall_s"] < hang_s / 3, hang
    assert summary["replica_groups"]["0"]["max_sync_s"] < hang_s / 3, summary["replica_groups"]["0"]
