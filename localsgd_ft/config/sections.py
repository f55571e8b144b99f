"""The experiment file's sections as pydantic models: each field with its type, range, default and doc.

A field's rules that involve other fields sit next to it, in its section's
``check(cfg)``; :class:`~localsgd_ft.config.experiment.ExperimentConfig` runs
them in file order once every field has its type.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Any, List, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from localsgd_ft.config.errors import Allowed, ConfigError, Hint, need, shown
from localsgd_ft.config.limits import (DAY_MS, DAY_S, MAX_BATCH, MAX_CPUS, MAX_GPU_INDEX, MAX_GROUPS, MAX_JOB_NODES,
                                       MAX_LR, MAX_MEMORY_MB, MAX_NODES, MAX_QUORUM_TICK_MS, MAX_RESTARTS,
                                       MAX_WEIGHT_DECAY, MAX_WIDTH, MAX_WORKERS, PATH_MAX, PATH_PART_MAX, URL_MAX)

if TYPE_CHECKING:
    from localsgd_ft.config.experiment import ExperimentConfig

# The choices, each defined once; the code that implements them is keyed by these names.
Algorithm = Literal["localsgd", "diloco"]
Recovery = Literal["sync", "async"]
SyncPrecision = Literal["float32", "bfloat16", "int8"]
Transport = Literal["auto", "nccl", "gloo"]
ModelArch = Literal["cnn", "resnet"]
OptimizerName = Literal["sgd", "adamw"]
FaultKind = Literal["kill", "hang", "kill_during_sync", "lighthouse", "partition", "host_down"]
HOST_FAULT_KINDS = ("partition", "host_down")  # failures of the worker's whole host (the test bed's only)
FaultMoment = Literal["step", "quorum", "allreduce", "heal"]

# How often a replica role tells the lighthouse role it lives (and learns whether the run goes on), in
# seconds. Defined here, below everything, because lighthouse.role_timeout_s is judged against it.
HEARTBEAT_S = 1.0

_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _yaml_exponent(value: Any) -> Any:
    """YAML 1.1 reads 1e-3 (no dot) as a string; in a number field it is the number."""
    # The length check first: on a long run of digits the pattern's backtracking is quadratic.
    if isinstance(value, str) and len(value) <= 64 and _EXPONENT.fullmatch(value.strip()):
        return float(value)
    return value


# Every number field is finite: an infinite timeout overflows inside torchft, an infinite rate trains nothing.
Number = Annotated[float, BeforeValidator(_yaml_exponent), Field(allow_inf_nan=False)]

# A path a run creates or reads: Linux refuses longer ones (and NUL anywhere) only when the file is written.
PATH_PATTERN = rf"^([^/\x00]{{0,{PATH_PART_MAX}}}/)*[^/\x00]{{0,{PATH_PART_MAX}}}$"
PathText = Annotated[str, Allowed(
    f"expected a path of at most {PATH_MAX} characters, each part between slashes at most {PATH_PART_MAX}, "
    "without NUL"), Field(max_length=PATH_MAX, pattern=PATH_PATTERN)]


class Section(BaseModel):
    """A mapping of keys in the experiment file: unknown keys and loose types are refused."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _empty_is_defaults(cls, value: Any) -> Any:
        return {} if value is None else value  # `data:` with nothing under it: every default


def section(cls: type, doc: str) -> Any:
    """A field holding a whole section, every key at its default unless the file says otherwise."""
    return Field(default_factory=cls, description=doc)


