"""Every signal goes to a process proven to be of this run, no helper outlives what it serves, and every
restart torchrun makes is counted (also of trainers killed while they start)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import REPO, read_summary, small_config, trainer_pids, write_config
from processes import descendants, signal_all, state

from localsgd_ft.contract import RUN_ID_ENV

END_PARENT = textwrap.dedent("""
    import os, sys
    from localsgd_ft.launch import lifecycle
    lifecycle._torchrun_pid = os.getppid()  # as follow_torchrun records it in a real worker
    print("signalled" if lifecycle.end_torchrun() else "left alone", flush=True)
""")


@pytest.mark.parametrize("parent_run", ["this-run", "another-run"])
def test_a_worker_ends_only_a_parent_of_its_own_run(parent_run):
    """The trainer ends its torchrun on a permanent error; a parent that is not of its run is left alone."""
    parent = subprocess.Popen(
        [sys.executable, "-c", f"import subprocess, sys; subprocess.run([sys.executable, '-c', {END_PARENT!r}], "
                               f"env={{**__import__('os').environ, {RUN_ID_ENV!r}: 'this-run'}}); "
                               "import time; time.sleep(60)"],
        env={**os.environ, RUN_ID_ENV: parent_run}, cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        said = parent.stdout.readline().strip()
        if parent_run == "this-run":
            assert said == "signalled" and parent.wait(10) == -signal.SIGKILL
        else:
            assert said == "left alone"
            with pytest.raises(subprocess.TimeoutExpired):
                parent.wait(1)
    finally:
        parent.kill()
        parent.wait()


HANG = textwrap.dedent("""
    import sys
    from localsgd_ft.config import Fault
    from localsgd_ft.training.faults import FaultInjector
    injector = FaultInjector.__new__(FaultInjector)
    injector.group, injector.worker, injector.hung = 0, 0, False
    print("hanging", flush=True)
    injector._inject(Fault(id=0, kind="hang", group=0, at_step=1, duration_s=120.0), 1)
    print("resumed", flush=True)
""")


def test_the_hang_helper_dies_with_the_trainer_it_froze():
    """The helper that continues a hung trainer, and anything it started, ends with the trainer. Before: the
    helper slept on and later sent SIGCONT to a bare pid that may have been reused; and then, a shell, its
    `sleep` child outlived a trainer its role ended, for the hang's whole length (Slurm kept the node
    COMPLETING for it)."""
    trainer = subprocess.Popen([sys.executable, "-c", HANG], cwd=REPO, stdout=subprocess.PIPE, text=True)
    helpers: list = []
    try:
        assert trainer.stdout.readline().strip() == "hanging"
        end = time.monotonic() + 30
        # Stopped, and every helper asleep: a shell sleeps only once it waits for the child it started, so
        # what the helper started is among its descendants by then.
        while state(trainer.pid) != "T" or not helpers or any(state(p) != "S" for p in helpers):
            assert time.monotonic() < end, "the trainer never stopped itself with its helper waiting"
            time.sleep(0.05)
            helpers = descendants(trainer.pid)
        trainer.kill()  # SIGKILL of the frozen trainer
        trainer.wait(10)
        end = time.monotonic() + 10
        while left := [p for p in helpers if state(p) not in ("", "Z")]:
            assert time.monotonic() < end, f"the hang's helpers {left} outlived the frozen trainer"
            time.sleep(0.05)
    finally:
        trainer.kill()
        signal_all(helpers)


@pytest.mark.integration
def test_restarts_count_trainers_killed_at_every_phase_of_their_start(tmp_path, cifar_root, torchx_run):
    """Three kills of group 0's trainer: two the moment torchrun starts it (before it reaches the lighthouse
    role), one after it reported ready. Before: the first two were never counted."""
    cfg = small_config(tmp_path, cifar_root, replica_groups={"max_restarts": 4}, localsgd={"recovery": "async"},
                       train={"max_steps": 120, "eval_every": 0})
    path = write_config(tmp_path, cfg)
    run = torchx_run(path)
    run.wait_for_line(lambda s: "lighthouse: run " in s, timeout=60)
    killed = set()
    for phase in ("at start", "at start", "after ready"):
        end = time.monotonic() + 120
        while time.monotonic() < end:
            fresh = [p for p in trainer_pids(path, 0) if p not in killed]
            if fresh:
                break
            time.sleep(0.01)
        assert fresh, f"no new trainer of group 0 to kill {phase}; tail:\n{run.tail()}"
        if phase == "after ready":
            run.wait_for_line(lambda s: "group 0 (restart " in s and "ready" in s and "(restart 0)" not in s,
                              timeout=120)
        os.kill(fresh[0], signal.SIGKILL)
        killed.add(fresh[0])
    assert run.wait(300) == 0, run.tail()
    summary = read_summary(cfg)
    assert summary["succeeded"], summary.get("failure_reason")
    assert summary["replica_groups"]["0"]["restarts"] == 3, summary["replica_groups"]["0"]
    assert summary["replica_groups"]["1"]["restarts"] == 0
