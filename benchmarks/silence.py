"""Silence benchmark: what each silent failure costs on the Slurm test cluster, sync and async recovery.

    bash .ci/slurm_setup.sh                      # as root: 5 nodes, each a host of the test bed
    python benchmarks/silence.py                 # every case, both recovery modes: about 15 minutes
    python benchmarks/silence.py --cases partition --modes async

Every case is one real ``torchx run -s slurm`` of 3 replica groups (the 2-node case: 2 groups of 2 nodes),
each node a network-namespace host with its own name and address, so every byte between groups crosses the
test bridge. The failures are the silent ones: a replica host that goes dark inside a sync (links limited to
1 Mbit/s so that the sync lasts) and between syncs, a 20-s partition, the lighthouse role's host gone dark, a
node of a 2-node group gone dark, a trainer frozen for good. Heartbeat timeout 2 s, ``lighthouse.role_timeout_s``
10 s (30 s for the partition, which a shorter one would declare lost), ``localsgd.timeout_s`` 60 s (so a
silence the code did not cut short would cost a minute). A run with a host gone dark is short: Slurm ends and
requeues the whole job once the node is DOWN (``SlurmdTimeout``, 30 s here; docs/clusters.md).

For each it prints what the survivors paid (the summary's ``survivor_stall_s``; for a partition their longest
sync while the link was dark; for the lighthouse host, when the last group's trainers ended), the bound the
design promises, the verdict, whether the groups that finished ended bit-identical, and what became of the hit
group; as its last line a JSON object: ``{case: {mode: {...}}}``. Exits non-zero if a case missed its bound.
Measured figures: docs/fault-tolerance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the test bed and the CI cluster's helpers

import slurm_cluster as cluster  # noqa: E402
from bed_run import trainers_on  # noqa: E402

from benchmarks.common import free_port_pair  # noqa: E402
from localsgd_ft.storage.fixture import write_fixture  # noqa: E402

HB_S = 2.0
ROLE_TIMEOUT_S = 10.0
TRAINER_TIMEOUT_S = 5.0
MID_SYNC_MBIT = 1.0  # a sync of the benchmark's model then lasts about a second: a host can go dark inside it
RUN_DEADLINE_S = 300


@dataclass
class Case:
    """One silent failure: how to plan it, the survivors' bound, and what to check of the hit group."""

    name: str
    bound_s: float
    faults: List[Dict[str, Any]] = field(default_factory=list)
    groups: int = 3
    nodes: int = 1
    limit_mbit: Optional[float] = None
    outside: Optional[str] = None  # a failure the benchmark delivers itself: "lighthouse_host"
    # Slurm ends the whole het job SlurmdTimeout (30 s on the CI cluster) after a node goes dark, and requeues
    # it (docs/clusters.md): a run with a host_down must end before that to be judged on its own.
    steps: int = 600
    role_timeout_s: float = ROLE_TIMEOUT_S


CASES = [
    Case("host_down_mid_sync", HB_S + 2,  # a replica host dark inside a sync
         [{"kind": "host_down", "group": 2, "at_step": 200, "moment": "allreduce"}], limit_mbit=MID_SYNC_MBIT,
         steps=300),
    Case("host_down_between_syncs", HB_S + 2,
         [{"kind": "host_down", "group": 2, "at_step": 200}], steps=400),
    Case("partition", HB_S + 2,
         [{"kind": "partition", "group": 1, "at_step": 100, "duration_s": 20}], steps=1600,
         role_timeout_s=30),  # longer than the partition: else its group is declared lost, as it should be
    Case("lighthouse_host", ROLE_TIMEOUT_S + 5, outside="lighthouse_host"),
    Case("node_of_two", HB_S + 2,  # one node of a 2-node group dark
         [{"kind": "host_down", "group": 1, "worker": 1, "at_step": 100}], groups=2, nodes=2, steps=300),
    Case("frozen_trainer", HB_S + 2,
         [{"kind": "hang", "group": 1, "at_step": 100, "duration_s": 3600}]),
]