class ReplicaGroupsConfig(Section):
    count: int = Field(2, ge=1, le=MAX_GROUPS, description="Number of replica groups (torchx roles "
                                                           "replica_0..N-1), each a separate torchrun.")
    workers: int = Field(
        1, ge=1, le=MAX_WORKERS,
        description="Worker processes per replica group (torchrun --nproc_per_node), one per GPU on GPUs. Inside a "
                    "group DDP averages gradients every step, so its workers stay identical; across groups worker r "
                    "syncs with worker r of the others. data.batch_size is per worker.")
    nodes: int = Field(
        1, ge=1, le=MAX_NODES,
        description="Nodes per replica group: the group's role gets this many replicas, each a torchrun agent of "
                    "`workers` processes, meeting (c10d rendezvous) at the group's first node on port "
                    "lighthouse.port + 2 + group (a free port on local runs, where all nodes are this host). cpus, "
                    "memory_mb and gpus_per_group are per node.")
    gpus: Annotated[List[Union[int, Annotated[List[int], Field(max_length=MAX_WORKERS)]]], Hint(
        "one entry per replica group, each a GPU index or a list of indices (e.g. [0, 1] or [[0], [1]]); for a "
        "number of GPUs per group use replica_groups.gpus_per_group instead")] = Field(
        default_factory=list, max_length=MAX_GROUPS,
        description="GPUs per group on the machine you launch from: one entry per group, a GPU index or a list of "
                    "indices (e.g. [0, 1] or [[0], [1]]); each group sees only its own (CUDA_VISIBLE_DEVICES). "
                    "Empty: see gpus_per_group; both empty: CPU training with gloo.")
    gpus_per_group: Annotated[int, Allowed("expected 0 (CPU) or replica_groups.workers: one GPU per worker")] = Field(
        0, ge=0, le=MAX_WORKERS,
        description="GPUs per group as a count the scheduler satisfies (Slurm --gpus-per-task, Kubernetes "
                    "nvidia.com/gpu); the scheduler picks the devices. Use this on clusters; exclusive with gpus.")
    max_restarts: int = Field(
        3, ge=0, le=MAX_RESTARTS,
        description="How often torchrun restarts a group's crashed workers before the group gives up.")
    trainer_timeout_s: Annotated[Number, Allowed(
        f"expected {3 * HEARTBEAT_S:g}..{DAY_S} seconds")] = Field(
        30.0, ge=3 * HEARTBEAT_S, le=DAY_S,
        description="A trainer shows it lives twice a second from a thread of its own (it goes on while the "
                    "trainer waits in a collective or a quorum); one silent this long (frozen, stopped, stuck "
                    "holding the interpreter) is killed by its replica role so that torchrun restarts the group, "
                    "which counts as a restart; with none left the group is lost with that reason. Peers stop "
                    "waiting for it in a sync sooner, after lighthouse.heartbeat_timeout_ms.")
    cpus: Annotated[int, Allowed(f"expected 0 (one per worker) or 1..{MAX_CPUS}, at least one CPU per worker "
                                 "(replica_groups.workers)")] = Field(
        0, ge=0, le=MAX_CPUS,
        description="CPUs requested per node of a group (torchx resource), at least one per worker; 0: one per "
                    "worker (replica_groups.workers). Local runs do not enforce it; Slurm asks for it as the role's "
                    "--cpus-per-task; Kubernetes makes it the pod's cpu limit (and, less torchx's 100m reserve, its "
                    "request). It also sets train.threads' default.")
    memory_mb: Annotated[int, Allowed(
        f"expected 256..{MAX_MEMORY_MB} (at least 256 MiB per worker; a CPU worker of the default model takes about "
        "900)")] = Field(
        2048, ge=256, le=MAX_MEMORY_MB,
        description="Memory requested per group (per node) from the scheduler, in MiB; at least 256 per worker.")

    @model_validator(mode="after")
    def _cpus_follow_workers(self) -> "ReplicaGroupsConfig":
        # Resolved here, once, so the launch plan, the threads default and the recorded config all read one
        # number: a config that only raises `workers` asks for a CPU per worker instead of being refused.
        if not self.cpus:
            self.cpus = self.workers
        return self

    def group_gpus(self) -> List[List[int]]:
        """Explicit GPU indices per replica group (empty lists on CPU and with gpus_per_group)."""
        if not self.gpus:
            return [[] for _ in range(self.count)]
        return [[g] if isinstance(g, int) else list(g) for g in self.gpus]

    def check(self, cfg: ExperimentConfig) -> None:
        need(self.count * self.nodes <= MAX_JOB_NODES, "replica_groups.nodes", self.nodes,
             f"expected at most {MAX_JOB_NODES} nodes in the whole job (replica_groups.count {self.count} x nodes "
             f"{self.nodes}); use fewer groups or nodes per group")
        need(self.nodes == 1 or not self.gpus, "replica_groups.gpus", self.gpus,
             f"explicit GPU indices name one machine's devices, but replica_groups.nodes is {self.nodes}: use "
             "replica_groups.gpus_per_group (one GPU per worker on every node) and let the scheduler place them")
        need(self.cpus >= self.workers, "replica_groups.cpus", self.cpus,
             f"expected at least one CPU per worker (replica_groups.workers: {self.workers}); raise "
             "replica_groups.cpus or lower replica_groups.workers")
        need(self.memory_mb >= 256 * self.workers, "replica_groups.memory_mb", self.memory_mb,
             f"expected at least {256 * self.workers} (256 MiB per worker; a CPU worker of the default model "
             "takes about 900)")
        if self.gpus:
            self._check_gpu_lists(cfg.localsgd.transport)
        need(self.gpus_per_group in (0, self.workers), "replica_groups.gpus_per_group", self.gpus_per_group,
             f"expected 0 (CPU) or replica_groups.workers ({self.workers}): one GPU per worker")
        if self.gpus and self.gpus_per_group:
            raise ConfigError(
                f"replica_groups.gpus_per_group: got {self.gpus_per_group} together with replica_groups.gpus "
                f"{shown(self.gpus)}; use one: explicit device lists (gpus, for this machine) or a count the "
                "scheduler satisfies (gpus_per_group, for Slurm/Kubernetes)")

    def _check_gpu_lists(self, transport: str) -> None:
        need(len(self.gpus) == self.count, "replica_groups.gpus", self.gpus,
             f"expected one entry per replica group ({self.count}), or [] for CPU")
        owner: dict = {}
        for i, g in enumerate(self.group_gpus()):
            need(len(g) == self.workers and all(0 <= x <= MAX_GPU_INDEX for x in g), f"replica_groups.gpus[{i}]",
                 self.gpus[i], f"expected {self.workers} GPU index(es) in 0..{MAX_GPU_INDEX} per group (one per "
                               "worker)")
            if len(set(g)) < len(g):
                raise ConfigError(
                    f"replica_groups.gpus[{i}]: got {shown(self.gpus[i])}, a GPU listed twice; the group's workers "
                    "average gradients with NCCL, which cannot put two members of one collective on the same device "
                    "(it fails with 'Duplicate GPU detected'): give each worker of a group its own GPU")
            for x in g:
                if x in owner and transport == "nccl":
                    raise ConfigError(
                        f"localsgd.transport: 'nccl', but replica_groups.gpus gives GPU {x} to groups {owner[x]} and "
                        f"{i}; NCCL cannot put two members of one collective on the same device (it fails every sync "
                        "with 'Duplicate GPU detected'): set localsgd.transport: auto or gloo (the groups sync over "
                        "host memory), or give each group its own GPU(s)")
                owner.setdefault(x, i)


