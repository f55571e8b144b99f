"""The component on a real Slurm cluster: submitted with the torchx CLI, run to its final job state.

Needs a cluster that answers ``sinfo`` with enough idle nodes (one per role:
Slurm puts the components of a het job on distinct nodes); CI makes one on
this host with ``.ci/slurm_setup.sh``. Skipped otherwise. Every job a test
submits is cancelled when it ends, whatever happened. One successful job is
shared by the tests that check what it did (each job costs half a minute):
while it runs, every process's command line is searched for the run token.
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set

import pytest
from conftest import REPO, small_config, write_config
from slurm_cluster import (JOB_DEADLINE_S, TERMINAL, bring_back_nodes, idle_nodes, job_states, node_addresses,
                           on_the_test_bed, submit_job, wait_for_end)

from localsgd_ft.contract import RUN_TOKEN_ENV

pytestmark = pytest.mark.slurm

def _cancelled_afterwards() -> Iterator[List[str]]:
    """Job ids submitted by a test; all cancelled afterwards."""
    jobs: List[str] = []
    if idle_nodes() < 3:
        pytest.skip("no Slurm cluster with 3 idle nodes here (CI creates one: .ci/slurm_setup.sh)")
    yield jobs
    for job in jobs:
        subprocess.run(["scancel", job], capture_output=True, timeout=30)


@pytest.fixture
def slurm_jobs():
    yield from _cancelled_afterwards()


@pytest.fixture(scope="module")
def module_slurm_jobs():
    yield from _cancelled_afterwards()


@dataclass
class Submitted:
    job: str
    console: str  # what `torchx run` printed, both streams


def submit(cwd: Path, config: Path, jobs: List[str], script: str = str(REPO / "train_localsgd.py")) -> Submitted:
    """``torchx run -s slurm`` from ``cwd``; returns the Slurm job id and the client's output."""
    job, res = submit_job(cwd, config, script)
    jobs.append(job)
    # torchx 0.7.0 asks sacct for the status right after submitting; without an accounting
    # database (this CI cluster) that fails after the job is in. Anything else is an error.
    assert res.returncode == 0 or "sacct" in res.stderr, res.stderr
    return Submitted(job, res.stdout + res.stderr)


def slurm_dir(cwd: Path) -> Path:
    """Where the component has Slurm write the job's files: the run's output directory (small_config: out)."""
    return cwd / "out" / "slurm"


def log(cwd: Path, job: str, role: str, stream: str = "out") -> str:
    path = slurm_dir(cwd) / f"slurm-{job}-{role}-0.{stream}"
    return path.read_text() if path.exists() else ""


def logs(cwd: Path, job: str, role: str) -> str:
    """A role's stdout and stderr, for a failed assertion's message."""
    return f"--- {role} stdout:\n{log(cwd, job, role)}\n--- {role} stderr:\n{log(cwd, job, role, 'err')}"


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:  # gone, or not ours to read
        return b""


@dataclass
class TokenWatch:
    """Searches every process's command line for the run token, each time it is polled during the job.

    The token is learnt from the environment of a role of this job (its
    command line names the job's config file); srun, which torchx 0.7.0 gives
    the role environment on its command line, must be among the processes seen.
    """

    config: bytes
    token: Optional[bytes] = None
    scans: int = 0
    srun_seen: bool = False
    leaks: Dict[int, bytes] = field(default_factory=dict)  # pid -> its command line
    files_while_running: List[str] = field(default_factory=list)

    def __call__(self) -> None:
        cmdlines = {int(e): _read(f"/proc/{e}/cmdline") for e in os.listdir("/proc") if e.isdigit()}
        if self.token is None:
            self.token = self._learn_token(cmdlines)
            if self.token is None:
                return
            self.files_while_running = readable_files_holding(self.token)
        self.scans += 1
        for pid, cmd in cmdlines.items():
            if self.token in cmd:
                self.leaks[pid] = cmd.replace(b"\0", b" ")[:300]
            if cmd.startswith(b"srun\0") and self.config in cmd:
                self.srun_seen = True

    def _learn_token(self, cmdlines: Dict[int, bytes]) -> Optional[bytes]:
        needle = f"{RUN_TOKEN_ENV}=".encode()
        for pid, cmd in cmdlines.items():
            if self.config in cmd and b"localsgd_ft.lighthouse" in cmd:
                for item in _read(f"/proc/{pid}/environ").split(b"\0"):
                    if item.startswith(needle):
                        return item[len(needle):]
        return None


