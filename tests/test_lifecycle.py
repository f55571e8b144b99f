"""A run owns its processes and ends whatever dies: real torchx runs, real signals (issue: run lifecycle).

Each test kills something the way the world does (SIGKILL of the torchx
client, of a role's own process, of a role's whole tree, SIGINT) and checks the
end state: the verdict and its reason, identical weights among the groups that
finished, and no process of the run left (found by the run id every process
carries in its environment).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest
from conftest import REPO, TORCHX, read_summary, small_config, wait_gone, write_config

from localsgd_ft.launch.lifecycle import processes_of_run

pytestmark = pytest.mark.integration

RUN_TIMEOUT = 240


def _run_id(run) -> str:
    line = run.wait_for_line(lambda s: "lighthouse: run " in s, timeout=60)
    return re.search(r"lighthouse: run (\S+): serving", line).group(1)


def _pids(run_id: str, *needles: bytes) -> List[int]:
    """This run's processes whose command line holds every needle."""
    out = []
    for pid in processes_of_run(run_id):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if all(n in cmd for n in needles):
            out.append(pid)
    return out


def _group_env(pid: int, group: int) -> bool:
    try:
        return f"REPLICA_GROUP_ID={group}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def _wrapper(run_id: str, group: int) -> int:
    (pid,) = [p for p in _pids(run_id, b"localsgd_ft.replica") if _group_env(p, group)]
    return pid


def _group_tree(run_id: str, group: int) -> List[int]:
    """The role's wrapper, its torchrun and its trainer(s)."""
    return [p for p in processes_of_run(run_id) if _group_env(p, group)]


def _quorum_sizes(lines: List[str]) -> List[int]:
    return [int(m.group(1)) for line in lines for m in [re.search(r" quorum (\d+)/\d+ ", line)] if m]


def _wait_step(run, group: int, step: int, timeout: float = 120) -> None:
    run.wait_for_line(lambda s: re.search(rf"group {group} step {step} ", s) is not None, timeout=timeout)


def _rerun_is_clean(torchx_run, path: Path, cfg: dict) -> None:
    """The same config again: it succeeds with a quorum of exactly its own groups."""
    run = torchx_run(path)
    code = run.wait(RUN_TIMEOUT)
    assert code == 0, run.tail()
    sizes = _quorum_sizes(run.lines)
    assert sizes and max(sizes) <= cfg["replica_groups"]["count"], sizes
    assert read_summary(cfg)["succeeded"]
    assert wait_gone(run.run_id, 20) == []


def test_1_killed_client_leaves_nothing_and_a_rerun_is_clean(tmp_path, cifar_root, torchx_run):
    cfg = small_config(tmp_path, cifar_root, train={"max_steps": 3000, "eval_every": 0})
    path = write_config(tmp_path, cfg)
    run = torchx_run(path)
    run_id = _run_id(run)
    _wait_step(run, 0, 50)
    assert len(processes_of_run(run_id)) >= 7  # lighthouse role + torchft lighthouse + 2 x (wrapper, torchrun, trainer)
    os.kill(run.proc.pid, signal.SIGKILL)  # a closed terminal, an OOM kill
    assert wait_gone(run_id, 15) == []
    # A fresh run of the same config binds the same ports and trains only with its own groups.
    cfg["train"]["max_steps"] = 200
    path = write_config(tmp_path, cfg)
    _rerun_is_clean(torchx_run, path, cfg)


@pytest.mark.parametrize("what", ["wrapper", "tree"])
def test_2_3_a_lost_replica_role_is_noticed_and_the_rest_finish(tmp_path, cifar_root, torchx_run, what):
    """Case 2: the role's own process SIGKILLed; case 3: its whole tree at once (its node gone)."""
    cfg = small_config(tmp_path, cifar_root, lighthouse={"role_timeout_s": 8}, train={"max_steps": 900})
    path = write_config(tmp_path, cfg)
    run = torchx_run(path)
    run_id = _run_id(run)
    _wait_step(run, 1, 50)
    victims = [_wrapper(run_id, 1)] if what == "wrapper" else _group_tree(run_id, 1)
    assert len(victims) >= (1 if what == "wrapper" else 3)
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    assert _gone_group(run_id, 1, 15) == []  # torchrun and trainer follow the wrapper
    run.wait(RUN_TIMEOUT)  # torchx says FAILED (a role died of SIGKILL); the verdict is the lighthouse's
    summary = read_summary(cfg)
    assert summary["succeeded"], summary["failure_reason"]
    assert summary["lost_groups"] == [1] and summary["lost_reasons"]["1"].startswith("role lost: no heartbeat")
    g0 = summary["replica_groups"]["0"]
    # A sync in flight when group 1 died fails and its steps are redone: count the committed ones.
    assert g0["succeeded"] and g0["steps"] - 10 * (g0["syncs_attempted"] - g0["syncs_committed"]) == 900
    # The verdict the user sees (torchx's log tail can end before the role's last line: read the report).
    assert "SUCCEEDED" in (Path(cfg["output_dir"]) / "report" / "summary.txt").read_text(), run.tail()
    assert wait_gone(run_id, 15) == []