def config(case: Case, mode: str, out: Path, data: Path) -> Dict[str, Any]:
    steps = 100000 if case.outside else case.steps
    return {
        "name": f"silence-{case.name}-{mode}",
        "output_dir": str(out),
        "replica_groups": {"count": case.groups, "nodes": case.nodes, "max_restarts": 2, "memory_mb": 1024,
                           "trainer_timeout_s": TRAINER_TIMEOUT_S},
        "localsgd": {"sync_every": 10, "recovery": mode, "timeout_s": 60, "quorum_timeout_s": 60,
                     "quorum_retries": 3},
        "lighthouse": {"port": free_port_pair(), "join_timeout_ms": 5000, "heartbeat_timeout_ms": int(HB_S * 1000),
                       "role_timeout_s": case.role_timeout_s, "min_replicas": case.groups - 1},
        "data": {"root": str(data), "verify": False, "batch_size": 32},
        "model": {"arch": "cnn", "width": 16},
        "optimizer": {"name": "sgd", "lr": 0.02},
        "train": {"max_steps": steps, "eval_every": 0, "log_every": 100},
        "checkpoint": {"every_syncs": 5},
        "faults": {"enabled": bool(case.faults), "schedule": case.faults},
    }


def _poll(check: Callable[[], bool], deadline_s: float, what: str, job: str) -> None:
    end = time.monotonic() + deadline_s
    while not check():
        states = cluster.job_states(job)
        if time.monotonic() > end or (states and set(states.values()) <= cluster.TERMINAL):
            raise RuntimeError(f"{what} (job {job}: {states})")
        time.sleep(0.5)


def _role_log(out: Path, job: str, role: str, stream: str = "err") -> str:
    path = out / "slurm" / f"slurm-{job}-{role}-0.{stream}"
    return path.read_text(errors="replace") if path.exists() else ""


def _lighthouse_host(job: str, out: Path, case: Case) -> Dict[str, Any]:
    """Take the lighthouse role's node dark once every group trains; when did each group's trainers stop?

    Every role's output reaches its file through the batch script's srun, which runs on the lighthouse role's
    node: from the moment that host is dark no role writes a line, so the processes are watched instead.
    """
    _poll(lambda: all(f"group {g} step 100 " in _role_log(out, job, f"replica_{g}", "out")
                      for g in range(case.groups)), RUN_DEADLINE_S, "the groups never reached step 100", job)
    nodes = cluster.component_nodes(job)
    cluster.BED.host_down(cluster.host_of(nodes["lighthouse-0"]))
    dark = time.monotonic()
    replicas = {g: nodes[f"replica_{g}-0"] for g in range(case.groups)}
    stopped: Dict[int, float] = {}

    def all_stopped() -> bool:
        for g, node in replicas.items():
            if g not in stopped and not trainers_on(cluster.BED, cluster.host_of(node)):
                stopped[g] = round(time.monotonic() - dark, 2)
        return len(stopped) == len(replicas)

    end = time.monotonic() + ROLE_TIMEOUT_S + 60
    while not all_stopped():  # the job's state is no guide here: Slurm requeues it once the node is DOWN
        if time.monotonic() > end:
            raise RuntimeError(f"trainers still running {ROLE_TIMEOUT_S + 60:g} s after the lighthouse host went "
                               f"dark: {sorted(set(replicas) - set(stopped))}")
        time.sleep(0.5)
    last = max(stopped.values())
    return {"stall_s": last, "verdict": "replicas stopped", "hit": f"every group's trainers ended, the last {last} s "
            "after; Slurm then requeues the job (node DOWN)"}


def _partition(summary: Dict[str, Any], case: Case) -> tuple:
    """The survivors' longest sync while the link was dark, and how soon after it returned the group healed.

    The sync in which the group heals after the link returns may cost the survivors more (TCP's retransmission
    backoff after the outage); that is not silence, and the row shows it apart.
    """
    fault = case.faults[0]
    cut = next(e for e in summary["events"] if e["kind"] == "fault")["time"]
    restored = cut + fault["duration_s"]
    stalls = [e for e in summary["events"] if e["kind"] == "sync_stall" and e["group"] != fault["group"]]
    dark = max((e["duration_s"] for e in stalls if cut <= e["time"] <= restored), default=0.0)
    after = max((e["duration_s"] for e in stalls if e["time"] > restored), default=0.0)
    healed = next((e["time"] for e in summary["events"] if e["kind"] == "recovered"
                   and e["group"] == fault["group"] and e["time"] > restored), None)
    heal = "never healed" if healed is None else f"healed {healed - restored:.1f} s after its link returned"
    restarts = summary["replica_groups"][str(fault["group"])]["restarts"]
    return dark, f"{heal}, restarts {restarts}; healing sync {after:.1f} s"


