"""Stall detection and disruption accounting (pure logic; real runs assert the same in test_integration)."""

from __future__ import annotations

import random

from localsgd_ft.training.sync_monitor import StallDetector, SyncMonitor


def _noisy_syncs(n, seed=0):
    """Sync times of a loaded 2-core host: ~30 ms, jitter, and now and then a peer's evaluation (0.6 s)."""
    rng = random.Random(seed)
    return [0.6 if i % 25 == 24 else rng.lognormvariate(-3.5, 0.8) for i in range(n)]


def test_jitter_and_a_peers_evaluation_are_not_stalls():
    detector = StallDetector(heartbeat_timeout_s=1.0)
    assert not any(detector.is_stall(d) for d in _noisy_syncs(2000))


def test_a_frozen_peer_is_a_stall_and_stays_out_of_the_history():
    detector = StallDetector(heartbeat_timeout_s=1.0)
    for d in _noisy_syncs(50):
        detector.is_stall(d)
    usual = detector.usual_s()
    assert detector.is_stall(3.0)  # a peer frozen for 3 s
    assert detector.usual_s() == usual


def test_the_floor_follows_the_heartbeat_timeout():
    detector = StallDetector(heartbeat_timeout_s=5.0)
    for _ in range(20):
        detector.is_stall(0.01)
    assert not detector.is_stall(2.0) and detector.is_stall(2.6)  # floor: half of 5 s
    assert StallDetector(heartbeat_timeout_s=0.5).floor_s == StallDetector.MIN_FLOOR_S


def test_no_verdict_during_warm_up():
    detector = StallDetector(heartbeat_timeout_s=1.0)
    assert not any(detector.is_stall(d) for d in [0.01, 5.0, 0.01, 5.0])


def test_a_sync_that_did_not_commit_stalled_even_when_it_lasted_no_longer_than_usual():
    """On a slow link a sync lasts a second; one given up for a silent peer lasts about as long, and was
    all cost: it counts, while a failed one of milliseconds (a reset on loopback) does not."""
    detector = StallDetector(heartbeat_timeout_s=2.0)
    for _ in range(20):
        detector.is_stall(1.0)
    assert not detector.is_stall(1.5, disrupted=True)  # committed, under twice the usual
    assert detector.is_stall(1.5, disrupted=True, committed=False)
    assert not detector.is_stall(0.02, disrupted=True, committed=False)


class _Manager:
    def __init__(self, participants=2):
        self.participants, self.step, self._quorum_id = participants, 0, 1

    def num_participants(self):
        return self.participants

    def current_step(self):
        return self.step


class _Completion:
    def __init__(self):
        self.events = []

    def report(self, group, kind, **fields):
        self.events.append(kind)


def _monitor(restarted_at=None):
    completion = _Completion()
    restart = {"at": restarted_at}

    def take():
        at, restart["at"] = restart["at"], None
        return at

    monitor = SyncMonitor(0, 2, completion, 1.0, disrupted=False, fingerprint=lambda: "h", metrics=None,
                          healed_from=lambda: None, lighthouse_restarted=take)
    return monitor, completion, restart


def test_a_noisy_fault_free_run_reports_nothing():
    monitor, completion, _ = _monitor()
    manager = _Manager()
    for i, d in enumerate(_noisy_syncs(500)):
        manager.step += 1
        monitor.after_sync(manager, 10 * i, 10 * i, d, committed=True)
    assert completion.events == [] and monitor.committed == 500


def test_a_lighthouse_restart_disrupts_until_the_next_full_commit():
    monitor, completion, restart = _monitor()
    manager = _Manager()
    monitor.after_sync(manager, 10, 10, 0.02, committed=True)
    restart["at"] = 0.0  # the quorum of the next sync came from a restarted lighthouse
    monitor.after_sync(manager, 20, 20, 0.02, committed=True)
    assert completion.events == ["recovered"]  # full quorum and committed: recovered at once


def test_a_partial_quorum_disrupts_until_every_group_is_back():
    monitor, completion, _ = _monitor()
    manager = _Manager(participants=1)
    monitor.after_sync(manager, 10, 10, 0.02, committed=True)
    assert completion.events == [] and monitor.disrupted and not monitor.full
    manager.participants = 2
    monitor.after_sync(manager, 20, 20, 0.02, committed=True)
    assert completion.events == ["recovered"] and monitor.full


def test_a_disrupted_groups_slow_syncs_are_the_survivors_stall():
    monitor, completion, _ = _monitor()
    manager = _Manager()
    for i in range(20):
        monitor.after_sync(manager, 10 * i, 10 * i, 0.03, committed=True)
    manager.participants = 1  # a peer died: the quorum waited out the heartbeat timeout (below the floor)
    monitor.after_sync(manager, 210, 210, 0.9, committed=True)
    monitor.after_sync(manager, 220, 220, 0.03, committed=True)
    manager.participants = 2
    monitor.after_sync(manager, 230, 230, 0.03, committed=True)
    assert completion.events == ["sync_stall", "recovered"]
