"""Slow links: what each sync algorithm keeps of its training rate where bandwidth is scarce.

    python benchmarks/links.py                       # as root: about 30 minutes on 2 cores
    python benchmarks/links.py --costs 10 --algorithms localsgd-100,streaming
    python benchmarks/links.py --faults              # and one run per algorithm through a partition and a reboot

The lighthouse role and 2 replica groups each run on a host of the test bed (tests/hosts.py: network
namespaces on one bridge; tests/bed_run.py starts the roles the component plans), so every byte between
the groups crosses the bridge, each replica host's link shaped with tc ``tbf`` (both ways). The rates are
scaled to the model, the way the DiLoCo papers scale the model to the link: a first run on the unlimited
link measures the compute step ``T``; one full-model sync is ``B`` bytes; for each ``--costs`` k (default
1, 10, 100) the link's rate is the one at which moving ``B`` takes k compute steps (``B * 8 / (k * T)``).
The algorithms:

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

Per algorithm, one run on the unlimited link measures the steps it needs to ``--accuracy`` on the fixture,
then per rate one *paired* run measures its utilisation: within the run the link alternates unlimited,
limited, unlimited, limited, unlimited, each phase 3 progress intervals long (the switch made in place,
``tc qdisc change``, when group 0 reaches the phase's first step). This 2-core machine drifts by 10-35 %
between runs, more than some of the effects measured; phases of one run share its processes, caches and
neighbours. Per rate it prints:

- ``of cmp``: samples/s (a paired run's: its limited phases') over the compute rate (the first run's step);
- ``util``: the median samples/s of the limited phases' progress intervals over the unlimited phases' (an
  interval a switch fell in is left out), and ``drift``, how far the unlimited phases differ among
  themselves (the noise in that ratio);
- ``eq util``: the same at equal compute: per step, the compute time ``c`` (the median interval's time
  outside syncs, all phases) plus the unlimited phases' median sync time, over ``c`` plus the limited
  phases': what the link alone costs, free of the compute's drift;
- ``busy``: the share of the limited phases' time outside syncs; MB each group handed to allreduce and its
  host sent on the wire (per 100 steps); per sync in the limited phases, its milliseconds and of them the
  quorum's and the commit's;
- the time to ``--accuracy`` at the limited phases' rate (no algorithm's arithmetic depends on the link:
  the runs of one algorithm of equal length end with the same hash), and the verdict.

A run whose every step would wait for a slow link logs at shorter intervals (``--budget-s``), never less
than a sync apart. The last line is a JSON object with the same; ``--out`` gets a plot (links.png).

With ``--faults``, each algorithm also trains about a minute and a half at the middle rate while group 1's
link is cut for 5 s (a quarter into the run) and, half into it, its host goes dark and reboots, its role
started again as a cluster reschedules a lost task (benchmarks/silent_storm.py's failures): the run must
SUCCEED with no group lost and identical weights, the rate limit still in place after the reboot.
"""

from __future__ import annotations

import argparse
import json
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
PHASES = 5  # unlimited, limited, unlimited, limited, unlimited
PHASE_INTERVALS = 3  # progress intervals per phase
UNLIMITED_MBIT = 10000.0  # an unlimited phase: a tbf far faster than the bridge, changed in place to the limit
SETTLE_S = 0.1  # an interval that began this soon after a switch is left out with the one the switch fell in
MIN_LOG_EVERY = 10  # a paired run's shortest progress interval, in steps


def _burst_kb(mbit: float) -> int:
    # 2 ms at the rate (4 kB at least), so that even the smallest sync is paced by the rate, not let through at once.
    return max(4, int(mbit / 4))


def config(base: Dict[str, Any], out: Path, data: Path, name: str, settings: Dict[str, Any], steps: int,
           log_every: int, evaluate: bool) -> Dict[str, Any]:
    cfg = run_config(base, name, out, data)
    cfg["localsgd"].update(settings)
    # A slow link makes a sync long: the collective's own deadline must not end it.
    cfg["localsgd"]["timeout_s"] = 120
    cfg["train"].update(max_steps=steps, eval_every=EVAL_EVERY if evaluate else 0, log_every=log_every)
    cfg["checkpoint"]["enabled"] = False
    return cfg


