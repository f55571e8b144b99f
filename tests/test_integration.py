"""Real runs: the torchx CLI, the torchft lighthouse, torchrun, gloo, on the CIFAR-format fixture."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest

from conftest import processes_using, small_config, wait_no_processes, write_config

pytestmark = pytest.mark.integration

RUN_TIMEOUT = 240


def _summary(cfg: dict) -> dict:
    return json.loads((Path(cfg["output_dir"]) / "summary.json").read_text())


def _finish(run, cfg_path: Path) -> int:
    code = run.wait(RUN_TIMEOUT)
    assert wait_no_processes(cfg_path) == [], "processes left running after the app ended"
    return code


def _trainer_pid(config: Path, group: int) -> int:
    """PID of group ``group``'s torchrun worker (not torchrun itself, not the replica wrapper)."""
    for pid in processes_using(config):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"train_localsgd.py" in cmd and b"torch.distributed.run" not in cmd \
                and f"REPLICA_GROUP_ID={group}".encode() in env and any(e.startswith(b"LOCAL_RANK=") for e in env):
            return pid
    raise AssertionError(f"no trainer process for group {group}")


@pytest.mark.parametrize("recovery", ["sync", "async"])
def test_two_groups_train_and_agree(tmp_path, cifar_root, torchx_run, recovery):
    cfg = small_config(tmp_path, cifar_root, localsgd={"recovery": recovery})
    path = write_config(tmp_path, cfg)
    run = torchx_run(path)
    code = _finish(run, path)
    assert code == 0, run.tail()
    assert any("Job finished: SUCCEEDED" in line for line in run.lines), run.tail()
    # The log lines users of torchft's example know.
    assert any("LocalSGD: Number of local optimizer steps completed: 100" in line for line in run.lines)
    assert any("got lighthouse quorum" in line for line in run.lines)

    summary = _summary(cfg)
    groups = summary["replica_groups"]
    assert set(groups) == {"0", "1"}
    assert summary["succeeded"] and summary["params_identical"]
    assert groups["0"]["params_sha256"] == groups["1"]["params_sha256"]
    assert summary["final_test_accuracy"] > 0.5, summary  # chance is 0.1
    for g in groups.values():
        assert g["steps"] == 200 and g["restarts"] == 0
        assert g["syncs_committed"] == 200 // 10 + (1 if recovery == "sync" else 0)


@pytest.mark.parametrize("recovery", ["sync", "async"])
def test_killed_worker_is_restarted_and_rejoins(tmp_path, cifar_root, torchx_run, recovery):
    cfg = small_config(tmp_path, cifar_root, localsgd={"recovery": recovery}, train={"max_steps": 1200})
    path = write_config(tmp_path, cfg)
    run = torchx_run(path)
    run.wait_for_line(lambda line: re.search(r"group 1 step 100 ", line) is not None, timeout=120)
    os.kill(_trainer_pid(path, 1), signal.SIGKILL)
    code = _finish(run, path)
    assert code == 0, run.tail()

    summary = _summary(cfg)
    g0, g1 = summary["replica_groups"]["0"], summary["replica_groups"]["1"]
    assert g1["restarts"] == 1 and g0["restarts"] == 0
    assert g0["params_sha256"] == g1["params_sha256"]
    assert g1["steps"] < g0["steps"]  # the restarted group rejoined mid-run with the live weights
    assert summary["final_test_accuracy"] > 0.5


def test_group_out_of_restarts_fails_the_run(tmp_path, cifar_root, torchx_run):
    cfg = small_config(tmp_path, cifar_root, replica_groups={"max_restarts": 0}, train={"max_steps": 600})
    path = write_config(tmp_path, cfg)
    run = torchx_run(path)
    run.wait_for_line(lambda line: re.search(r"group 1 step 50 ", line) is not None, timeout=120)
    os.kill(_trainer_pid(path, 1), signal.SIGKILL)
    code = _finish(run, path)
    assert code != 0
    assert any("Job finished: FAILED" in line for line in run.lines), run.tail()
    summary = _summary(cfg)
    assert not summary["succeeded"]
    assert summary["replica_groups"]["1"]["exit_code"] != 0
    assert summary["replica_groups"]["0"]["succeeded"]  # the survivor trained to the end alone
