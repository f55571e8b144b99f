"""Failures in a storm cost their own length: lighthouse outages at every moment of a sync (real runs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import small_config, write_config

pytestmark = pytest.mark.integration

OUTAGE_S = 2.0
# A kill first, so that quorum ids have moved on before the lighthouse restarts (a restarted
# lighthouse numbers quorums from 1 again); its heal is itself one of the moments.
MOMENTS = [
    {"kind": "kill", "group": 1, "at_step": 100},
    {"kind": "lighthouse", "at_step": 1, "duration_s": OUTAGE_S, "moment": "heal"},
    {"kind": "lighthouse", "at_step": 900, "duration_s": OUTAGE_S},  # idle: between two syncs
    {"kind": "lighthouse", "at_step": 1300, "duration_s": OUTAGE_S, "moment": "quorum"},
    {"kind": "lighthouse", "at_step": 1700, "duration_s": OUTAGE_S, "moment": "allreduce"},
]
# Outages 400 steps or more apart, so that one's stall never spans another's: the heal comes seconds after
# the kill, which is 150 steps on a slow machine and 200-300 on one three times as fast (7 ms a step), where
# 145 steps between two outages were less than a second and one stall spanned both.
MAX_STEPS = 1900


@pytest.mark.parametrize("recovery", ["sync", "async"])
def test_a_lighthouse_outage_costs_its_length_at_any_moment(tmp_path, cifar_root, torchx_run, recovery):
    cfg = small_config(tmp_path, cifar_root, localsgd={"recovery": recovery}, train={"max_steps": MAX_STEPS},
                       faults={"enabled": True, "schedule": MOMENTS})
    path = write_config(tmp_path, cfg)
    run = torchx_run(path)
    assert run.wait(240) == 0, run.tail()
    summary = json.loads((Path(cfg["output_dir"]) / "summary.json").read_text())
    assert summary["succeeded"] and summary["params_identical"], summary["failure_reason"]
    assert summary["faults"]["by_kind"] == {"kill": 1, "lighthouse": 4} and summary["lighthouse_restarts"] == 4
    outages = [r for r in summary["recoveries"] if r["kind"] == "lighthouse"]
    assert sorted(r["moment"] for r in outages) == ["allreduce", "heal", "quorum", "step"]
    for r in outages:
        # The groups' longest sync after the outage: its cost. (The first commit with every group in
        # it may come a sync later: the restarted lighthouse can form its first quorum with only the
        # group that asked first, and the other heals at the next sync.)
        assert r["recovered"], r
        # 2.5 s beyond the outage: the lighthouse's restart and a quorum retry; on this machine's slow cores
        # (docs/testing.md) the quorum moment measured 3.5 and 4.04 s in two runs of the same code.
        assert r["survivor_stall_s"] <= OUTAGE_S + 2.5, r
    for g in summary["replica_groups"].values():
        assert g["max_sync_s"] <= OUTAGE_S + 2 + 5, g  # the kill's heal may add a model transfer
