"""Silent storm: failures that answer nothing, and loud ones, on the multi-host test bed, beside a calm run.

    python benchmarks/silent_storm.py                 # as root: 30 failures, about 12 minutes on 2 cores
    python benchmarks/silent_storm.py --failures 10

The lighthouse role and 2 replica groups each run on a host of the test bed (tests/hosts.py: network
namespaces on one bridge, each with its own name and address; tests/bed_run.py starts the roles the
component plans on them, as a cluster would place them), and train configs/storm.yaml's model and data
twice: calm, then while this script delivers failures from outside, 2-5 s after the last one's action
ended, each drawn (seeded) from these kinds and aimed at a group drawn likewise (one whose trainer runs: a
group still restarting is left alone until it trains again):

- ``host_down``: the group's host goes dark (its link cut, everything on it SIGKILLed); it "reboots" 3 s
  later (the link back) and the group's replica role is started on it again, as a cluster would reschedule
  it; the new role's trainer resumes from the newest checkpoint and heals from the other group;
- ``partition``: the group's link cut for 5 s, its processes left running;
- ``hang``: the group's trainer SIGSTOPped for 3 s (heartbeats and all), then continued;
- ``kill``: the group's trainer SIGKILLed; torchrun restarts it.

Prints both runs' wall time, verdict, lost groups and whether every group ended bit-identical, the mean
cost per failure ((storm wall time - calm wall time) / failures) and, by kind, the mean of the survivor's
longest sync in the 10 s after each failure; its last line is a JSON object with those figures. Exits
non-zero unless the storm SUCCEEDED with nothing lost and identical weights.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the test bed and the roles started on it

import hosts  # noqa: E402
from bed_run import BedRun, trainers_on  # noqa: E402
from processes import signal_all  # noqa: E402

from benchmarks.common import run_config  # noqa: E402
from localsgd_ft.storage.fixture import write_fixture  # noqa: E402

KINDS = ("host_down", "partition", "hang", "kill")
REBOOT_S, PARTITION_S, HANG_S = 3.0, 5.0, 3.0
GAP_S = (2.0, 5.0)  # between the end of one failure's action and the next
STALL_WINDOW_S = 10.0
RUN_DEADLINE_S = 1800


def config(out: Path, data: Path, name: str, steps: int) -> Dict[str, Any]:
    cfg = run_config(yaml.safe_load((REPO / "configs/storm.yaml").read_text()), name, out, data)
    # Longer than a host's reboot and its role's start: the group is rescheduled, not declared lost.
    cfg["lighthouse"]["role_timeout_s"] = 30
    cfg["train"]["max_steps"] = steps
    cfg["faults"] = {"enabled": False}  # the failures come from outside
    return cfg


class Storm:
    """Delivers failures to a running BedRun from outside; ``delivered``: (time, kind, group) of each."""

    def __init__(self, run: BedRun, groups: int, seed: int) -> None:
        self.run, self.bed, self.groups = run, run.bed, groups
        self.rng = random.Random(seed)
        self.delivered: List[Dict[str, Any]] = []

    def running(self) -> bool:
        return self.run.procs["lighthouse"].poll() is None

    def deliver(self, kind: str, group: int) -> bool:
        """One failure; False where the group has no trainer to hit (still starting after the last one)."""
        role = f"replica_{group}"
        host = self.run.hosts[role]
        pids = trainers_on(self.bed, host)
        if not pids:
            return False
        at = time.time()
        if kind == "kill":
            signal_all(pids[:1], signal.SIGKILL)
        elif kind == "hang":
            signal_all(pids, signal.SIGSTOP)
            time.sleep(HANG_S)  # the hang's length, by design
            signal_all(pids, signal.SIGCONT)
        elif kind == "partition":
            self.bed.cut(host)
            time.sleep(PARTITION_S)
            self.bed.restore(host)
        else:  # host_down, then the reboot and the role rescheduled on the same host
            self.bed.host_down(host)
            self.run.procs[role].wait(30)
            time.sleep(REBOOT_S)
            self.bed.restore(host)
            self.run.start(role)
        self.delivered.append({"time": at, "kind": kind, "group": group})
        return True

    def rage(self, failures: int) -> None:
        while len(self.delivered) < failures and self.running():
            time.sleep(self.rng.uniform(*GAP_S))
            kind, group = self.rng.choice(KINDS), self.rng.randrange(self.groups)
            if self.running() and not self.deliver(kind, group):
                time.sleep(1.0)  # its trainer is starting: the next draw may find one


def _wait_for_training(run: BedRun, groups: int) -> None:
    end = time.monotonic() + 300
    while not all(f"group {g} step 200 " in run.text(f"replica_{g}") for g in range(groups)):
        if time.monotonic() > end or run.procs["lighthouse"].poll() is not None:
            raise RuntimeError("the groups never reached step 200:\n" + run.text("lighthouse")[-2000:])
        time.sleep(0.5)


def one_run(bed: hosts.TestBed, tmp: Path, name: str, steps: int, failures: int, seed: int
            ) -> Dict[str, Any]:
    out = tmp / name
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config(out, tmp / "data", f"silent-storm-{name}", steps)))
    run = BedRun(bed, path, REPO)
    storm = Storm(run, 2, seed)
    try:
        if failures:
            _wait_for_training(run, 2)
            storm.rage(failures)
        code = run.wait(RUN_DEADLINE_S)
    finally:
        left = run.kill()
        for i in range(1, 3):  # no link left cut, whatever happened
            bed.restore(i)
    summary = json.loads((out / "summary.json").read_text())
    summary["_exit_code"], summary["_left"], summary["_delivered"] = code, left, storm.delivered
    return summary


def stall_by_kind(summary: Dict[str, Any]) -> Dict[str, float]:
    """Per kind, the mean over its failures of the other group's longest sync within STALL_WINDOW_S after."""
    stalls = [e for e in summary["events"] if e["kind"] == "sync_stall"]
    by_kind: Dict[str, List[float]] = defaultdict(list)
    for f in summary["_delivered"]:
        near = [e["duration_s"] for e in stalls if e["group"] != f["group"]
                and f["time"] <= e["time"] <= f["time"] + STALL_WINDOW_S]
        by_kind[f["kind"]].append(max(near, default=0.0))
    return {k: round(statistics.mean(v), 2) for k, v in sorted(by_kind.items())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--failures", type=int, default=30)
    parser.add_argument("--steps", type=int, default=9000, help="train.max_steps of both runs (long enough for "
                        "the failures: about 25 s of calm training per 4 of them here)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--keep", metavar="DIR", help="leave both runs' output directories here")
    args = parser.parse_args()
    why_not = hosts.unavailable()
    if why_not:
        print(f"silent storm: the test bed cannot be built here: {why_not}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="silent-storm-") as tmp_dir:
        tmp = Path(args.keep) if args.keep else Path(tmp_dir)
        tmp.mkdir(parents=True, exist_ok=True)
        write_fixture(tmp / "data")
        with hosts.TestBed(3, tag="storm") as bed:
            calm = one_run(bed, tmp, "calm", args.steps, 0, args.seed)
            storm = one_run(bed, tmp, "storm", args.steps, args.failures, args.seed)
    delivered = storm["_delivered"]
    n = len(delivered)
    out = {
        "failures": n,
        "by_kind": {k: sum(1 for f in delivered if f["kind"] == k) for k in KINDS},
        "cost_per_failure_s": round((storm["wall_time_s"] - calm["wall_time_s"]) / max(n, 1), 2),
        "survivor_stall_by_kind_s": stall_by_kind(storm),
        "max_stall_s": max([e["duration_s"] for e in storm["events"] if e["kind"] == "sync_stall"], default=0.0),
        "lost_groups": storm["lost_groups"],
        "params_identical": storm["params_identical"],
        "restarts": {g: r.get("restarts") for g, r in storm["replica_groups"].items()},
        "calm_wall_s": calm["wall_time_s"],
        "storm_wall_s": storm["wall_time_s"],
        "succeeded": storm["succeeded"],
        "left_behind": len(calm["_left"]) + len(storm["_left"]),
        "delivered": [{**f, "time": round(f["time"] - delivered[0]["time"], 1)} for f in delivered] if n else [],
    }
    print(f"{'':<8}{'wall s':>9}{'verdict':>11}{'failures':>10}  lost  identical")
    for name, s in (("calm", calm), ("storm", storm)):
        print(f"{name:<8}{s['wall_time_s']:>9.1f}{'SUCCEEDED' if s['succeeded'] else 'FAILED':>11}"
              f"{len(s['_delivered']):>10}  {s['lost_groups'] or 'none'}  {'yes' if s['params_identical'] else 'NO'}")
    print(f"failures by kind: {out['by_kind']}; cost per failure {out['cost_per_failure_s']} s; survivor's "
          f"longest sync by kind {out['survivor_stall_by_kind_s']}; processes left behind {out['left_behind']}")
    print(json.dumps(out))
    ok = storm["succeeded"] and storm["params_identical"] and not storm["lost_groups"] and not out["left_behind"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