class LighthouseConfig(Section):
    port: Annotated[int, Allowed("expected a port in 1..65534 (port + 1 is used too)")] = Field(
        29510, ge=1, le=65534, description="Port of the torchft lighthouse; the completion service listens on "
                                           "port + 1.")
    min_replicas: Annotated[int, Allowed("expected 1..replica_groups.count")] = Field(
        1, ge=1, le=MAX_GROUPS, description="Fewest replica groups that may form a quorum and commit a sync.")
    join_timeout_ms: int = Field(
        10000, ge=1, le=DAY_MS,
        description="How long a quorum waits for heartbeating stragglers, in ms.")
    quorum_tick_ms: int = Field(
        100, ge=1, le=MAX_QUORUM_TICK_MS,
        description="How often the lighthouse re-evaluates a pending quorum, in ms.")
    heartbeat_timeout_ms: int = Field(
        2000, ge=1, le=DAY_MS,
        description="Silence after which a group counts as dead; survivors stall about this long after a failure "
                    "(torchft's Manager beats every 100 ms, trainers twice a second).")
    role_timeout_s: Annotated[Number, Allowed(
        f"expected at least {3 * HEARTBEAT_S:g} seconds (roles send a heartbeat every {HEARTBEAT_S:g} s) and at "
        f"most a day ({DAY_S})")] = Field(
        15.0, ge=3 * HEARTBEAT_S, le=DAY_S,
        description=f"A replica role sends a heartbeat every {HEARTBEAT_S:g} s; one silent this long (its node gone, "
                    "its wrapper killed) is declared lost, and the run goes on without it or ends, as for any lost "
                    "group.")
    cpus: int = Field(1, ge=1, le=MAX_CPUS, description="CPUs requested for the lighthouse role from the scheduler "
                                                         "(enforced as for replica_groups.cpus).")
    memory_mb: Annotated[int, Allowed(f"expected 256..{MAX_MEMORY_MB}")] = Field(
        1536, ge=256, le=MAX_MEMORY_MB,
        description="Memory requested for the lighthouse role, in MiB (it uses about 75 MB, two processes of about "
                    "37 MB; Kubernetes requests this minus torchx's 1024 MB node reserve).")

    @property
    def completion_port(self) -> int:
        """Where the lighthouse role's completion service listens: the port after the lighthouse's."""
        return self.port + 1

    def rendezvous_port(self, group: int) -> int:
        """Where the torchrun agents of a multi-node group meet (c10d) on its first node."""
        return self.port + 2 + group

    def check(self, cfg: ExperimentConfig) -> None:
        rg = cfg.replica_groups
        need(rg.nodes == 1 or self.rendezvous_port(rg.count - 1) <= 65535, "lighthouse.port", self.port,
             f"expected at most {65534 - rg.count}: multi-node groups meet on ports lighthouse.port + 2 + group")
        need(self.min_replicas <= rg.count, "lighthouse.min_replicas", self.min_replicas,
             f"expected 1..replica_groups.count ({rg.count})")


