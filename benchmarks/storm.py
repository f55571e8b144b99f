"""Storm benchmark: what a failure costs, the same run with and without 100 failures, side by side.

    python benchmarks/storm.py                 # configs/storm.yaml: about 10 minutes on 2 CPU cores
    python benchmarks/storm.py --failures 20   # a shorter storm

Runs the config twice with the real ``torchx run`` on a generated CIFAR-format
fixture, one after the other on this machine: calm (``faults.enabled: false``)
and storm (its failure plan). Prints a table and, as its last line, JSON with
``failures`` (injected), ``by_kind``, ``cost_per_failure_s`` (``overall``:
(storm wall time - calm wall time) / failures; and by kind: the mean, over that
kind's failures, of the longest sync stall any group had between the failure
and the first full commit after it), ``max_stall_s`` (the longest sync of any
group in the storm), ``lost_groups``, ``params_identical``, ``accuracy_delta``
(storm - calm) and the two wall times.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Dict

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import free_port_pair, torchx_run  # noqa: E402
from localsgd_ft.storage.fixture import write_fixture  # noqa: E402


def _stall_cost(summary: dict) -> Dict[str, float]:
    """Mean per kind of the longest sync stall of the groups that kept training, after each failure.

    For a lighthouse failure every group counts; for the other kinds, the groups not hit.
    In a storm a window can hold the next failure too: this is an upper bound.
    """
    by_kind = defaultdict(list)
    for r in summary["recoveries"]:
        by_kind[r["kind"]].append(r["survivor_stall_s"] or 0.0)
    return {k: round(statistics.mean(v), 2) for k, v in sorted(by_kind.items())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs/storm.yaml"))
    parser.add_argument("--failures", type=int, default=0, help="at most this many failures (0: the config's)")
    parser.add_argument("--keep", metavar="DIR", help="leave both runs' output directories here")
    args = parser.parse_args()
    base = yaml.safe_load(Path(args.config).read_text())
    if args.failures:
        base["faults"]["max_random"] = args.failures
    with tempfile.TemporaryDirectory(prefix="storm-") as tmp_dir:
        tmp = Path(args.keep) if args.keep else Path(tmp_dir)
        tmp.mkdir(parents=True, exist_ok=True)
        write_fixture(tmp / "data")
        results = {}
        for name in ("calm", "storm"):
            cfg = json.loads(json.dumps(base))
            cfg.update(name=f"storm-{name}", output_dir=str(tmp / name))
            cfg["data"]["root"] = str(tmp / "data")
            cfg["lighthouse"]["port"] = free_port_pair()
            cfg["faults"]["enabled"] = name == "storm"
            print(f"storm benchmark: {name} run ...", file=sys.stderr, flush=True)
            results[name] = torchx_run(tmp, name, cfg, timeout_s=3600)
    calm, storm = results["calm"], results["storm"]
    failures = storm["faults"]["injected"]
    out = {
        "failures": failures,
        "by_kind": storm["faults"]["by_kind"],
        "cost_per_failure_s": {"overall": round((storm["wall_time_s"] - calm["wall_time_s"]) / max(failures, 1), 2),
                               **_stall_cost(storm)},
        # Every incarnation's stalls (a group's own max_sync_s covers its last incarnation only).
        "max_stall_s": max([e["duration_s"] for e in storm["events"] if e["kind"] == "sync_stall"], default=0.0),
        "lost_groups": storm["lost_groups"],
        "params_identical": storm["params_identical"],
        "accuracy_delta": round(storm["final_test_accuracy"] - calm["final_test_accuracy"], 4),
        "calm_wall_s": calm["wall_time_s"],
        "storm_wall_s": storm["wall_time_s"],
        "succeeded": storm["succeeded"],
    }
    print(f"{'':<8}{'wall s':>9}{'accuracy':>10}{'failures':>10}")
    for name, s in results.items():
        print(f"{name:<8}{s['wall_time_s']:>9.1f}{s['final_test_accuracy']:>10.4f}{s['faults']['injected']:>10}")
    print(f"cost per failure: {out['cost_per_failure_s']}  max stall: {out['max_stall_s']} s")
    print(json.dumps(out))
    return 0 if storm["succeeded"] else 1


if __name__ == "__main__":
    sys.exit(main())
