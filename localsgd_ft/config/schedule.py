"""The sections that say what a run does over time: how groups sync, how long they train, checkpoints, failures.

Like :mod:`localsgd_ft.config.sections`: typed fields with their docs, and each
section's rules across fields in its ``check(cfg)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, List

from pydantic import Field

from localsgd_ft.config.errors import Allowed, ConfigError, need, shown
from localsgd_ft.config.limits import (DAY_S, MAX_BUCKET_MB, MAX_CHECKPOINTS_KEPT, MAX_CPUS, MAX_FRAGMENTS, MAX_GROUPS,
                                       MAX_LR, MAX_NODES, MAX_QUORUM_RETRIES, MAX_RANDOM_FAULTS, MAX_RANDOM_KINDS,
                                       MAX_SCHEDULED_FAULTS, MAX_SEED, MAX_STEPS, MAX_WORKERS)
from localsgd_ft.config.sections import (HOST_FAULT_KINDS, Algorithm, FaultKind, FaultMoment, Number, PathText,
                                         Recovery, Section, SyncPrecision, Transport, section)

if TYPE_CHECKING:
    from localsgd_ft.config.experiment import ExperimentConfig

# With localsgd.quorum_retries -1: one quorum try every this many seconds while the lighthouse is away.
QUORUM_RETRY_INTERVAL_S = 0.5

# DiLoCo's keys: set with algorithm 'localsgd' they would be ignored, so they are refused.
DILOCO_KEYS = ("outer_optimizer", "fragments", "fragment_sync_delay", "fragment_update_alpha", "quantize",
               "sync_precision", "bucket_cap_mb")

# int8 syncs leave 127 // groups levels per side for each group's share of the sum: below 4 they say too little.
INT8_MAX_GROUPS = 127 // 4


class OuterOptimizerConfig(Section):
    lr: Number = Field(
        0.7, gt=0, le=MAX_LR,
        description="DiLoCo's outer learning rate (SGD on the averaged pseudo-gradient).")
    momentum: Annotated[Number, Allowed("expected 0 <= momentum < 1")] = Field(
        0.5, ge=0, lt=1,
        description="Outer momentum. 0.5 trains at every sync_every measured; the paper's 0.9 assumes an AdamW "
                    "inner optimizer and hundreds of outer steps, and with SGD momentum inside it trains badly "
                    "or diverges (docs/algorithms.md).")
    nesterov: bool = Field(True, description="Nesterov momentum for the outer step.")


class LocalSGDConfig(Section):
    algorithm: Annotated[Algorithm, Allowed(
        "expected one of localsgd, diloco (Streaming DiLoCo is diloco with fragments > 1)")] = Field(
        "localsgd",
        description="'localsgd': average the parameters every sync_every steps; 'diloco': average the change since "
                    "the last sync (a pseudo-gradient) and apply it with an outer optimizer (DiLoCo; Streaming "
                    "DiLoCo with fragments > 1). Needs recovery: sync.")
    sync_every: int = Field(
        10, ge=1, le=MAX_STEPS,
        description="Local optimizer steps between two fault-tolerant syncs of the whole model.")
    recovery: Recovery = Field(
        "sync",
        description="How a joining group recovers: 'sync' restores the live weights before its first step; "
                    "'async' recovers in the background and its first sync_every steps are discarded.")
    transport: Annotated[Transport, Allowed("expected one of auto, nccl, gloo")] = Field(
        "auto",
        description="The process group the groups sync through. 'auto': gloo on CPU and where groups share a GPU "
                    "(replica_groups.gpus such as [0, 0]: NCCL refuses two members on one device), NCCL where every "
                    "group has its own GPUs; 'gloo' on GPUs stages each sync through host memory.")
    timeout_s: Number = Field(
        30.0, gt=0, le=DAY_S,
        description="Timeout of collectives, commits and checkpoint transfers, in seconds.")
    quorum_timeout_s: Number = Field(
        120.0, gt=0, le=DAY_S,
        description="How long a group waits for a quorum, in seconds. Must exceed the heartbeat timeout plus one sync "
                    "interval.")
    quorum_retries: Annotated[int, Allowed(f"expected 0..{MAX_QUORUM_RETRIES}, or -1 (automatic)")] = Field(
        -1, ge=-1, le=MAX_QUORUM_RETRIES,
        description="Tries of a failed quorum request within quorum_timeout_s; torchft waits quorum_timeout_s / "
                    "(retries + 1) between them, so they ride through a lighthouse restart. -1: one try every "
                    f"{QUORUM_RETRY_INTERVAL_S:g} s, so an outage costs little more than its own length; 0: none (a "
                    "lighthouse restart crashes every group).")
    outer_optimizer: OuterOptimizerConfig = section(OuterOptimizerConfig, "DiLoCo only: the outer optimizer.")
    fragments: Annotated[int, Allowed(f"expected an integer in 1..{MAX_FRAGMENTS} that divides "
                                      "localsgd.sync_every")] = Field(
        1, ge=1, le=MAX_FRAGMENTS,
        description="DiLoCo only: split the model into this many fragments of consecutive layers, synced one after "
                    "another (Streaming DiLoCo): one fragment every sync_every / fragments steps. 1: plain DiLoCo.")
    fragment_sync_delay: Annotated[int, Allowed("expected 0..sync_every / fragments - 1: a fragment's allreduce must "
                                                "finish before the next fragment's starts")] = Field(
        0, ge=0, le=MAX_STEPS,
        description="DiLoCo only: local steps a fragment's allreduce overlaps with training before it is waited "
                    "for; less than sync_every / fragments.")
    fragment_update_alpha: Annotated[Number, Allowed(
        "expected a number in [0, 1] (0: take the synced parameters; 1: keep the local ones)")] = Field(
        0.0, ge=0, le=1,
        description="DiLoCo only: weight of the local parameters mixed into the synced ones, in [0, 1] (0: synced "
                    "only).")
    quantize: bool = Field(False, description="DiLoCo only: quantize pseudo-gradients for the allreduce (torchft's "
                                              "triton kernels: GPUs only).")
    sync_precision: Annotated[SyncPrecision, Allowed("expected one of float32, bfloat16, int8")] = Field(
        "float32",
        description="DiLoCo only: what a pseudo-gradient is sent as, on any device. 'bfloat16': half the bytes, "
                    "summed in bfloat16; 'int8': about a quarter, each block of 256 values scaled by the largest "
                    "magnitude any group has there; both averaged in float32 on arrival (docs/algorithms.md).")
    bucket_cap_mb: Annotated[int, Allowed(f"expected 0..{MAX_BUCKET_MB} (0: one allreduce per parameter)")] = Field(
        0, ge=0, le=MAX_BUCKET_MB,
        description="DiLoCo only: allreduce pseudo-gradients in buckets of this many MiB; 0: one allreduce per "
                    "parameter.")

    def check(self, cfg: ExperimentConfig) -> None:
        """What torchft would reject at start or silently mishandle, refused here."""
        heartbeat_ms = cfg.lighthouse.heartbeat_timeout_ms
        need(self.quorum_timeout_s * 1000 > heartbeat_ms, "localsgd.quorum_timeout_s", self.quorum_timeout_s,
             f"expected more than lighthouse.heartbeat_timeout_ms ({heartbeat_ms} ms) plus one sync interval")
        if self.transport == "nccl" and not cfg.uses_gpus:
            raise ConfigError(
                "localsgd.transport: 'nccl', but the groups train on CPU (no replica_groups.gpus or gpus_per_group): "
                "NCCL moves GPU memory only; set localsgd.transport: auto or gloo, or give the groups GPUs")
        if self.quantize and cfg.uses_gpus and cfg.cross_group_backend == "gloo":
            raise ConfigError(
                "localsgd.quantize: true, but the groups sync through gloo (localsgd.transport, or groups sharing a "
                "GPU): torchft's quantized allreduce is written for NCCL; set localsgd.sync_precision: int8 or "
                "bfloat16 instead (any device, any transport), or give each group its own GPU with transport nccl")
        if self.algorithm == "localsgd":
            plain = LocalSGDConfig()
            if self.sync_precision != plain.sync_precision:
                raise ConfigError(
                    f"localsgd.sync_precision: set to {self.sync_precision!r}, but algorithm 'localsgd' averages "
                    "the parameters themselves, which rounding would move in every group; reduced precision "
                    "suits DiLoCo's pseudo-gradients: set localsgd.algorithm: diloco (with "
                    "localsgd.outer_optimizer lr: 1.0 and momentum: 0 it averages like LocalSGD), or remove "
                    "localsgd.sync_precision")
            for key in DILOCO_KEYS:
                if getattr(self, key) != getattr(plain, key):
                    raise ConfigError(
                        f"localsgd.{key}: set to {shown(getattr(self, key))}, but it is a DiLoCo setting and "
                        "localsgd.algorithm is 'localsgd', which would ignore it; set localsgd.algorithm: diloco, "
                        f"or remove localsgd.{key}")
            return
        self._check_diloco(cfg)

    def _check_diloco(self, cfg: ExperimentConfig) -> None:
        if self.recovery != "sync":
            raise ConfigError(
                f"localsgd.recovery: got {self.recovery!r}, but DiLoCo needs a synchronous quorum (torchft's DiLoCo "
                "refuses an asynchronous one); use recovery: sync, or algorithm: localsgd")
        if self.sync_every % self.fragments:
            raise ConfigError(
                f"localsgd.fragments: got {self.fragments}, expected an integer >= 1 that divides "
                f"localsgd.sync_every ({self.sync_every}): each fragment is synced once every sync_every steps, one "
                "every sync_every / fragments steps")
        per_fragment = self.sync_every // self.fragments
        if self.fragment_sync_delay >= per_fragment:
            raise ConfigError(
                f"localsgd.fragment_sync_delay: got {self.fragment_sync_delay}, expected 0..{per_fragment - 1}: a "
                f"fragment's allreduce must finish before the next fragment's starts (sync_every {self.sync_every} "
                f"/ fragments {self.fragments} = {per_fragment} steps apart)")
        if self.quantize and self.sync_precision != "float32":
            raise ConfigError(
                f"localsgd.quantize: true together with localsgd.sync_precision {self.sync_precision!r}: both choose "
                "what a pseudo-gradient is sent as; keep one (sync_precision works on any device, quantize needs "
                "CUDA and triton)")
        if self.sync_precision == "int8" and cfg.replica_groups.count > INT8_MAX_GROUPS:
            raise ConfigError(
                f"localsgd.sync_precision: 'int8' with {cfg.replica_groups.count} replica groups: the sum of every "
                f"group's int8 values must fit in int8, which leaves fewer than 4 levels per group above "
                f"{INT8_MAX_GROUPS} groups; use sync_precision: bfloat16, or at most {INT8_MAX_GROUPS} groups")
        if self.quantize and not cfg.uses_gpus:
            raise ConfigError(
                "localsgd.quantize: true, but the groups train on CPU: torchft quantizes with triton kernels on "
                "CUDA GPUs only (without them it silently sends the data unquantized); set "
                "localsgd.quantize: false, or give the groups GPUs")


class TrainConfig(Section):
    max_steps: int = Field(
        1000, ge=1, le=MAX_STEPS,
        description="Local optimizer steps per replica group; a multiple of localsgd.sync_every so groups stop on a "
                    "sync.")
    eval_every: Annotated[int, Allowed(f"expected 0..{MAX_STEPS} (0: only at the end)")] = Field(
        500, ge=0, le=MAX_STEPS,
        description="Evaluate on the test split every this many local steps (0: only at the end).")
    seed: int = Field(
        0, ge=0, le=MAX_SEED,
        description="Seed of model initialisation (same in every group), data order and augmentation.")
    threads: Annotated[int, Allowed(f"expected 0..{MAX_CPUS} (0: replica_groups.cpus / workers)")] = Field(
        0, ge=0, le=MAX_CPUS,
        description="Intra-op CPU threads per worker; 0: replica_groups.cpus / workers, so groups sharing a host do "
                    "not oversubscribe it.")
    channels_last: bool = Field(False, description="Keep images and conv weights in channels_last memory format "
                                                   "(faster convolutions on GPU).")
    bf16: bool = Field(False, description="Run forward and loss under bfloat16 autocast (GPU; weights and optimizer "
                                          "stay float32).")
    compile: bool = Field(False, description="torch.compile the model (worth it on GPU for long runs; compiling "
                                             "takes a while).")
    log_every: int = Field(
        100, ge=1, le=MAX_STEPS,
        description="Progress cadence: every N local steps each group prints 'LocalSGD: Number of local optimizer "
                    "steps completed: N' and a progress line (step/max, loss, accuracy, samples/s, quorum, ETA) and "
                    "appends a 'train' event to its metrics file.")

    def check(self, cfg: ExperimentConfig) -> None:
        sync_every = cfg.localsgd.sync_every
        if self.max_steps % sync_every:
            lo = max(sync_every, self.max_steps - self.max_steps % sync_every)
            hi = lo + sync_every if lo < self.max_steps else lo
            raise ConfigError(
                f"train.max_steps: got {self.max_steps}, which is not a multiple of localsgd.sync_every "
                f"({sync_every}); groups must stop on a sync boundary: use {lo} or {hi}")


class CheckpointConfig(Section):
    enabled: bool = Field(True, description="Write durable checkpoints, so a whole-job restart resumes instead of "
                                            "starting over.")
    dir: PathText = Field("", description="Checkpoint directory. Empty: <output_dir>/checkpoints.")
    every_syncs: int = Field(
        50, ge=1, le=MAX_STEPS,
        description="Write one every this many committed syncs (by the lowest-ranked live group; with Streaming "
                    "DiLoCo each fragment's sync counts).")
    every_s: Annotated[Number, Allowed(f"expected 0..{DAY_S} seconds (0: off)")] = Field(
        300.0, ge=0, le=DAY_S,
        description="Also write one at the first committed sync after this many seconds since the writing group's "
                    "last one (or its start): with both cadences a whole-job crash loses at most this long or "
                    "every_syncs syncs of training, whichever is less. 0: by sync count only. The final sync always "
                    "writes one.")
    keep: int = Field(
        3, ge=1, le=MAX_CHECKPOINTS_KEPT,
        description="Keep this many of the newest valid checkpoints; older ones are deleted.")
    resume: bool = Field(
        True,
        description="Resume from the newest valid checkpoint. false (or `torchx run -- --fresh True`) starts over; "
                    "the old checkpoints are set aside (renamed), never deleted.")

    def check(self, cfg: ExperimentConfig) -> None:
        syncs = cfg.training_syncs
        if self.enabled and self.every_syncs > syncs and not self.every_s:
            raise ConfigError(
                f"checkpoint.every_syncs: got {self.every_syncs}, but the run has only {syncs} syncs "
                f"(train.max_steps {cfg.train.max_steps} / {cfg.steps_per_sync} steps per sync) and "
                "checkpoint.every_s is 0, so no checkpoint would be written before the end and a crash would lose "
                f"all the work; use every_syncs at most {syncs} (e.g. {max(1, syncs // 4)}), a time cadence "
                "(checkpoint.every_s, e.g. 300), or checkpoint.enabled: false")


class FaultConfig(Section):
    kind: FaultKind = Field(
        "kill",
        description="'kill': SIGKILL the group's worker (a machine loss); 'hang': SIGSTOP it for duration_s; "
                    "'kill_during_sync': SIGKILL it inside the parameter allreduce; 'lighthouse': kill the "
                    "lighthouse and restart it after duration_s; 'partition': cut the worker's host off the "
                    "network for duration_s, its processes left running; 'host_down': the worker's host goes "
                    "dark for good (its link cut, then everything on it killed). The last two need a host of "
                    "the multi-host test bed (tests/hosts.py) and are refused anywhere else.")
    group: Annotated[int, Allowed("expected -1 (random) or 0..replica_groups.count - 1")] = Field(
        -1, ge=-1, le=MAX_GROUPS - 1,
        description="Replica group to hit; -1: one chosen at random (seeded by faults.seed). Unused for 'lighthouse'.")
    worker: Annotated[int, Allowed("expected -1 (random) or a rank of the group's workers")] = Field(
        -1, ge=-1, le=MAX_WORKERS * MAX_NODES - 1,
        description="Which worker (rank) of the group to hit; -1: one chosen at random (0 with one worker). Unused "
                    "for 'lighthouse'.")
    at_step: Annotated[int, Allowed("expected 1..train.max_steps - 1 (inside train.max_steps)")] = Field(
        1, ge=1, le=MAX_STEPS,
        description="Training step (committed syncs x sync_every + local steps since) at which it happens.")
    duration_s: Number = Field(
        3.0, gt=0, le=DAY_S,
        description="How long a 'hang' or a 'partition' lasts, or how long the lighthouse stays down.")
    moment: FaultMoment = Field(
        "step",
        description="When a 'lighthouse' failure strikes: 'step' (at at_step, between syncs), 'quorum' (as the "
                    "first sync after at_step asks for its quorum), 'allreduce' (inside that sync's parameter "
                    "allreduce), 'heal' (while the first group to recover live loads the state it was sent; "
                    "at_step is then ignored). A 'hang' takes 'allreduce' too: the group freezes just before it "
                    "sends its part of the first sync after at_step, so its peers wait for it mid-collective. "
                    "'partition' and 'host_down' take 'allreduce' as well: the link goes dark once that "
                    "collective is under way.")

    def check(self, cfg: ExperimentConfig, key: str) -> None:
        count, size, steps = cfg.replica_groups.count, cfg.group_size, cfg.train.max_steps
        need(self.group < count, f"{key}.group", self.group, f"expected -1 (random) or 0..{count - 1}")
        need(self.worker < size, f"{key}.worker", self.worker,
             f"expected -1 (random) or 0..{size - 1} (a rank of the group's {size} worker(s))")
        need(self.at_step < steps, f"{key}.at_step", self.at_step,
             f"expected 1..{steps - 1} (inside train.max_steps)")
        need(self.moment == "step" or self.kind == "lighthouse"
             or (self.kind in ("hang", *HOST_FAULT_KINDS) and self.moment == "allreduce"),
             f"{key}.moment", self.moment,
             "only 'lighthouse' failures take any moment, and 'hang', 'partition' and 'host_down' take "
             "'allreduce'; other kinds strike at at_step")


class FaultsConfig(Section):
    enabled: bool = Field(False, description="Inject the failures below. Nothing is ever injected unless this is "
                                             "true.")
    schedule: List[FaultConfig] = Field(
        default_factory=list, max_length=MAX_SCHEDULED_FAULTS,
        description="Failures at given steps: a list of {kind, group, worker, at_step, duration_s, moment}.")
    mtbf_steps: Annotated[int, Allowed(f"expected 0..{MAX_STEPS} (0: no random failures)")] = Field(
        0, ge=0, le=MAX_STEPS, description="Random failures: mean training steps between them (exponential); 0: none.")
    max_random: int = Field(0, ge=0, le=MAX_RANDOM_FAULTS, description="Random failures: at most this many.")
    random_kinds: List[FaultKind] = Field(
        default_factory=lambda: ["kill"], max_length=MAX_RANDOM_KINDS,
        description="Random failures: the kinds to draw from (a kind named twice is drawn twice as often).")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed for random failures and random target groups.")

    def check(self, cfg: ExperimentConfig) -> None:
        for i, fault in enumerate(self.schedule):
            fault.check(cfg, f"faults.schedule[{i}]")
        need(bool(self.random_kinds) or not self.mtbf_steps, "faults.random_kinds", self.random_kinds,
             "expected at least one kind when faults.mtbf_steps > 0")
        plan = cfg.fault_plan
        if any(f.kind != "lighthouse" for f in plan):
            need(cfg.replica_groups.max_restarts >= 1, "replica_groups.max_restarts", cfg.replica_groups.max_restarts,
                 "expected >= 1 when faults kill workers (a killed group is restarted by torchrun)")
        if any(f.kind == "lighthouse" for f in plan):
            need(cfg.quorum_retries >= 1, "localsgd.quorum_retries", cfg.localsgd.quorum_retries,
                 "expected >= 1 when faults kill the lighthouse (groups retry the quorum while it restarts)")
