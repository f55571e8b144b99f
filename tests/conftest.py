"""Shared test fixtures: a CIFAR-format data set, free ports, experiment configs, and real torchx runs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

import pytest
import yaml
from processes import is_trainer, signal_all

from localsgd_ft.launch.addresses import free_port_pair
from localsgd_ft.launch.lifecycle import processes_of_run
from localsgd_ft.storage.fixture import write_fixture

REPO = Path(__file__).resolve().parent.parent
TORCHX = str(Path(sys.executable).with_name("torchx"))


# Real runs left out of the default `pytest` (and so of CI), which must stay under 20 minutes on 2 slow
# cores: each repeats, in another mode or at another moment, what a faster test in the default run
# already shows for real. `pytest -m slow` runs them (and `-m "integration or slow"` every real run).
SLOW = (
    "test_checkpoint.py::test_time_cadence_writes_checkpoints_in_a_real_run",
    "test_diloco.py::test_two_groups_train_to_the_end_with_identical_parameters[diloco]",
    "test_diloco.py::test_a_killed_worker_rejoins_and_every_group_ends_identical[diloco]",
    "test_diloco.py::test_a_killed_worker_rejoins_and_every_group_ends_identical[streaming]",
    "test_diloco.py::test_resume_restores_the_outer_optimizer_bit_for_bit",
    "test_diloco.py::test_streaming_resumes_after_a_whole_app_kill",
    "test_diloco.py::test_a_checkpoint_holds_the_outer_optimizer_state_and_a_resume_takes_the_new_settings",
    "test_integration.py::test_two_groups_train_and_agree[sync]",
    "test_integration.py::test_two_groups_train_and_agree[async]",
    "test_integration.py::test_group_out_of_restarts_is_lost_and_the_rest_finish",
    "test_integration.py::test_lighthouse_killed_and_restarted_mid_run",
    "test_integration.py::test_chaos_run_finishes_with_nothing_lost",
    "test_integration.py::test_whole_app_killed_resumes_from_last_checkpoint[async]",
    "test_integration.py::test_gpu_path_options_run_on_cpu",
    "test_lifecycle.py::test_1_killed_client_leaves_nothing_and_a_rerun_is_clean",
    "test_lifecycle.py::test_5_a_group_restarted_after_the_final_sync_takes_the_final_state",
    "test_lifecycle.py::test_7_lighthouse_that_cannot_be_restarted_ends_the_run_with_the_reason",
    "test_lifecycle.py::test_8_a_full_disk_for_metrics_is_a_warning_not_a_crash",
    "test_lifecycle.py::test_9_an_aborted_run_stops_every_trainer",
    "test_lifecycle.py::test_ctrl_c_stops_everything_keeps_the_checkpoint_and_says_how_to_resume",
    "test_lifecycle.py::test_a_second_run_on_the_same_ports_cannot_join_the_first",
    "test_lifecycle.py::test_the_resume_hint_does_not_depend_on_which_role_saw_the_interrupt_first",
    "test_report.py::test_real_run_writes_metrics_and_report[kill]",
    "test_report.py::test_real_run_writes_metrics_and_report[no-fault]",
    "test_storm.py::test_a_lighthouse_outage_costs_its_length_at_any_moment[sync]",
    "test_workers.py::test_worker_1_of_group_0_killed_the_group_restarts_and_rejoins[sync]",
    "test_workers.py::test_worker_1_of_group_0_killed_the_group_restarts_and_rejoins[async]",
    "test_workers.py::test_planned_failures_hit_the_worker_they_name",
    "test_workers.py::test_whole_app_killed_resumes_every_worker_from_the_checkpoint",
    "test_workers.py::test_killed_client_leaves_no_worker_and_a_lost_group_is_noticed",
    "test_workers.py::test_two_groups_of_two_nodes_train_to_the_end_and_survive_a_worker_loss",
    "test_workers.py::test_a_lost_node_loses_its_group_and_nothing_is_left",
    "test_integration.py::test_killed_worker_is_restarted_and_rejoins[sync]",
    "test_lifecycle.py::test_2_3_a_lost_replica_role_is_noticed_and_the_rest_finish[wrapper]",
    "test_ownership.py::test_two_runs_on_one_directory_a_stale_verdict_and_a_killed_run",
    "test_hosts.py::test_a_replica_host_gone_dark_costs_the_survivors_a_heartbeat_and_its_group_is_named_lost[step]",
    "test_slurm.py::test_a_node_that_dies_ends_the_het_job_and_slurm_requeues_it_to_resume_without_the_failure",
    "test_slurm.py::test_a_partition_of_one_group_from_the_yaml_heals_on_slurm",
)


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    for item in items:
        if item.nodeid.split("/", 1)[-1] in SLOW:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small learnable data set in CIFAR-10's file format (not the official one)."""
    root = tmp_path_factory.mktemp("cifar")
    write_fixture(root)
    return root


