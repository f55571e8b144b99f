"""Runs side by side: a table and plots from the output directories of finished runs.

    python -m localsgd_ft.compare DIR [DIR ...] [--out OUT]

Each DIR is a run's ``output_dir`` (it holds ``summary.json``; its
``metrics/`` files add the curves). Runs are labelled by what differs between
them: the config keys whose values are not the same in every run (the name,
output directory, port and data location aside). Writes into ``--out``
(default: ``compare/`` beside the first run):

- ``compare.md``: a markdown table of each run's varying keys, final test
  accuracy, wall time, samples/s per group, syncs committed, MB each group
  handed to allreduce, failures injected and recovered, and the verdict (the
  console gets the same table);
- ``accuracy.png``: test accuracy against training step, against wall time
  and against MB sent (a group's bytes spread evenly over its steps: syncs
  come at a fixed cadence);
- ``throughput.png``: samples/s per group, one bar per run.

Works on any output directory with a ``summary.json``, also from runs made
before the keys it reads existed (missing values show as ``-``). No torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from localsgd_ft.contract import GroupSummary
from localsgd_ft.results.metrics import incarnations, read_all
from localsgd_ft.results.report import ReportError, load_summary
from localsgd_ft.results.tables import columns, fmt
from localsgd_ft.storage.atomic import write_text_atomic

# Keys that differ between any two runs without saying anything about the experiment.
INCIDENTAL = ("name", "output_dir", "lighthouse.port", "data.root", "checkpoint.dir")


class Run:
    """One finished run: its summary, its flattened config and its events."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = Path(run_dir)
        self.summary = load_summary(self.dir)
        self.config = flatten(self.summary.config)
        self.metrics = read_all(self.dir)
        self.label = self.dir.name

    def mean(self, value: Callable[[GroupSummary], Optional[float]]) -> Optional[float]:
        """The mean over the groups of ``value`` (groups without one left out)."""
        values = [v for v in map(value, self.summary.groups()) if v is not None]
        return sum(values) / len(values) if values else None

    def sent_mb(self) -> Optional[float]:
        sent = [g.sync_bytes for g in self.summary.groups() if g.sync_bytes is not None]
        return max(sent) / 2**20 if sent else None


def flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """A nested config as ``{dotted.key: value}``."""
    out: Dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def varying_keys(runs: Sequence[Run]) -> List[str]:
    """Config keys whose values are not the same in every run, in config order."""
    keys: List[str] = []
    for run in runs:
        keys += [k for k in run.config if k not in keys]
    return [k for k in keys if k not in INCIDENTAL
            and len({json.dumps(r.config.get(k), sort_keys=True) for r in runs}) > 1]


def label_runs(runs: Sequence[Run]) -> List[str]:
    """Each run's label: its values of the varying keys, or its directory name if nothing varies."""
    keys = varying_keys(runs)
    if not keys:
        return [r.dir.name for r in runs]
    return [", ".join(f"{k}={_value(r.config.get(k))}" for k in keys) for r in runs]


def _value(v: Any) -> str:
    return "-" if v is None else json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def table_rows(runs: Sequence[Run]) -> List[List[str]]:
    rows = [["run", "accuracy", "wall_s", "samples/s", "syncs_committed", "sent_MB", "failures", "recovered",
             "verdict"]]
    for run in runs:
        s = run.summary
        rows.append([run.label, fmt(s.final_test_accuracy, ".4f"), fmt(s.wall_time_s, ".1f"),
                     fmt(run.mean(lambda g: g.samples_per_s), ".0f"),
                     fmt(run.mean(lambda g: g.syncs_committed), ".0f"), fmt(run.sent_mb(), ".2f"),
                     str(s.faults.injected), str(sum(1 for r in s.recoveries if r.recovered)),
                     "SUCCEEDED" if s.succeeded else "FAILED"])
    return rows


def markdown(rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + " --- |" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows[1:]]) + "\n"


def console(rows: List[List[str]]) -> str:
    return "\n".join(columns(rows))


def _accuracy_curve(run: Run) -> Tuple[List[float], List[float], List[float], List[float]]:
    """(steps, seconds since start, MB sent, accuracy) of the evaluations of the run's lowest group."""
    if not run.metrics:
        return [], [], [], []
    group = min(run.metrics)
    events = run.metrics[group]
    t0 = events[0]["t"] if events else 0.0
    # The last process lifetime's evaluations and final accuracy (an earlier one was cut short).
    life = incarnations(events)[-1] if events else []
    points = [(e["step"], e["t"] - t0, e.get("test_accuracy")) for e in life if e["kind"] in ("eval", "end")]
    points = [(s, t, a) for s, t, a in points if a is not None]
    result = run.summary.replica_groups.get(str(group)) or GroupSummary()
    steps, sent = result.steps or 0, result.sync_bytes
    per_step = sent / steps / 2**20 if sent and steps else None
    return ([p[0] for p in points], [p[1] for p in points],
            [p[0] * per_step if per_step is not None else float("nan") for p in points], [p[2] for p in points])


def write_plots(runs: Sequence[Run], out: Path) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), sharey=True)
    for run in runs:
        steps, seconds, mb, acc = _accuracy_curve(run)
        for ax, xs in zip(axes, (steps, seconds, mb)):
            ax.plot(xs, acc, marker="o", label=run.label)
    for ax, xlabel in zip(axes, ("training step", "wall time since start (s)", "MB handed to allreduce per group")):
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.3)
        ax.set_xlim(left=0)
    axes[0].set_ylabel("test accuracy")
    axes[0].set_ylim(0, 1.05)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle("test accuracy of each run")
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(runs) + 3), 4.8))
    rates = [run.mean(lambda g: g.samples_per_s) or 0.0 for run in runs]
    ax.bar(range(len(runs)), rates, color=[f"C{i}" for i in range(len(runs))])
    ax.set_xticks(range(len(runs)), [run.label for run in runs], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("samples/s per group (mean over groups)")
    ax.set_title("training throughput of each run")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=110)
    plt.close(fig)
    return [out / "accuracy.png", out / "throughput.png"]


def compare(run_dirs: Sequence[Path], out: Path) -> Tuple[str, List[Path]]:
    """Write the comparison of ``run_dirs`` into ``out``; returns the console table and the files written."""
    if not run_dirs:
        raise ReportError("no run directories given")
    runs = [Run(d) for d in run_dirs]
    for run, label in zip(runs, label_runs(runs)):
        run.label = label
    out.mkdir(parents=True, exist_ok=True)
    rows = table_rows(runs)
    varying = varying_keys(runs)
    header = (f"Runs compared: {len(runs)}; they differ in: {', '.join(varying) or 'nothing but their directory'}.\n\n")
    write_text_atomic(out / "compare.md", header + markdown(rows))
    return console(rows), [out / "compare.md", *write_plots(runs, out)]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m localsgd_ft.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path, help="output directories of finished runs")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: compare/ beside the first)")
    args = parser.parse_args(argv)
    out = args.out or args.run_dirs[0].resolve().parent / "compare"
    try:
        table, files = compare(args.run_dirs, out)
    except ReportError as e:
        print(f"compare: error: {e}", file=sys.stderr)
        return 2
    print(table)
    print(f"compare: {out} ({', '.join(f.name for f in files)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
