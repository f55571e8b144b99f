"""The records one process sends another: a group's result and report, the completion service's requests,
events and replies, each a pydantic model whose fields carry their docs."""

from __future__ import annotations

import typing
from typing import Annotated, Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from localsgd_ft.config import Algorithm, FaultKind, FaultMoment
from localsgd_ft.contract.names import EventKind


def _describe(text: str, default: Any = None) -> Any:
    return Field(default, description=text)


# Validation context for reading a file another version may have written: unknown keys are dropped.
LENIENT = {"lenient": True}


class Record(BaseModel):
    """A record that crosses a process boundary: unknown keys are refused, JSON types are not coerced.

    Read with the :data:`LENIENT` context (files on disk), unknown keys are ignored instead: a
    summary.json written by a newer version still reads.
    """
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _ignore_unknown_when_lenient(cls, data: Any, info: ValidationInfo) -> Any:
        if (info.context or {}).get("lenient") and isinstance(data, dict):
            return {k: v for k, v in data.items() if k in cls.model_fields}
        return data

    def wire(self) -> Dict[str, Any]:
        """Plain JSON values, with only the fields that were set: what is sent or written."""
        return self.model_dump(mode="json", exclude_unset=True)


class Evaluation(Record):
    step: int = Field(description="Local optimizer steps when it was evaluated.")
    test_accuracy: float = Field(description="Top-1 accuracy on the test split, in [0, 1].")


class TrainerResult(Record):
    """What a group's trainer (worker 0) reports at its end; every field may be absent (a group that failed early)."""
    algorithm: Optional[Algorithm] = _describe("The sync algorithm it ran.")
    sync_bytes: Optional[int] = _describe("Bytes it handed to allreduce over its last incarnation.")
    steps: Optional[int] = _describe("Local optimizer steps of its last incarnation.")
    syncs_attempted: Optional[int] = _describe("Syncs it took part in.")
    syncs_committed: Optional[int] = _describe("Syncs it took part in that committed.")
    sync_time_s: Optional[float] = _describe("Seconds it spent in syncs.")
    max_sync_s: Optional[float] = _describe("Its longest sync, in seconds.")
    global_syncs: Optional[int] = _describe("The quorum's committed-sync count when it ended.")
    restarts: Optional[int] = _describe("How many incarnations of the group started before the last one.")
    resumed_from_step: Optional[int] = _describe("The training step it resumed from (0: from scratch).")
    checkpoints_written: Optional[List[int]] = _describe("Training steps at which it wrote a durable checkpoint.")
    params_sha256: Optional[str] = _describe("SHA-256 of its final parameters (absent: it has no final state).")
    worker_params_sha256: Optional[List[str]] = _describe("The same hash from each of its workers, in rank order.")
    final_test_accuracy: Optional[float] = _describe("Top-1 test accuracy of its final parameters.")
    evals: Optional[List[Evaluation]] = _describe("Its evaluations during training (train.eval_every).")
    train_time_s: Optional[float] = _describe("Seconds from its first step to its last.")
    samples_per_s: Optional[float] = _describe("Training throughput (null: it trained no measurable time).")
    peak_rss_mb: Optional[float] = _describe("Peak resident memory of worker 0, in MiB.")
    error: Optional[str] = _describe("Why it did not train to the end (a permanent error, a stop, a loss).")
    permanent: Optional[bool] = _describe("The error is one no restart can fix: torchrun was not left to retry.")
    finished_late: Optional[bool] = _describe(
        "It (re)started after the run's final sync and took the final state instead of training alone.")

    @classmethod
    def failed(cls, result: Optional["TrainerResult"], error: str) -> "TrainerResult":
        """``result`` (or an empty one) with ``error``, unless it says why already: that reason stands."""
        result = result or cls()
        return result if result.error else result.model_copy(update={"error": error})


class GroupReport(Record):
    """How a group ended, as the lighthouse role records it (from its nodes' /finished, or inferred)."""
    group: Optional[int] = _describe("The replica group (where reports are filed by group, the key says it too).")
    exit_code: int = Field(description="Its torchrun's exit code (the first failing node's; -1: declared lost).")
    result: Optional[TrainerResult] = _describe("Its trainer's result (from the node that ran worker 0).")
    declared_lost: bool = _describe("Inferred from silence: a later report of the group replaces it.", False)
    nodes_reported: Optional[List[int]] = _describe("The nodes that reported (a group of several nodes).")


# ---------------------------------------------------------------------------- the completion service's requests

def _in_range(value: int, info: ValidationInfo, count_key: str) -> int:
    """``value`` if it is in 0..count-1 for the run's count in the validation context (none: any)."""
    count = (info.context or {}).get(count_key)
    if count is not None and not 0 <= value < count:
        raise PydanticCustomError("out_of_range", "expected an integer in 0..{last}", {"last": count - 1})
    return value


class GroupRequest(Record):
    """What every request to the completion service names: the group, and which of its nodes sends it."""
    group: int = Field(description="The replica group that sends it (0..replica_groups.count-1).")
    node: int = _describe("Which node of the group sends it (0..replica_groups.nodes-1).", 0)

    @field_validator("group")
    @classmethod
    def _group_of_this_run(cls, value: int, info: ValidationInfo) -> int:
        return _in_range(value, info, "groups")

    @field_validator("node")
    @classmethod
    def _node_of_this_run(cls, value: int, info: ValidationInfo) -> int:
        return _in_range(value, info, "nodes")