def slurm_state_dirs() -> List[Path]:
    """The directories where this cluster's daemons keep jobs (scripts, environments) and their logs."""
    out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
    dirs = []
    for key in ("StateSaveLocation", "SlurmdSpoolDir", "SlurmctldLogFile", "SlurmdLogFile"):
        m = re.search(rf"^{key}\s*=\s*(\S+)", out, re.M)
        if m:
            path = Path(m.group(1).split("%")[0])  # SlurmdSpoolDir=/var/spool/slurmd/%n: all the nodes'
            dirs.append(path if path.is_dir() else path.parent)
    return dirs


def _files(roots: List[Path]) -> Iterator[Path]:
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for name in names:
                yield Path(dirpath) / name


def readable_files_holding(token: bytes, roots: Optional[List[Path]] = None) -> List[str]:
    """Files under ``roots`` (default: the Slurm daemons' state and logs) that hold ``token`` and that every
    user of the machine may read (mode o+r), with their modes."""
    found = []
    for path in _files(roots if roots is not None else slurm_state_dirs()):
        try:
            mode = path.lstat().st_mode
        except OSError:
            continue
        if stat.S_ISREG(mode) and mode & stat.S_IROTH and token in _read(str(path)):
            found.append(f"{path} ({stat.filemode(mode)})")
    return found


@dataclass
class Finished:
    cwd: Path
    job: str
    console: str
    states: Dict[str, str]
    watch: TokenWatch
    left_in_cwd: Set[str]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, cifar_root, module_slurm_jobs) -> Finished:
    """A tiny successful run, submitted from its own directory, watched for the token while it runs."""
    cwd = tmp_path_factory.mktemp("slurm-run")
    cfg = small_config(cwd, cifar_root, train={"max_steps": 60, "eval_every": 0, "log_every": 20})
    config = write_config(cwd, cfg)
    before = set(os.listdir(cwd))
    submitted = submit(cwd, config, module_slurm_jobs)
    watch = TokenWatch(config=str(config).encode())
    states = wait_for_end(submitted.job, poll=watch, every_s=0.5)
    return Finished(cwd, submitted.job, submitted.console, states, watch, set(os.listdir(cwd)) - before)


def test_training_runs_to_completed_with_a_summary(finished_run):
    cwd, job, states = finished_run.cwd, finished_run.job, finished_run.states
    lighthouse_log = log(cwd, job, "lighthouse")
    assert set(states) == {"lighthouse-0", "replica_0-0", "replica_1-0"}
    assert set(states.values()) == {"COMPLETED"}, f"{states}\n{logs(cwd, job, 'lighthouse')}"
    assert "training SUCCEEDED" in lighthouse_log, logs(cwd, job, "lighthouse")
    summary = json.loads((cwd / "out" / "summary.json").read_text())
    assert summary["succeeded"] and summary["params_identical"] and summary["lost_groups"] == []
    assert {g["exit_code"] for g in summary["replica_groups"].values()} == {0}
    assert all(g["steps"] == 60 for g in summary["replica_groups"].values())
    # The replica groups found the lighthouse on the het-job node of role 0.
    assert "LocalSGD: Number of local optimizer steps completed" in log(cwd, job, "replica_0")


