"""The contract between a run's processes: every record one sends another (results, requests, replies, events)
or leaves for later readers (summary.json) as a pydantic model, and the names and periods they share.

Every model refuses unknown keys and does not coerce JSON types (``true`` is
no integer); a field its sender did not set stays out of the JSON it dumps
(:meth:`Record.wire`), so requests and files keep the keys they had. No torch.

``names`` (environment variables, the heartbeat period, closed sets of names),
``records`` (results, requests, events, replies), ``summary`` (summary.json),
``reading`` (a record from JSON, refusals in one line). Import from here.
"""

from localsgd_ft.contract.names import (COMPLETION_ENV, FRESH_ENV, GROUP_ENV, HEARTBEAT_S, NUM_GROUPS_ENV,  # noqa: F401
                                        PARENT_PID_ENV, RUN_ID_ENV, RUN_TOKEN_ENV, TOKEN_HEADER, TORCHFT_LIGHTHOUSE_ENV,
                                        TORCHRUN_ENV, EventKind, Name, Route, StopReason)
from localsgd_ft.contract.reading import REQUESTS, ContractError, one_line, read, read_event, read_request  # noqa: F401
from localsgd_ft.contract.records import (EVENT_MODELS, CheckpointEvent, CompletedRequest, ErrorReply,  # noqa: F401
                                          Evaluation, Event, EventReply, FaultEvent, FinalSync, FinishedRequest,
                                          GroupReport, GroupRequest, HeartbeatRequest, OkReply, Record, RecoveredEvent,
                                          ResumedEvent, StartedReply, StartedRequest, Status, SyncStallEvent,
                                          TrainerResult)
from localsgd_ft.contract.summary import (CheckpointEntry, FaultCounts, GroupSummary, Recovery, Snapshot,  # noqa: F401
                                          Summary)
