"""The slow-link benchmark's measurement from a paired run's progress intervals (benchmarks/links.py): pure
logic on made-up intervals; the benchmark itself runs only as root on the test bed (docs/slow-links.md)."""

from __future__ import annotations

import sys
from typing import Any, Dict, List

import pytest
from hosts import REPO

sys.path.insert(0, str(REPO))  # the benchmarks are scripts beside the package, not installed with it
from benchmarks import links  # noqa: E402

BATCH = 32
SWITCHES = [{"began": t, "ended": t + 0.05} for t in (10.0, 20.0, 30.0, 40.0)]  # to limited at 10 and 30


def _interval(t0: float, compute_s: float, sync_s: float, startup: bool = False) -> Dict[str, Any]:
    return {"t0": t0, "t1": t0 + 1.0, "steps": 100, "busy_s": compute_s + sync_s, "syncs": 1, "sync_s": sync_s,
            "quorum_s": sync_s / 2, "commit_s": 0.001, "startup": startup}


def _run(limited_compute_s: float) -> List[Dict[str, Any]]:
    """One interval a second for 50 s: a sync of 0.1 s on the unlimited link, 0.6 s on the limited one; the
    compute 0.5 s per interval, or ``limited_compute_s`` in the limited phases (the machine drifting)."""
    out = []
    for t in range(50):
        limited = 10 <= t < 20 or 30 <= t < 40
        out.append(_interval(t + 0.5, limited_compute_s if limited else 0.5, 0.6 if limited else 0.1,
                             startup=t == 0))
    return out


def test_an_interval_a_switch_fell_in_or_just_followed_belongs_to_no_phase():
    assert links._phase_of(_interval(9.5, 0.5, 0.1), SWITCHES) is None  # the switch at 10 inside it
    assert links._phase_of(_interval(10.06, 0.5, 0.1), SWITCHES) is None  # began within SETTLE_S after it
    assert links._phase_of(_interval(10.5, 0.5, 0.1), SWITCHES) == 1
    assert links._phase_of(_interval(44.5, 0.5, 0.1), SWITCHES) == 4
    assert links._phase_of(_interval(2.5, 0.5, 0.1, startup=True), SWITCHES) is None


def test_utilisation_is_the_limited_phases_rate_over_the_unlimited_and_at_equal_compute_ignores_drift():
    steady = links._phases(_run(limited_compute_s=0.5), SWITCHES, BATCH)
    assert steady["utilisation"] == pytest.approx(0.6 / 1.1, abs=1e-3)
    assert steady["eq_utilisation"] == pytest.approx(0.6 / 1.1, abs=1e-3)
    assert steady["drift"] == 0 and steady["sync_ms"] == pytest.approx(600)
    assert steady["compute_share"] == pytest.approx(0.5 / 1.1, abs=1e-3)
    # The machine slower in the limited phases: the plain ratio takes the drift for the link's cost, the one at
    # equal compute does not.
    drifting = links._phases(_run(limited_compute_s=0.6), SWITCHES, BATCH)
    assert drifting["utilisation"] == pytest.approx(0.6 / 1.2, abs=1e-3)
    assert drifting["eq_utilisation"] == pytest.approx(0.6 / 1.1, abs=1e-3)


def test_a_run_that_ended_before_its_last_switch_has_no_utilisation():
    partial = links._phases(_run(0.5), SWITCHES[:2], BATCH)
    assert partial["utilisation"] is None and partial["eq_utilisation"] is None
    assert partial["samples_per_s"] is not None


def test_progress_intervals_are_whole_syncs_and_shorter_only_where_the_link_would_take_too_long():
    assert links.paired_log_every(100, 100, 0.006, 60) == 100
    assert links.paired_log_every(10, 10, 0.006, 60) == 100
    assert links.paired_log_every(1, 100, 0.006, 60) == 16  # 6 limited intervals of 16 steps at 0.6 s a step
    assert links.paired_log_every(1, 100, 0.06, 60) == links.MIN_LOG_EVERY


def test_late_accuracy_is_the_mean_of_the_last_quarter_of_evaluations():
    evals = [{"step": s, "test_accuracy": a} for s, a in zip(range(25, 225, 25), (.5, .9, .3, .9, .8, .9, .2, 1.))]
    assert links.late_accuracy(evals) == pytest.approx(0.6)
    assert links.late_accuracy([]) is None
