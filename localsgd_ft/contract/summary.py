"""summary.json as a typed record: the run's verdict, each group's result, recoveries and events."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

from pydantic import Field

from localsgd_ft.config import Algorithm, FaultKind, FaultMoment
from localsgd_ft.contract.reading import read
from localsgd_ft.contract.records import LENIENT, Event, FinalSync, GroupReport, Record, TrainerResult, _describe


class GroupSummary(TrainerResult):
    """One group in summary.json: its result, and what the lighthouse role computed from it."""
    exit_code: Optional[int] = _describe("Its torchrun's exit code (null: it never reported).")
    succeeded: bool = _describe("It exited 0 with final parameters.", False)
    lost: bool = _describe("It failed (restarts exhausted, a permanent error, declared lost).", False)
    ranks_identical: Optional[bool] = _describe("All its workers ended with the same parameters (null: none).")


class Recovery(Record):
    fault_id: Optional[int] = _describe("The failure's id in the plan.")
    kind: Optional[FaultKind] = _describe("What failed.")
    moment: FaultMoment = _describe("When in the step it struck.", "step")
    group: Optional[int] = _describe("The group it hit (null: the lighthouse).")
    step: Optional[int] = _describe("The training step it struck at.")
    recovered: bool = _describe("The hit group (any group, for the lighthouse) committed with all groups since.", False)
    recovery_s: Optional[float] = _describe("Seconds to that first full-quorum commit.")
    survivor_stall_s: float = _describe("The longest stall of the other groups meanwhile, in seconds.", 0.0)


class FaultCounts(Record):
    planned: int = _describe("Failures in the plan.", 0)
    injected: int = _describe("Failures that fired.", 0)
    by_kind: Dict[str, int] = Field(default_factory=dict, description="Failures that fired, by kind.")


class CheckpointEntry(Record):
    step: int = Field(description="The training step it holds.")
    sync: Optional[int] = _describe("The quorum's committed-sync count it holds.")
    group: int = Field(description="The group that wrote it.")


def _listing(text: str) -> Any:
    return Field(default_factory=list, description=text)


class Summary(Record):
    """summary.json; readers also take older files, whose missing keys read as their defaults."""
    name: Optional[str] = _describe("The experiment's name.")
    algorithm: Algorithm = _describe("localsgd.algorithm.", "localsgd")
    run_id: Optional[str] = _describe("The launch's run id.")
    config_path: Optional[str] = _describe("The config file it ran.")
    succeeded: bool = _describe("The verdict: enough groups trained to the end with identical parameters.", False)
    stopped: bool = _describe("Stopped by a signal (Ctrl-C, a cancel, the client gone): resumable.", False)
    failure_reason: Optional[str] = _describe("Why it failed (null: it succeeded).")
    final_test_accuracy: Optional[float] = _describe("The first group that trained to the end: its accuracy.")
    params_identical: bool = _describe("Every worker of every group that finished holds the same parameters.", False)
    lost_groups: List[int] = _listing("The groups that failed.")
    lost_reasons: Dict[str, str] = Field(default_factory=dict, description="Why each lost group failed.")
    completed: Optional[FinalSync] = _describe("The run's final sync (null: never reached).")
    resumed_from_step: int = _describe("The earliest step a first incarnation resumed from.", 0)
    checkpoints_written: List[CheckpointEntry] = _listing("Every durable checkpoint written, in order.")
    checkpoints_stopped: Optional[str] = _describe(
        "Why checkpoints stopped (the first failed write: group, step, error; null: none failed). Training went on.")
    wall_time_s: Optional[float] = _describe("Seconds from the lighthouse role's start to the summary.")
    lighthouse_peak_rss_mb: Optional[float] = _describe("Peak resident memory of the lighthouse role, in MiB.")
    lighthouse_restarts: int = _describe("How often the torchft lighthouse was restarted.", 0)
    faults: FaultCounts = Field(default_factory=FaultCounts, description="Planned and injected failures.")
    recoveries: List[Recovery] = _listing("One per injected failure: how the run recovered.")
    events: List[Event] = _listing("Every event reported, stamped with the lighthouse role's clock.")
    replica_groups: Dict[str, GroupSummary] = Field(default_factory=dict, description="Each group, by id.")
    config: Dict[str, Any] = Field(default_factory=dict, description="The resolved config it ran.")

    @classmethod
    def of(cls, summary: Union["Summary", Mapping[str, Any]]) -> "Summary":
        """``summary`` as a Summary (a parsed summary.json as it is; unknown keys are ignored); ContractError if
        it is not one."""
        return summary if isinstance(summary, Summary) else read(cls, summary, LENIENT)

    @classmethod
    def load(cls, path: Path) -> "Summary":
        """Read summary.json at ``path`` (OSError, ValueError: unreadable, not JSON, or not a summary)."""
        return read(cls, json.loads(Path(path).read_text()), LENIENT)

    def groups(self) -> List[GroupSummary]:
        """The groups in id order."""
        return [g for _, g in sorted(self.replica_groups.items(), key=lambda kv: int(kv[0]))]


SummaryLike = Union[Summary, Mapping[str, Any]]  # a Summary, or summary.json as JSON values (see Summary.of)


class Snapshot(Record):
    """What the lighthouse role's completion state holds at the end: the input of summary.json."""
    finished: Dict[int, GroupReport] = Field(description="Each group that finished, by id.")
    events: List[Event] = Field(description="Every event, in order of arrival.")
    abort: Optional[str] = Field(description="Why the run was aborted (null: it was not).")
    abort_quoted: Dict[int, str] = Field(default_factory=dict, description="The groups' errors the abort names.")
    completed: Optional[FinalSync] = Field(description="The run's final sync (null: never reached).")
