"""The records one process sends another: a group's result and report, the completion service's requests,
events and replies, each a pydantic model whose fields carry their docs.

Every record is bounded: lists that grow with a run are thinned (their counts kept) and long texts cut as
they are built, so a group's result fits the completion service's body cap however long the run was.
"""

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

# What a result holds at most. With these a result of 64-bit numbers stays under half the completion
# service's 1 MiB body cap (tests/test_completion_limits.py builds the largest one there can be).
MAX_EVALS = 1000  # evaluations listed; beyond, older ones are thinned (evals_count keeps the total)
MAX_CHECKPOINTS_LISTED = 1000  # checkpoint steps listed: the newest (checkpoints_count keeps the total)
MAX_WORKERS = 4096  # workers of one group whose hashes a result lists (nodes x workers)
MAX_QUIET_S = 86400.0 * 365  # a trainer's silence, as a role reports it (a year: any real one fits)
MAX_TEXT = 4000  # characters of an error or a reason; a longer one keeps its start and its end
Digest = Annotated[str, Field(max_length=64)]  # a SHA-256 in hex


def clip(text: str, limit: int = MAX_TEXT) -> str:
    """``text`` cut to about ``limit`` characters: its start (what failed) and its end (the innermost cause)."""
    if len(text) <= limit:
        return text
    keep = (limit - 40) // 2
    return f"{text[:keep]} [... {len(text) - 2 * keep} characters cut ...] {text[-keep:]}"


class Record(BaseModel):
    """A record that crosses a process boundary: unknown keys are refused, JSON types are not coerced.

    Read with the :data:`LENIENT` context (files on disk), unknown keys are ignored instead: a
    summary.json written by a newer version still reads.
    """
    # Not a number (NaN, Infinity) is refused: summary.json must stay JSON that any reader takes.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

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

    @staticmethod
    def thin(evals: List[Any], cap: int = MAX_EVALS) -> List[Any]:
        """``evals`` (in order) cut to at most ``cap`` by dropping every other one until they fit; the first and
        the latest always stay. Appending and thinning at the cap keeps recent ones dense and older ones sparse."""
        if cap < 2:
            raise ValueError(f"cap: got {cap}, expected at least 2 (the first and the latest)")
        while len(evals) > cap:
            kept = evals[::2]
            evals = kept if len(evals) % 2 else kept + evals[-1:]
        return evals


def _fit_result(data: Dict[str, Any]) -> Dict[str, Any]:
    """A result's JSON values with its growing lists thinned and its error cut (see the MAX_ limits)."""
    evals, written, error = data.get("evals"), data.get("checkpoints_written"), data.get("error")
    fitted = dict(data)
    if isinstance(evals, list) and len(evals) > MAX_EVALS:
        fitted["evals"] = Evaluation.thin(evals)
        fitted.setdefault("evals_count", len(evals))
    if isinstance(written, list) and len(written) > MAX_CHECKPOINTS_LISTED:
        fitted["checkpoints_written"] = written[-MAX_CHECKPOINTS_LISTED:]
        fitted.setdefault("checkpoints_count", len(written))
    if isinstance(error, str):
        fitted["error"] = clip(error)
    return fitted


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
    checkpoints_written: Optional[List[int]] = _describe(
        f"Training steps at which it wrote a durable checkpoint (the newest {MAX_CHECKPOINTS_LISTED}).")
    checkpoints_count: Optional[int] = _describe("How many checkpoints it wrote, when more than are listed.")
    params_sha256: Optional[Digest] = _describe("SHA-256 of its final parameters (absent: it has no final state).")
    worker_params_sha256: Optional[List[Digest]] = Field(
        None, max_length=MAX_WORKERS, description="The same hash from each of its workers, in rank order.")
    final_test_accuracy: Optional[float] = _describe("Top-1 test accuracy of its final parameters.")
    evals: Optional[List[Evaluation]] = _describe(
        f"Its evaluations during training (train.eval_every): all of them up to {MAX_EVALS}; beyond, a thinned "
        "selection, denser towards the end (the first and the latest always among them).")
    evals_count: Optional[int] = _describe("How many evaluations it made (evals may list fewer).")
    train_time_s: Optional[float] = _describe("Seconds from its first step to its last.")
    samples_per_s: Optional[float] = _describe("Training throughput (null: it trained no measurable time).")
    peak_rss_mb: Optional[float] = _describe("Peak resident memory of worker 0, in MiB.")
    error: Optional[str] = _describe(
        f"Why it did not train to the end (a permanent error, a stop, a loss); at most about {MAX_TEXT} characters.")
    permanent: Optional[bool] = _describe("The error is one no restart can fix: torchrun was not left to retry.")
    finished_late: Optional[bool] = _describe(
        "It (re)started after the run's final sync and took the final state instead of training alone.")

    @model_validator(mode="before")
    @classmethod
    def _fit(cls, data: Any) -> Any:
        return _fit_result(data) if isinstance(data, dict) else data

    @classmethod
    def failed(cls, result: Optional["TrainerResult"], error: str) -> "TrainerResult":
        """``result`` (or an empty one) with ``error``, unless it says why already: that reason stands."""
        result = result or cls()
        return result if result.error else result.model_copy(update={"error": clip(error)})


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
    trainer_quiet_s: Optional[float] = Field(
        None, ge=0, le=MAX_QUIET_S,
        description="Seconds since the quietest of this node's trainers last showed it lives (null: none runs).")


