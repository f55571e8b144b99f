"""summary.json's fault accounting, from a hand-made event log (pure logic; the real thing runs in test_integration)."""

from __future__ import annotations

import json

import pytest

from localsgd_ft.config import parse_config
from localsgd_ft.launch.completion.state import CompletionState
from localsgd_ft.results.summary import build_summary


def _state(events, finished):
    """The lighthouse role's snapshot of what the groups reported (event times as given)."""
    return {"events": [dict(e) for e in events], "finished": {g: dict(r) for g, r in finished.items()},
            "abort": None, "completed": None}


OK = {"exit_code": 0, "result": {"params_sha256": "h", "final_test_accuracy": 0.9}}


def test_recovery_and_survivor_stall_are_paired_with_their_fault():
    events = [
        {"group": 1, "kind": "fault", "fault": "kill", "fault_id": 0, "target": 1, "step": 100, "time": 10.0},
        {"group": 0, "kind": "sync_stall", "duration_s": 1.2, "time": 11.5},
        {"group": 0, "kind": "recovered", "time": 14.0, "global_sync": 20},
        {"group": 1, "kind": "recovered", "time": 14.5, "global_sync": 20},
        {"group": 0, "kind": "fault", "fault": "lighthouse", "fault_id": 1, "target": -1, "step": 300, "time": 30.0},
        {"group": 1, "kind": "sync_stall", "duration_s": 3.5, "time": 33.6},
        {"group": 1, "kind": "recovered", "time": 33.6, "global_sync": 40},
    ]
    s = build_summary(parse_config({}), _state(events, {0: OK, 1: OK}), 0.0, "c.yaml", 1, 20.0)
    kill, lh = s["recoveries"]
    assert kill == {"fault_id": 0, "kind": "kill", "moment": "step", "group": 1, "step": 100, "recovered": True,
                    "recovery_s": 4.5, "survivor_stall_s": 1.2}
    assert lh["group"] is None and lh["recovery_s"] == 3.6 and lh["survivor_stall_s"] == 3.5
    assert s["faults"] == {"planned": 0, "injected": 2, "by_kind": {"kill": 1, "lighthouse": 1}}
    assert s["succeeded"] and s["lighthouse_restarts"] == 1


def test_a_fault_id_fires_once():
    state = CompletionState(2)
    assert state.add_event({"group": 0, "kind": "fault", "fault_id": 3})
    assert not state.add_event({"group": 1, "kind": "fault", "fault_id": 3})
    assert state.status()["fired"] == [3] and len(state.events) == 1


def test_verdicts():
    cfg = parse_config({"lighthouse": {"min_replicas": 1}})
    lost = build_summary(cfg, _state([], {0: OK, 1: {"exit_code": 1, "result": None}}), 0.0, "c", 0, 1.0)
    assert lost["succeeded"] and lost["lost_groups"] == [1]
    differ = {"exit_code": 0, "result": {"params_sha256": "other", "final_test_accuracy": 0.9}}
    bad = build_summary(cfg, _state([], {0: OK, 1: differ}), 0.0, "c", 0, 1.0)
    assert not bad["succeeded"] and "different parameters" in bad["failure_reason"]
    workers_differ = {"exit_code": 0, "result": {"params_sha256": "h", "final_test_accuracy": 0.9,
                                                 "worker_params_sha256": ["h", "x"]}}
    split = build_summary(cfg, _state([], {0: OK, 1: workers_differ}), 0.0, "c", 0, 1.0)
    assert not split["succeeded"] and not split["params_identical"]
    assert split["failure_reason"] == "the workers of replica group(s) 1 finished with different parameters"
    assert split["replica_groups"]["1"]["ranks_identical"] is False and split["replica_groups"]["0"]["ranks_identical"]
    two = {"exit_code": 0, "result": {"params_sha256": "h", "final_test_accuracy": 0.9,
                                      "worker_params_sha256": ["h", "h"]}}
    agree = build_summary(cfg, _state([], {0: two, 1: two}), 0.0, "c", 0, 1.0)
    assert agree["succeeded"] and agree["params_identical"] and agree["replica_groups"]["0"]["ranks_identical"]
    partial = build_summary(cfg, _state([], {0: OK}), 0.0, "c", 0, 1.0)
    assert not partial["succeeded"] and "before every replica group finished" in partial["failure_reason"]


