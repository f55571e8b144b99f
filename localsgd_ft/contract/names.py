"""The names a run's processes share: environment variables, the token header, closed sets of names.

Standard library only: a torchrun worker imports this before it arms its parent-death signal.
"""

from __future__ import annotations

from enum import Enum

# Environment variables, and who sets them for whom.
RUN_ID_ENV = "LOCALSGD_FT_RUN_ID"  # the component, for every process of the run: the run id
RUN_TOKEN_ENV = "LOCALSGD_FT_RUN_TOKEN"  # the component, for every process: the completion service's token
PARENT_PID_ENV = "LOCALSGD_FT_CLIENT_PID"  # the component, locally: the pid every role's parent must have
FRESH_ENV = "LOCALSGD_FT_FRESH"  # the component, for every role: "1" ignores old checkpoints (--fresh)
GROUP_ENV = "REPLICA_GROUP_ID"  # the component, for a replica role and (through it) its trainers
NUM_GROUPS_ENV = "NUM_REPLICA_GROUPS"  # the same: replica_groups.count
COMPLETION_ENV = "LOCALSGD_FT_COMPLETION"  # a replica role, for its trainers: the completion service's URL
TORCHFT_LIGHTHOUSE_ENV = "TORCHFT_LIGHTHOUSE"  # a replica role, for torchft's Managers: the lighthouse's URL
LIVENESS_DIR_ENV = "LOCALSGD_FT_LIVENESS_DIR"  # a replica role, for its trainers: where each worker shows it lives
TORCHRUN_ENV = "TORCHELASTIC_RUN_ID"  # torchrun, in its workers: a process that has it runs under torchrun
TORCHRUN_RESTARTS_ENV = "TORCHELASTIC_RESTART_COUNT"  # torchrun, in its workers: how often it restarted them
TOKEN_HEADER = "X-LocalSGD-Run-Token"  # the HTTP header that carries the run token on every request
# The multi-host test bed (tests/hosts.py), for the failures of a whole host: a line of each bed host's
# /etc/hosts, "<mark> link=<its bridge port> root=<the root namespace's name under ip netns>", that says
# where its link lives. Only such a host can be cut off or taken down by a `partition` or `host_down` fault.
TESTBED_MARK = "# localsgd-ft test bed host:"

# The run directory (output_dir/name): what each process of the run writes there.
SUMMARY_FILE = "summary.json"  # the lighthouse role: the verdict
CONFIG_FILE = "config.yaml"  # the lighthouse role: the config this run ran, every default filled in
METRICS_DIR = "metrics"  # the trainers: one JSON-lines file per group
REPORT_DIR = "report"  # the report: tables and plots
GROUPS_DIR = "groups"  # each group's worker 0: its final result, which its replica role reports


class Name(str, Enum):
    """A closed set of names: compares, prints and serialises as its plain string value."""

    def __str__(self) -> str:  # and so format() and f-strings too, on every Python from 3.10
        return str(self.value)


class StopReason(Name):
    """Why a replica role stops its torchrun before it ends by itself."""
    ABORTED = "aborted"  # the lighthouse role aborted the run
    REFUSED = "refused"  # the completion service refused this role
    UNREACHABLE = "unreachable"  # the lighthouse role did not answer for lighthouse.role_timeout_s
    SIGNAL = "signal"  # SIGTERM or SIGINT: Ctrl-C, a scheduler's cancel, the client gone


class EventKind(Name):
    """What an event reports; each kind has its model below."""
    FAULT = "fault"
    RESUMED = "resumed"
    RECOVERED = "recovered"
    SYNC_STALL = "sync_stall"
    CHECKPOINT = "checkpoint"
    CHECKPOINT_FAILED = "checkpoint_failed"
    TRAINER_FROZEN = "trainer_frozen"
    SYNC_ABANDONED = "sync_abandoned"
    NODE_SILENT = "node_silent"


class Route(Name):
    """The completion service's paths."""
    HEARTBEAT = "/heartbeat"
    STARTED = "/started"
    EVENT = "/event"
    COMPLETED = "/completed"
    FINISHED = "/finished"
    STATUS = "/status"