class StartedRequest(GroupRequest):
    """POST /started: the group's Manager is up."""
    incarnation: str = Field("", max_length=64, description="A fresh id per incarnation: a resent request counts "
                                                                "once.")


class FinalSync(Record):
    """The run's final sync, as the first group to commit it reported it."""
    group: int = Field(description="The group that reported it first.")
    global_sync: int = Field(description="The quorum's committed-sync count at the final sync.")
    params_sha256: Digest = Field(description="SHA-256 of the parameters after it.")


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
    step: int = Field(description="The training step it resumed from (0: from scratch).")


class RecoveredEvent(_Event):
    """A group's first full-quorum commit after a failure, a restart or a stall."""
    kind: Literal[EventKind.RECOVERED] = Field(description=_KIND)
    local_step: Optional[int] = _describe("The group's local optimizer steps then.")
    participants: Optional[int] = _describe("Groups in the quorum.")
    global_sync: Optional[int] = _describe("The quorum's committed-sync count.")
    params_sha256: Optional[Digest] = _describe("SHA-256 of the group's parameters after the commit.")
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
    step: int = Field(description="The training step it holds.")
    sync: Optional[int] = _describe("The quorum's committed-sync count it holds.")


class CheckpointFailedEvent(_Event):
    """A group could not write a checkpoint (a full disk, a quota): it stopped writing them and trains on."""
    kind: Literal[EventKind.CHECKPOINT_FAILED] = Field(description=_KIND)
    step: int = Field(description="The training step it tried to save.")
    error: str = Field(max_length=MAX_TEXT, description=f"Why the write failed (at most {MAX_TEXT} characters).")


class TrainerFrozenEvent(_Event):
    """A replica role ended a trainer that showed no sign of life for replica_groups.trainer_timeout_s."""
    kind: Literal[EventKind.TRAINER_FROZEN] = Field(description=_KIND)
    worker: int = Field(description="The worker's local rank on its node.")
    quiet_s: float = Field(description="Seconds it had been silent.")


class SyncAbandonedEvent(_Event):
    """A group stopped waiting for a sync's collective because a peer in it fell silent (or it was cut off)."""
    kind: Literal[EventKind.SYNC_ABANDONED] = Field(description=_KIND)
    silent: List[int] = Field(max_length=4096, description="The groups of the quorum that had fallen silent "
                                                            "(empty: this group could not reach the lighthouse role).")
    waited_s: float = Field(description="Seconds it had waited in the collective.")


class NodeSilentEvent(_Event):
    """A replica role ended its node's trainers because another node of its group fell silent: they would wait
    for it in the group's own collectives while their Manager, heartbeating, held every other group's quorum."""
    kind: Literal[EventKind.NODE_SILENT] = Field(description=_KIND)
    silent_node: int = Field(description="The node of the group that fell silent.")
    silent_s: float = Field(description="Seconds it had been silent, as the completion service counted them.")
    workers: int = Field(description="How many of this node's trainers the role ended.")


Event = Annotated[Union[FaultEvent, ResumedEvent, RecoveredEvent, SyncStallEvent, CheckpointEvent,
                        CheckpointFailedEvent, TrainerFrozenEvent, SyncAbandonedEvent, NodeSilentEvent],
                  Field(discriminator="kind")]
EVENT_MODELS: Dict[EventKind, type] = {m.model_fields["kind"].annotation.__args__[0]: m
                                       for m in typing.get_args(typing.get_args(Event)[0])}
assert set(EVENT_MODELS) == set(EventKind), "every event kind has its model"


# ---------------------------------------------------------------------------- replies

class SilentNode(Record):
    """A node of a group still training whose role, or a trainer on it, has fallen silent."""
    group: int = Field(description="Its replica group.")
    node: int = Field(description="Which node of the group (0..replica_groups.nodes-1).")
    silent_s: float = Field(description="Seconds since it last showed it lives.")


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
    silent: List[int] = Field(
        default_factory=list, max_length=4096,
        description="Groups not finished whose role, or whose trainer, has been silent longer than "
                    "lighthouse.heartbeat_timeout_ms: a sync waiting on them stops waiting.")
    silent_nodes: List[SilentNode] = Field(
        default_factory=list, max_length=4096,
        description="With several nodes per group: which nodes those are (the other nodes of such a group "
                    "end their trainers, which would wait for it).")


class OkReply(Record):
    ok: bool = Field(description="Always true.")


class StartedReply(OkReply):
    restarts: int = Field(description="How many incarnations of the group started before this one.")


class EventReply(Record):
    first: bool = Field(description="False if the event's fault_id had already fired.")


class ErrorReply(Record):
    error: str = Field(description="Why the request was refused (one line).")
