"""The contract between a run's processes: every record one sends another (results, requests, replies, events)
or leaves for later readers (summary.json) as a pydantic model, and the names and periods they share.

Every model refuses unknown keys and does not coerce JSON types (``true`` is
no integer); a field its sender did not set stays out of the JSON it dumps
(:meth:`Record.wire`), so requests and files keep the keys they had. No torch.

``names`` (environment variables, the heartbeat period, closed sets of names),
``records`` (results, requests, events, replies), ``summary`` (summary.json),
``reading`` (a record from JSON, refusals in one line). Import from here: each name is loaded
on first use, so a process that needs only ``names`` (a torchrun worker arming its parent-death
signal) does not pay for pydantic. ``HEARTBEAT_S`` comes from the config, which judges
``lighthouse.role_timeout_s`` against it.
"""

from __future__ import annotations

import importlib
from typing import Any, Dict, List

_EXPORTS: Dict[str, List[str]] = {
    "localsgd_ft.contract.names": [
        "COMPLETION_ENV", "EventKind", "FRESH_ENV", "GROUP_ENV", "NUM_GROUPS_ENV", "Name", "PARENT_PID_ENV",
        "RUN_ID_ENV", "RUN_TOKEN_ENV", "Route", "StopReason", "TOKEN_HEADER", "TORCHFT_LIGHTHOUSE_ENV",
        "TORCHRUN_ENV", "TORCHRUN_RESTARTS_ENV", "LIVENESS_DIR_ENV", "SUMMARY_FILE", "CONFIG_FILE", "METRICS_DIR",
        "REPORT_DIR", "GROUPS_DIR", "TESTBED_MARK"],
    "localsgd_ft.contract.records": [
        "CheckpointEvent", "CheckpointFailedEvent", "CompletedRequest", "EVENT_MODELS", "LENIENT", "ErrorReply", "Evaluation", "Event",
        "EventReply", "FaultEvent", "FinalSync", "FinishedRequest", "GroupReport", "GroupRequest",
        "HeartbeatRequest", "NodeSilentEvent", "OkReply", "Record", "RecoveredEvent", "ResumedEvent", "StartedReply",
        "SilentNode", "StartedRequest", "Status", "SyncAbandonedEvent", "SyncStallEvent", "TrainerFrozenEvent", "TrainerResult",
        "clip"],
    "localsgd_ft.contract.summary": [
        "CheckpointEntry", "FaultCounts", "GroupSummary", "Recovery", "Snapshot", "Summary", "SummaryLike"],
    "localsgd_ft.contract.reading": [
        "ContractError", "REQUESTS", "read", "read_event", "read_json", "read_request"],
    "localsgd_ft.config": ["HEARTBEAT_S"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> List[str]:
    return __all__
