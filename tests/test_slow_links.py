"""A slow link, for real (the test bed's hosts, tc): Streaming DiLoCo's delayed fragments hide their transfer."""

from __future__ import annotations

import json
from pathlib import Path

import hosts
import pytest

WHY_NOT = hosts.unavailable()
pytestmark = [pytest.mark.integration, pytest.mark.skipif(WHY_NOT is not None, reason=str(WHY_NOT))]

# A fragment of the test model (about 48 kB) takes about 0.1 s at this rate: longer than a sync takes on an
# unlimited link, shorter than the 19 steps it overlaps on any CPU we know (a step is 5-80 ms).
MBIT = 4.0


def _transfer_share(tmp_path: Path, cifar_root: Path, delay: int) -> float:
    """Groups on two hosts whose links run at MBIT; the part of a sync that is neither quorum nor commit (the
    wait for the allreduce), per sync, as a share of the time the link needs for the bytes of one sync."""
    from bed_run import BedRun
    from conftest import small_config, write_config

    cfg = small_config(tmp_path / f"delay{delay}", cifar_root,
                       localsgd={"algorithm": "diloco", "sync_every": 40, "fragments": 2,
                                 "fragment_sync_delay": delay, "timeout_s": 60, "quorum_timeout_s": 60},
                       data={"batch_size": 64}, train={"max_steps": 320, "eval_every": 0, "log_every": 20},
                       checkpoint={"enabled": False})
    path = write_config(tmp_path, cfg, f"delay{delay}.yaml")
    with hosts.TestBed(3, tag="slow") as bed:
        for host in (1, 2):
            bed.limit(host, MBIT, burst_kb=4)  # a burst far below a fragment: the rate paces every sync
        run = BedRun(bed, path, hosts.REPO)
        try:
            assert run.wait(600) == 0, run.text("lighthouse")[-3000:]
        finally:
            left = run.kill()
        assert left == []
    summary = json.loads((Path(cfg["output_dir"]) / "summary.json").read_text())
    assert summary["succeeded"] and summary["params_identical"], summary["failure_reason"]
    shares = []
    for group, g in summary["replica_groups"].items():
        metrics = Path(cfg["output_dir"]) / "metrics" / f"group_{group}.jsonl"
        train = [r for r in map(json.loads, metrics.read_text().splitlines()) if r["kind"] == "train"][2:]
        syncs = len(train)  # a fragment's sync every 20 steps: one per progress line
        transfer_s = g["sync_bytes"] / g["syncs_attempted"] * 8 / (MBIT * 1e6)
        waited = sum(r["sync_s"] - r["quorum_s"] - r["commit_s"] for r in train)
        shares.append(waited / syncs / transfer_s)
    return max(shares)


def test_delayed_fragments_overlap_their_transfer_with_training_on_a_slow_link(tmp_path, cifar_root):
    """The same run with fragment_sync_delay 0 waits for the link at every sync; with 19 steps of delay
    the transfer happens while the group trains and the sync no longer waits for it."""
    waiting = _transfer_share(tmp_path, cifar_root, delay=0)
    hidden = _transfer_share(tmp_path, cifar_root, delay=19)
    print(f"\nthe wait for the allreduce per sync, as a share of its transfer time at {MBIT} Mbit/s: delay 0 "
          f"{waiting:.2f}, delay 19 {hidden:.2f}")
    assert waiting >= 0.6, waiting  # the link does limit the sync
    assert hidden <= 0.25 * waiting, (hidden, waiting)
