"""The CI Slurm cluster (``.ci/slurm_setup.sh``), as tests and benchmarks drive it: submit with the torchx CLI,
watch a het job's components, find which test-bed host a node lives on, and bring dead nodes back.

Node ``slurmciN`` lives on host ``N - 1`` of the persistent test bed tagged ``slurm`` (``tests/hosts.py``).
"""

from __future__ import annotations

import ipaddress
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import hosts

REPO = Path(__file__).resolve().parent.parent
TORCHX = str(Path(sys.executable).with_name("torchx"))
JOB_DEADLINE_S = 240
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
            "BOOT_FAIL", "DEADLINE"}
# .ci/slurm_setup.sh's test bed, for its names only (never built here).
BED = hosts.TestBed(1, tag="slurm")


def idle_nodes() -> int:
    """How many nodes answer idle (0: no cluster, or no Slurm tools)."""
    if not shutil.which("sbatch") or not shutil.which("sinfo"):
        return 0
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-t", "idle", "-o", "%N"], capture_output=True, text=True,
                             timeout=15)
    except (OSError, subprocess.SubprocessError):
        return 0
    return len(out.stdout.split()) if out.returncode == 0 else 0


def submit_job(cwd: Path, config: Path, script: str = str(REPO / "train_localsgd.py"), torchx: str = TORCHX
               ) -> Tuple[str, subprocess.CompletedProcess]:
    """``torchx run -s slurm`` from ``cwd``; the Slurm job id (AssertionError: none printed) and the client."""
    res = subprocess.run(
        [torchx, "run", "-s", "slurm", str(REPO / "components/localsgd.py") + ":localsgd",
         "--config", str(config), "--script", script],
        cwd=cwd, capture_output=True, text=True, timeout=120,
    )
    m = re.search(r"^slurm://[^/\s]*/(\d+)$", res.stdout, re.M)
    assert m, f"no app handle printed (rc={res.returncode}):\n{res.stdout}\n{res.stderr}"
    return m.group(1), res


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


def component_nodes(job: str) -> Dict[str, str]:
    """Each het-job component's name -> the node it runs on."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30)
    return {m.group(1): m.group(2) for m in re.finditer(r"\bJobName=(\S+).*?\bNodeList=(\S+)", out.stdout)}


def wait_for_end(job: str, deadline_s: float = JOB_DEADLINE_S, poll: Callable[[], None] = lambda: None,
                 every_s: float = 2.0) -> Dict[str, str]:
    """Poll until every component of ``job`` is in a final state, calling ``poll`` at each look."""
    end = time.monotonic() + deadline_s
    states: Dict[str, str] = {}
    while time.monotonic() < end:
        poll()
        states = job_states(job)
        if states and all(s in TERMINAL for s in states.values()):
            return states
        time.sleep(every_s)
    raise AssertionError(f"Slurm job {job} not finished after {deadline_s}s: {states}")


def node_addresses() -> Dict[str, str]:
    """Each node of the cluster -> its NodeAddr."""
    out = subprocess.run(["scontrol", "show", "node", "-o"], capture_output=True, text=True, timeout=30).stdout
    return {m.group(1): m.group(2) for m in re.finditer(r"NodeName=(\S+).*?\bNodeAddr=(\S+)", out)}


def on_the_test_bed() -> bool:
    """Whether every node is a host of the multi-host test bed (CI's cluster: .ci/slurm_setup.sh)."""
    addrs = node_addresses()
    return bool(addrs) and all(ipaddress.ip_address(a) in hosts.RANGE for a in addrs.values())


def host_of(node: str) -> int:
    """The test-bed host that node ``slurmciN`` lives on."""
    return int(node.removeprefix("slurmci")) - 1


def revive_node(name: str) -> None:
    """Node ``name``'s host back on the bridge and its slurmd started again (after a host was taken down)."""
    host = host_of(name)
    subprocess.run(["ip", "link", "set", BED.port_link(host), "up"], check=True, timeout=30)
    subprocess.run(["bash", str(REPO / ".ci" / "slurm_node.sh"), name, BED.ns(host)], check=True, timeout=60)


def cancel(job: str) -> None:
    subprocess.run(["scancel", job], capture_output=True, timeout=30)


def dark_nodes() -> List[str]:
    """The nodes whose host is dark: its link down, or nothing left running on it (its slurmd included)."""
    dark = []
    for name in node_addresses():
        host = host_of(name)
        link = subprocess.run(["ip", "-o", "link", "show", BED.port_link(host)], capture_output=True, text=True,
                              timeout=30).stdout
        pids = subprocess.run(["ip", "netns", "pids", BED.ns(host)], capture_output=True, text=True,
                              timeout=30).stdout.split()
        if "state DOWN" in link or not pids:
            dark.append(name)
    return dark


def bring_back_nodes(deadline_s: float = 60) -> None:
    """Every node whose host was taken down (dark, or Slurm says so) revived, until all are idle."""
    dead = set(dark_nodes())
    for line in subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True,
                               timeout=30).stdout.splitlines():
        name, state = line.split()
        if state.rstrip("*") in ("down", "drain", "drng", "fail") or state.endswith("*"):
            dead.add(name)
    for name in sorted(dead):
        revive_node(name)
    end = time.monotonic() + deadline_s
    while idle_nodes() < len(node_addresses()):
        assert time.monotonic() < end, subprocess.run(["sinfo", "-N"], capture_output=True, text=True).stdout
        time.sleep(1)