def _tx_bytes(bed: hosts.TestBed, host: int) -> int:
    """Bytes host ``host`` has sent: what its bridge port received."""
    return int(Path(f"/sys/class/net/{bed.port_link(host)}/statistics/rx_bytes").read_text())


def _intervals(metrics: Path, group_batch: int) -> List[Dict[str, Any]]:
    """A group's progress lines as intervals: wall time ``t0``..``t1``, steps, busy seconds (evaluations
    excluded), syncs, seconds in syncs and, of those, waiting for the quorum and agreeing to commit;
    ``startup``: the first interval of a process (it holds the process's start)."""
    out: List[Dict[str, Any]] = []
    last = syncs = 0
    t0: Optional[float] = None
    for line in metrics.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("kind") == "start":  # a process's counters begin again
            last, syncs, t0 = 0, 0, None
        elif rec.get("kind") == "train" and rec.get("samples_per_s"):
            n = rec["local_step"] - last
            out.append({"t0": t0, "t1": rec["t"], "steps": n, "busy_s": n * group_batch / rec["samples_per_s"],
                        "syncs": (rec.get("syncs_attempted") or 0) - syncs, "startup": t0 is None,
                        **{k: rec.get(k, 0) for k in ("sync_s", "quorum_s", "commit_s")}})
            last, syncs, t0 = rec["local_step"], rec.get("syncs_attempted") or 0, rec["t"]
    return out


def _rate(intervals: List[Dict[str, Any]], group_batch: int) -> Optional[float]:
    """Samples/s of the typical interval: the median, start-ups left out where others remain."""
    steady = [i for i in intervals if not i["startup"]] or intervals
    rates = [i["steps"] * group_batch / i["busy_s"] for i in steady]
    return statistics.median(rates) if rates else None


def _phase_of(interval: Dict[str, Any], switches: List[Dict[str, float]]) -> Optional[int]:
    """The phase an interval lies wholly in, or None: a switch fell in it, it began just after one, or it
    holds a process's start."""
    if interval["startup"]:
        return None
    for s in switches:
        if interval["t0"] < s["ended"] + SETTLE_S and interval["t1"] > s["began"]:
            return None
    return sum(1 for s in switches if s["ended"] <= interval["t0"])


class Progress:
    """A group's newest training step, from its metrics file (a restarted incarnation appends to it), reading
    only what the file gained since the last look: polled every 20 ms while the groups train."""

    def __init__(self, metrics: Path) -> None:
        self.metrics, self.offset, self.rest, self.step = metrics, 0, "", 0

    def newest(self) -> int:
        try:
            with open(self.metrics) as f:
                f.seek(self.offset)
                chunk = self.rest + f.read()
                self.offset = f.tell()
        except FileNotFoundError:
            return self.step
        *lines, self.rest = chunk.split("\n")
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("kind") == "train":
                self.step = rec["step"]
        return self.step

    def wait_for(self, run: BedRun, step: int, deadline: float) -> bool:
        """Until the group's newest progress line is at ``step`` or beyond; False if the run ended first."""
        while self.newest() < step:
            if run.procs["lighthouse"].poll() is not None or time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True


def alternate(run: BedRun, bed: hosts.TestBed, metrics: Path, log_every: int, mbit: float) -> List[Dict[str, float]]:
    """Switch both replica hosts' links between unlimited and ``mbit`` as group 0 reaches each phase's first
    step; the switches made, each with its wall time (``began``, ``ended``)."""
    switches: List[Dict[str, float]] = []
    progress, deadline = Progress(metrics), time.monotonic() + RUN_DEADLINE_S
    for phase in range(1, PHASES):
        if not progress.wait_for(run, phase * PHASE_INTERVALS * log_every, deadline):
            break
        rate = mbit if phase % 2 else UNLIMITED_MBIT
        began = time.time()
        for host in range(1, GROUPS + 1):
            bed.reshape(host, rate, _burst_kb(rate))
        switches.append({"began": began, "ended": time.time()})
    return switches


