"""Slow links: what each sync algorithm keeps of its training rate where bandwidth is scarce.

    python benchmarks/links.py                       # as root: about 28 minutes on 2 cores
    python benchmarks/links.py --costs 10 --algorithms localsgd-100,streaming
    python benchmarks/links.py --costs 10 --faults   # and one run per algorithm through a partition and a reboot

The lighthouse role and 2 replica groups each run on a host of the test bed (tests/hosts.py: network
namespaces on one bridge; tests/bed_run.py starts the roles the component plans), so every byte between
the groups crosses the bridge. Each replica host's link is rate-limited with tc ``tbf`` (both ways) to a
rate scaled to the model, the way the DiLoCo papers scale the model to the link: first every algorithm
runs on the unlimited link, which measures the compute step ``T`` and the bytes of one full-model sync
``B``; then, for each ``--costs`` k (default 1, 10, 100), the link gets the rate at which moving ``B``
takes k compute steps (``B * 8 / (k * T)``), and every algorithm runs again on it:

- ``localsgd-1``: parameter averaging every step, the communication pattern of data-parallel training;
- ``localsgd-10``, ``localsgd-100``: LocalSGD;
- ``diloco-100``: DiLoCo with the shipped outer optimizer;
- ``diloco-100-overlap``: DiLoCo whose whole-model allreduce overlaps ``fragment_sync_delay`` 20 steps of
  training (Streaming DiLoCo's overlap with one fragment: the outer step lands 20 steps late);
- ``streaming``: Streaming DiLoCo, ``sync_every`` 100 in 2 fragments (a fragment every 50 steps), each
  fragment's allreduce overlapping ``fragment_sync_delay`` 20 steps of training: room for a transfer of
  up to 20 compute steps;
- ``diloco-100-bf16``, ``diloco-100-int8``: DiLoCo sending its pseudo-gradients as bfloat16 or int8
  (``localsgd.sync_precision``); after the table, their bytes and final accuracy beside ``diloco-100``'s.

A run whose every step would wait for a slow link trains fewer steps (``--budget-s``), enough to measure
its rate; since no algorithm's arithmetic depends on the link (the groups' hashes say so), its time to
accuracy is the steps the algorithm needs (from its unlimited run) at the rate it reached. Per run it
prints samples/s per group (evaluations excluded) and that rate's ratio to the same algorithm's on the
unlimited link (the compute utilisation), MB each group handed to allreduce and MB its host sent on the
wire (both per 100 steps), the longest sync, the time to ``--accuracy`` on the fixture, and whether the
groups ended bit-identical; its last line is a JSON object with the same.

With ``--faults``, each algorithm also trains about a minute and a half at the middle rate while group 1's
link is cut for 5 s (a quarter into the run) and, half into it, its host goes dark and reboots, its role
started again as a cluster reschedules a lost task (benchmarks/silent_storm.py's failures): the run must
SUCCEED with no group lost and identical weights, the rate limit still in place after the reboot.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the test bed and the roles started on it

import hosts  # noqa: E402
from bed_run import BedRun  # noqa: E402

from benchmarks.common import run_config  # noqa: E402
from benchmarks.silent_storm import Storm  # noqa: E402
from localsgd_ft.storage.fixture import write_fixture  # noqa: E402

ALGORITHMS: Dict[str, Dict[str, Any]] = {
    "localsgd-1": {"algorithm": "localsgd", "sync_every": 1},
    "localsgd-10": {"algorithm": "localsgd", "sync_every": 10},
    "localsgd-100": {"algorithm": "localsgd", "sync_every": 100},
    "diloco-100": {"algorithm": "diloco", "sync_every": 100},
    "diloco-100-overlap": {"algorithm": "diloco", "sync_every": 100, "fragment_sync_delay": 20},
    "streaming": {"algorithm": "diloco", "sync_every": 100, "fragments": 2, "fragment_sync_delay": 20},
    "diloco-100-bf16": {"algorithm": "diloco", "sync_every": 100, "sync_precision": "bfloat16"},
    "diloco-100-int8": {"algorithm": "diloco", "sync_every": 100, "sync_precision": "int8"},
}
# Reduced-precision variants, each judged against the float32 algorithm it rounds.
FULL_PRECISION = {"diloco-100-bf16": "diloco-100", "diloco-100-int8": "diloco-100"}
COSTS = (1, 10, 100)
GROUPS = 2
EVAL_EVERY = 25
NOISE = 200.0  # the fixture's pixel noise: hard enough that accuracy takes a few hundred steps
# TCP/IP headers on 1448-byte segments, and the quorum's and heartbeats' own bytes.
WIRE_OVERHEAD = 1.06
RUN_DEADLINE_S = 1800
FAULT_RUN_S = 90.0  # a run with failures trains about this long: time for a reboot, a restart and a heal


def config(base: Dict[str, Any], out: Path, data: Path, name: str, settings: Dict[str, Any], steps: int,
           evaluate: bool) -> Dict[str, Any]:
    cfg = run_config(base, name, out, data)
    every = settings["sync_every"]
    cfg["localsgd"].update(settings)
    # A slow link makes a sync long: the collective's own deadline must not end it.
    cfg["localsgd"]["timeout_s"] = 120
    # Progress lines (the rate's intervals) a whole number of full syncs apart, unless the run is too short.
    cfg["train"].update(max_steps=steps, eval_every=EVAL_EVERY if evaluate else 0,
                        log_every=100 if steps >= 300 else max(10, every))
    cfg["checkpoint"]["enabled"] = False
    return cfg


def _tx_bytes(bed: hosts.TestBed, host: int) -> int:
    """Bytes host ``host`` has sent: what its bridge port received."""
    return int(Path(f"/sys/class/net/{bed.port_link(host)}/statistics/rx_bytes").read_text())


def _intervals(metrics: Path, group_batch: int) -> List[Dict[str, float]]:
    """A group's progress lines as intervals: steps, busy seconds (evaluations excluded), seconds in syncs
    and, of those, waiting for the quorum and agreeing to commit."""
    out, last = [], 0
    for line in metrics.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("kind") == "train" and rec.get("samples_per_s"):
            n, last = rec["local_step"] - last, rec["local_step"]
            out.append({"steps": n, "busy_s": n * group_batch / rec["samples_per_s"], "sync_s": rec.get("sync_s", 0),
                        "quorum_s": rec.get("quorum_s", 0), "commit_s": rec.get("commit_s", 0)})
    return out


def _rate(intervals: List[Dict[str, float]], group_batch: int) -> Optional[float]:
    """Samples/s of the typical interval: the median, past the first (start-up) where there are three or more."""
    steady = intervals[1:] if len(intervals) >= 3 else intervals
    rates = sorted(i["steps"] * group_batch / i["busy_s"] for i in steady)
    return statistics.median(rates) if rates else None


def _wait_for_step(run: BedRun, group: int, step: int) -> bool:
    """Until group ``group``'s newest progress line is at ``step`` or beyond; False if the run ended first."""
    end = time.monotonic() + RUN_DEADLINE_S
    pattern = re.compile(rf"group {group} step \d+ train_step (\d+)/")
    while time.monotonic() < end and run.procs["lighthouse"].poll() is None:
        if max((int(m) for m in pattern.findall(run.text(f"replica_{group}"))), default=0) >= step:
            return True
        time.sleep(0.2)
    return False


