"""The lighthouse role as a real process: binds loopback locally, ends when every group reported."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import small_config, write_config

from localsgd_ft.contract import RUN_ID_ENV, RUN_TOKEN_ENV
from localsgd_ft.launch.completion.client import CompletionClient, Refused
from localsgd_ft.launch.completion.server import MAX_BODY

TOKEN = "0123456789abcdef"
LIGHTHOUSE_FAULT = {"faults": {"enabled": True, "schedule": [{"kind": "lighthouse", "at_step": 5, "duration_s": 2.0}]}}


@pytest.fixture
def lighthouse(request, tmp_path, cifar_root):
    cfg = small_config(tmp_path, cifar_root, replica_groups={"count": 2}, **getattr(request, "param", {}))
    path = write_config(tmp_path, cfg)
    proc = subprocess.Popen(
        [sys.executable, "-m", "localsgd_ft.lighthouse", "--config", str(path), "--host-env", "LH_HOST"],
        env={**os.environ, "LH_HOST": "localhost", RUN_ID_ENV: "t-test", RUN_TOKEN_ENV: TOKEN},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    port = cfg["lighthouse"]["port"]
    client = CompletionClient(f"http://127.0.0.1:{port + 1}", TOKEN)
    yield proc, client, cfg, port
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _listening(port: int) -> set:
    """Local addresses (hex, as in /proc/net/tcp*) listening on ``port``."""
    addrs = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if int(p, 16) == port and state == "0A":
                addrs.add(addr)
    return addrs


def test_ends_when_all_groups_finished_and_writes_summary(lighthouse):
    proc, client, cfg, port = lighthouse
    client.started(0, deadline_s=30)
    client.started(1, deadline_s=30)
    assert client.wait_all_started(deadline_s=5) == [0, 1]
    # Both the lighthouse and the completion service listen on loopback only.
    assert _listening(port) == {"0100007F"} and _listening(port + 1) == {"0100007F"}
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
        assert r.status == 200  # torchft's dashboard
    result = {"steps": 10, "syncs_committed": 2, "restarts": 0, "params_sha256": "ab", "final_test_accuracy": 0.7}
    client.finished(0, 0, result)
    assert proc.poll() is None  # one group still running: the lighthouse waits
    client.finished(1, 0, result)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    summary = json.loads((Path(cfg["output_dir"]) / "summary.json").read_text())
    assert summary["succeeded"] and summary["params_identical"] and summary["final_test_accuracy"] == 0.7
    assert summary["replica_groups"]["1"]["steps"] == 10
    assert summary["lighthouse_peak_rss_mb"] < 200  # the role does not import torch


def test_a_lost_group_is_recorded_and_the_rest_may_finish(lighthouse):
    proc, client, cfg, _ = lighthouse  # min_replicas 1: one group may carry on
    client.finished(1, 1, None, deadline_s=30)
    assert client.status()["abort"] is None
    client.finished(0, 0, {"params_sha256": "ab", "final_test_accuracy": 0.5})
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    summary = json.loads((Path(cfg["output_dir"]) / "summary.json").read_text())
    assert summary["succeeded"] and summary["lost_groups"] == [1]
    assert summary["replica_groups"]["1"]["lost"] and "lost replica groups" in out


@pytest.mark.parametrize("lighthouse", [{"lighthouse": {"min_replicas": 2}}], indirect=True)
def test_too_few_groups_left_aborts_the_run(lighthouse):
    proc, client, cfg, _ = lighthouse
    client.finished(1, 1, None, deadline_s=30)
    deadline = time.monotonic() + 10
    while not (reason := client.status()["abort"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "exhausted replica_groups.max_restarts" in reason and "lighthouse.min_replicas (2)" in reason
    client.finished(0, -15, None)  # its wrapper saw the abort and stopped torchrun
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 1 and "ABORT" in out
    summary = json.loads((Path(cfg["output_dir"]) / "summary.json").read_text())
    assert not summary["succeeded"] and summary["failure_reason"] == reason


def _lighthouse_child(port: int) -> int:
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes()
            except OSError:
                continue
            if b"localsgd_ft.lighthouse_server" in cmd and f":{port}".encode() in cmd:
                return int(d.name)
    raise AssertionError("no lighthouse child process")


def _wait_listening(port: int, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"port {port} not listening after {timeout}s")


def test_a_dead_lighthouse_is_restarted(lighthouse):
    proc, client, cfg, port = lighthouse
    client.started(0, deadline_s=30)
    first = _lighthouse_child(port)
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # a new child on the same port
        try:
            if _lighthouse_child(port) != first:
                break
        except AssertionError:
            pass
        time.sleep(0.1)
    _wait_listening(port, 30)
    for g in (0, 1):
        client.finished(g, 0, {"params_sha256": "ab", "final_test_accuracy": 0.5})
    out, _ = proc.communicate(timeout=30)
    summary = json.loads((Path(cfg["output_dir"]) / "summary.json").read_text())
    assert proc.returncode == 0 and summary["lighthouse_restarts"] == 1, out


@pytest.mark.parametrize("lighthouse", [LIGHTHOUSE_FAULT], indirect=True)
def test_injected_lighthouse_fault_kills_it_for_its_duration(lighthouse):
    proc, client, cfg, port = lighthouse
    client.started(0, deadline_s=30)
    _wait_listening(port, 30)
    t0 = time.monotonic()
    assert client.event(0, "fault", fault="lighthouse", fault_id=0, target=-1, step=5, duration_s=2.0)
    assert not client.event(1, "fault", fault="lighthouse", fault_id=0, target=-1, step=5, duration_s=2.0)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # it goes down ...
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            time.sleep(0.05)
        except OSError:
            break
    else:
        raise AssertionError("lighthouse did not go down")
    _wait_listening(port, 30)  # ... and comes back, not before its outage ends
    assert time.monotonic() - t0 >= 2.0
    for g in (0, 1):
        client.finished(g, 0, {"params_sha256": "ab", "final_test_accuracy": 0.5})
    out, _ = proc.communicate(timeout=30)
    summary = json.loads((Path(cfg["output_dir"]) / "summary.json").read_text())
    assert summary["faults"]["injected"] == 1 and summary["faults"]["by_kind"] == {"lighthouse": 1}
    assert "FAULT #0: lighthouse" in out


def test_sigterm_stops_it_with_a_partial_summary(lighthouse):
    proc, client, cfg, _ = lighthouse
    client.finished(0, 0, {"params_sha256": "ab", "final_test_accuracy": 0.5}, deadline_s=30)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 1 and "stopped by a signal" in out
    summary = json.loads((Path(cfg["output_dir"]) / "summary.json").read_text())
    assert summary["replica_groups"]["1"]["exit_code"] is None and not summary["succeeded"]


def test_bad_report_is_rejected(lighthouse):
    _, client, _, _ = lighthouse
    client.started(0, deadline_s=30)
    with pytest.raises(Refused) as e:
        client._call("/finished", {"group": 7})
    assert e.value.code == 400


def _raw(port: int, path: str, body: bytes, headers: dict) -> int:
    req = urllib.request.Request(f"http://127.0.0.1:{port + 1}{path}", data=body, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_control_plane_refuses_what_it_was_not_told_by_its_run(lighthouse):
    """No token, a wrong token, an oversize body, a result claiming computed keys, a fault while faults are off."""
    proc, client, cfg, port = lighthouse
    client.started(0, deadline_s=30)
    body = json.dumps({"group": 0, "exit_code": 0, "result": {"params_sha256": "ab"}}).encode()
    assert _raw(port, "/finished", body, {}) == 403
    assert _raw(port, "/finished", body, {"X-LocalSGD-Run-Token": "guess"}) == 403
    assert _raw(port, "/status", b"", {"X-LocalSGD-Run-Token": "guess"}) == 403
    huge = b'{"group": 0, "pad": "' + b"x" * (MAX_BODY + 10) + b'"}'
    assert _raw(port, "/event", huge, {"X-LocalSGD-Run-Token": TOKEN, "Content-Length": str(len(huge))}) == 413
    with pytest.raises(Refused, match="result.succeeded"):
        client.finished(0, 0, {"params_sha256": "ab", "succeeded": True, "lost": False})
    with pytest.raises(Refused) as e:  # faults.enabled is false: nobody may kill the lighthouse
        client.event(0, "fault", fault="lighthouse", fault_id=0, target=-1, step=5, duration_s=2.0)
    assert e.value.code == 403
    assert client.status()["finished"] == [] and client.status()["fired"] == []
    # A client that opens a connection and sends nothing is dropped, and does not block others.
    idle = socket.create_connection(("127.0.0.1", port + 1), timeout=5)
    assert client.status()["expected"] == 2
    idle.close()
    for g in (0, 1):
        client.finished(g, 0, {"params_sha256": "ab", "final_test_accuracy": 0.5})
    out, _ = proc.communicate(timeout=30)
    summary = json.loads((Path(cfg["output_dir"]) / "summary.json").read_text())
    assert proc.returncode == 0 and summary["succeeded"] and summary["faults"]["injected"] == 0, out


@pytest.mark.parametrize("lighthouse", [{"lighthouse": {"role_timeout_s": 3}}], indirect=True)
def test_a_silent_role_is_declared_lost(lighthouse):
    proc, client, cfg, _ = lighthouse
    client.heartbeat(1, deadline_s=30)  # group 1's role was seen once, then went silent
    client.finished(0, 0, {"params_sha256": "ab", "final_test_accuracy": 0.5})
    out, _ = proc.communicate(timeout=60)
    summary = json.loads((Path(cfg["output_dir"]) / "summary.json").read_text())
    assert proc.returncode == 0 and summary["succeeded"] and summary["lost_groups"] == [1], out
    assert summary["lost_reasons"]["1"].startswith("role lost: no heartbeat for")
    assert "group 1: role lost: no heartbeat" in out
    silent = float(re.search(r"no heartbeat for (\d+) s", summary["lost_reasons"]["1"]).group(1))
    assert 3 <= silent < 10


@pytest.mark.parametrize("lighthouse", [{"lighthouse": {"role_timeout_s": 3}}], indirect=True)
def test_a_role_that_never_arrives_is_declared_lost(lighthouse):
    proc, client, cfg, _ = lighthouse  # local: a role has 2 x role_timeout_s to make contact
    client.heartbeat(0, deadline_s=30)
    client.finished(0, 0, {"params_sha256": "ab", "final_test_accuracy": 0.5})
    out, _ = proc.communicate(timeout=60)
    summary = json.loads((Path(cfg["output_dir"]) / "summary.json").read_text())
    assert proc.returncode == 0 and summary["lost_groups"] == [1], out
    assert "never reached the lighthouse role" in summary["lost_reasons"]["1"]


def test_a_taken_port_fails_at_once_with_one_line_and_writes_nothing(tmp_path, cifar_root):
    cfg = small_config(tmp_path, cifar_root)
    port = cfg["lighthouse"]["port"]
    out_dir = Path(cfg["output_dir"])
    (out_dir / "metrics").mkdir(parents=True)
    (out_dir / "metrics" / "group_0.jsonl").write_text("{}\n")
    path = write_config(tmp_path, cfg)
    env = {**os.environ, "LH_HOST": "localhost", RUN_ID_ENV: "t-test", RUN_TOKEN_ENV: TOKEN}
    for taken in (port, port + 1):
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", taken))
            holder.listen()
            proc = subprocess.run([sys.executable, "-m", "localsgd_ft.lighthouse", "--config", str(path),
                                   "--host-env", "LH_HOST"], env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and f"port {taken}" in lines[0] and "lighthouse.port" in lines[0], proc.stderr
        # Nothing moved, nothing written.
        assert sorted(p.name for p in out_dir.iterdir()) == ["metrics"]
        assert (out_dir / "metrics" / "group_0.jsonl").read_text() == "{}\n"


def test_lighthouse_child_leaves_with_a_killed_role(lighthouse):
    proc, client, cfg, port = lighthouse
    client.started(0, deadline_s=30)
    child = _lighthouse_child(port)
    os.kill(proc.pid, signal.SIGKILL)  # the role dies without cleaning up
    proc.wait(10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and Path(f"/proc/{child}").exists():
        try:
            if b"zombie" in Path(f"/proc/{child}/status").read_bytes().lower():
                break
        except OSError:
            break
        time.sleep(0.1)
    else:
        if Path(f"/proc/{child}").exists():
            raise AssertionError("the torchft lighthouse outlived its role")
