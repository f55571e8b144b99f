"""A run's roles started by hand on the test bed's hosts (tests/hosts.py), as a cluster would place them.

The component's own plan (:func:`localsgd_ft.launch.appdef.build_app`) gives each role's command and
environment; here the lighthouse role runs on host 0 and replica group g on host g + 1, each under its
host's name, so every byte between groups crosses the bridge, and a test can cut a host's link.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Dict, List, Tuple

from hosts import TestBed
from processes import is_trainer, signal_all

from localsgd_ft.config import embed_config, load_config
from localsgd_ft.launch import appdef, lifecycle

HOST_VAR = "LSFT_LIGHTHOUSE_HOST"  # what torchx's rank0_env macro names on a cluster


def trainers_on(bed: TestBed, host: int) -> List[int]:
    """The pids of the trainers (torchrun's workers) on a bed host."""
    pids = subprocess.run(["ip", "netns", "pids", bed.ns(host)], capture_output=True, text=True, timeout=30)
    return [int(pid) for pid in pids.stdout.split() if is_trainer(int(pid))]


class BedRun:
    """The roles of one run, one per host; ``logs[role]`` is its output file."""

    def __init__(self, bed: TestBed, config: Path, cwd: Path) -> None:
        cfg = load_config(config)
        self.bed, self.cfg, self.run_id = bed, cfg, lifecycle.new_run_id(cfg.name)
        launch = appdef.Launch(config=str(config), embedded=embed_config(config), image="", script="train_localsgd.py",
                               fresh=False, local=False, rendezvous_ports=[], scheduler="", run_id=self.run_id,
                               token=lifecycle.new_run_token(), dry_run=False, slurm_logs="")
        app = appdef.build_app(cfg, launch)
        self.cwd = cwd
        self.procs: Dict[str, subprocess.Popen] = {}
        self.logs: Dict[str, Path] = {}
        self.hosts: Dict[str, int] = {}
        self._commands: Dict[str, Tuple[List[str], Dict[str, str]]] = {}
        for i, role in enumerate(app.roles):
            args = [a.replace("${rank0_env}", HOST_VAR).replace("${replica_id}", "0") for a in role.args]
            env = {**os.environ, **role.env, HOST_VAR: bed.name(0)}
            env.pop("LOCALSGD_FT_CLIENT_PID", None)
            log = Path(cfg.output_dir).parent / f"{role.name}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text("")
            self.logs[role.name], self.hosts[role.name] = log, i
            self._commands[role.name] = ([role.entrypoint, *args], env)
            self.start(role.name)

    def start(self, role: str) -> None:
        """Start ``role`` on its host: at the beginning, or again once its host is back, as a cluster would
        reschedule it (its output appended to the same file)."""
        argv, env = self._commands[role]
        with open(self.logs[role], "a") as out:
            self.procs[role] = self.bed.run(self.hosts[role], argv, env=env, cwd=self.cwd, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def text(self, role: str) -> str:
        return self.logs[role].read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        """The lighthouse role's exit code (the run's verdict), once every role has ended."""
        code = self.procs["lighthouse"].wait(timeout)
        for proc in self.procs.values():
            proc.wait(timeout=60)
        return code

    def kill(self) -> List[int]:
        """SIGKILL every process of the run, wherever it runs; the pids that were still there."""
        left = lifecycle.processes_of_run(self.run_id)
        signal_all(left)
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
        return left