def strike(run: BedRun, steps: int) -> List[str]:
    """A quarter into the run group 1's link is cut for 5 s; half into it, its host goes dark and reboots (its
    role started again, as a cluster reschedules a lost task). What was delivered before the run ended."""
    storm = Storm(run, GROUPS, seed=0)
    for kind, at in (("partition", steps // 4), ("host_down", steps // 2)):
        if _wait_for_step(run, 1, at):
            storm.deliver(kind, 1)
    return [d["kind"] for d in storm.delivered]


def one_run(bed: hosts.TestBed, tmp: Path, base: Dict[str, Any], name: str, settings: Dict[str, Any],
            steps: int, mbit: Optional[float], evaluate: bool, faults: bool = False) -> Dict[str, Any]:
    out = tmp / name
    path = tmp / f"{name}.yaml"
    cfg = config(base, out, tmp / "data", name, settings, steps, evaluate)
    if faults:  # as the silent storm's: longer than a reboot and a role's start, so the group is not lost
        cfg["lighthouse"]["role_timeout_s"] = 30
        cfg["checkpoint"]["enabled"] = True
    path.write_text(yaml.safe_dump(cfg))
    for host in range(1, GROUPS + 1):
        # Burst: 2 ms at the rate (4 kB at least), so that even the smallest sync is paced by the rate, not let
        # through at once.
        bed.limit(host, mbit, burst_kb=max(4, int((mbit or 0) / 4)))
    sent = [_tx_bytes(bed, h) for h in range(1, GROUPS + 1)]
    run = BedRun(bed, path, REPO)
    delivered: List[str] = []
    try:
        if faults:
            delivered = strike(run, steps)
            limited = [h for h in range(1, GROUPS + 1) if mbit is None or "tbf" in bed.qdisc(h)]
            assert len(limited) == GROUPS, "a host's rate limit did not survive its reboot"
        run.wait(RUN_DEADLINE_S)
    finally:
        left = run.kill()
        for host in range(1, GROUPS + 1):
            bed.restore(host)  # no link left cut, whatever happened
            bed.limit(host, None)
    wire = [_tx_bytes(bed, h) - s for h, s in zip(range(1, GROUPS + 1), sent)]
    summary = json.loads((out / "summary.json").read_text())
    groups = summary["replica_groups"]
    group_batch = summary["config"]["data"]["batch_size"] * summary["config"]["replica_groups"]["workers"]
    intervals = [i for g in range(GROUPS) for i in _intervals(out / "metrics" / f"group_{g}.jsonl", group_batch)]
    evals = groups["0"].get("evals") or []
    syncs = max(g.get("syncs_attempted") or 0 for g in groups.values()) or 1
    per_sync = {k: round(sum(i[k] for i in intervals) / GROUPS / syncs * 1000, 1)
                for k in ("sync_s", "quorum_s", "commit_s")}
    return {
        "left_behind": len(left), "succeeded": summary["succeeded"], "faults": delivered,
        "lost_groups": summary.get("lost_groups") or [],
        "identical": summary["params_identical"], "hash": groups["0"].get("params_sha256"),
        "steps": steps, "samples_per_s": _rate(intervals, group_batch),
        "compute_share": round(1 - sum(i["sync_s"] for i in intervals) / sum(i["busy_s"] for i in intervals), 3),
        "sync_ms": per_sync["sync_s"], "quorum_ms": per_sync["quorum_s"], "commit_ms": per_sync["commit_s"],
        "sync_bytes": max(g.get("sync_bytes", 0) for g in groups.values()), "wire_bytes": max(wire),
        "sync_mb_per_100": round(max(g.get("sync_bytes", 0) for g in groups.values()) / 2**20 * 100 / steps, 3),
        "wire_mb_per_100": round(max(wire) / 2**20 * 100 / steps, 3),
        "max_sync_s": max(g.get("max_sync_s") or 0.0 for g in groups.values()),
        "accuracy": summary.get("final_test_accuracy"), "evals": evals, "group_batch": group_batch,
    }


def full_sync_bytes(base: Dict[str, Any]) -> int:
    """What one full-model sync hands to allreduce: every parameter in float32."""
    from localsgd_ft.config import ExperimentConfig
    from localsgd_ft.training.model import build_model

    model = build_model(ExperimentConfig.model_validate(base).model)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def steps_to(evals: List[Dict[str, float]], accuracy: float) -> Optional[int]:
    return next((int(e["step"]) for e in evals if e["test_accuracy"] >= accuracy), None)


def _precision_rows(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Each reduced-precision run beside its float32 algorithm's run on the same link for as many steps:
    the bytes each handed to allreduce and sent on the wire, and the final test accuracy."""
    out = []
    for r in rows:
        against = FULL_PRECISION.get(r["algorithm"])
        full = next((f for f in rows if f["algorithm"] == against and (f["mbit"], f["steps"], f["label"]) ==
                     (r["mbit"], r["steps"], r["label"])), None)
        if full is None or r["accuracy"] is None or full["accuracy"] is None:
            continue
        out.append({"algorithm": r["algorithm"], "against": against, "mbit": r["mbit"], "steps": r["steps"],
                    # From the exact byte counts (same steps): the rounded MB columns would skew the ratio.
                    "bytes_ratio": round(r["sync_bytes"] / full["sync_bytes"], 3),
                    "wire_ratio": round(r["wire_bytes"] / full["wire_bytes"], 3),
                    "accuracy": r["accuracy"], "reference_accuracy": full["accuracy"],
                    "accuracy_delta": round(r["accuracy"] - full["accuracy"], 3)})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="local steps per run (a multiple of 100)")
    parser.add_argument("--costs", default=",".join(map(str, COSTS)),
                        help="link rates, as compute steps that one full-model sync takes on them")
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS), help=f"some of {', '.join(ALGORITHMS)}")
    parser.add_argument("--accuracy", type=float, default=0.9, help="the test accuracy timed on the fixture")
    parser.add_argument("--budget-s", type=float, default=60.0,
                        help="train fewer steps where the whole run would wait longer than this for the link")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of limited runs, each between two unlimited ones; the summary takes medians")
    parser.add_argument("--faults", action="store_true",
                        help="also, per algorithm, a run of about a minute and a half at the middle rate in which "
                             "group 1's link is cut for 5 s, and later its host goes dark and reboots")
    parser.add_argument("--keep", metavar="DIR", help="leave every run's output directory here")
    args = parser.parse_args()
    names = args.algorithms.split(",")
    unknown = [n for n in names if n not in ALGORITHMS]
    if unknown or args.steps % 100 or args.steps <= 0:
        parser.error(f"unknown algorithm(s) {unknown}" if unknown else "--steps: a positive multiple of 100")
    if args.repeat < 1:
        parser.error("--repeat: at least 1")
    costs = [float(c) for c in args.costs.split(",")]
    why_not = hosts.unavailable()
    if why_not:
        print(f"links benchmark: the test bed cannot be built here: {why_not}", file=sys.stderr)
        return 2
    base = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    rows: List[Dict[str, Any]] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="links-") as tmp_dir:
        tmp = Path(args.keep) if args.keep else Path(tmp_dir)
        tmp.mkdir(parents=True, exist_ok=True)
        write_fixture(tmp / "data", noise=NOISE)
        with hosts.TestBed(1 + GROUPS, tag="links") as bed:
            def run(name: str, cost: float, mbit: Optional[float], steps: int, label: str) -> Dict[str, Any]:
                link = "unlimited" if mbit is None else f"{mbit} Mbit/s (a sync = {cost:g} steps)"
                print(f"links benchmark: {name}, {link}, {steps} steps ...", file=sys.stderr, flush=True)
                r = one_run(bed, tmp, base, f"{name}-{label}", ALGORITHMS[name], steps, mbit, evaluate=mbit is None)
                return {"algorithm": name, "cost": cost, "mbit": mbit, "label": label, **r}

            # The compute step, from the run that syncs least; the rates follow from it.
            calibration = run("localsgd-100", 0, None, args.steps, "calibration")
            step_s = calibration["group_batch"] / calibration["samples_per_s"]
            model_bytes = full_sync_bytes(base)
            rates = {cost: round(model_bytes * 8 * WIRE_OVERHEAD / (cost * step_s) / 1e6, 3) for cost in costs}
            print(f"links benchmark: compute step {step_s * 1000:.1f} ms, one full-model sync "
                  f"{model_bytes / 1e3:.1f} kB: rates {rates} Mbit/s", file=sys.stderr, flush=True)
            # Each algorithm's runs side by side, each round of limited runs between two on the unlimited link:
            # a limited run's reference is the mean of the two around it, and their difference shows how much
            # this machine drifted meanwhile. --repeat rounds: the summary takes each rate's median.
            def measure(name: str, first: Optional[Dict[str, Any]]) -> List[Dict[str, Any]]:
                every = ALGORITHMS[name]["sync_every"]
                refs = [dict(first or run(name, 0, None, args.steps, "unlimited"), round=0)]
                out: List[Dict[str, Any]] = [refs[0]]
                for rep in range(args.repeat):
                    for cost, mbit in rates.items():
                        # Shorter where every step would wait so long that the run would exceed the budget.
                        steps = args.steps
                        per_step = step_s * (1 + cost / every)
                        if per_step * steps > args.budget_s:
                            steps = min(args.steps, max(2 * max(every, 10), int(args.budget_s / per_step) // every * every))
                        out.append(dict(run(name, cost, mbit, steps, f"{cost:g}" + (f"-{rep}" if rep else "")),
                                        round=rep))
                    refs.append(dict(run(name, 0, None, args.steps, f"unlimited-{rep + 1}"), round=rep))
                    out.append(refs[-1])
                if args.faults:
                    cost = sorted(rates)[len(rates) // 2]
                    steps = max(args.steps, int(FAULT_RUN_S / (step_s * (1 + cost / every))) // 100 * 100)
                    print(f"links benchmark: {name}, {rates[cost]} Mbit/s, {steps} steps, group 1's link cut, "
                          "then its host down and rebooted ...", file=sys.stderr, flush=True)
                    r = one_run(bed, tmp, base, f"{name}-faults", ALGORITHMS[name], steps, rates[cost], evaluate=False,
                                faults=True)
                    out.append({"algorithm": name, "cost": cost, "mbit": rates[cost], "label": "faults", **r})
                before = refs[0]
                rates_u = [x["samples_per_s"] for x in refs]
                drift = max(abs(a - b) / statistics.mean([a, b]) for a, b in zip(rates_u, rates_u[1:]))
                need = steps_to(before["evals"], args.accuracy)
                for r in out:
                    k = r.get("round", len(refs) - 2)  # the faults run: the last round's reference
                    reference = statistics.mean([refs[k]["samples_per_s"], refs[k + 1]["samples_per_s"]])
                    r.update(reference=reference, drift=round(drift, 3), steps_to_accuracy=need,
                             utilisation=round(r["samples_per_s"] / reference, 3),
                             time_to_accuracy_s=round(need * r["group_batch"] / r["samples_per_s"], 1) if need else None,
                             same_as_unlimited=r["steps"] != before["steps"] or r["hash"] == before["hash"]
                             or bool(r["faults"]))  # a recovery changes the arithmetic
                return out

            for name in names:
                rows.extend(measure(name, calibration if name == "localsgd-100" else None))
    print(f"\nstep {step_s * 1000:.1f} ms, full-model sync {model_bytes / 1e3:.1f} kB; time to test accuracy "
          f"{args.accuracy}; {time.monotonic() - started:.0f} s in all")
    print(f"{'algorithm':<14}{'link':>14}{'steps':>6}{'samples/s':>10}{'util':>7}{'busy':>6}{'sync MB':>9}{'wire MB':>9}"
          f"{'sync ms':>8}{'quorum':>7}{'commit':>7}{'to acc s':>9}  verdict")
    for r in rows:
        link = "unlimited" if r["mbit"] is None else f"{r['mbit']:g} Mbit/s"
        verdict = ("SUCCEEDED" if r["succeeded"] else "FAILED") + (
            f" through {' + '.join(r['faults'])}" if r["faults"] else "") + (
            f", LOST {r['lost_groups']}" if r["lost_groups"] else "") + (
            ", identical" if r["identical"] else ", DIFFERENT") + ("" if r["same_as_unlimited"] else ", NOT AS UNLIMITED")
        fmt = lambda v, f: format(v, f) if v is not None else "-"  # noqa: E731
        print(f"{r['algorithm']:<14}{link:>14}{r['steps']:>6}{fmt(r['samples_per_s'], '.0f'):>10}"
              f"{fmt(r['utilisation'], '.2f'):>7}{r['compute_share']:>6.2f}{r['sync_mb_per_100']:>9.2f}{r['wire_mb_per_100']:>9.2f}"
              f"{r['sync_ms']:>8.0f}{r['quorum_ms']:>7.0f}{r['commit_ms']:>7.0f}"
              f"{fmt(r['time_to_accuracy_s'], '.1f'):>9}  {verdict}")
    print("util: samples/s over the mean of the unlimited runs before and after its round (largest drift between "
          "two of those: " + ", ".join(f"{n} {next(r['drift'] for r in rows if r['algorithm'] == n):.0%}" for n in names)
          + "); busy: the share of the run's own time outside syncs; MB per group per 100 steps: handed to "
          "allreduce, and sent by its host on the wire; ms per sync: the whole sync, and of it waiting for the "
          "quorum and agreeing to commit")
    medians = {n: {f"{c:g}": round(statistics.median(r["utilisation"] for r in rows if r["algorithm"] == n
                                                     and r["mbit"] == m and not r["faults"]), 3)
                   for c, m in rates.items()} for n in names}
    if args.repeat > 1:
        print(f"median utilisation of {args.repeat} rounds, by the compute steps one sync costs: "
              + "; ".join(f"{n} " + ", ".join(f"{c}: {u:.2f}" for c, u in by.items()) for n, by in medians.items()))
    precision = _precision_rows(rows)
    for p in precision:
        link = "unlimited" if p["mbit"] is None else f"{p['mbit']:g} Mbit/s"
        print(f"{p['algorithm']} against {p['against']} ({link}, {p['steps']} steps): {p['bytes_ratio']:.3f} of the "
              f"bytes handed to "
              f"allreduce, {p['wire_ratio']:.3f} of those on the wire; final test accuracy {p['accuracy']:.3f} "
              f"against {p['reference_accuracy']:.3f} ({p['accuracy_delta']:+.3f})")
    keep = ("algorithm", "cost", "mbit", "steps", "samples_per_s", "utilisation", "compute_share", "drift",
            "sync_mb_per_100",
            "wire_mb_per_100", "sync_ms", "quorum_ms", "commit_ms", "max_sync_s", "time_to_accuracy_s", "accuracy", "succeeded", "identical",
            "same_as_unlimited", "left_behind", "faults", "lost_groups")
    print(json.dumps({"step_ms": round(step_s * 1000, 2), "sync_kb": round(model_bytes / 1e3, 1),
                      "median_utilisation": medians,
                      "rows": [{k: r[k] for k in keep} for r in rows], "precision": precision}))
    ok = all(r["succeeded"] and r["identical"] and r["same_as_unlimited"] and not r["left_behind"]
             and not r["lost_groups"] for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
