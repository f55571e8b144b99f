"""Per-group metrics: structured events as JSON lines in ``output_dir/metrics/group_<g>.jsonl``.

Each line is one event: ``{"t": wall time, "kind": ..., "group": g, "step": training step, ...}``
(the schema is in docs/metrics.md).
Writing is best-effort: a failed write (disk full, folder not writable) is
one warning on stderr, never a crashed worker. Events are buffered and appended at the progress cadence and at once for
events a person looks for (start, evaluation, fault, recovery, end), so the
training loop does no file I/O per step. A restarted incarnation appends to
the same file; its ``start`` event carries ``restart`` > 0.

A worker killed while writing can leave a truncated last line: readers skip
lines that are not complete JSON objects.

This module does not import torch: the report reads these files in the
lighthouse role.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

from localsgd_ft.contract.names import METRICS_DIR


def metrics_dir(run_dir: Path) -> Path:
    return Path(run_dir) / METRICS_DIR


def metrics_path(run_dir: Path, group: int) -> Path:
    return metrics_dir(run_dir) / f"group_{group}.jsonl"


class MetricsLog:
    """One group's event log: ``add`` buffers an event, ``flush`` appends the buffer to the file."""

    def __init__(self, path: Path, group: int) -> None:
        self.path = Path(path)
        self.group = group
        self.buffer: List[Dict[str, Any]] = []
        self.failed = False  # a write failed and was warned about; later failures stay quiet (each still tries)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            self._warn(e)

    def add(self, kind: str, step: int, flush: bool = False, **fields: Any) -> None:
        self.buffer.append({"t": round(time.time(), 3), "kind": kind, "group": self.group, "step": step, **fields})
        if flush:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        # One write of whole lines, so a concurrent reader or a kill leaves at most one partial line.
        try:
            with open(self.path, "a") as f:
                f.write("".join(json.dumps(e, separators=(",", ":")) + "\n" for e in self.buffer))
                f.flush()
        except OSError as e:  # observability is best-effort: a full disk must not stop training
            self._warn(e)
        self.buffer.clear()

    def _warn(self, e: OSError) -> None:
        if not self.failed:
            self.failed = True
            print(f"WARNING: metrics: cannot write {self.path}: {e}; training goes on, this group's metrics "
                  "are incomplete", file=sys.stderr, flush=True)


def read_events(path: Path) -> List[Dict[str, Any]]:
    """The events of one file, in order; a line that is not a complete JSON object is skipped."""
    events = []
    for line in Path(path).read_text().splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(event, dict) and "kind" in event:
            events.append(event)
    return events


def read_all(run_dir: Path) -> Dict[int, List[Dict[str, Any]]]:
    """Every group's events, by group id ({} when the run wrote no metrics here).

    Only regular files are read: a name that leads to a device (a link to
    /dev/full or /dev/zero) would be read forever, until memory runs out.
    """
    out = {}
    for path in sorted(metrics_dir(run_dir).glob("group_*.jsonl")):
        try:
            group = int(path.stem.split("_", 1)[1])
        except ValueError:
            continue  # not one of ours
        if not path.is_file():
            print(f"WARNING: metrics: skipping {path}: not a regular file", file=sys.stderr, flush=True)
            continue
        out[group] = read_events(path)
    return out


def incarnations(events: List[dict]) -> List[List[dict]]:
    """A group's events split at each (re)start: one list per process lifetime."""
    out: List[List[dict]] = []
    for e in events:
        if e["kind"] == "start" or not out:
            out.append([])
        out[-1].append(e)
    return out
