"""The run report: PNG plots and a summary table from ``summary.json`` and the groups' metrics files.

``python -m localsgd_ft.report OUTPUT_DIR`` (the lighthouse role runs it at the
end of every run) writes into ``OUTPUT_DIR/report/``:

- ``loss.png``: training loss against training step (0 to ``train.max_steps``), per group;
- ``accuracy.png``: test accuracy against training step (the same axis), per group;
- ``quorum.png``: quorum size over time per group, with failure, restart and
  recovery markers;
- ``throughput.png``: samples/s over time per group, with the same markers;
- ``summary.txt``: the table it prints (accuracy, steps, syncs committed and
  failed, restarts, samples/s per group; each failure with its recovery time).

Every number in the table comes from ``summary.json`` (``results.tables``); the
plots come from ``OUTPUT_DIR/metrics/group_<g>.jsonl`` (``results.plots``, which
reads ``results.metrics``). Without metrics files (e.g. groups in other pods)
only the table is produced. No display needed, and no torch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Tuple

from localsgd_ft.contract import Summary
from localsgd_ft.contract.names import REPORT_DIR
from localsgd_ft.results.plots import write_plots
from localsgd_ft.results.tables import summary_table


class ReportError(Exception):
    """The report cannot be made; the message says why."""


def load_summary(run_dir: Path) -> Summary:
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        raise ReportError(f"{path}: no summary.json here; pass the output_dir of a finished run "
                          "(summary.json is written when a run ends)")
    try:
        return Summary.load(path)
    except (OSError, ValueError) as e:
        raise ReportError(f"{path}: cannot read summary.json: {e}") from None


def make_report(run_dir: Path) -> Tuple[str, List[Path]]:
    """Write the report into ``run_dir/report``; returns the table and the files written."""
    run_dir = Path(run_dir)
    summary = load_summary(run_dir)
    out = run_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    table = summary_table(summary)
    (out / "summary.txt").write_text(table + "\n")
    return table, [out / "summary.txt", *write_plots(run_dir, summary, out)]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", help="a run's output_dir (holds summary.json and metrics/)")
    args = parser.parse_args(argv)
    try:
        table, files = make_report(Path(args.output_dir))
    except ReportError as e:
        print(f"report: error: {e}", file=sys.stderr)
        return 2
    print(table)
    run_dir = Path(args.output_dir)
    if len(files) == 1:
        print(f"report: no metrics files in {run_dir / 'metrics'}: table only")
    print(f"report: {run_dir / 'report'} ({', '.join(f.name for f in files)}); summary: {run_dir / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