def test_a_stall_counts_for_the_latest_failure_before_it_ended():
    """Failures closer together than a recovery: each stall is charged once, to its own failure."""
    events = [
        {"group": 0, "kind": "fault", "fault": "lighthouse", "fault_id": 0, "target": -1, "step": 10, "time": 10.0},
        {"group": 1, "kind": "recovered", "time": 10.5, "global_sync": 3},
        {"group": 0, "kind": "fault", "fault": "lighthouse", "fault_id": 1, "target": -1, "step": 30, "time": 12.0},
        {"group": 0, "kind": "sync_stall", "duration_s": 3.1, "time": 15.1},
        {"group": 0, "kind": "recovered", "time": 15.1, "global_sync": 5},
    ]
    first, second = build_summary(parse_config({}), _state(events, {0: OK, 1: OK}), 0.0, "c", 2, 1.0)["recoveries"]
    assert first["survivor_stall_s"] == 0.0 and second["survivor_stall_s"] == 3.1


def test_a_group_of_several_nodes_finishes_when_all_have_reported_or_one_failed():
    state = CompletionState(2, nodes=2)
    result = {"params_sha256": "h", "final_test_accuracy": 0.9}
    state.mark_finished(0, {"group": 0, "exit_code": 0, "result": None}, node=1)  # worker 0 ran on node 0
    assert 0 not in state.finished
    state.mark_finished(0, {"group": 0, "exit_code": 0, "result": result}, node=0)
    assert state.finished[0] == {"group": 0, "exit_code": 0, "result": result, "nodes_reported": [0, 1]}
    # One node failing ends its group soon after: it cannot go on without it.
    state.heartbeat(1, node=0)
    state.mark_finished(1, {"group": 1, "exit_code": 1, "result": {"error": "boom"}}, node=1)
    assert 1 not in state.finished and state.settle_failing(grace_s=60) == []
    assert state.settle_failing(grace_s=0) == [1]
    assert state.finished[1]["exit_code"] == 1 and state.finished[1]["result"] == {"error": "boom"}


def test_a_silent_node_loses_its_group_and_only_all_its_nodes_can_say_otherwise():
    state = CompletionState(1, nodes=2)
    state.heartbeat(0, node=0)
    state.heartbeat(0, node=1)
    state.last_seen[(0, 1)] -= 100  # node 1 went silent
    assert [g for g, _ in state.declare_silent_lost(10)] == [0]
    assert state.finished[0]["result"]["error"].startswith("role lost: no heartbeat from node 1 for ")
    state.mark_finished(0, {"group": 0, "exit_code": 1, "result": None}, node=0)  # node 0 gave up waiting
    assert state.finished[0]["declared_lost"]  # the reason stays: node 1's loss
    never = CompletionState(1, nodes=2)
    never.heartbeat(0, node=0)
    assert never.declare_never_seen_lost(30) == [0]
    assert "from node 1 never reached" in never.finished[0]["result"]["error"]


def test_the_lighthouse_role_counts_each_groups_incarnations():
    # torchrun's restart count is per agent, and a multi-node group's agents may count differently.
    state = CompletionState(2)
    assert state.mark_started(0, "first") == 0
    assert state.mark_started(0, "first") == 0  # a resent request counts once
    assert state.mark_started(0, "second") == 1
    assert state.mark_started(1, "other") == 0