class DataConfig(Section):
    root: PathText = Field("data", description="Directory holding (or receiving) CIFAR-10's "
                                               "'cifar-10-batches-py' folder.")
    download: bool = Field(False, description="Download CIFAR-10 into root when it is missing (once, before "
                                              "training starts).")
    url: Annotated[str, Allowed(f"expected an http(s) URL of at most {URL_MAX} characters")] = Field(
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", pattern=r"^https?://", max_length=URL_MAX,
        description="Where to download CIFAR-10's python archive from (a mirror must serve the official file: its "
                    "checksum is checked unless verify is false).")
    download_timeout_s: Number = Field(
        600.0, gt=0, le=DAY_S,
        description="The download must finish within this many seconds (and a stalled connection gives up after "
                    "30 s).")
    verify: bool = Field(True, description="Enforce the official CIFAR-10 checksums. Set false to use a CIFAR-format "
                                           "subset or fixture on purpose.")
    batch_size: int = Field(128, ge=1, le=MAX_BATCH, description="Training batch size per worker.")
    augment: bool = Field(True, description="Random crop (4 px padding) and horizontal flip, done in batches; never "
                                            "on eval.")


class ModelConfig(Section):
    arch: ModelArch = Field("cnn", description="'cnn': small fast CNN for CPU runs; 'resnet': a residual network "
                                               "for GPU runs.")
    width: int = Field(32, ge=1, le=MAX_WIDTH, description="Channels of the first stage; later stages double it.")


class OptimizerConfig(Section):
    name: OptimizerName = Field("sgd", description="'sgd' (with momentum) or 'adamw'.")
    lr: Number = Field(0.05, gt=0, le=MAX_LR, description="Learning rate.")
    momentum: Annotated[Number, Allowed("expected 0 <= momentum < 1")] = Field(
        0.9, ge=0, lt=1, description="SGD momentum (ignored by adamw).")
    weight_decay: Number = Field(5e-4, ge=0, le=MAX_WEIGHT_DECAY, description="Weight decay.")
    nesterov: bool = Field(True, description="Nesterov momentum for sgd.")
