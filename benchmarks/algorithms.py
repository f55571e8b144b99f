"""LocalSGD vs DiLoCo vs Streaming DiLoCo, side by side: accuracy, wall time and bytes sent per group.

    python benchmarks/algorithms.py                  # about 4 minutes on 2 CPU cores
    python benchmarks/algorithms.py --steps 400 --out outputs/algorithms

Runs 2 replica groups with the real ``torchx run`` on a generated CIFAR-format
fixture, one run after another on this machine, for each algorithm at
``sync_every`` 10, 50 and 100, all with the same number of local steps (the
base config is ``configs/smoke.yaml``). The algorithms:

- ``localsgd``: parameter averaging;
- ``diloco``: DiLoCo with the shipped outer optimizer (Nesterov SGD, lr 0.7,
  momentum 0.5);
- ``diloco-m0.9``: the same with the paper's outer momentum 0.9;
- ``streaming``: Streaming DiLoCo, 2 fragments, fragment_sync_delay 1, the
  shipped outer optimizer.

Prints a table (final test accuracy, wall time, MB each group handed to
allreduce, whether the groups ended identical or the run diverged: a loss
that is not a number stops it, and it counts as accuracy 0) and, as its last line, JSON of
the same; writes ``algorithms.png`` (accuracy and MB sent against
``sync_every``) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import run_config, torchx_run  # noqa: E402
from localsgd_ft.storage.fixture import write_fixture  # noqa: E402

ALGORITHMS: Dict[str, dict] = {
    "localsgd": {"algorithm": "localsgd"},
    "diloco": {"algorithm": "diloco"},
    "diloco-m0.9": {"algorithm": "diloco", "outer_optimizer": {"momentum": 0.9}},
    "streaming": {"algorithm": "diloco", "fragments": 2, "fragment_sync_delay": 1},
}
SYNC_EVERY = (10, 50, 100)


def _plot(rows: List[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc, sent) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name in ALGORITHMS:
        mine = [r for r in rows if r["algorithm"] == name]
        xs = [r["sync_every"] for r in mine]
        acc.plot(xs, [r["accuracy"] for r in mine], marker="o", label=name)
        sent.plot(xs, [r["sent_mb"] for r in mine], marker="o", label=name)
    for ax, title, ylabel in ((acc, "final test accuracy", "top-1 accuracy"),
                              (sent, "data handed to allreduce per group", "MB")):
        ax.set_xscale("log")
        ax.set_xticks(SYNC_EVERY, [str(s) for s in SYNC_EVERY])
        ax.set_xlabel("sync_every (local steps per full sync)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    acc.set_ylim(0, 1.05)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="local steps per group (a multiple of 100)")
    parser.add_argument("--out", default=str(REPO / "outputs" / "algorithms"), help="where algorithms.png goes")
    args = parser.parse_args()
    base = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    rows = []
    with tempfile.TemporaryDirectory(prefix="algorithms-") as tmp_dir:
        tmp = Path(tmp_dir)
        write_fixture(tmp / "data")
        for name, settings in ALGORITHMS.items():
            for sync_every in SYNC_EVERY:
                run = f"{name}-{sync_every}"
                cfg = run_config(base, run.replace(".", ""), tmp / run, tmp / "data")
                cfg["localsgd"].update(settings, sync_every=sync_every)
                cfg["train"].update(max_steps=args.steps, eval_every=0, log_every=args.steps)
                cfg["checkpoint"]["enabled"] = False
                print(f"algorithms benchmark: {run} ...", file=sys.stderr, flush=True)
                s = torchx_run(tmp, run, cfg)
                groups = s["replica_groups"].values()
                # A diverged run ends FAILED ("training diverged"): a result of the comparison, not an error.
                rows.append({"algorithm": name, "sync_every": sync_every, "accuracy": s["final_test_accuracy"] or 0.0,
                             "wall_s": s["wall_time_s"],
                             "sent_mb": round(max(g.get("sync_bytes", 0) for g in groups) / 2**20, 2),
                             "identical": s["params_identical"], "succeeded": s["succeeded"],
                             "diverged": "training diverged" in (s.get("failure_reason") or "")})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _plot(rows, out / "algorithms.png")
    print(f"{'algorithm':<13}{'sync_every':>11}{'accuracy':>10}{'wall s':>8}{'sent MB':>9}  verdict")
    for r in rows:
        verdict = "diverged" if r["diverged"] else "identical" if r["identical"] else "DIFFERENT"
        print(f"{r['algorithm']:<13}{r['sync_every']:>11}{r['accuracy']:>10.4f}{r['wall_s']:>8.1f}"
              f"{r['sent_mb']:>9.2f}  {verdict}")
    print(f"plot: {out / 'algorithms.png'}")
    print(json.dumps(rows))
    return 0 if all(r["succeeded"] or r["diverged"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
