"""The record of fired failures beside the checkpoints: a whole-job restart (Slurm's requeue after a node
failure) resumes without firing them again, --fresh starts over with them, and a damaged record refuses."""

from __future__ import annotations

import pytest

from localsgd_ft.contract import EventKind
from localsgd_ft.launch.completion.state import CompletionState
from localsgd_ft.storage import fired_faults
from localsgd_ft.storage.fired_faults import FIRED_FILE, FiredFaultsUnreadable
from localsgd_ft.storage.set_aside import check_checkpoints, set_aside_checkpoints


def test_what_fired_is_read_back_and_only_for_failures_still_planned(tmp_path):
    assert fired_faults.load(tmp_path, [0, 1]) == []  # a first job: nothing fired
    fired_faults.save(tmp_path, [2, 0, 0])
    assert fired_faults.load(tmp_path, [0, 1]) == [0]  # a failure no longer planned is forgotten
    assert fired_faults.load(tmp_path, [0, 1, 2]) == [0, 2]
    assert [p.name for p in tmp_path.iterdir()] == [FIRED_FILE]  # written atomically: no temporary left


@pytest.mark.parametrize("text", ["not json", '{"fired": [1, "x"]}', '{"fired": true}', '[]', '{"fired": [true]}'])
def test_a_damaged_record_refuses_with_the_file_and_the_fix(tmp_path, text):
    (tmp_path / FIRED_FILE).write_text(text)
    with pytest.raises(FiredFaultsUnreadable, match=rf"{FIRED_FILE} cannot be read .*remove it.*--fresh"):
        fired_faults.load(tmp_path, [0, 1])


def test_starting_over_sets_the_record_aside_with_the_checkpoints(tmp_path):
    fired_faults.save(tmp_path, [0])
    (tmp_path / "step_00000010.pt").write_bytes(b"x")
    assert sorted(check_checkpoints(tmp_path)) == [FIRED_FILE, "step_00000010.pt"]  # ours, not foreign
    assert set_aside_checkpoints(tmp_path) is not None
    assert fired_faults.load(tmp_path, [0]) == []


def test_a_remembered_failure_is_refused_by_the_service_so_it_never_fires_twice():
    state = CompletionState(2, "run", {0: "host_down", 1: "kill"})
    state.remember_fired([0])
    assert state.status()["fired"] == [0]
    fault = {"kind": EventKind.FAULT.value, "group": 1, "fault": "host_down", "fault_id": 0, "target": 1}
    assert not state.add_event(dict(fault))
    assert state.add_event({**fault, "fault": "kill", "fault_id": 1}) and state.fired_ids() == [0, 1]
