"""Several replica groups on one GPU, for real: configs/one_gpu.yaml's path through the real ``torchx run``.

    python benchmarks/one_gpu.py          # one CUDA GPU: a few minutes
    python benchmarks/one_gpu.py --cpu    # the same runs on CPU: checks the script where there is no GPU

On the fixture, with the bandwidth benchmark's model (configs/smoke.yaml's cnn, width 16) and DiLoCo at
``sync_every`` 50, side by side in one run of the script:

1. one group alone on GPU 0: the rate a group gets with the card to itself;
2. 2 groups on GPU 0 (``replica_groups.gpus: [0, 0]``): ``localsgd.transport: auto`` syncs them through
   gloo over host memory, since NCCL refuses two members of one collective on one device;
3. the same with ``localsgd.sync_precision: bfloat16``;
4. 3 groups on GPU 0.

Per run: samples/s per group and their sum, ms per sync, syncs committed, whether every group ended
bit-identical, wall time; the last line is a JSON object with the same and each shared run's aggregate rate
over the lone group's (``sharing_ratio``). Exits non-zero unless every run SUCCEEDED with identical weights.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import run_config, torchx_run  # noqa: E402
from localsgd_ft.storage.fixture import write_fixture  # noqa: E402

RUNS: Dict[str, Dict[str, Any]] = {
    "1 group": {"groups": 1},
    "2 groups": {"groups": 2},
    "2 groups, bfloat16": {"groups": 2, "sync_precision": "bfloat16"},
    "3 groups": {"groups": 3},
}


def config(base: Dict[str, Any], tmp: Path, name: str, run: Dict[str, Any], steps: int, cpu: bool) -> Dict[str, Any]:
    cfg = run_config(base, name.replace(" ", "").replace(",", "-"), tmp / name.replace(" ", "_"), tmp / "data")
    groups = run["groups"]
    cfg["replica_groups"].update(count=groups, gpus=[] if cpu else [0] * groups, cpus=1, memory_mb=4096)
    cfg["lighthouse"]["min_replicas"] = 1
    cfg["localsgd"].update(algorithm="diloco", sync_every=50, transport="auto",
                           sync_precision=run.get("sync_precision", "float32"))
    cfg["train"].update(max_steps=steps, eval_every=0, log_every=50)
    cfg["checkpoint"]["enabled"] = False
    return cfg


def one(base: Dict[str, Any], tmp: Path, name: str, run: Dict[str, Any], steps: int, cpu: bool) -> Dict[str, Any]:
    cfg = config(base, tmp, name, run, steps, cpu)
    print(f"one-GPU benchmark: {name}, {steps} steps ...", file=sys.stderr, flush=True)
    started = time.monotonic()
    summary = torchx_run(tmp, cfg["name"], cfg)
    groups = summary["replica_groups"]
    rates = [g.get("samples_per_s") or 0.0 for g in groups.values()]
    syncs = [g.get("syncs_committed") or 0 for g in groups.values()]
    sync_ms = [1000 * (g.get("sync_time_s") or 0.0) / max(g.get("syncs_attempted") or 1, 1) for g in groups.values()]
    return {"run": name, "groups": run["groups"], "succeeded": summary["succeeded"],
            "identical": summary["params_identical"], "failure": summary.get("failure_reason"),
            "samples_per_s": [round(r, 1) for r in rates], "aggregate": round(sum(rates), 1),
            "sync_ms": round(statistics.mean(sync_ms), 1), "syncs_committed": min(syncs),
            "hashes": sorted({g.get("params_sha256") for g in groups.values()}),
            "wall_s": round(time.monotonic() - started, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000, help="local steps per run (a multiple of 50)")
    parser.add_argument("--cpu", action="store_true", help="run on CPU (checks the script; measures no GPU)")
    args = parser.parse_args()
    if args.steps % 50 or args.steps <= 0:
        parser.error("--steps: a positive multiple of 50")
    if not args.cpu:
        import torch

        if not torch.cuda.is_available():
            print("one-GPU benchmark: CUDA is not available here; run it on a machine with a GPU "
                  "(or --cpu to check the script)", file=sys.stderr)
            return 2
    base = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    rows: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="one-gpu-") as tmp_dir:
        tmp = Path(tmp_dir)
        write_fixture(tmp / "data")
        for name, run in RUNS.items():
            rows.append(one(base, tmp, name, run, args.steps, args.cpu))
    alone = rows[0]["aggregate"] or None
    device = "CPU" if args.cpu else "GPU 0"
    print(f"\n{'run':<22}{'samples/s per group':>28}{'sum':>9}{'ratio':>7}{'sync ms':>9}{'syncs':>7}{'wall s':>8}"
          "  verdict")
    for r in rows:
        r["sharing_ratio"] = round(r["aggregate"] / alone, 3) if alone else None
        verdict = ("SUCCEEDED" if r["succeeded"] else f"FAILED ({r['failure']})") + (
            ", identical" if r["identical"] else ", DIFFERENT")
        per_group = ", ".join(f"{x:.0f}" for x in r["samples_per_s"])
        print(f"{r['run']:<22}{per_group:>28}{r['aggregate']:>9.0f}{r['sharing_ratio'] or 0:>7.2f}{r['sync_ms']:>9.1f}"
              f"{r['syncs_committed']:>7}{r['wall_s']:>8.1f}  {verdict}")
    print(f"every group on {device}; ratio: the run's summed samples/s over the lone group's")
    print(json.dumps({"device": device, "rows": rows}))
    return 0 if all(r["succeeded"] and r["identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