def test_every_role_ran_on_a_host_of_its_own_and_talked_across_the_bridge(finished_run):
    """On the test-bed cluster each role is on its own host, under its own name, and what the groups
    advertise to each other (torchft's Managers, the lighthouse) are those hosts' addresses."""
    if not on_the_test_bed():
        pytest.skip("this cluster's nodes are not test-bed hosts (.ci/slurm_setup.sh builds such a cluster)")
    cwd, job = finished_run.cwd, finished_run.job
    served = re.search(r"serving http://([^:/\s]+):", log(cwd, job, "lighthouse"))
    assert served, logs(cwd, job, "lighthouse")
    where = {"lighthouse": served.group(1)}
    for g in (0, 1):
        manager = re.search(r"Manager listening on http://([^:/\s]+):", log(cwd, job, f"replica_{g}", "err"))
        assert manager, logs(cwd, job, f"replica_{g}")
        where[f"replica_{g}"] = manager.group(1)
    addrs = node_addresses()
    assert len(set(where.values())) == 3 and all(h in addrs for h in where.values()), (where, addrs)
    for role, host in where.items():  # and each name leads to that host's own address on the bridge
        assert socket.gethostbyname(host) == addrs[host], (role, host, addrs)


def test_a_partition_of_one_group_from_the_yaml_heals_on_slurm(tmp_path, cifar_root, slurm_jobs):
    """The YAML's `partition` cuts group 1's node off the bridge for 8 s inside a Slurm job: the job
    still COMPLETES, group 1 heals without a restart and every group ends bit-identical."""
    if not on_the_test_bed():
        pytest.skip("a partition needs the test-bed cluster (.ci/slurm_setup.sh builds it)")
    cfg = small_config(tmp_path, cifar_root, train={"max_steps": 600, "eval_every": 0, "log_every": 100},
                       lighthouse={"role_timeout_s": 60, "heartbeat_timeout_ms": 2000},
                       localsgd={"timeout_s": 60, "quorum_timeout_s": 60, "quorum_retries": 3},
                       faults={"enabled": True, "schedule": [
                           {"kind": "partition", "group": 1, "at_step": 100, "duration_s": 8}]})
    job = submit(tmp_path, write_config(tmp_path, cfg), slurm_jobs).job
    states = wait_for_end(job)
    assert set(states.values()) == {"COMPLETED"}, f"{states}\n{logs(tmp_path, job, 'lighthouse')}"
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["succeeded"] and summary["params_identical"], summary["failure_reason"]
    assert summary["faults"]["by_kind"] == {"partition": 1}
    cut = next(e for e in summary["events"] if e["kind"] == "fault")
    restored = cut["time"] + 8
    # While the link is dark the survivor pays a heartbeat; the sync in which the group heals afterwards may
    # cost it more (TCP's retransmission backoff after an 8-s outage: measured up to 5.8 s), and is not silence.
    silent = [e["duration_s"] for e in summary["events"] if e["kind"] == "sync_stall" and e["group"] == 0
              and cut["time"] <= e["time"] <= restored]
    assert silent and max(silent) <= 2 + 2, summary["events"]
    healed = [e for e in summary["events"] if e["kind"] == "recovered" and e["group"] == 1]
    assert summary["recoveries"][0]["recovered"] and healed and healed[0]["time"] - restored < 10, healed
    assert summary["replica_groups"]["1"]["restarts"] == 0