def test_a_node_failing_after_its_sibling_fell_silent_blames_the_sibling():
    state = CompletionState(1, nodes=2)
    state.heartbeat(0, node=0)
    state.heartbeat(0, node=1)  # ... and never again: node 1 is gone
    state.mark_finished(0, {"group": 0, "exit_code": 1, "result": None}, node=0)
    assert state.settle_failing(grace_s=0) == [0]
    assert state.finished[0]["result"]["error"].startswith("role lost: no heartbeat from node 1 for ")
    alive = CompletionState(1, nodes=2)
    alive.mark_finished(0, {"group": 0, "exit_code": 1, "result": None}, node=0)
    alive.heartbeat(0, node=1)  # heard from after the failure: not to blame
    assert alive.settle_failing(grace_s=0) == [0] and alive.finished[0]["result"] is None


def test_a_summary_written_by_another_version_still_reads(tmp_path):
    """Readers (report, compare, sweep's skip of finished points) take unknown keys in summary.json as absent."""
    from localsgd_ft.contract import Summary

    s = build_summary(parse_config({}), _state([], {0: OK, 1: OK}), 0.0, "c.yaml", 0, 1.0)
    s["added_later"] = {"x": 1}
    s["replica_groups"]["0"]["added_later"] = 2
    (tmp_path / "summary.json").write_text(json.dumps(s))
    loaded = Summary.load(tmp_path / "summary.json")
    assert loaded.succeeded and loaded.replica_groups["0"].params_sha256 == s["replica_groups"]["0"]["params_sha256"]


def test_a_summary_that_cannot_be_built_still_gives_a_verdict(monkeypatch):
    """The lighthouse role never ends without summary.json: if building it fails, the summary says why."""
    from localsgd_ft.launch import lighthouse_role

    def broken(*args, **kwargs):
        raise KeyError("finished")

    monkeypatch.setattr(lighthouse_role, "summarize", broken)
    cfg = parse_config({})
    summary = lighthouse_role._summary(cfg, CompletionState(2), 0.0, "c.yaml", 0, None, False).wire()
    assert summary["succeeded"] is False and "the summary could not be built: KeyError" in summary["failure_reason"]
    # summary.json's contract holds even then: the keys every reader looks for are there.
    assert summary["final_test_accuracy"] is None and summary["replica_groups"] == {}
    assert summary["config"] == cfg.model_dump()


def test_an_event_the_summary_needs_whole_is_refused_at_the_door():
    """A resumed or checkpoint event without its step was stored, and then broke summary.json at the end (min()
    of None, a checkpoint entry without its step): the lighthouse role fell back to 'the summary could not be
    built' for a run that had trained well."""
    from localsgd_ft.contract import ContractError, Route, read_request

    for kind in ("resumed", "checkpoint"):
        with pytest.raises(ContractError, match="step: missing"):
            read_request(Route.EVENT, {"group": 0, "kind": kind}, 2, 1)
    state = CompletionState(2)
    for body in ({"group": 0, "kind": "resumed", "step": 0}, {"group": 1, "kind": "checkpoint", "step": 50}):
        state.add_event(read_request(Route.EVENT, body, 2, 1).wire())
    s = build_summary(parse_config({}), state.snapshot() | {"finished": {0: OK, 1: OK}}, 0.0, "c", 0, 1.0)
    assert s["succeeded"] and s["resumed_from_step"] == 0
    assert s["checkpoints_written"] == [{"step": 50, "sync": None, "group": 1}]


def test_events_without_the_services_stamp_are_left_out_of_the_recoveries():
    """Only the service stamps events; a snapshot made otherwise (without times) still gives a summary."""
    events = [{"group": 1, "kind": "fault", "fault": "kill", "fault_id": 0, "target": 1, "step": 100},
              {"group": 1, "kind": "recovered", "time": 14.5, "global_sync": 20},
              {"group": 0, "kind": "sync_stall", "duration_s": 1.2}]
    s = build_summary(parse_config({}), _state(events, {0: OK, 1: OK}), 0.0, "c.yaml", 0, 1.0)
    assert s["succeeded"] and s["recoveries"] == [] and s["faults"]["injected"] == 1
    json.dumps(s, allow_nan=False)