def run_case(case: Case, mode: str, tmp: Path, data: Path) -> Dict[str, Any]:
    out = tmp / f"{case.name}-{mode}"
    path = tmp / f"{case.name}-{mode}.yaml"
    path.write_text(yaml.safe_dump(config(case, mode, out, data)))
    limited = range(1, len(cluster.node_addresses())) if case.limit_mbit else range(0)
    for i in limited:
        cluster.BED.limit(i, case.limit_mbit)
    job = ""
    try:
        job, _ = cluster.submit_job(tmp, path)
        if case.outside == "lighthouse_host":
            return _lighthouse_host(job, out, case)
        _poll(lambda: (out / "summary.json").exists(), RUN_DEADLINE_S, "no summary.json", job)
        summary = json.loads((out / "summary.json").read_text())  # written atomically
        hit_group = case.faults[0]["group"]
        recovery = summary["recoveries"][0] if summary["recoveries"] else {}
        group = summary["replica_groups"][str(hit_group)]
        stall = recovery.get("survivor_stall_s")
        if case.name == "partition":
            stall, hit = _partition(summary, case)
        elif hit_group in summary["lost_groups"]:
            hit = f"lost: {group.get('error', '')[:70]}"
        elif recovery.get("recovered"):
            hit = f"healed in {recovery['recovery_s']} s, restarts {group['restarts']}"
        else:
            hit = f"restarts {group['restarts']}"
        return {"stall_s": stall, "verdict": "SUCCEEDED" if summary["succeeded"]
                else "FAILED", "hit": hit, "identical": summary["params_identical"],
                "lost_groups": summary["lost_groups"], "wall_s": summary["wall_time_s"]}
    finally:
        if job:
            cluster.cancel(job)
        for i in limited:
            cluster.BED.limit(i, None)
        cluster.bring_back_nodes(deadline_s=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=[c.name for c in CASES], default=[c.name for c in CASES])
    parser.add_argument("--modes", nargs="+", choices=["sync", "async"], default=["sync", "async"])
    parser.add_argument("--keep", metavar="DIR", help="leave every run's output directory here")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("silence benchmark: needs root (it cuts the test bed's links)", file=sys.stderr)
        return 2
    if not cluster.on_the_test_bed() or cluster.idle_nodes() < 5:
        print("silence benchmark: needs the 5-node test-bed Slurm cluster: run `bash .ci/slurm_setup.sh` first "
              "(as root)", file=sys.stderr)
        return 2
    results: Dict[str, Dict[str, Any]] = {}
    missed = []
    with tempfile.TemporaryDirectory(prefix="silence-") as tmp_dir:
        tmp = Path(args.keep) if args.keep else Path(tmp_dir)
        tmp.mkdir(parents=True, exist_ok=True)
        write_fixture(tmp / "data")
        print(f"{'case':<26}{'mode':<7}{'survivors s':>12}{'bound s':>9}  {'verdict':<17}{'identical':<10}hit group",
              flush=True)
        for case in (c for c in CASES if c.name in args.cases):
            for mode in args.modes:
                try:
                    got = run_case(case, mode, tmp, tmp / "data")
                except Exception as e:  # one case's trouble is its row; the others still run
                    got = {"stall_s": None, "verdict": "ERROR", "hit": str(e).splitlines()[0][:90]}
                got["bound_s"] = case.bound_s
                results.setdefault(case.name, {})[mode] = got
                if got["stall_s"] is None or got["stall_s"] > case.bound_s or got["verdict"] in ("FAILED", "ERROR"):
                    missed.append(f"{case.name}/{mode}")
                stall = "-" if got["stall_s"] is None else f"{got['stall_s']:.2f}"
                same = {True: "yes", False: "NO"}.get(got.get("identical"), "-")
                print(f"{case.name:<26}{mode:<7}{stall:>12}{case.bound_s:>9.1f}  {got['verdict']:<17}{same:<10}"
                      f"{got['hit']}", flush=True)
    if missed:
        print(f"missed the bound: {missed}", file=sys.stderr)
    print(json.dumps(results))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