class HeartbeatRequest(GroupRequest):
    """POST /heartbeat, every HEARTBEAT_S from each replica role; answered with the /status reply."""


class StartedRequest(GroupRequest):
    """POST /started: the group's Manager is up."""
    incarnation: str = _describe("A fresh id per incarnation: a resent request counts once.", "")


class FinalSync(Record):
    """The run's final sync, as the first group to commit it reported it."""
    group: int = Field(description="The group that reported it first.")
    global_sync: int = Field(description="The quorum's committed-sync count at the final sync.")
    params_sha256: str = Field(description="SHA-256 of the parameters after it.")


class CompletedRequest(GroupRequest, FinalSync):
    """POST /completed: the group committed the final sync."""
    def final(self) -> FinalSync:
        return FinalSync(**self.model_dump(include=set(FinalSync.model_fields)))


class FinishedRequest(GroupRequest):
    """POST /finished: one node's torchrun has exited."""
    exit_code: int = Field(description="torchrun's exit code.")
    result: Optional[TrainerResult] = _describe("The trainer's result (null: none was left).")

    def report(self) -> GroupReport:
        return GroupReport(group=self.group, exit_code=self.exit_code, result=self.result)


# ---------------------------------------------------------------------------- events (POST /event)

_KIND = "What the event reports: it picks the event's model."


class _Event(GroupRequest):
    step: Optional[int] = _describe("The training step when it happened.")
    time: Optional[float] = _describe("The lighthouse role's clock when it arrived (set there, never by a sender).")


class FaultEvent(_Event):
    """A planned failure is about to be injected (accepted only for a failure of this run's plan)."""
    kind: Literal[EventKind.FAULT] = Field(description=_KIND)
    fault: FaultKind = Field(description="What fails.")
    fault_id: int = Field(description="The failure's id in the run's plan: it fires once.")
    target: int = Field(description="The group it hits (-1: the lighthouse).")
    worker: Optional[int] = _describe("The worker of the group it hits.")
    duration_s: Optional[float] = _describe("How long a hang or a lighthouse outage lasts.")
    moment: FaultMoment = _describe("When in the step it strikes.", "step")


class ResumedEvent(_Event):
    """A group's first incarnation resumed (at ``step``; 0: from scratch)."""
    kind: Literal[EventKind.RESUMED] = Field(description=_KIND)


class RecoveredEvent(_Event):
    """A group's first full-quorum commit after a failure, a restart or a stall."""
    kind: Literal[EventKind.RECOVERED] = Field(description=_KIND)
    local_step: Optional[int] = _describe("The group's local optimizer steps then.")
    participants: Optional[int] = _describe("Groups in the quorum.")
    global_sync: Optional[int] = _describe("The quorum's committed-sync count.")
    params_sha256: Optional[str] = _describe("SHA-256 of the group's parameters after the commit.")
    healed_from: Optional[int] = _describe("The group whose live state it loaded (null: none).")
    disrupted_s: Optional[float] = _describe("Seconds from the disruption to this commit.")


class SyncStallEvent(_Event):
    """A sync took far longer than usual (see docs/fault-tolerance.md)."""
    kind: Literal[EventKind.SYNC_STALL] = Field(description=_KIND)
    local_step: Optional[int] = _describe("The group's local optimizer steps then.")
    duration_s: float = Field(description="How long the sync took, in seconds.")
    committed: Optional[bool] = _describe("Whether it committed.")
    participants: Optional[int] = _describe("Groups in its quorum.")


class CheckpointEvent(_Event):
    """A group wrote a durable checkpoint (at ``step``)."""
    kind: Literal[EventKind.CHECKPOINT] = Field(description=_KIND)
    sync: Optional[int] = _describe("The quorum's committed-sync count it holds.")


Event = Annotated[Union[FaultEvent, ResumedEvent, RecoveredEvent, SyncStallEvent, CheckpointEvent],
                  Field(discriminator="kind")]
EVENT_MODELS: Dict[EventKind, type] = {m.model_fields["kind"].annotation.__args__[0]: m
                                       for m in typing.get_args(typing.get_args(Event)[0])}
assert set(EVENT_MODELS) == set(EventKind), "every event kind has its model"


# ---------------------------------------------------------------------------- replies

class Status(Record):
    """GET /status (and the answer to every heartbeat): where the run stands."""
    run: str = Field(description="The run id.")
    started: List[int] = Field(description="The groups that reported /started.")
    expected: int = Field(description="replica_groups.count.")
    fired: List[int] = Field(description="The ids of the planned failures that fired.")
    finished: List[int] = Field(description="The groups that have finished (or were declared lost).")
    abort: Optional[str] = Field(description="Why the run was aborted (null: it goes on).")
    completed: Optional[FinalSync] = Field(description="The run's final sync (null: training goes on).")
    lighthouse_incarnation: int = Field(description="How many times the torchft lighthouse was started.")


class OkReply(Record):
    ok: bool = Field(description="Always true.")


class StartedReply(OkReply):
    restarts: int = Field(description="How many incarnations of the group started before this one.")


class EventReply(Record):
    first: bool = Field(description="False if the event's fault_id had already fired.")


class ErrorReply(Record):
    error: str = Field(description="Why the request was refused (one line).")