def test_a_node_that_dies_ends_the_het_job_and_slurm_requeues_it_to_resume_without_the_failure(
        tmp_path, cifar_root, slurm_jobs):
    """Group 1's host goes dark for good (the YAML's `host_down`: its link cut, its slurmd killed). Slurm
    22.05 marks the node DOWN after SlurmdTimeout and then kills every component of the het job, whatever
    `--no-kill` says, and requeues it (torchx submits with --requeue): a whole-job restart on the nodes left.
    The requeued job resumes from its checkpoint, the failure does not fire again, and the job COMPLETES."""
    if not on_the_test_bed():
        pytest.skip("a node failure needs the test-bed cluster (.ci/slurm_setup.sh builds it)")
    bring_back_nodes()
    cfg = small_config(tmp_path, cifar_root, train={"max_steps": 4000, "eval_every": 0, "log_every": 500},
                       checkpoint={"every_syncs": 5},
                       lighthouse={"role_timeout_s": 10, "heartbeat_timeout_ms": 2000},
                       localsgd={"timeout_s": 60, "quorum_timeout_s": 60, "quorum_retries": 3},
                       faults={"enabled": True, "schedule": [{"kind": "host_down", "group": 1, "at_step": 100}]})
    job = submit(tmp_path, write_config(tmp_path, cfg), slurm_jobs).job

    def release_the_requeued_job() -> None:  # Slurm holds a requeued job for minutes (BeginTime): not here
        out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
        if "Reason=BeginTime" in out:
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True)

    try:
        states = wait_for_end(job, deadline_s=480, poll=release_the_requeued_job)
        shown = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    finally:
        bring_back_nodes()
    lighthouse_log = log(tmp_path, job, "lighthouse")
    assert set(states.values()) == {"COMPLETED"}, f"{states}\n{logs(tmp_path, job, 'lighthouse')}"
    assert "Restarts=1" in shown, shown  # one whole-job restart
    assert "planned failure(s) [0] fired in an earlier job of this run and will not fire again" in lighthouse_log
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["succeeded"] and summary["params_identical"] and summary["lost_groups"] == [], summary
    assert summary["faults"]["injected"] == 0  # the requeued job: nothing fired twice
    assert min(e["step"] for e in summary["events"] if e["kind"] == "resumed") >= 100  # from the checkpoint


def test_a_dark_node_of_a_two_node_group_costs_the_others_seconds_and_its_group_is_lost(
        tmp_path, cifar_root, slurm_jobs):
    """Two groups of two nodes; the host of group 1's worker 1 goes dark for good (the YAML's `host_down`).
    Group 1's other node would wait for it in the group's own gradient allreduce while its Manager heartbeats,
    and torchft's lighthouse forms no quorum of one group while two heartbeat: group 0 would wait until Slurm
    killed the job. Its role ends its trainers instead (a `node_silent` event), so the Manager falls silent:
    group 0 goes on within two heartbeat timeouts, group 1 is named lost, and the run SUCCEEDS before Slurm
    (SlurmdTimeout 30 s) ends the het job for its dead node."""
    if not on_the_test_bed():
        pytest.skip("a node failure needs the test-bed cluster (.ci/slurm_setup.sh builds it)")
    bring_back_nodes()
    if idle_nodes() < 5:
        pytest.skip("needs 5 idle test-bed nodes (.ci/slurm_setup.sh makes 5; SLURM_FAKE_NODES sets how many)")
    hb_s = 2.0
    cfg = small_config(tmp_path, cifar_root, replica_groups={"count": 2, "nodes": 2, "max_restarts": 2,
                                                             "memory_mb": 1024},
                       train={"max_steps": 500, "eval_every": 0, "log_every": 50},
                       lighthouse={"role_timeout_s": 10, "heartbeat_timeout_ms": int(hb_s * 1000)},
                       localsgd={"timeout_s": 60, "quorum_timeout_s": 60, "quorum_retries": 3},
                       faults={"enabled": True, "schedule": [
                           {"kind": "host_down", "group": 1, "worker": 1, "at_step": 100}]})
    job = submit(tmp_path, write_config(tmp_path, cfg), slurm_jobs).job
    summary_file = tmp_path / "out" / "summary.json"
    try:
        end = time.monotonic() + JOB_DEADLINE_S
        while not summary_file.exists():  # the job itself ends NODE_FAIL (a node died), after the verdict
            assert time.monotonic() < end and not set(job_states(job).values()) & TERMINAL, (
                f"{job_states(job)}\n{logs(tmp_path, job, 'lighthouse')}")
            time.sleep(1)
        lighthouse_log = log(tmp_path, job, "lighthouse")
    finally:
        subprocess.run(["scancel", job], capture_output=True, timeout=30)
        bring_back_nodes()
    summary = json.loads(summary_file.read_text())
    assert summary["succeeded"] and summary["lost_groups"] == [1], f"{summary}\n{lighthouse_log}"
    assert "node 1" in summary["replica_groups"]["1"]["error"], summary["replica_groups"]["1"]
    ended = [e for e in summary["events"] if e["kind"] == "node_silent"]
    assert ended and ended[0]["group"] == 1 and ended[0]["silent_node"] == 1 and ended[0]["workers"] == 1, ended
    [recovery] = summary["recoveries"]
    # Our service needs a heartbeat timeout to count the node silent, torchft's lighthouse another to stop
    # counting the Manager the role ended; the role looks once a second.
    assert recovery["kind"] == "host_down" and recovery["survivor_stall_s"] <= 2 * hb_s + 2, recovery
    print(f"\ndark node of a 2-node group: {recovery}; node 1 silent {ended[0]['silent_s']} s when its sibling "
          f"ended its trainers; group 1: {summary['replica_groups']['1']['error']}")