def deep_update(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            deep_update(base[k], v)
        else:
            base[k] = v
    return base


def small_config(tmp: Path, cifar_root: Path, **over: Any) -> Dict[str, Any]:
    """A fast 2-group CPU experiment on the fixture, with short timeouts; ``over`` patches it."""
    cfg: Dict[str, Any] = {
        "name": "t",
        "output_dir": str(tmp / "out"),
        "replica_groups": {"count": 2, "max_restarts": 2, "memory_mb": 1024},
        "localsgd": {"sync_every": 10, "recovery": "sync", "timeout_s": 10, "quorum_timeout_s": 30},
        "lighthouse": {"port": free_port_pair(), "join_timeout_ms": 5000, "heartbeat_timeout_ms": 1000},
        "data": {"root": str(cifar_root), "verify": False, "batch_size": 32},
        "model": {"arch": "cnn", "width": 16},
        "optimizer": {"name": "sgd", "lr": 0.02},
        "train": {"max_steps": 200, "eval_every": 100, "log_every": 10},
        "checkpoint": {"every_syncs": 5},
    }
    return deep_update(cfg, over)


def write_config(tmp: Path, cfg: Dict[str, Any], name: str = "exp.yaml") -> Path:
    path = tmp / name
    path.write_text(yaml.safe_dump(cfg))
    return path


class TorchxRun:
    """A real ``torchx run`` in its own process group, its output collected line by line."""

    def __init__(self, config: Path, cwd: Path = REPO, prefix: Sequence[str] = ()) -> None:
        self.config = config
        self.lines: List[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(  # ``prefix``: what runs the client (e.g. a private mount namespace)
            [*prefix, TORCHX, "run", "--", "--config", str(config)],
            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for_line(self, pred: Callable[[str], bool], timeout: float) -> str:
        """Block until an output line satisfies ``pred``; fail after ``timeout`` seconds."""
        end = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    if pred(line):
                        return line
                seen = len(self.lines)
                left = end - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError("expected line not seen; output tail:\n" + "\n".join(self.lines[-40:]))
                self._cond.wait(min(left, 1.0))

    def wait(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"torchx run did not finish in {timeout}s; tail:\n" + self.tail())
        self._reader.join(10)
        return code

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.lines[-n:])

    @property
    def run_id(self) -> str:
        """The run id the lighthouse role printed ('' before it did)."""
        with self._cond:
            for line in self.lines:
                m = re.search(r"lighthouse: run (\S+): serving", line)
                if m:
                    return m.group(1)
        return ""

    def kill(self) -> None:
        kill_tree(self.proc.pid, self.config)
        if self.run_id:
            signal_all(processes_of_run(self.run_id))


def processes_using(config: Path) -> List[int]:
    """PIDs whose command line names ``config`` (every role and worker of a run does)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if str(config).encode() in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def kill_tree(pgid: int, config: Path) -> None:
    """Kill the run's process group and anything else still running with its config."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    signal_all(processes_using(config))


def wait_no_processes(config: Path, timeout: float = 20.0) -> List[int]:
    """Poll until no process names ``config``; returns the stragglers if the deadline passes."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        left = processes_using(config)
        if not left:
            return []
        time.sleep(0.2)
    return processes_using(config)


def wait_gone(run_id: str, timeout: float = 20.0) -> List[Any]:
    """Poll until no process carries ``run_id`` in its environment; the stragglers (pid, command) if not."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not processes_of_run(run_id):
            return []
        time.sleep(0.1)
    left = []
    for pid in processes_of_run(run_id):
        try:
            left.append((pid, Path(f"/proc/{pid}/cmdline").read_bytes()[:120]))
        except OSError:
            pass
    return left


@pytest.fixture
def torchx_run(tmp_path: Path):
    """Start real ``torchx run``s; every one is killed (by process group) when the test ends."""
    runs: List[TorchxRun] = []

    def start(config: Path, prefix: Sequence[str] = ()) -> TorchxRun:
        run = TorchxRun(config, prefix=prefix)
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.kill()


@pytest.fixture
def fake_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[int], Path]:
    """Pretend this machine has N NVIDIA GPUs: an ``nvidia-smi -L`` stand-in first on PATH.

    It also serves as a PATH entry for subprocesses (the torchx CLI). N = 0 is a driver
    with no GPUs.
    """

    def install(n: int) -> Path:
        bin_dir = tmp_path / "fake-bin"
        bin_dir.mkdir(exist_ok=True)
        smi = bin_dir / "nvidia-smi"
        lines = "".join(f"GPU {i}: Fake GPU (UUID: GPU-{i:08d})\\n" for i in range(n))
        smi.write_text(f"#!/bin/sh\nprintf '{lines}'\n")
        smi.chmod(0o755)
        monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
        return bin_dir

    return install


def read_summary(cfg: Dict[str, Any]) -> dict:
    """The summary.json of a run made from config dict ``cfg``."""
    return json.loads((Path(cfg["output_dir"]) / "summary.json").read_text())


def finish(run: "TorchxRun", config: Path, timeout: float = 240) -> int:
    """Wait for ``run`` to end; assert nothing of it is left running; return its exit code."""
    code = run.wait(timeout)
    assert wait_no_processes(config) == [], "processes left running after the app ended"
    return code


def trainer_pids(config: Path, group: int, rank: int = 0) -> List[int]:
    """PIDs of worker ``rank`` of group ``group`` (torchrun workers: not torchrun, not the replica wrapper)."""
    return [pid for pid in processes_using(config) if is_trainer(pid, group, rank)]


def trainer_pid(config: Path, group: int, rank: int = 0) -> int:
    """PID of worker ``rank`` of group ``group``."""
    pids = trainer_pids(config, group, rank)
    if not pids:
        raise AssertionError(f"no trainer process for worker {rank} of group {group}")
    return pids[0]


def kill_trainer_at(run: "TorchxRun", config: Path, group: int, step: int, rank: int = 0) -> None:
    """SIGKILL worker ``rank`` of group ``group`` once the group has logged local step ``step`` (a machine loss)."""
    run.wait_for_line(lambda line: re.search(rf"group {group} step {step} ", line) is not None, timeout=120)
    os.kill(trainer_pid(config, group, rank), signal.SIGKILL)


def finish_with_a_worker_killed(torchx_run: Callable[[Path], "TorchxRun"], tmp: Path, cfg: Dict[str, Any],
                                group: int, step: int, rank: int = 0, timeout: float = 240) -> tuple:
    """Run ``cfg`` and SIGKILL one worker mid-run (:func:`kill_trainer_at`); assert the app SUCCEEDED and
    left no process; return (the run, its summary.json)."""
    path = write_config(tmp, cfg)
    run = torchx_run(path)
    kill_trainer_at(run, path, group, step, rank)
    assert finish(run, path, timeout) == 0, run.tail()
    return run, read_summary(cfg)


def assert_rejoin_hashes_match(summary: dict, group: int) -> None:
    """At the rejoined group's first full commit, its parameters equal the other groups' at that sync."""
    rec = [e for e in summary["events"] if e["kind"] == "recovered"]
    mine = next(e for e in rec if e["group"] == group)
    peers = [e for e in rec if e["group"] != group and e["global_sync"] == mine["global_sync"]]
    assert peers, rec  # the survivors were disrupted too and report the same sync
    assert {e["params_sha256"] for e in peers} == {mine["params_sha256"]}


def model_bytes(cfg: Dict[str, Any]) -> int:
    """Bytes of the parameters of the model ``cfg`` builds: what one sync of the whole model hands to allreduce."""
    from localsgd_ft.config import parse_config
    from localsgd_ft.training.model import build_model

    return sum(p.numel() * p.element_size() for p in build_model(parse_config(cfg).model).parameters())