def strike(run: BedRun, metrics: Path, steps: int) -> List[str]:
    """A quarter into the run group 1's link is cut for 5 s; half into it, its host goes dark and reboots (its
    role started again, as a cluster reschedules a lost task). What was delivered before the run ended."""
    storm = Storm(run, GROUPS, seed=0)
    progress, deadline = Progress(metrics), time.monotonic() + RUN_DEADLINE_S
    for kind, at in (("partition", steps // 4), ("host_down", steps // 2)):
        if progress.wait_for(run, at, deadline):
            storm.deliver(kind, 1)
    return [d["kind"] for d in storm.delivered]


def _sync_split(intervals: List[Dict[str, Any]]) -> Dict[str, float]:
    """The share of the intervals' time outside syncs, and per sync its milliseconds and of them the quorum's
    and the commit's."""
    syncs = sum(i["syncs"] for i in intervals) or 1
    return {"compute_share": round(1 - sum(i["sync_s"] for i in intervals) / sum(i["busy_s"] for i in intervals), 3),
            **{f"{k[:-2]}_ms": round(sum(i[k] for i in intervals) / syncs * 1000, 1)
               for k in ("sync_s", "quorum_s", "commit_s")}}


UNPAIRED = {"utilisation": None, "eq_utilisation": None, "drift": None}  # what only a paired run measures


def _phases(intervals: List[Dict[str, Any]], switches: List[Dict[str, float]], group_batch: int) -> Dict[str, Any]:
    """A paired run's measures from its intervals (both groups') and the switches made."""
    by: Dict[int, List[Dict[str, Any]]] = {}
    for i in intervals:
        phase = _phase_of(i, switches)
        if phase is not None:
            by.setdefault(phase, []).append(i)
    unlimited = [i for p, xs in by.items() if p % 2 == 0 for i in xs]
    limited = [i for p, xs in by.items() if p % 2 for i in xs]
    if len(switches) < PHASES - 1 or not unlimited or not limited:
        return {"samples_per_s": _rate(intervals, group_batch), **UNPAIRED,
                **dict.fromkeys(("compute_share", "sync_ms", "quorum_ms", "commit_ms"))}
    rate_u, rate_l = _rate(unlimited, group_batch), _rate(limited, group_batch)
    phase_rates = [_rate(xs, group_batch) for p, xs in sorted(by.items()) if p % 2 == 0]
    drift = max(phase_rates) / min(phase_rates) - 1
    per_step = lambda xs, f: statistics.median(f(i) / i["steps"] for i in xs)  # noqa: E731
    compute = per_step(unlimited + limited, lambda i: i["busy_s"] - i["sync_s"])
    sync_u, sync_l = per_step(unlimited, lambda i: i["sync_s"]), per_step(limited, lambda i: i["sync_s"])
    return {"samples_per_s": rate_l, "utilisation": round(rate_l / rate_u, 3),
            "eq_utilisation": round((compute + sync_u) / (compute + sync_l), 3), "drift": round(drift, 3),
            **_sync_split(limited)}


def one_run(bed: hosts.TestBed, tmp: Path, base: Dict[str, Any], name: str, settings: Dict[str, Any],
            steps: int, log_every: int, mbit: Optional[float], evaluate: bool, paired: bool = False,
            faults: bool = False) -> Dict[str, Any]:
    """One run on the bed: on the unlimited link (``mbit`` None), at ``mbit`` throughout (``faults``), or
    alternating between the two (``paired``)."""
    out = tmp / name
    path = tmp / f"{name}.yaml"
    cfg = config(base, out, tmp / "data", name, settings, steps, log_every, evaluate)
    if faults:  # as the silent storm's: longer than a reboot and a role's start, so the group is not lost
        cfg["lighthouse"]["role_timeout_s"] = 30
        cfg["checkpoint"]["enabled"] = True
    path.write_text(yaml.safe_dump(cfg))
    start_rate = UNLIMITED_MBIT if paired else mbit
    for host in range(1, GROUPS + 1):
        bed.limit(host, start_rate, burst_kb=_burst_kb(start_rate or 0))
    sent = [_tx_bytes(bed, h) for h in range(1, GROUPS + 1)]
    run = BedRun(bed, path, REPO)
    delivered: List[str] = []
    switches: List[Dict[str, float]] = []
    try:
        if faults:
            delivered = strike(run, out / "metrics" / "group_1.jsonl", steps)
            limited = [h for h in range(1, GROUPS + 1) if mbit is None or "tbf" in bed.qdisc(h)]
            assert len(limited) == GROUPS, "a host's rate limit did not survive its reboot"
        if paired:
            assert mbit is not None
            switches = alternate(run, bed, out / "metrics" / "group_0.jsonl", log_every, mbit)
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
    measured = (_phases(intervals, switches, group_batch) if paired else
                {"samples_per_s": _rate(intervals, group_batch), **UNPAIRED, **_sync_split(intervals)})
    sync_bytes = max(g.get("sync_bytes", 0) for g in groups.values())
    return {
        "left_behind": len(left), "succeeded": summary["succeeded"], "faults": delivered,
        "lost_groups": summary.get("lost_groups") or [], "switches": len(switches),
        "identical": summary["params_identical"], "hash": groups["0"].get("params_sha256"),
        "steps": steps, "log_every": log_every, **measured,
        "sync_bytes": sync_bytes, "wire_bytes": max(wire),
        "sync_mb_per_100": round(sync_bytes / 2**20 * 100 / steps, 3),
        "wire_mb_per_100": round(max(wire) / 2**20 * 100 / steps, 3),
        "max_sync_s": max(g.get("max_sync_s") or 0.0 for g in groups.values()),
        "accuracy": summary.get("final_test_accuracy"), "evals": groups["0"].get("evals") or [],
        "group_batch": group_batch, "wall_s": summary.get("wall_time_s"),
    }


def full_sync_bytes(base: Dict[str, Any]) -> int:
    """What one full-model sync hands to allreduce: every parameter in float32."""
    from localsgd_ft.config import ExperimentConfig
    from localsgd_ft.training.model import build_model

    model = build_model(ExperimentConfig.model_validate(base).model)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def steps_to(evals: List[Dict[str, float]], accuracy: float) -> Optional[int]:
    return next((int(e["step"]) for e in evals if e["test_accuracy"] >= accuracy), None)


def paired_log_every(every: int, cost: float, step_s: float, budget_s: float) -> int:
    """Steps per progress interval of a paired run: a whole number of syncs (100 steps for the algorithms that
    sync every 100), fewer where the limited phases would wait longer than ``budget_s`` for the link."""
    limited_steps_per_log = (PHASES // 2) * PHASE_INTERVALS
    fits = int(budget_s / (limited_steps_per_log * step_s * (1 + cost / every)))
    return max(every, MIN_LOG_EVERY, min(100, fits // every * every))


def late_accuracy(evals: List[Dict[str, float]]) -> Optional[float]:
    """The mean test accuracy of the last quarter of a run's evaluations: on the benchmark's hard fixture even
    float32 training swings between evaluations (0.97 to 0.27 and back), so one final figure is mostly chance."""
    if not evals:
        return None
    late = [e["test_accuracy"] for e in evals[-max(1, len(evals) // 4):]]
    return round(statistics.mean(late), 3)


def _precision_rows(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Each reduced-precision run beside its float32 algorithm's run of the same kind for as many steps:
    the bytes each handed to allreduce and sent on the wire, and the test accuracy (final, and where the runs
    evaluated, late: the last quarter's mean)."""
    out = []
    for r in rows:
        against = FULL_PRECISION.get(r["algorithm"])
        full = next((f for f in rows if f["algorithm"] == against and (f["mbit"], f["steps"], f["label"]) ==
                     (r["mbit"], r["steps"], r["label"])), None)
        if full is None or r["accuracy"] is None or full["accuracy"] is None:
            continue
        out.append({"algorithm": r["algorithm"], "against": against, "mbit": r["mbit"], "steps": r["steps"],
                    "label": r["label"],
                    # From the exact byte counts (same steps): the rounded MB columns would skew the ratio.
                    "bytes_ratio": round(r["sync_bytes"] / full["sync_bytes"], 3),
                    "wire_ratio": round(r["wire_bytes"] / full["wire_bytes"], 3),
                    "accuracy": r["accuracy"], "reference_accuracy": full["accuracy"],
                    "accuracy_delta": round(r["accuracy"] - full["accuracy"], 3),
                    "late_accuracy": late_accuracy(r["evals"]), "reference_late_accuracy": late_accuracy(full["evals"])})
    return out


def _plot(eq_util: Dict[str, Dict[str, Optional[float]]], mb: Dict[str, float], path: Path) -> None:
    """Utilisation at equal compute by algorithm and rate (``eq_util[algorithm][cost]``), and the MB each group
    hands to allreduce per 100 steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    names, costs = list(eq_util), list(next(iter(eq_util.values())))
    width = 0.8 / len(costs)
    for k, cost in enumerate(costs):
        left.bar([x + (k - (len(costs) - 1) / 2) * width for x in range(len(names))],
                 [eq_util[n][cost] or 0 for n in names], width,
                 label=f"a sync = {cost} compute step{'' if cost == '1' else 's'}")
    left.axhline(0.9, color="grey", linestyle="--", linewidth=0.8)
    left.axhline(0.95, color="grey", linestyle=":", linewidth=0.8)
    left.set_xticks(range(len(names)), names, rotation=25, ha="right")
    left.set_ylabel("utilisation at equal compute")
    left.set_ylim(0, 1.15)
    left.legend(loc="upper left", fontsize=8)
    left.set_title("rate on the slow link / rate on the unlimited link (one run)")
    right.bar(range(len(names)), [mb[n] for n in names], color="tab:grey")
    right.set_yscale("log")
    right.set_xticks(range(len(names)), names, rotation=25, ha="right")
    right.set_ylabel("MB per group per 100 steps")
    right.set_title("bytes handed to allreduce")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400,
                        help="local steps of each unlimited run (a multiple of 100): the time to accuracy")
    parser.add_argument("--costs", default=",".join(map(str, COSTS)),
                        help="link rates, as compute steps that one full-model sync takes on them")
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS), help=f"some of {', '.join(ALGORITHMS)}")
    parser.add_argument("--accuracy", type=float, default=0.9, help="the test accuracy timed on the fixture")
    parser.add_argument("--budget-s", type=float, default=60.0,
                        help="log at shorter intervals where a paired run's limited phases would take longer")
    parser.add_argument("--faults", action="store_true",
                        help="also, per algorithm, a run of about a minute and a half at the middle rate in which "
                             "group 1's link is cut for 5 s, and later its host goes dark and reboots")
    parser.add_argument("--keep", metavar="DIR", help="leave every run's output directory here")
    parser.add_argument("--out", default="outputs/links", help="where the plot goes (links.png)")
    args = parser.parse_args()
    names = args.algorithms.split(",")
    unknown = [n for n in names if n not in ALGORITHMS]
    if unknown or args.steps % 100 or args.steps <= 0:
        parser.error(f"unknown algorithm(s) {unknown}" if unknown else "--steps: a positive multiple of 100")
    try:
        costs = [float(c) for c in args.costs.split(",")]
    except ValueError:
        parser.error(f"--costs: numbers of compute steps, comma-separated, not {args.costs!r}")
    if any(c <= 0 for c in costs):
        parser.error("--costs: each a positive number of compute steps")
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
            def run(name: str, cost: float, mbit: Optional[float], steps: int, log_every: int, label: str,
                    **kind: bool) -> Dict[str, Any]:
                link = "unlimited" if mbit is None else f"{mbit} Mbit/s (a sync = {cost:g} steps)"
                how = ", alternating with unlimited" if kind.get("paired") else ""
                how += ", group 1's link cut, then its host down and rebooted" if kind.get("faults") else ""
                print(f"links benchmark: {name}, {link}{how}, {steps} steps ...", file=sys.stderr, flush=True)
                r = one_run(bed, tmp, base, f"{name}-{label}", ALGORITHMS[name], steps, log_every, mbit,
                            evaluate=mbit is None, **kind)
                return {"algorithm": name, "cost": cost, "mbit": mbit, "label": label, **r}

            def unlimited(name: str) -> Dict[str, Any]:
                return run(name, 0, None, args.steps, max(ALGORITHMS[name]["sync_every"], 100), "unlimited")

            # The compute step, from the run that syncs least; the rates follow from it.
            first = unlimited("localsgd-100")
            step_s = first["group_batch"] / first["samples_per_s"]
            model_bytes = full_sync_bytes(base)
            rates = {cost: round(model_bytes * 8 * WIRE_OVERHEAD / (cost * step_s) / 1e6, 3) for cost in costs}
            print(f"links benchmark: compute step {step_s * 1000:.1f} ms, one full-model sync "
                  f"{model_bytes / 1e3:.1f} kB: rates {rates} Mbit/s", file=sys.stderr, flush=True)

            for name in names:
                every = ALGORITHMS[name]["sync_every"]
                ref = first if name == "localsgd-100" else unlimited(name)
                out = [ref]
                for cost, mbit in rates.items():
                    log_every = paired_log_every(every, cost, step_s, args.budget_s)
                    out.append(run(name, cost, mbit, PHASES * PHASE_INTERVALS * log_every, log_every, f"{cost:g}",
                                   paired=True))
                if args.faults:
                    cost = sorted(rates)[len(rates) // 2]
                    steps = max(args.steps, int(FAULT_RUN_S / (step_s * (1 + cost / every))) // 100 * 100)
                    out.append(run(name, cost, rates[cost], steps, 100, "faults", faults=True))
                need = steps_to(ref["evals"], args.accuracy)
                for r in out:
                    twins = [o for o in out if o is not r and o["steps"] == r["steps"] and not o["faults"]]
                    r.update(steps_to_accuracy=need, of_compute=round(r["samples_per_s"] * step_s / r["group_batch"], 3),
                             time_to_accuracy_s=round(need * r["group_batch"] / r["samples_per_s"], 1) if need else None,
                             # No algorithm's arithmetic depends on the link; a recovery changes it.
                             same_as_other_links=all(o["hash"] == r["hash"] for o in twins) or bool(r["faults"]))
                rows.extend(out)
    print(f"\nstep {step_s * 1000:.1f} ms, full-model sync {model_bytes / 1e3:.1f} kB; time to test accuracy "
          f"{args.accuracy}; {time.monotonic() - started:.0f} s in all")
    print(f"{'algorithm':<19}{'link':>14}{'steps':>6}{'samples/s':>10}{'of cmp':>7}{'util':>6}{'drift':>6}{'eq util':>8}"
          f"{'busy':>6}{'sync MB':>8}{'wire MB':>8}{'sync ms':>8}{'quorum':>7}{'commit':>7}{'to acc s':>9}  verdict")
    fmt = lambda v, f: format(v, f) if v is not None else "-"  # noqa: E731
    for r in rows:
        link = "unlimited" if r["mbit"] is None else f"{r['mbit']:g} Mbit/s"
        verdict = ("SUCCEEDED" if r["succeeded"] else "FAILED") + (
            f" through {' + '.join(r['faults'])}" if r["faults"] else "") + (
            f", LOST {r['lost_groups']}" if r["lost_groups"] else "") + (
            ", identical" if r["identical"] else ", DIFFERENT") + (
            "" if r["same_as_other_links"] else ", NOT AS ON THE OTHER LINKS") + (
            f", {r['switches']} OF {PHASES - 1} SWITCHES" if r["label"] not in ("unlimited", "faults")
            and r["switches"] != PHASES - 1 else "")
        print(f"{r['algorithm']:<19}{link:>14}{r['steps']:>6}{fmt(r['samples_per_s'], '.0f'):>10}"
              f"{r['of_compute']:>7.2f}{fmt(r['utilisation'], '.2f'):>6}{fmt(r['drift'], '.2f'):>6}{fmt(r['eq_utilisation'], '.2f'):>8}"
              f"{fmt(r['compute_share'], '.2f'):>6}{r['sync_mb_per_100']:>8.2f}{r['wire_mb_per_100']:>8.2f}"
              f"{fmt(r['sync_ms'], '.0f'):>8}{fmt(r['quorum_ms'], '.0f'):>7}{fmt(r['commit_ms'], '.0f'):>7}"
              f"{fmt(r['time_to_accuracy_s'], '.1f'):>9}  {verdict}")
    print("of cmp: samples/s (a paired run's: its limited phases') over the compute rate, one step per "
          f"{step_s * 1000:.1f} ms; util: the limited phases' samples/s over the unlimited phases' of the same run (drift: how far the "
          "unlimited phases differ among themselves); eq util: the same at equal compute per step (what the link "
          "alone costs); busy: the limited phases' share of time outside syncs; MB per group per 100 steps: handed "
          "to allreduce, and sent by its host on the wire; ms per sync (limited phases): the whole sync, and of it "
          "waiting for the quorum and agreeing to commit; to acc s: the steps to accuracy at the run's rate")
    row = {(r["algorithm"], r["label"]): r for r in rows}
    util, eq_util = ({n: {f"{c:g}": row[n, f"{c:g}"][key] for c in costs} for n in names}
                     for key in ("utilisation", "eq_utilisation"))
    precision = _precision_rows(rows)
    for p in precision:
        link = "unlimited" if p["mbit"] is None else f"{p['mbit']:g} Mbit/s"
        print(f"{p['algorithm']} against {p['against']} ({link}, {p['steps']} steps): {p['bytes_ratio']:.3f} of the "
              f"bytes handed to allreduce, {p['wire_ratio']:.3f} of those on the wire; final test accuracy "
              f"{p['accuracy']:.3f} against {p['reference_accuracy']:.3f} ({p['accuracy_delta']:+.3f})" + (
                  f", mean of the last quarter of evaluations {p['late_accuracy']:.3f} against "
                  f"{p['reference_late_accuracy']:.3f} ({p['late_accuracy'] - p['reference_late_accuracy']:+.3f})"
                  if p["late_accuracy"] is not None and p["reference_late_accuracy"] is not None else ""))
    plot = Path(args.out) / "links.png"
    try:
        _plot(eq_util, {n: row[n, "unlimited"]["sync_mb_per_100"] for n in names}, plot)
        print(f"plot: {plot}")
    except Exception as e:  # the numbers above stand without it
        print(f"links benchmark: no plot ({type(e).__name__}: {e})", file=sys.stderr)
    keep = ("algorithm", "cost", "mbit", "label", "steps", "log_every", "samples_per_s", "of_compute", "utilisation", "drift",
            "eq_utilisation", "compute_share", "sync_mb_per_100", "wire_mb_per_100", "sync_ms", "quorum_ms",
            "commit_ms", "max_sync_s", "time_to_accuracy_s", "accuracy", "wall_s", "succeeded", "identical",
            "same_as_other_links", "left_behind", "faults", "lost_groups", "switches")
    print(json.dumps({"step_ms": round(step_s * 1000, 2), "sync_kb": round(model_bytes / 1e3, 1),
                      "rates_mbit": {f"{c:g}": m for c, m in rates.items()},
                      "utilisation": util, "utilisation_at_equal_compute": eq_util,
                      "rows": [{k: r.get(k) for k in keep} for r in rows], "precision": precision}))
    ok = all(r["succeeded"] and r["identical"] and r["same_as_other_links"] and not r["left_behind"]
             and not r["lost_groups"] and (r["label"] in ("unlimited", "faults") or r["switches"] == PHASES - 1)
             for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