def _gone_group(run_id: str, group: int, timeout: float) -> List[int]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not _group_tree(run_id, group):
            return []
        time.sleep(0.2)
    return _group_tree(run_id, group)


def test_4_unreachable_download_is_one_line_and_writes_nothing(tmp_path):
    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    root = tmp_path / "data"
    url = f"http://127.0.0.1:{closed}/cifar-10-python.tar.gz"
    path = write_config(tmp_path, {"name": "dl", "output_dir": str(tmp_path / "out"),
                                   "data": {"root": str(root), "download": True, "url": url}})
    t0 = time.monotonic()
    proc = subprocess.run([TORCHX, "run", "--", "--config", str(path)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and time.monotonic() - t0 < 30
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, out
    (line,) = [s for s in out.splitlines() if "CIFAR-10 download" in s]
    assert url in line and "Connection refused" in line and "by hand" in line and "localsgd_ft.fixture" in line
    assert not (root / "cifar-10-batches-py").exists() and not list(root.glob(".cifar10-download-*"))
    assert not (tmp_path / "out").exists()  # no role started


def test_5_a_group_restarted_after_the_final_sync_takes_the_final_state(tmp_path, cifar_root, torchx_run):
    # Group 1 dies inside the last sync interval; group 0 commits the final sync alone (min_replicas 1).
    cfg = small_config(tmp_path, cifar_root, faults={"enabled": True, "schedule": [
        {"kind": "kill", "group": 1, "at_step": 195}]})
    path = write_config(tmp_path, cfg)
    run = torchx_run(path)
    code = run.wait(RUN_TIMEOUT)
    assert code == 0, run.tail()
    summary = read_summary(cfg)
    g0, g1 = summary["replica_groups"]["0"], summary["replica_groups"]["1"]
    assert summary["succeeded"] and summary["params_identical"], summary["failure_reason"]
    assert g1["restarts"] == 1 and g1["finished_late"] and g1["steps"] == 0  # it did not train alone
    assert g0["params_sha256"] == g1["params_sha256"] == summary["completed"]["params_sha256"]
    assert summary["checkpoints_written"][-1]["step"] == 200  # the final commit always writes one
    assert wait_gone(run.run_id, 20) == []


def test_7_lighthouse_that_cannot_be_restarted_ends_the_run_with_the_reason(tmp_path, cifar_root, torchx_run):
    cfg = small_config(tmp_path, cifar_root, localsgd={"quorum_timeout_s": 5}, train={"max_steps": 3000})
    path = write_config(tmp_path, cfg)
    run = torchx_run(path)
    run_id = _run_id(run)
    _wait_step(run, 0, 30)
    port = cfg["lighthouse"]["port"]
    (child,) = _pids(run_id, b"localsgd_ft.lighthouse_server")
    with socket.socket() as holder:  # someone else takes the port the moment it is free
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the groups' old connections linger
        os.kill(child, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while True:
            try:
                holder.bind(("127.0.0.1", port))
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        holder.listen()
        code = run.wait(RUN_TIMEOUT)
    assert code != 0
    summary = read_summary(cfg)
    assert not summary["succeeded"] and "could not be restarted" in summary["failure_reason"], summary
    assert wait_gone(run_id, 15) == []


def test_8_a_full_disk_for_metrics_is_a_warning_not_a_crash(tmp_path, cifar_root, torchx_run):
    cfg = small_config(tmp_path, cifar_root)
    path = write_config(tmp_path, cfg)
    run = torchx_run(path)
    _run_id(run)  # the lighthouse role has moved old metrics aside: now the folder is the groups'
    metrics = Path(cfg["output_dir"]) / "metrics"
    metrics.mkdir(parents=True, exist_ok=True)
    (metrics / "group_1.jsonl").symlink_to("/dev/full")  # every write: ENOSPC
    code = run.wait(RUN_TIMEOUT)
    assert code == 0, run.tail()
    summary = read_summary(cfg)
    assert summary["succeeded"] and summary["replica_groups"]["1"]["restarts"] == 0
    assert any("WARNING: metrics: cannot write" in line and "No space left" in line for line in run.lines)
    assert (metrics / "group_0.jsonl").stat().st_size > 0
    # The report is made from what was written (reading the link would never end).
    verdict = next(line for line in run.lines if "lighthouse: training SUCCEEDED" in line)
    assert "; report: " in verdict, run.tail()


def test_9_an_aborted_run_stops_every_trainer(tmp_path, cifar_root, torchx_run):
    """Too few groups left: the survivors' wrappers stop torchrun, and its workers with it."""
    cfg = small_config(tmp_path, cifar_root, replica_groups={"max_restarts": 0}, lighthouse={"min_replicas": 2},
                       train={"max_steps": 3000})
    path = write_config(tmp_path, cfg)
    run = torchx_run(path)
    run_id = _run_id(run)
    _wait_step(run, 1, 30)
    (trainer,) = [p for p in _group_tree(run_id, 1)
                  if b"LOCAL_RANK=0" in Path(f"/proc/{p}/environ").read_bytes().split(b"\0")]
    os.kill(trainer, signal.SIGKILL)
    t0 = time.monotonic()
    assert run.wait(RUN_TIMEOUT) != 0
    assert time.monotonic() - t0 < 60
    summary = read_summary(cfg)
    assert not summary["succeeded"] and "fewer than lighthouse.min_replicas" in summary["failure_reason"]
    assert wait_gone(run_id, 10) == []


def test_ctrl_c_stops_everything_keeps_the_checkpoint_and_says_how_to_resume(tmp_path, cifar_root, torchx_run):
    cfg = small_config(tmp_path, cifar_root, train={"max_steps": 3000, "eval_every": 0},
                       checkpoint={"every_syncs": 5})
    path = write_config(tmp_path, cfg)
    run = torchx_run(path)
    run_id = _run_id(run)
    run.wait_for_line(lambda s: "checkpoint written" in s, timeout=120)
    _wait_step(run, 0, 150)
    os.kill(run.proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends to the foreground process
    run.wait(60)
    assert wait_gone(run_id, 15) == []
    # The client prints the way back after its own exit (the roles' output no longer reaches the terminal).
    assert any("to resume, run the same command again (it continues from the newest checkpoint, step" in line
               for line in run.lines), run.tail()
    from localsgd_ft.config import load_config
    from localsgd_ft.storage.checkpoints import resume_point

    found, _ = resume_point(load_config(path), start_over=False)
    assert found is not None and found.step >= 50
    # Resuming: the same command continues from it and finishes.
    cfg["train"]["max_steps"] = found.step + 100
    path = write_config(tmp_path, cfg)
    run = torchx_run(path)
    assert run.wait(RUN_TIMEOUT) == 0, run.tail()
    assert read_summary(cfg)["resumed_from_step"] == found.step


def test_a_second_run_on_the_same_ports_cannot_join_the_first(tmp_path, cifar_root, torchx_run):
    """The headline of case 1: a second launch must not average its weights with a live run's."""
    first_cfg = small_config(tmp_path / "a", cifar_root, train={"max_steps": 1200, "eval_every": 0})
    (tmp_path / "a").mkdir()
    first = torchx_run(write_config(tmp_path / "a", first_cfg))
    _wait_step(first, 0, 30)
    second_cfg = {**first_cfg, "output_dir": str(tmp_path / "b" / "out"),
                  "lighthouse": {**first_cfg["lighthouse"], "role_timeout_s": 5}}
    (tmp_path / "b").mkdir()
    second = torchx_run(write_config(tmp_path / "b", second_cfg))
    assert second.wait(120) != 0
    out = "\n".join(second.lines)
    assert "is already in use" in out and "lighthouse.port" in out, second.tail()
    assert "refused this run" in out and "LocalSGD: group" not in out  # its groups never trained
    assert first.wait(RUN_TIMEOUT) == 0, first.tail()
    sizes = _quorum_sizes(first.lines)
    assert sizes and max(sizes) <= 2, sizes
    summary = read_summary(first_cfg)
    assert summary["succeeded"] and summary["params_identical"]


def test_a_permanent_error_in_the_trainer_is_never_retried(tmp_path, cifar_root, torchx_run, fake_gpus):
    """The roles see GPUs (nvidia-smi says so) but CUDA is unusable: each trainer starts once, then stops its torchrun."""
    fake_gpus(2)
    cfg = small_config(tmp_path, cifar_root, replica_groups={"gpus": [0, 1], "max_restarts": 2})
    path = write_config(tmp_path, cfg)
    run = torchx_run(path)
    assert run.wait(RUN_TIMEOUT) != 0
    summary = read_summary(cfg)
    assert not summary["succeeded"] and "CUDA is not available" in summary["failure_reason"], summary
    assert sorted(summary["lost_groups"]) == [0, 1]
    # One start per group, not 1 + max_restarts: torchrun was ended before it could retry.
    starts = [line for line in run.lines if re.match(r"replica_\d/0 error: replica group \d is configured", line)]
    assert len(starts) == 2, run.tail()
    assert wait_gone(run.run_id, 15) == []


def test_a_host_failure_planned_off_the_test_bed_is_refused_at_once_not_skipped(tmp_path, cifar_root, torchx_run):
    """`partition` and `host_down` cut the host's link: on this machine's own network (no test-bed host) the
    trainers refuse them before the first step, once, and the run fails with the reason and the fix."""
    cfg = small_config(tmp_path, cifar_root, faults={"enabled": True, "schedule": [
        {"kind": "partition", "group": 0, "at_step": 50}, {"kind": "host_down", "group": 1, "at_step": 50}]})
    path = write_config(tmp_path, cfg)
    run = torchx_run(path)
    assert run.wait(RUN_TIMEOUT) != 0
    summary = read_summary(cfg)
    reason = summary["failure_reason"]
    assert not summary["succeeded"] and sorted(summary["lost_groups"]) == [0, 1], summary
    assert "is a 'partition'" in reason and "is a 'host_down'" in reason and "test bed" in reason, reason
    assert summary["faults"]["injected"] == 0 and not any(g.get("steps") for g in summary["replica_groups"].values())
    assert wait_gone(run.run_id, 15) == []


def test_the_resume_hint_does_not_depend_on_which_role_saw_the_interrupt_first(tmp_path, monkeypatch, capsys):
    """CI once saw a replica role stopped by the Ctrl-C report before the lighthouse role saw the signal:
    summary.json then said FAILED but not "stopped", and the client printed no way back."""
    from localsgd_ft.config import parse_config
    from localsgd_ft.launch import client_hooks as client

    cfg = parse_config({"output_dir": str(tmp_path / "out")})
    cfg.run_dir.mkdir(parents=True)
    monkeypatch.setattr(client, "_interrupted", True)
    launched = time.time() - 1
    (cfg.run_dir / "summary.json").write_text(json.dumps({"succeeded": False, "stopped": False}))
    client.say_how_to_resume(cfg, launched)
    assert "to resume, run the same command again" in capsys.readouterr().err
    (cfg.run_dir / "summary.json").write_text(json.dumps({"succeeded": True, "stopped": False}))
    client.say_how_to_resume(cfg, launched)
    assert capsys.readouterr().err == ""  # training had ended: nothing to resume


_WRITE_THEN_WAIT = """
import sys
from localsgd_ft.launch import lifecycle
print("lighthouse: training SUCCEEDED (the verdict)")
print("a warning", file=sys.stderr)
sys.exit(0 if lifecycle.wait_for_console_copy(deadline_s=float(sys.argv[1])) else 3)
"""


def _role_like(log_dir: Path, deadline_s: float) -> subprocess.Popen:
    """A process whose stdout and stderr are files named as torchx local_cwd names a role's logs."""
    log_dir.mkdir(parents=True)
    (log_dir / "combined.log").write_bytes(b"")  # the client's copy, empty so far
    with open(log_dir / "stdout.log", "wb") as out, open(log_dir / "stderr.log", "wb") as err:
        return subprocess.Popen([sys.executable, "-c", _WRITE_THEN_WAIT, str(deadline_s)], cwd=REPO,
                                stdout=out, stderr=err)


def test_the_last_role_ends_only_after_the_client_copied_its_verdict(tmp_path):
    """torchx's client copies a role's logs into combined.log by polling, and stops showing them once the app
    has ended: the lighthouse role's verdict, its last line, was lost from the console that way in CI."""
    log_dir = tmp_path / "lighthouse" / "0"
    proc = _role_like(log_dir, deadline_s=60)
    try:
        end = time.monotonic() + 30
        while b"a warning" not in (log_dir / "stderr.log").read_bytes() and time.monotonic() < end:
            time.sleep(0.05)
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=1.0)  # written, not yet copied: the role must not end
        copied = (log_dir / "stdout.log").read_bytes() + (log_dir / "stderr.log").read_bytes()
        assert b"training SUCCEEDED" in copied
        (log_dir / "combined.log").write_bytes(copied)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.wait()

    # Nobody copying (the client's copy stopped): the wait is bounded.
    proc = _role_like(tmp_path / "uncopied" / "0", deadline_s=0.5)
    assert proc.wait(timeout=20) == 3


def test_outside_local_cwd_the_role_does_not_wait(tmp_path):
    """A log that is not torchx local_cwd's (Slurm's, a terminal's): no copy to wait for, even beside a file
    named like the client's copy."""
    (tmp_path / "combined.log").write_bytes(b"")
    with open(tmp_path / "slurm-1-lighthouse-0.out", "wb") as out:
        proc = subprocess.run([sys.executable, "-c", _WRITE_THEN_WAIT, "60"], cwd=REPO, stdout=out,
                              stderr=subprocess.STDOUT, timeout=30)
    assert proc.returncode == 0
