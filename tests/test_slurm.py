"""The component on a real Slurm cluster: submitted with the torchx CLI, run to its final job state.

Needs a cluster that answers ``sinfo`` with enough idle nodes (one per role:
Slurm puts the components of a het job on distinct nodes); CI makes one on
this host with ``.ci/slurm_setup.sh``. Skipped otherwise. Every job a test
submits is cancelled when it ends, whatever happened.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Dict, List

import pytest
from conftest import REPO, TORCHX, small_config, write_config

pytestmark = pytest.mark.slurm

JOB_DEADLINE_S = 240
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
            "BOOT_FAIL", "DEADLINE"}


def idle_nodes() -> int:
    if not shutil.which("sbatch") or not shutil.which("sinfo"):
        return 0
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-t", "idle", "-o", "%N"], capture_output=True, text=True,
                             timeout=15)
    except (OSError, subprocess.SubprocessError):
        return 0
    return len(out.stdout.split()) if out.returncode == 0 else 0


@pytest.fixture
def slurm_jobs():
    """Job ids submitted by the test; all cancelled afterwards."""
    jobs: List[str] = []
    if idle_nodes() < 3:
        pytest.skip("no Slurm cluster with 3 idle nodes here (CI creates one: .ci/slurm_setup.sh)")
    yield jobs
    for job in jobs:
        subprocess.run(["scancel", job], capture_output=True, timeout=30)


def submit(cwd: Path, config: Path, jobs: List[str], script: str = str(REPO / "train_localsgd.py")) -> str:
    """``torchx run -s slurm`` from ``cwd``; returns the Slurm job id."""
    res = subprocess.run(
        [TORCHX, "run", "-s", "slurm", str(REPO / "components/localsgd.py") + ":localsgd",
         "--config", str(config), "--script", script],
        cwd=cwd, capture_output=True, text=True, timeout=120,
    )
    m = re.search(r"^slurm://[^/\s]*/(\d+)$", res.stdout, re.M)
    assert m, f"no app handle printed (rc={res.returncode}):\n{res.stdout}\n{res.stderr}"
    jobs.append(m.group(1))
    # torchx 0.7.0 asks sacct for the status right after submitting; without an accounting
    # database (this CI cluster) that fails after the job is in. Anything else is an error.
    assert res.returncode == 0 or "sacct" in res.stderr, res.stderr
    return m.group(1)


def job_states(job: str) -> Dict[str, str]:
    """Each het-job component's name -> JobState (scontrol keeps finished jobs for MinJobAge)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30)
    states = {}
    for line in out.stdout.splitlines():
        name = re.search(r"\bJobName=(\S+)", line)
        state = re.search(r"\bJobState=(\S+)", line)
        if name and state:
            states[name.group(1)] = state.group(1)
    return states


def wait_for_end(job: str, deadline_s: float = JOB_DEADLINE_S) -> Dict[str, str]:
    end = time.monotonic() + deadline_s
    states: Dict[str, str] = {}
    while time.monotonic() < end:
        states = job_states(job)
        if states and all(s in TERMINAL for s in states.values()):
            return states
        time.sleep(2)
    raise AssertionError(f"Slurm job {job} not finished after {deadline_s}s: {states}")


def log(cwd: Path, job: str, role: str, stream: str = "out") -> str:
    path = cwd / f"slurm-{job}-{role}-0.{stream}"
    return path.read_text() if path.exists() else ""


def logs(cwd: Path, job: str, role: str) -> str:
    """A role's stdout and stderr, for a failed assertion's message."""
    return f"--- {role} stdout:\n{log(cwd, job, role)}\n--- {role} stderr:\n{log(cwd, job, role, 'err')}"


def test_training_runs_to_completed_with_a_summary(tmp_path, cifar_root, slurm_jobs):
    cfg = small_config(tmp_path, cifar_root, train={"max_steps": 60, "eval_every": 0, "log_every": 20})
    config = write_config(tmp_path, cfg)
    job = submit(tmp_path, config, slurm_jobs)
    states = wait_for_end(job)
    lighthouse_log = log(tmp_path, job, "lighthouse")
    assert set(states) == {"lighthouse-0", "replica_0-0", "replica_1-0"}
    assert set(states.values()) == {"COMPLETED"}, f"{states}\n{logs(tmp_path, job, 'lighthouse')}"
    assert "training SUCCEEDED" in lighthouse_log, logs(tmp_path, job, "lighthouse")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["succeeded"] and summary["params_identical"] and summary["lost_groups"] == []
    assert {g["exit_code"] for g in summary["replica_groups"].values()} == {0}
    assert all(g["steps"] == 60 for g in summary["replica_groups"].values())
    # The replica groups found the lighthouse on the het-job node of role 0.
    assert "LocalSGD: Number of local optimizer steps completed" in log(tmp_path, job, "replica_0")


def test_failed_training_ends_failed_with_the_reason_in_the_log(tmp_path, cifar_root, slurm_jobs):
    broken = tmp_path / "broken_train.py"
    broken.write_text("import sys\nprint('training crashed on purpose', file=sys.stderr)\nsys.exit(3)\n")
    cfg = small_config(tmp_path, cifar_root, replica_groups={"max_restarts": 0})
    job = submit(tmp_path, write_config(tmp_path, cfg), slurm_jobs, script=str(broken))
    states = wait_for_end(job)
    lighthouse_log = log(tmp_path, job, "lighthouse")
    assert states["lighthouse-0"] == "FAILED", f"{states}\n{logs(tmp_path, job, 'lighthouse')}"
    assert "training FAILED (" in lighthouse_log, logs(tmp_path, job, "lighthouse")  # with the reason
    replica_err = (tmp_path / f"slurm-{job}-replica_0-0.err").read_text()
    assert "training crashed on purpose" in replica_err and "torchrun exited with" in replica_err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert not summary["succeeded"] and sorted(summary["lost_groups"]) == [0, 1]
