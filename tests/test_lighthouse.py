"""The lighthouse role as a real process: binds loopback locally, ends when every group reported."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import small_config, write_config
from localsgd_ft.control import CompletionClient


@pytest.fixture
def lighthouse(tmp_path, cifar_root):
    cfg = small_config(tmp_path, cifar_root, replica_groups={"count": 2})
    path = write_config(tmp_path, cfg)
    proc = subprocess.Popen(
        [sys.executable, "-m", "localsgd_ft.lighthouse", "--config", str(path), "--host-env", "LH_HOST"],
        env={**os.environ, "LH_HOST": "localhost"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )
    port = cfg["lighthouse"]["port"]
    client = CompletionClient(f"http://127.0.0.1:{port + 1}")
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


def test_a_failed_group_makes_it_exit_nonzero(lighthouse):
    proc, client, cfg, _ = lighthouse
    client.finished(0, 0, {"params_sha256": "ab", "final_test_accuracy": 0.5}, deadline_s=30)
    client.finished(1, 1, None)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 1, out
    summary = json.loads((Path(cfg["output_dir"]) / "summary.json").read_text())
    assert not summary["succeeded"] and summary["replica_groups"]["1"]["exit_code"] == 1


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
    with pytest.raises(urllib.error.HTTPError) as e:
        client._call("/finished", {"group": 7})
    assert e.value.code == 400
