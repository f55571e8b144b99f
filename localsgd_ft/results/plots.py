"""The report's PNG plots from the groups' metrics files: loss and accuracy by step, quorum and throughput in time.

Failures, restarts and recoveries are marked on each. matplotlib's Agg backend: no display needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from localsgd_ft.contract import EventKind, FaultEvent, Summary, SummaryLike
from localsgd_ft.results.metrics import incarnations, read_all

PLOTS = ("loss.png", "accuracy.png", "quorum.png", "throughput.png")


def _markers(metrics: Dict[int, List[dict]], summary: SummaryLike) -> Dict[str, List[dict]]:
    """Failures, restarts and recoveries, each with ``t`` (group clock), ``step`` and ``group``."""
    faults: Dict[Any, dict] = {}
    restarts, recovered = [], []
    for group, events in metrics.items():
        for e in events:
            if e["kind"] == EventKind.FAULT:
                faults.setdefault(e.get("fault_id"), e)
            elif e["kind"] == "start" and e.get("restart", 0) > 0:
                restarts.append(e)
            elif e["kind"] == EventKind.RECOVERED:
                recovered.append(e)
    # A fault whose target died before its file was flushed is still in summary.json (lighthouse clock).
    for e in Summary.of(summary).events:
        if isinstance(e, FaultEvent) and e.fault_id not in faults:
            faults[e.fault_id] = {**e.wire(), "t": e.time}
    return {EventKind.FAULT: sorted(faults.values(), key=lambda e: e.get("t") or 0), "restart": restarts,
            EventKind.RECOVERED: recovered}


def _fault_label(e: dict) -> str:
    kind = e.get("fault")
    return f"{kind} (lighthouse)" if kind == "lighthouse" else f"{kind} group {e.get('target')}"


def _series(events: List[dict], kind: str, key: str, x: str) -> Tuple[List[float], List[float]]:
    """(x, y) of ``kind`` events carrying ``key``; a restart breaks the line (NaN) so it does not jump back."""
    xs: List[float] = []
    ys: List[float] = []
    for e in events:
        if e["kind"] == "start" and xs:
            xs.append(float("nan"))
            ys.append(float("nan"))
        elif e["kind"] == kind and e.get(key) is not None:
            xs.append(e[x])
            ys.append(e[key])
    return xs, ys


def _fault_line(ax: Any, x: float, f: dict, first: bool) -> None:
    ax.axvline(x, color="red", linestyle="--", linewidth=1, label="injected failure" if first else None)
    ax.annotate(" " + _fault_label(f), (x, 0.98), xycoords=("data", "axes fraction"), rotation=90,
                va="top", ha="left", fontsize=8, color="red")


def _mark_faults_at_steps(ax: Any, markers: Dict[str, List[dict]]) -> None:
    for i, f in enumerate(markers[EventKind.FAULT]):
        _fault_line(ax, f["step"], f, i == 0)


def _mark_events_in_time(ax: Any, markers: Dict[str, List[dict]], t0: float, y_of: Any) -> None:
    """Failures (line, and a band until the hit group's next full-quorum commit), restarts, recoveries."""
    for i, f in enumerate(markers[EventKind.FAULT]):
        if f.get("t") is None:
            continue
        _fault_line(ax, f["t"] - t0, f, i == 0)
        lighthouse = f.get("fault") == "lighthouse"
        back = [r["t"] for r in markers[EventKind.RECOVERED]
                if r["t"] > f["t"] and (lighthouse or r["group"] == f.get("target"))]
        if back:
            ax.axvspan(f["t"] - t0, min(back) - t0, color="red", alpha=0.08,
                       label="failure until recovered" if i == 0 else None)
    for i, e in enumerate(markers["restart"]):
        ax.plot([e["t"] - t0], [y_of(e)], marker="x", color="black", markersize=9, linestyle="none",
                label="group restarted (new process)" if i == 0 else None)
    for i, e in enumerate(markers[EventKind.RECOVERED]):
        ax.plot([e["t"] - t0], [y_of(e)], marker="^", color="green", markersize=8, linestyle="none",
                label="recovered (full-quorum commit after a failure or stall)" if i == 0 else None)


def value_at(points: Sequence[Tuple[float, float]], t: float) -> Optional[float]:
    """A series' value at time ``t``: its latest point at or before ``t``, else its earliest after it.

    A marker placed before its group's first value (a restart before the new process's first sync)
    takes that first value: 0 would read as "no quorum" or "stalled". None when there are no points.
    """
    ordered = sorted(points, key=lambda p: p[0])  # stable: of points at the same time, the last one written wins
    before = [y for x, y in ordered if x <= t]
    if before:
        return before[-1]
    return ordered[0][1] if ordered else None


def _marker_y(series: Dict[int, List[Tuple[float, float]]], group: int, t: float, default: float) -> float:
    """Height of a group's marker at time ``t`` on a time plot: on the group's own line; for a group
    with no values at all, at the other groups' mean value then, else at ``default`` (mid-axis)."""
    own = value_at(series.get(group, []), t)
    if own is not None:
        return own
    others = [v for g, pts in series.items() if g != group for v in [value_at(pts, t)] if v is not None]
    return sum(others) / len(others) if others else default


def _colors(metrics: Dict[int, List[dict]]) -> Dict[int, str]:
    return {g: f"C{i}" for i, g in enumerate(sorted(metrics))}


def _start_time(metrics: Dict[int, List[dict]]) -> float:
    """The first event's time: time axes count seconds from it."""
    return min(e["t"] for events in metrics.values() for e in events)


def last_step(metrics: Dict[int, List[dict]], summary: SummaryLike) -> int:
    """The right end of the step axes, so that they span the whole run (one evaluation does not fill the
    axis, a run cut short shows how far it got): ``train.max_steps`` from summary.json's config; without
    it, the largest of the ``start`` events' ``max_steps`` and the steps recorded."""
    configured = (Summary.of(summary).config.get("train") or {}).get("max_steps")  # the config's own record
    if configured is not None:
        return int(configured)
    steps = [e.get("max_steps") if e["kind"] == "start" else e.get("step")
             for events in metrics.values() for e in events]
    return int(max([s for s in steps if s is not None], default=0))


def _step_axis(ax: Any, end: int) -> None:
    ax.set_xlim(0, max(end, 1))  # a zero-width axis draws nothing useful and warns


def _plot_loss(ax: Any, metrics: Dict[int, List[dict]], markers: Dict[str, List[dict]], end: int) -> None:
    """Training loss against step, one line per group (named even without a loss point)."""
    colors = _colors(metrics)
    for g, events in sorted(metrics.items()):
        xs, ys = _series(events, "train", "loss", "step")
        ax.plot(xs, ys, color=colors[g], label=f"group {g}" if xs else f"group {g} (no loss recorded)")
    _mark_faults_at_steps(ax, markers)
    losses = [e["loss"] for ev in metrics.values() for e in ev if e["kind"] == "train" and e.get("loss")]
    if losses and max(losses) > 100 * min(losses):
        ax.set_yscale("log")  # a loss that falls by orders of magnitude is flat on a linear axis
    _step_axis(ax, end)


def _plot_accuracy(ax: Any, metrics: Dict[int, List[dict]], markers: Dict[str, List[dict]], end: int) -> None:
    """Test accuracy against step: evaluations as a line, each final evaluation as a star."""
    colors = _colors(metrics)
    for g, events in sorted(metrics.items()):
        xs, ys = _series([e for e in events if e["kind"] != "start"], "eval", "test_accuracy", "step")
        ax.plot(xs, ys, color=colors[g], marker="o",
                label=f"group {g}: evaluations" if xs else f"group {g} (no evaluation recorded)")
        for e in events:
            if e["kind"] == "end" and e.get("test_accuracy") is not None:
                ax.plot([e["step"]], [e["test_accuracy"]], color=colors[g], marker="*", markersize=14,
                        linestyle="none", label=f"group {g}: final ({e['test_accuracy']:.4f})")
    _mark_faults_at_steps(ax, markers)
    ax.set_ylim(0, 1.05)
    _step_axis(ax, end)


def _plot_quorum(ax: Any, metrics: Dict[int, List[dict]], markers: Dict[str, List[dict]], t0: float,
                 n_groups: int) -> None:
    """Quorum size over time, one line per group and process lifetime, with the failure markers."""
    colors = _colors(metrics)
    # Groups usually share the quorum size; a small offset per group keeps every line visible.
    offset = {g: 0.04 * (i - (len(metrics) - 1) / 2) for i, g in enumerate(sorted(metrics))}
    for g, events in sorted(metrics.items()):
        label: Optional[str] = f"group {g}"  # on the group's first line, whichever lifetime draws it
        # One line per process lifetime, ending at its last event: a dead group draws nothing.
        for life in incarnations(events):
            pts = [(e["t"], e["quorum_size"]) for e in life if e.get("quorum_size") is not None]
            if not pts:
                continue
            pts.append((life[-1]["t"], pts[-1][1]))
            ax.step([x - t0 for x, _ in pts], [y + offset[g] for _, y in pts], where="post", color=colors[g],
                    label=label)
            label = None
        if label:
            ax.plot([], [], color=colors[g], label=f"group {g} (no sync recorded)")
    quorum_at = {g: [(e["t"], e["quorum_size"]) for e in ev if e.get("quorum_size") is not None]
                 for g, ev in metrics.items()}

    def y_quorum(e: dict) -> float:
        g = e["group"]
        size = e.get("participants")
        if size is None:
            size = _marker_y(quorum_at, g, e["t"], n_groups / 2)
        return size + offset.get(g, 0)

    _mark_events_in_time(ax, markers, t0, y_quorum)
    ax.set_ylim(-0.2, n_groups + 0.6)
    ax.set_yticks(range(0, n_groups + 1))


def _plot_throughput(ax: Any, metrics: Dict[int, List[dict]], markers: Dict[str, List[dict]], t0: float) -> None:
    """Samples/s over time, one line per group, with the failure markers."""
    colors = _colors(metrics)
    rate_at = {}
    for g, events in sorted(metrics.items()):
        xs, ys = _series(events, "train", "samples_per_s", "t")
        ax.plot([x - t0 for x in xs], ys, color=colors[g], marker=".",
                label=f"group {g}" if xs else f"group {g} (no progress recorded)")
        rate_at[g] = [(x, y) for x, y in zip(xs, ys) if x == x]  # without the NaN restart breaks
    rates = [y for pts in rate_at.values() for _, y in pts]
    middle = max(rates) / 2 if rates else 1.0
    _mark_events_in_time(ax, markers, t0, lambda e: _marker_y(rate_at, e["group"], e["t"], middle))
    ax.set_ylim(bottom=0)


def _finish(fig: Any, ax: Any, path: Path, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_plots(run_dir: Path, summary: Summary, out: Path) -> List[Path]:
    """Write the four PNGs into ``out``; returns their paths ([] without metrics files)."""
    metrics = read_all(run_dir)
    if not any(metrics.values()):
        return []
    import matplotlib

    matplotlib.use("Agg")  # files only; there is no display
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    markers = _markers(metrics, summary)
    t0 = _start_time(metrics)
    end = last_step(metrics, summary)
    name = summary.name or ""
    n_groups = len(summary.replica_groups or metrics)
    plots = [
        ("loss.png", lambda ax: _plot_loss(ax, metrics, markers, end),
         f"{name}: training loss (mean over each progress interval)", "training step", "cross-entropy loss"),
        ("accuracy.png", lambda ax: _plot_accuracy(ax, metrics, markers, end),
         f"{name}: test accuracy", "training step", "top-1 accuracy"),
        ("quorum.png", lambda ax: _plot_quorum(ax, metrics, markers, t0, n_groups),
         f"{name}: quorum size (replica groups in the last sync's quorum)", "time since start (s)",
         "groups in quorum"),
        ("throughput.png", lambda ax: _plot_throughput(ax, metrics, markers, t0),
         f"{name}: training throughput per group (between progress lines)", "time since start (s)", "samples/s"),
    ]
    paths = []
    for filename, draw, title, xlabel, ylabel in plots:
        fig, ax = plt.subplots(figsize=(9, 5))
        draw(ax)
        _finish(fig, ax, out / filename, title, xlabel, ylabel)
        plt.close(fig)
        paths.append(out / filename)
    return paths
