"""The experiment schema: one YAML file -> typed, validated config objects.

Both sides read the YAML through :func:`load_config`: the torchx component
(to plan the roles) and every trainer process (to train), so the launch plan
and the training can never disagree. Every field carries its one-line doc in
``metadata["doc"]``; the config reference (docs/config.md) is generated from them
(``python -m localsgd_ft.config --reference``).

Bad input raises :class:`ConfigError` whose message names the file, the key,
the bad value and what is allowed.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import random
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence, Union

import yaml


class ConfigError(ValueError):
    """A config file that cannot be used; the message says why and how to fix it."""


def doc(default: Any, text: str) -> Any:
    """A dataclass field with a default and its one-line documentation."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"doc": text})
    if dataclasses.is_dataclass(default):
        return field(default_factory=lambda: dataclasses.replace(default), metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


@dataclass
class ReplicaGroupsConfig:
    count: int = doc(2, "Number of replica groups (torchx roles replica_0..N-1), each a separate torchrun.")
    workers: int = doc(
        1,
        "Worker processes per replica group (torchrun --nproc_per_node), one per GPU on GPUs. Inside a group "
        "DDP averages gradients every step, so its workers stay identical; across groups worker r syncs with "
        "worker r of the others. data.batch_size is per worker.",
    )
    nodes: int = doc(
        1,
        "Nodes per replica group: the group's role gets this many replicas, each a torchrun agent of `workers` "
        "processes, meeting (c10d rendezvous) at the group's first node on port lighthouse.port + 2 + group "
        "(a free port on local runs, where all nodes are this host). cpus, memory_mb and gpus_per_group are "
        "per node.",
    )
    gpus: List[Union[int, List[int]]] = doc(
        [],
        "GPUs per group on the machine you launch from: one entry per group, a GPU index or a list of "
        "indices (e.g. [0, 1] or [[0], [1]]); each group sees only its own (CUDA_VISIBLE_DEVICES). "
        "Empty: see gpus_per_group; both empty: CPU training with gloo.",
    )
    gpus_per_group: int = doc(
        0,
        "GPUs per group as a count the scheduler satisfies (Slurm --gpus-per-task, Kubernetes "
        "nvidia.com/gpu); the scheduler picks the devices. Use this on clusters; exclusive with gpus.",
    )
    max_restarts: int = doc(3, "How often torchrun restarts a group's crashed workers before the group gives up.")
    cpus: int = doc(1, "CPUs requested per group from the scheduler (torchx resource); at least one per worker.")
    memory_mb: int = doc(2048, "Memory requested per group (per node) from the scheduler, in MiB; at least 256 "
                               "per worker.")


ALGORITHMS = ("localsgd", "diloco")


@dataclass
class OuterOptimizerConfig:
    lr: float = doc(0.7, "DiLoCo's outer learning rate (SGD on the averaged pseudo-gradient).")
    momentum: float = doc(0.9, "Outer momentum.")
    nesterov: bool = doc(True, "Nesterov momentum for the outer step.")


@dataclass
class LocalSGDConfig:
    algorithm: str = doc(
        "localsgd",
        "'localsgd': average the parameters every sync_every steps; 'diloco': average the change since the "
        "last sync (a pseudo-gradient) and apply it with an outer optimizer (DiLoCo; Streaming DiLoCo with "
        "fragments > 1). Needs recovery: sync.",
    )
    sync_every: int = doc(10, "Local optimizer steps between two fault-tolerant syncs of the whole model.")
    recovery: str = doc(
        "sync",
        "How a joining group recovers: 'sync' restores the live weights before its first step; "
        "'async' recovers in the background and its first sync_every steps are discarded.",
    )
    timeout_s: float = doc(30.0, "Timeout of collectives, commits and checkpoint transfers, in seconds.")
    quorum_timeout_s: float = doc(
        120.0,
        "How long a group waits for a quorum, in seconds. Must exceed the heartbeat timeout plus one sync interval.",
    )
    quorum_retries: int = doc(
        -1,
        "Tries of a failed quorum request within quorum_timeout_s; torchft waits quorum_timeout_s / (retries + 1) "
        "between them, so they ride through a lighthouse restart. -1: one try every 0.5 s, so an outage costs "
        "little more than its own length; 0: none (a lighthouse restart crashes every group).",
    )
    outer_optimizer: OuterOptimizerConfig = doc(OuterOptimizerConfig(), "DiLoCo only: the outer optimizer.")
    fragments: int = doc(
        1,
        "DiLoCo only: split the model into this many fragments of consecutive layers, synced one after another "
        "(Streaming DiLoCo): one fragment every sync_every / fragments steps. 1: plain DiLoCo.",
    )
    fragment_sync_delay: int = doc(
        0,
        "DiLoCo only: local steps a fragment's allreduce overlaps with training before it is waited for; "
        "less than sync_every / fragments.",
    )
    fragment_update_alpha: float = doc(
        0.0, "DiLoCo only: weight of the local parameters mixed into the synced ones, in [0, 1] (0: synced only)."
    )
    quantize: bool = doc(
        False, "DiLoCo only: quantize pseudo-gradients for the allreduce (torchft's triton kernels: GPUs only)."
    )
    bucket_cap_mb: int = doc(
        0, "DiLoCo only: allreduce pseudo-gradients in buckets of this many MiB; 0: one allreduce per parameter."
    )


@dataclass
class LighthouseConfig:
    port: int = doc(29510, "Port of the torchft lighthouse; the completion service listens on port + 1.")
    min_replicas: int = doc(1, "Fewest replica groups that may form a quorum and commit a sync.")
    join_timeout_ms: int = doc(10000, "How long a quorum waits for heartbeating stragglers, in ms.")
    quorum_tick_ms: int = doc(100, "How often the lighthouse re-evaluates a pending quorum, in ms.")
    heartbeat_timeout_ms: int = doc(
        5000, "Silence after which a group counts as dead; survivors stall about this long after a failure."
    )
    role_timeout_s: float = doc(
        15.0,
        "A replica role sends a heartbeat every second; one silent this long (its node gone, its wrapper "
        "killed) is declared lost, and the run goes on without it or ends, as for any lost group.",
    )
    cpus: int = doc(1, "CPUs requested for the lighthouse role from the scheduler.")
    memory_mb: int = doc(1536, "Memory requested for the lighthouse role, in MiB (it uses about 30 MB; "
                               "Kubernetes requests this minus torchx's 1024 MB node reserve).")

    @property
    def completion_port(self) -> int:
        """Where the lighthouse role's completion service listens: the port after the lighthouse's."""
        return self.port + 1

    def rendezvous_port(self, group: int) -> int:
        """Where the torchrun agents of a multi-node group meet (c10d) on its first node."""
        return self.port + 2 + group


@dataclass
class DataConfig:
    root: str = doc("data", "Directory holding (or receiving) CIFAR-10's 'cifar-10-batches-py' folder.")
    download: bool = doc(False, "Download CIFAR-10 into root when it is missing (once, before training starts).")
    url: str = doc(
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "Where to download CIFAR-10's python archive from (a mirror must serve the official file: its "
        "checksum is checked unless verify is false).",
    )
    download_timeout_s: float = doc(600.0, "The download must finish within this many seconds (and a stalled "
                                           "connection gives up after 30 s).")
    verify: bool = doc(
        True, "Enforce the official CIFAR-10 checksums. Set false to use a CIFAR-format subset or fixture on purpose."
    )
    batch_size: int = doc(128, "Training batch size per worker.")
    augment: bool = doc(True, "Random crop (4 px padding) and horizontal flip, done in batches; never on eval.")


@dataclass
class ModelConfig:
    arch: str = doc("cnn", "'cnn': small fast CNN for CPU runs; 'resnet': a residual network for GPU runs.")
    width: int = doc(32, "Channels of the first stage; later stages double it.")


@dataclass
class OptimizerConfig:
    name: str = doc("sgd", "'sgd' (with momentum) or 'adamw'.")
    lr: float = doc(0.05, "Learning rate.")
    momentum: float = doc(0.9, "SGD momentum (ignored by adamw).")
    weight_decay: float = doc(5e-4, "Weight decay.")
    nesterov: bool = doc(True, "Nesterov momentum for sgd.")


@dataclass
class TrainConfig:
    max_steps: int = doc(
        1000, "Local optimizer steps per replica group; a multiple of localsgd.sync_every so groups stop on a sync."
    )
    eval_every: int = doc(500, "Evaluate on the test split every this many local steps (0: only at the end).")
    seed: int = doc(0, "Seed of model initialisation (same in every group), data order and augmentation.")
    threads: int = doc(0, "Intra-op CPU threads per worker; 0: replica_groups.cpus / workers, so groups sharing a host do not oversubscribe it.")
    channels_last: bool = doc(False, "Keep images and conv weights in channels_last memory format (faster convolutions on GPU).")
    bf16: bool = doc(False, "Run forward and loss under bfloat16 autocast (GPU; weights and optimizer stay float32).")
    compile: bool = doc(False, "torch.compile the model (worth it on GPU for long runs; compiling takes a while).")
    log_every: int = doc(
        100,
        "Progress cadence: every N local steps each group prints 'LocalSGD: Number of local optimizer steps "
        "completed: N' and a progress line (step/max, loss, accuracy, samples/s, quorum, ETA) and appends "
        "a 'train' event to its metrics file.",
    )


@dataclass
class CheckpointConfig:
    enabled: bool = doc(True, "Write durable checkpoints, so a whole-job restart resumes instead of starting over.")
    dir: str = doc("", "Checkpoint directory. Empty: <output_dir>/checkpoints.")
    every_syncs: int = doc(50, "Write one every this many committed syncs (by the lowest-ranked live group; with "
                               "Streaming DiLoCo each fragment's sync counts).")
    every_s: float = doc(
        300.0,
        "Also write one at the first committed sync after this many seconds since the writing group's last "
        "one (or its start): with both cadences a whole-job crash loses at most this long or every_syncs "
        "syncs of training, whichever is less. 0: by sync count only. The final sync always writes one.",
    )
    keep: int = doc(3, "Keep this many of the newest valid checkpoints; older ones are deleted.")
    resume: bool = doc(
        True,
        "Resume from the newest valid checkpoint. false (or `torchx run -- --fresh True`) starts over; "
        "the old checkpoints are moved aside, not deleted.",
    )


QUORUM_RETRY_INTERVAL_S = 0.5

FAULT_MOMENTS = ("step", "quorum", "allreduce", "heal")
FAULT_KINDS = ("kill", "hang", "kill_during_sync", "lighthouse")


@dataclass
class FaultConfig:
    kind: str = doc(
        "kill",
        "'kill': SIGKILL the group's worker (a machine loss); 'hang': SIGSTOP it for duration_s; "
        "'kill_during_sync': SIGKILL it inside the parameter allreduce; 'lighthouse': kill the "
        "lighthouse and restart it after duration_s.",
    )
    group: int = doc(-1, "Replica group to hit; -1: one chosen at random (seeded by faults.seed). Unused for 'lighthouse'.")
    worker: int = doc(-1, "Which worker (rank) of the group to hit; -1: one chosen at random (0 with one worker). "
                          "Unused for 'lighthouse'.")
    at_step: int = doc(1, "Training step (committed syncs x sync_every + local steps since) at which it happens.")
    duration_s: float = doc(3.0, "How long a 'hang' lasts, or how long the lighthouse stays down.")
    moment: str = doc(
        "step",
        "When a 'lighthouse' failure strikes: 'step' (at at_step, between syncs), 'quorum' (as the first sync "
        "after at_step asks for its quorum), 'allreduce' (inside that sync's parameter allreduce), 'heal' "
        "(while the first group to recover live loads the state it was sent; at_step is then ignored).",
    )


@dataclass
class FaultsConfig:
    enabled: bool = doc(False, "Inject the failures below. Nothing is ever injected unless this is true.")
    schedule: List[FaultConfig] = doc([], "Failures at given steps: a list of {kind, group, at_step, duration_s, moment}.")
    mtbf_steps: int = doc(0, "Random failures: mean training steps between them (exponential); 0: none.")
    max_random: int = doc(0, "Random failures: at most this many.")
    random_kinds: List[str] = doc(["kill"], "Random failures: the kinds to draw from.")
    seed: int = doc(0, "Seed for random failures and random target groups.")


@dataclass
class Fault:
    """One planned failure, resolved from the config: who, what, when."""

    id: int
    kind: str
    group: int  # -1 for the lighthouse
    at_step: int
    duration_s: float
    moment: str = "step"
    worker: int = 0  # rank inside the group (0 for the lighthouse)


@dataclass
class ExperimentConfig:
    name: str = doc("localsgd", "Experiment name: the torchx app name and the default output directory.")
    output_dir: str = doc("", "Where summary.json and per-group results go. Empty: outputs/<name>.")
    replica_groups: ReplicaGroupsConfig = doc(None, "Replica groups and their resources.")
    localsgd: LocalSGDConfig = doc(None, "LocalSGD synchronisation and fault-tolerance timings.")
    lighthouse: LighthouseConfig = doc(None, "The torchft lighthouse (quorum service).")
    data: DataConfig = doc(None, "CIFAR-10 location, checks and batching.")
    model: ModelConfig = doc(None, "The network.")
    optimizer: OptimizerConfig = doc(None, "The local optimizer.")
    train: TrainConfig = doc(None, "Steps, evaluation, seeding.")
    checkpoint: CheckpointConfig = doc(None, "Durable checkpoints and resuming.")
    faults: FaultsConfig = doc(None, "Failures to inject (off by default).")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if getattr(self, f.name) is None:
                setattr(self, f.name, _type_of(ExperimentConfig, f.name)())

    @property
    def run_dir(self) -> Path:
        """The output directory this run writes to."""
        return Path(self.output_dir or f"outputs/{self.name}")

    @property
    def threads(self) -> int:
        """Intra-op threads per worker process."""
        return self.train.threads or max(1, self.replica_groups.cpus // self.replica_groups.workers)

    @property
    def group_size(self) -> int:
        """Worker processes per replica group, over all its nodes."""
        return self.replica_groups.workers * self.replica_groups.nodes

    @property
    def group_batch(self) -> int:
        """Samples per training step of one replica group (all its workers; data.batch_size is per worker)."""
        return self.data.batch_size * self.group_size

    @property
    def checkpoint_dir(self) -> Path:
        """Where this run's durable checkpoints go."""
        return Path(self.checkpoint.dir) if self.checkpoint.dir else self.run_dir / "checkpoints"

    @property
    def group_gpus(self) -> List[List[int]]:
        """Explicit GPU indices per replica group (empty lists on CPU and with gpus_per_group)."""
        if not self.replica_groups.gpus:
            return [[] for _ in range(self.replica_groups.count)]
        return [[g] if isinstance(g, int) else list(g) for g in self.replica_groups.gpus]

    @property
    def steps_per_sync(self) -> int:
        """Local steps between two syncs: sync_every, or one fragment's share of it (Streaming DiLoCo)."""
        ls = self.localsgd
        return ls.sync_every // ls.fragments if ls.algorithm == "diloco" else ls.sync_every

    @property
    def training_syncs(self) -> int:
        """Syncs of training after which every group stops."""
        return self.train.max_steps // self.steps_per_sync

    @property
    def gpus_per_group(self) -> int:
        """How many GPUs each replica group uses (requested from the scheduler); 0 on CPU."""
        if self.replica_groups.gpus:
            return len(self.group_gpus[0])
        return self.replica_groups.gpus_per_group

    @property
    def uses_gpus(self) -> bool:
        return self.gpus_per_group > 0

    @property
    def quorum_retries(self) -> int:
        """Retries handed to torchft's Manager (localsgd.quorum_retries, or the automatic count)."""
        if self.localsgd.quorum_retries >= 0:
            return self.localsgd.quorum_retries
        # torchft sleeps quorum_timeout / (retries + 1) after a failed try; the Python side gives
        # up after quorum_timeout anyway, so more retries only shorten the wait after an outage.
        return max(1, int(self.localsgd.quorum_timeout_s / QUORUM_RETRY_INTERVAL_S) - 1)

    @property
    def initial_syncs(self) -> int:
        """Syncs before the first step at each job start: LocalSGD in sync mode begins with one that aligns every
        group. DiLoCo needs none: its first quorum heals a joining group before any pseudo-gradient is sent."""
        return 1 if self.localsgd.recovery == "sync" and self.localsgd.algorithm == "localsgd" else 0

    @property
    def fault_plan(self) -> List[Fault]:
        """Every failure this run injects, in step order (empty unless faults.enabled)."""
        f = self.faults
        if not f.enabled:
            return []
        rng = random.Random(f.seed)
        count = self.replica_groups.count
        workers = self.group_size
        planned = [(x.kind, x.group, x.at_step, x.duration_s, x.moment, x.worker) for x in f.schedule]
        step = 0
        for _ in range(f.max_random if f.mtbf_steps else 0):
            step += max(1, round(rng.expovariate(1 / f.mtbf_steps)))
            if step >= self.train.max_steps:
                break
            planned.append((rng.choice(f.random_kinds), -1, step, 3.0, "step", -1))
        plan = []
        for i, (kind, group, at_step, duration, moment, worker) in enumerate(sorted(planned, key=lambda p: p[2])):
            if kind == "lighthouse":
                group, worker = -1, 0
            else:
                if group < 0:
                    group = rng.randrange(count)
                if worker < 0:  # one worker draws nothing, so such plans stay what they were
                    worker = rng.randrange(workers) if workers > 1 else 0
            plan.append(Fault(i, kind, group, at_step, duration, moment, worker))
        return plan


# ---------------------------------------------------------------------------
# Parsing


def _type_of(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


_SINGULAR = {int: "an integer", float: "a number", bool: "true/false", str: "a string"}
_PLURAL = {int: "integers", float: "numbers", bool: "true/false values", str: "strings"}


def _type_name(tp: Any, plural: bool = False) -> str:
    """How a message names type ``tp``: 'an integer', 'a list of integers', 'a list whose entries are ...'."""
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        if typing.get_origin(item) is Union:
            name = f"a list whose entries are each {_type_name(item)}"
        else:
            name = f"a list of {_type_name(item, plural=True)}"
        return f"lists ({name[2:]})" if plural else name
    if origin is Union:
        return " or ".join(_type_name(a, plural) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "mappings" if plural else "a mapping"
    return (_PLURAL if plural else _SINGULAR).get(tp, tp.__name__)


# What a message adds for a value of the wrong shape, where a natural guess needs another key.
_SHAPE_HINTS = {
    "replica_groups.gpus": "one entry per replica group, each a GPU index or a list of indices (e.g. [0, 1] or "
                           "[[0], [1]]); for a number of GPUs per group use replica_groups.gpus_per_group instead",
}


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against type ``tp``; return it converted (int -> float only)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of keys, got {value!r}")
        return _build(tp, value, key + ".")
    if origin is list:
        if not isinstance(value, list):
            hint = _SHAPE_HINTS.get(key)
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}" + (f": {hint}" if hint else ""))
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is Union:
        for option in typing.get_args(tp):
            try:
                return _convert(value, option, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    # bool is an int subclass: keep true/false out of integer fields and vice versa.
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        if isinstance(value, str) and _EXPONENT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string; in a number field it is one
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, tp)
    if not ok:
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    return value


def _build(cls: type, raw: dict, prefix: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    for k in raw:
        if k not in names:
            raise ConfigError(f"{prefix}{k}: unknown key; allowed keys here: {', '.join(sorted(names))}")
    kwargs = {k: _convert(v, _type_of(cls, k), prefix + k) for k, v in raw.items()}
    return cls(**kwargs)


def _check_algorithm(cfg: ExperimentConfig) -> None:
    """The sync algorithm's keys: what torchft would reject at start or silently mishandle, refused here."""
    ls = cfg.localsgd
    if ls.algorithm not in ALGORITHMS:
        raise ConfigError(f"localsgd.algorithm: got {ls.algorithm!r}, expected one of {', '.join(ALGORITHMS)}")
    if ls.algorithm == "localsgd":
        plain = LocalSGDConfig()
        for key in ("outer_optimizer", "fragments", "fragment_sync_delay", "fragment_update_alpha", "quantize",
                    "bucket_cap_mb"):
            if getattr(ls, key) != getattr(plain, key):
                raise ConfigError(
                    f"localsgd.{key}: set to {getattr(ls, key)!r}, but it is a DiLoCo setting and "
                    "localsgd.algorithm is 'localsgd', which would ignore it; set localsgd.algorithm: diloco, "
                    f"or remove localsgd.{key}")
        return
    oo = ls.outer_optimizer
    if ls.recovery != "sync":
        raise ConfigError(
            f"localsgd.recovery: got {ls.recovery!r}, but DiLoCo needs a synchronous quorum (torchft's DiLoCo "
            "refuses an asynchronous one); use recovery: sync, or algorithm: localsgd")
    if ls.fragments < 1 or ls.sync_every % ls.fragments:
        raise ConfigError(
            f"localsgd.fragments: got {ls.fragments}, expected an integer >= 1 that divides localsgd.sync_every "
            f"({ls.sync_every}): each fragment is synced once every sync_every steps, one every "
            "sync_every / fragments steps")
    per_fragment = ls.sync_every // ls.fragments
    if not 0 <= ls.fragment_sync_delay < per_fragment:
        raise ConfigError(
            f"localsgd.fragment_sync_delay: got {ls.fragment_sync_delay}, expected 0..{per_fragment - 1}: a "
            f"fragment's allreduce must finish before the next fragment's starts (sync_every {ls.sync_every} / "
            f"fragments {ls.fragments} = {per_fragment} steps apart)")
    need(0 <= ls.fragment_update_alpha <= 1, "localsgd.fragment_update_alpha", ls.fragment_update_alpha,
         "expected a number in [0, 1] (0: take the synced parameters; 1: keep the local ones)")
    need(oo.lr > 0, "localsgd.outer_optimizer.lr", oo.lr, "expected a number > 0")
    need(0 <= oo.momentum < 1, "localsgd.outer_optimizer.momentum", oo.momentum, "expected 0 <= momentum < 1")
    if ls.quantize and not cfg.uses_gpus:
        raise ConfigError(
            "localsgd.quantize: true, but the groups train on CPU: torchft quantizes with triton kernels on "
            "CUDA GPUs only (without them it silently sends the data unquantized); set "
            "localsgd.quantize: false, or give the groups GPUs")
    need(ls.bucket_cap_mb >= 0, "localsgd.bucket_cap_mb", ls.bucket_cap_mb,
         "expected an integer >= 0 (0: one allreduce per parameter)")


def need(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Refuse ``value`` of ``key`` unless ``ok``: one line naming the key, the value and what is allowed."""
    if not ok:
        raise ConfigError(f"{key}: got {value!r}, {allowed}")


def _check(cfg: ExperimentConfig) -> None:
    """Reject impossible values; each message names the key, the value and what is allowed."""

    rg, ls, lh, tr = cfg.replica_groups, cfg.localsgd, cfg.lighthouse, cfg.train
    need(bool(cfg.name) and all(c.isalnum() or c in "-_" for c in cfg.name), "name", cfg.name,
         "expected letters, digits, '-' or '_' (it names the torchx app)")
    need(rg.count >= 1, "replica_groups.count", rg.count, "expected an integer >= 1")
    need(rg.workers >= 1, "replica_groups.workers", rg.workers, "expected an integer >= 1")
    need(rg.nodes >= 1, "replica_groups.nodes", rg.nodes, "expected an integer >= 1")
    need(rg.nodes == 1 or not rg.gpus, "replica_groups.gpus", rg.gpus,
         f"explicit GPU indices name one machine's devices, but replica_groups.nodes is {rg.nodes}: use "
         "replica_groups.gpus_per_group (one GPU per worker on every node) and let the scheduler place them")
    need(rg.max_restarts >= 0, "replica_groups.max_restarts", rg.max_restarts, "expected an integer >= 0")
    need(rg.cpus >= rg.workers, "replica_groups.cpus", rg.cpus,
         f"expected at least one CPU per worker (replica_groups.workers: {rg.workers}); raise "
         "replica_groups.cpus or lower replica_groups.workers")
    need(rg.memory_mb >= 256 * rg.workers, "replica_groups.memory_mb", rg.memory_mb,
         f"expected at least {256 * rg.workers} (256 MiB per worker; a CPU worker of the default model "
         "takes about 900)")
    if rg.gpus:
        need(len(rg.gpus) == rg.count, "replica_groups.gpus", rg.gpus,
             f"expected one entry per replica group ({rg.count}), or [] for CPU")
        for i, g in enumerate(cfg.group_gpus):
            need(len(g) == rg.workers and all(x >= 0 for x in g), f"replica_groups.gpus[{i}]", rg.gpus[i],
                 f"expected {rg.workers} non-negative GPU index(es) per group (one per worker)")
    if rg.gpus:
        owner: dict = {}
        for i, g in enumerate(cfg.group_gpus):
            for x in g:
                if x in owner:
                    raise ConfigError(
                        f"replica_groups.gpus: GPU {x} is given to groups {owner[x]} and {i}; NCCL cannot put two "
                        "members of one collective on the same device (it fails every sync with 'Duplicate GPU "
                        "detected'): give each group its own GPU(s), or use fewer groups")
                owner[x] = i
    need(rg.gpus_per_group in (0, rg.workers), "replica_groups.gpus_per_group", rg.gpus_per_group,
         f"expected 0 (CPU) or replica_groups.workers ({rg.workers}): one GPU per worker")
    if rg.gpus and rg.gpus_per_group:
        raise ConfigError(
            f"replica_groups.gpus_per_group: got {rg.gpus_per_group} together with replica_groups.gpus "
            f"{rg.gpus!r}; use one: explicit device lists (gpus, for this machine) or a count the "
            "scheduler satisfies (gpus_per_group, for Slurm/Kubernetes)"
        )
    need(ls.sync_every >= 1, "localsgd.sync_every", ls.sync_every, "expected an integer >= 1")
    need(ls.recovery in ("sync", "async"), "localsgd.recovery", ls.recovery, "expected 'sync' or 'async'")
    need(ls.timeout_s > 0, "localsgd.timeout_s", ls.timeout_s, "expected a number > 0")
    need(ls.quorum_timeout_s * 1000 > lh.heartbeat_timeout_ms, "localsgd.quorum_timeout_s", ls.quorum_timeout_s,
         f"expected more than lighthouse.heartbeat_timeout_ms ({lh.heartbeat_timeout_ms} ms) plus one sync interval")
    need(ls.quorum_retries >= -1, "localsgd.quorum_retries", ls.quorum_retries,
         "expected an integer >= 0, or -1 (automatic)")
    _check_algorithm(cfg)
    need(1 <= lh.port <= 65534, "lighthouse.port", lh.port, "expected a port in 1..65534 (port + 1 is used too)")
    need(rg.nodes == 1 or lh.port + 1 + rg.count <= 65535, "lighthouse.port", lh.port,
         f"expected at most {65534 - rg.count}: multi-node groups meet on ports lighthouse.port + 2 + group")
    need(1 <= lh.min_replicas <= rg.count, "lighthouse.min_replicas", lh.min_replicas,
         f"expected 1..replica_groups.count ({rg.count})")
    need(lh.role_timeout_s >= 3, "lighthouse.role_timeout_s", lh.role_timeout_s,
         "expected at least 3 seconds (roles send a heartbeat every second)")
    need(lh.cpus >= 1, "lighthouse.cpus", lh.cpus, "expected an integer >= 1")
    need(lh.memory_mb >= 256, "lighthouse.memory_mb", lh.memory_mb, "expected at least 256")
    for k in ("join_timeout_ms", "quorum_tick_ms", "heartbeat_timeout_ms"):
        need(getattr(lh, k) >= 1, f"lighthouse.{k}", getattr(lh, k), "expected an integer >= 1")
    need(cfg.data.download_timeout_s > 0, "data.download_timeout_s", cfg.data.download_timeout_s,
         "expected a number > 0")
    need(cfg.data.url.startswith(("http://", "https://")), "data.url", cfg.data.url, "expected an http(s) URL")
    need(cfg.data.batch_size >= 1, "data.batch_size", cfg.data.batch_size, "expected an integer >= 1")
    need(cfg.model.arch in ("cnn", "resnet"), "model.arch", cfg.model.arch, "expected 'cnn' or 'resnet'")
    need(cfg.model.width >= 1, "model.width", cfg.model.width, "expected an integer >= 1")
    opt = cfg.optimizer
    need(opt.name in ("sgd", "adamw"), "optimizer.name", opt.name, "expected 'sgd' or 'adamw'")
    need(opt.lr > 0, "optimizer.lr", opt.lr, "expected a number > 0")
    need(0 <= opt.momentum < 1, "optimizer.momentum", opt.momentum, "expected 0 <= momentum < 1")
    need(opt.weight_decay >= 0, "optimizer.weight_decay", opt.weight_decay, "expected a number >= 0")
    need(tr.max_steps >= 1, "train.max_steps", tr.max_steps, "expected an integer >= 1")
    if tr.max_steps % ls.sync_every:
        lo = max(ls.sync_every, tr.max_steps - tr.max_steps % ls.sync_every)
        hi = lo + ls.sync_every if lo < tr.max_steps else lo
        raise ConfigError(
            f"train.max_steps: got {tr.max_steps}, which is not a multiple of localsgd.sync_every "
            f"({ls.sync_every}); groups must stop on a sync boundary: use {lo} or {hi}"
        )
    need(tr.eval_every >= 0, "train.eval_every", tr.eval_every, "expected an integer >= 0 (0: only at the end)")
    need(tr.threads >= 0, "train.threads", tr.threads, "expected an integer >= 0 (0: replica_groups.cpus / workers)")
    need(tr.log_every >= 1, "train.log_every", tr.log_every, "expected an integer >= 1")
    ck = cfg.checkpoint
    need(ck.every_syncs >= 1, "checkpoint.every_syncs", ck.every_syncs, "expected an integer >= 1")
    need(ck.keep >= 1, "checkpoint.keep", ck.keep, "expected an integer >= 1")
    need(ck.every_s >= 0, "checkpoint.every_s", ck.every_s, "expected a number of seconds >= 0 (0: off)")
    if ck.enabled and ck.every_syncs > cfg.training_syncs and not ck.every_s:
        raise ConfigError(
            f"checkpoint.every_syncs: got {ck.every_syncs}, but the run has only {cfg.training_syncs} syncs "
            f"(train.max_steps {tr.max_steps} / {cfg.steps_per_sync} steps per sync) and checkpoint.every_s is 0, "
            f"so no checkpoint would be written before the end and a crash would lose all the work; use "
            f"every_syncs at most {cfg.training_syncs} (e.g. {max(1, cfg.training_syncs // 4)}), a time cadence "
            "(checkpoint.every_s, e.g. 300), or checkpoint.enabled: false"
        )
    fl = cfg.faults
    for i, x in enumerate(fl.schedule):
        key = f"faults.schedule[{i}]"
        need(x.kind in FAULT_KINDS, f"{key}.kind", x.kind, f"expected one of {', '.join(FAULT_KINDS)}")
        need(-1 <= x.group < rg.count, f"{key}.group", x.group, f"expected -1 (random) or 0..{rg.count - 1}")
        need(-1 <= x.worker < cfg.group_size, f"{key}.worker", x.worker,
             f"expected -1 (random) or 0..{cfg.group_size - 1} (a rank of the group's "
             f"{cfg.group_size} worker(s))")
        need(1 <= x.at_step < tr.max_steps, f"{key}.at_step", x.at_step,
             f"expected 1..{tr.max_steps - 1} (inside train.max_steps)")
        need(x.duration_s > 0, f"{key}.duration_s", x.duration_s, "expected a number > 0")
        need(x.moment in FAULT_MOMENTS, f"{key}.moment", x.moment, f"expected one of {', '.join(FAULT_MOMENTS)}")
        need(x.moment == "step" or x.kind == "lighthouse", f"{key}.moment", x.moment,
             "only 'lighthouse' failures take a moment; other kinds strike at at_step")
    need(fl.mtbf_steps >= 0, "faults.mtbf_steps", fl.mtbf_steps, "expected an integer >= 0 (0: no random failures)")
    need(fl.max_random >= 0, "faults.max_random", fl.max_random, "expected an integer >= 0")
    for i, k in enumerate(fl.random_kinds):
        need(k in FAULT_KINDS, f"faults.random_kinds[{i}]", k, f"expected one of {', '.join(FAULT_KINDS)}")
    need(bool(fl.random_kinds) or not fl.mtbf_steps, "faults.random_kinds", fl.random_kinds,
         "expected at least one kind when faults.mtbf_steps > 0")
    if fl.enabled and any(x.kind != "lighthouse" for x in cfg.fault_plan):
        need(rg.max_restarts >= 1, "replica_groups.max_restarts", rg.max_restarts,
             "expected >= 1 when faults kill workers (a killed group is restarted by torchrun)")
    if fl.enabled and any(x.kind == "lighthouse" for x in cfg.fault_plan):
        need(cfg.quorum_retries >= 1, "localsgd.quorum_retries", ls.quorum_retries,
             "expected >= 1 when faults kill the lighthouse (groups retry the quorum while it restarts)")


def parse_config(raw: Any, source: str = "<config>") -> ExperimentConfig:
    """Validate an already-parsed YAML document; errors are prefixed with ``source``."""
    try:
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"expected a mapping of keys at the top level, got {type(raw).__name__}")
        cfg = _build(ExperimentConfig, raw, "")
        _check(cfg)
        return cfg
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _read_text(p: Path) -> str:
    try:
        return p.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found (looked in {Path.cwd()}); pass --config PATH") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config file: {e.strerror}") from None


def embed_config(path: Union[str, Path], overrides: Sequence[str] = ()) -> str:
    """The config's text (with overrides merged) as base64, for roles that cannot read the file.

    Base64 has no commas, quotes or spaces, so it survives Slurm's ``--export``
    (which splits on commas), shells and Kubernetes manifests unchanged.
    """
    return base64.b64encode(resolved_text(path, overrides).encode()).decode("ascii")


_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def apply_overrides(raw: Any, overrides: Sequence[str], source: str = "<config>") -> Any:
    """``raw`` (a parsed YAML document) with each ``dotted.key=value`` set; values are parsed as YAML.

    Only the shape is checked here; the schema checks keys and values afterwards,
    with the same messages as for the file.
    """
    if not overrides:
        return raw
    merged = copy.deepcopy(raw) if raw is not None else {}
    if not isinstance(merged, dict):
        return merged  # parse_config says what is wrong with the file itself
    for item in overrides:
        key, sep, text = item.partition("=")
        if item.startswith("-"):
            raise ConfigError(f"{source}: override {item!r}: options such as --fresh go before the "
                              "dotted.key=value overrides (torchx hands everything after the first one to them)")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"{source}: override {item!r}: expected dotted.key=value, e.g. localsgd.sync_every=50")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: override {item!r}: the value is not valid YAML: {e}") from None
        *parents, leaf = key.split(".")
        node = merged
        for i, part in enumerate(parents):
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parents[: i + 1])
                raise ConfigError(f"{source}: override {item!r}: {where} is {child!r}, not a mapping of keys")
            node = child
        node[leaf] = value
    return merged


def describe_source(path: Union[str, Path], overrides: Sequence[str]) -> str:
    """How messages name a config: its file, and the overrides applied to it."""
    return f"{path} with {' '.join(overrides)}" if overrides else str(path)


def resolved_text(path: Union[str, Path], overrides: Sequence[str] = ()) -> str:
    """The YAML text the roles run: the file's own text, or with overrides the merged document."""
    text = _read_text(Path(path))
    if not overrides:
        return text
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: malformed YAML: {e}") from None
    merged = apply_overrides(raw, overrides, describe_source(path, overrides))
    return f"# {path} with overrides: {' '.join(overrides)}\n" + yaml.safe_dump(merged, sort_keys=False)


def load_config(path: Union[str, Path], embedded: Optional[str] = None,
                overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read and validate the experiment YAML at ``path``, with ``overrides`` (``dotted.key=value``) applied.

    With ``embedded`` (from :func:`embed_config`) the text comes from there and
    ``path`` only names it in messages: the file need not exist here.
    """
    p = Path(path)
    source = describe_source(p, overrides)
    if embedded is None:
        text = _read_text(p)
    else:
        try:
            text = base64.b64decode(embedded.encode("ascii"), validate=True).decode()
        except (ValueError, UnicodeError) as e:
            raise ConfigError(f"{p}: the embedded config (--config-b64) is not base64 of UTF-8 text: {e}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: malformed YAML: {e}") from None
    return parse_config(apply_overrides(raw, overrides, source), source)


def resolved_yaml(cfg: ExperimentConfig, source: str) -> str:
    """Every key of ``cfg`` as YAML, defaults included: what a run records as ``output_dir/config.yaml``."""
    return (f"# The resolved config of this run: {source}, every default filled in.\n"
            f"# Rerun it exactly: torchx run -- --config <this file>\n"
            + yaml.safe_dump(to_dict(cfg), sort_keys=False))


def to_dict(cfg: ExperimentConfig) -> dict:
    return dataclasses.asdict(cfg)


def reference_markdown() -> str:
    """The config reference table (every key, its default and its doc) for docs/config.md."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]

    def walk(cls: type, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            tp = _type_of(cls, f.name)
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{f.name}.")
                continue
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
            if item is not None and dataclasses.is_dataclass(item):
                rows.append(f"| `{prefix}{f.name}` | `[]` | {f.metadata['doc']} |")
                walk(item, f"{prefix}{f.name}[].")
                continue
            rows.append(f"| `{prefix}{f.name}` | `{yaml.safe_dump(default, default_flow_style=True).strip().removesuffix('...').strip()}` | {f.metadata['doc']} |")

    walk(ExperimentConfig, "")
    return "\n".join(rows)


def main(argv: List[str]) -> int:
    """``python -m localsgd_ft.config FILE [key=value ...]`` checks a config and prints it resolved;
    ``--reference`` prints the key table."""
    if argv == ["--reference"]:
        print(reference_markdown())
        return 0
    if not argv or argv[0].startswith("-"):
        print("usage: python -m localsgd_ft.config CONFIG.yaml [dotted.key=value ...] | --reference",
              file=sys.stderr)
        return 2
    try:
        cfg = load_config(argv[0], overrides=argv[1:])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
