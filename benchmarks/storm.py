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

    python benchmarks/storm.py --by-kind --failures 20   # one storm per kind beside the calm run

With ``--by-kind`` the storm runs once for each kind of ``faults.random_kinds``,
that kind alone, so the wall time a failure costs is measured per kind
(``wall_per_failure_s``: (that storm's wall time - calm wall time) / its
failures) beside the survivors' stalls (``stall_per_failure_s``). A config
with other timeouts (``--config``) shows what its settings cost, and
``--shipped-timeouts`` what the schema's defaults cost:

    python benchmarks/storm.py --by-kind --shipped-timeouts --failures 8 --steps 1500   # about 8 minutes
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Dict, Optional

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import run_config, torchx_run  # noqa: E402
from localsgd_ft.storage.fixture import write_fixture  # noqa: E402

# What --shipped-timeouts takes out of the config, so that the schema's defaults apply.
SHIPPED = {"localsgd": ("recovery", "timeout_s", "quorum_timeout_s", "quorum_retries"),
           "lighthouse": ("join_timeout_ms", "heartbeat_timeout_ms", "quorum_tick_ms", "role_timeout_s")}


def _stall_cost(summary: dict) -> Dict[str, float]:
    """Mean per kind of the longest sync stall of the groups that kept training, after each failure.

    For a lighthouse failure every group counts; for the other kinds, the groups not hit.
    In a storm a window can hold the next failure too: this is an upper bound.
    """
    by_kind = defaultdict(list)
    for r in summary["recoveries"]:
        by_kind[r["kind"]].append(r["survivor_stall_s"] or 0.0)
    return {k: round(statistics.mean(v), 2) for k, v in sorted(by_kind.items())}


def _run(tmp: Path, base: dict, name: str, faults: bool, kind: Optional[str] = None) -> dict:
    """One run of the config: calm or with its failures (``kind``: of that kind alone)."""
    cfg = run_config(base, f"storm-{name}", tmp / name, tmp / "data")
    cfg["faults"]["enabled"] = faults
    if kind:
        cfg["faults"]["random_kinds"] = [kind]
    print(f"storm benchmark: {name} run ...", file=sys.stderr, flush=True)
    return torchx_run(tmp, name, cfg, timeout_s=3600)


def _by_kind(tmp: Path, base: dict, calm: dict) -> int:
    """One storm per kind: the wall time each kind of failure costs, beside its survivors' stalls."""
    storms = {kind: _run(tmp, base, f"storm-{kind}", True, kind) for kind in base["faults"]["random_kinds"]}
    n = {kind: s["faults"]["injected"] for kind, s in storms.items()}
    out = {
        "wall_per_failure_s": {k: round((s["wall_time_s"] - calm["wall_time_s"]) / max(n[k], 1), 2)
                               for k, s in storms.items()},
        "stall_per_failure_s": {k: _stall_cost(s).get(k, 0.0) for k, s in storms.items()},
        "failures": n,
        **{key: {k: s[key] for k, s in storms.items()} for key in ("lost_groups", "params_identical", "succeeded")},
        "calm_wall_s": calm["wall_time_s"],
    }
    print(f"{'kind':<18}{'failures':>9}{'wall s':>9}{'wall/failure s':>16}{'stall/failure s':>17}  ok")
    print(f"{'calm':<18}{0:>9}{calm['wall_time_s']:>9.1f}")
    for k, s in storms.items():
        ok = s["succeeded"] and s["params_identical"]
        print(f"{k:<18}{n[k]:>9}{s['wall_time_s']:>9.1f}{out['wall_per_failure_s'][k]:>16.2f}"
              f"{out['stall_per_failure_s'][k]:>17.2f}  {'yes' if ok else 'NO'}")
    print(json.dumps(out))
    return 0 if all(out["succeeded"].values()) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs/storm.yaml"))
    parser.add_argument("--failures", type=int, default=0, help="at most this many failures (0: the config's)")
    parser.add_argument("--by-kind", action="store_true",
                        help="one storm per kind of faults.random_kinds: the wall time per failure by kind")
    parser.add_argument("--shipped-timeouts", action="store_true",
                        help="drop the config's timeouts and recovery mode: what a user who tunes nothing pays")
    parser.add_argument("--steps", type=int, default=0, help="train.max_steps (0: the config's)")
    parser.add_argument("--keep", metavar="DIR", help="leave every run's output directory here")
    args = parser.parse_args()
    base = yaml.safe_load(Path(args.config).read_text())
    if args.failures:
        base["faults"]["max_random"] = args.failures
    if args.steps:
        base["train"]["max_steps"] = args.steps
    if args.shipped_timeouts:
        for section, keys in SHIPPED.items():
            for key in keys:
                base.get(section, {}).pop(key, None)
    with tempfile.TemporaryDirectory(prefix="storm-") as tmp_dir:
        tmp = Path(args.keep) if args.keep else Path(tmp_dir)
        tmp.mkdir(parents=True, exist_ok=True)
        write_fixture(tmp / "data")
        calm = _run(tmp, base, "calm", False)
        if args.by_kind:
            return _by_kind(tmp, base, calm)
        storm = _run(tmp, base, "storm", True)
        results = {"calm": calm, "storm": storm}
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