def test_the_run_token_is_on_no_command_line_and_in_no_readable_file(finished_run):
    watch = finished_run.watch
    assert watch.token is not None and len(watch.token) == 32, "no role of the job was seen with its token"
    assert watch.scans >= 3 and watch.srun_seen, f"the job's srun was never seen running ({watch.scans} scans)"
    assert not watch.leaks, "the run token is on a command line:\n" + "\n".join(
        f"{pid}: {cmd!r}" for pid, cmd in watch.leaks.items())
    # Files: the Slurm daemons' (the job's environment is kept there: by the daemon's user only), while the
    # job ran and after; everything the job and torchx left in and under the directory it was submitted from.
    assert not watch.files_while_running, watch.files_while_running
    assert not readable_files_holding(watch.token), readable_files_holding(watch.token)
    assert not readable_files_holding(watch.token, [finished_run.cwd])
    assert watch.token.decode() not in finished_run.console


def test_slurm_files_go_under_the_output_dir_and_the_console_says_where(finished_run):
    cwd, job = finished_run.cwd, finished_run.job
    assert finished_run.left_in_cwd == {"out"}, finished_run.left_in_cwd  # no slurm-*.out beside the config
    files = {p.name for p in slurm_dir(cwd).iterdir()}
    roles = ["lighthouse-0", "replica_0-0", "replica_1-0"]
    assert files == {f"slurm-{job}.out"} | {f"slurm-{job}-{r}.{s}" for r in roles for s in ("out", "err")}
    assert "job exited with code 0" in (slurm_dir(cwd) / f"slurm-{job}.out").read_text()  # the batch script's
    assert f"localsgd: Slurm writes each role's output to {slurm_dir(cwd)}/slurm-<job id>-<role>-<node>.out" in \
        finished_run.console


def test_failed_training_ends_failed_with_the_reason_in_the_log(tmp_path, cifar_root, slurm_jobs):
    broken = tmp_path / "broken_train.py"
    broken.write_text("import sys\nprint('training crashed on purpose', file=sys.stderr)\nsys.exit(3)\n")
    cfg = small_config(tmp_path, cifar_root, replica_groups={"max_restarts": 0})
    job = submit(tmp_path, write_config(tmp_path, cfg), slurm_jobs, script=str(broken)).job
    states = wait_for_end(job)
    lighthouse_log = log(tmp_path, job, "lighthouse")
    assert states["lighthouse-0"] == "FAILED", f"{states}\n{logs(tmp_path, job, 'lighthouse')}"
    assert "training FAILED (" in lighthouse_log, logs(tmp_path, job, "lighthouse")  # with the reason
    replica_err = (slurm_dir(tmp_path) / f"slurm-{job}-replica_0-0.err").read_text()
    assert "training crashed on purpose" in replica_err and "torchrun exited with" in replica_err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert not summary["succeeded"] and sorted(summary["lost_groups"]) == [0, 1]
