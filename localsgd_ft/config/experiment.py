"""The whole experiment file: its sections, the facts derived from them, and the order their rules run in."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Annotated, List

from pydantic import Field, model_validator

from localsgd_ft.config.errors import Allowed
from localsgd_ft.config.fault_plan import Fault, plan_faults
from localsgd_ft.config.limits import NAME_MAX
from localsgd_ft.config.schedule import (QUORUM_RETRY_INTERVAL_S, CheckpointConfig, FaultsConfig, LocalSGDConfig,
                                         TrainConfig)
from localsgd_ft.config.sections import (DataConfig, LighthouseConfig, ModelConfig, OptimizerConfig, PathText,
                                         ReplicaGroupsConfig, Section, section)

# A pause after a failed quorum request longer than this is worth a warning: a lighthouse outage of a
# second would cost every group that long.
QUORUM_PAUSE_WARN_S = 5.0
# DiLoCo's outer momentum from which SGD momentum inside was measured to train badly (docs/algorithms.md).
OUTER_MOMENTUM_WARN = 0.8


class ExperimentConfig(Section):
    """One experiment: what ``torchx run -- --config FILE`` launches and every trainer trains."""

    name: Annotated[str, Allowed(
        f"expected 1 to {NAME_MAX} letters, digits, '-' or '_', the first a letter or digit (it names the torchx "
        "app, its Kubernetes job and the output directory)")] = Field(
        "localsgd", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$", max_length=NAME_MAX,
        description="Experiment name: the torchx app name and the default output directory.")
    output_dir: PathText = Field("", description="Where summary.json and per-group results go. Empty: "
                                                 "outputs/<name>.")
    replica_groups: ReplicaGroupsConfig = section(ReplicaGroupsConfig, "Replica groups and their resources.")
    localsgd: LocalSGDConfig = section(LocalSGDConfig, "LocalSGD synchronisation and fault-tolerance timings.")
    lighthouse: LighthouseConfig = section(LighthouseConfig, "The torchft lighthouse (quorum service).")
    data: DataConfig = section(DataConfig, "CIFAR-10 location, checks and batching.")
    model: ModelConfig = section(ModelConfig, "The network.")
    optimizer: OptimizerConfig = section(OptimizerConfig, "The local optimizer.")
    train: TrainConfig = section(TrainConfig, "Steps, evaluation, seeding.")
    checkpoint: CheckpointConfig = section(CheckpointConfig, "Durable checkpoints and resuming.")
    faults: FaultsConfig = section(FaultsConfig, "Failures to inject (off by default).")

    @model_validator(mode="after")
    def _rules_across_fields(self) -> "ExperimentConfig":
        for part in (self.replica_groups, self.localsgd, self.lighthouse, self.train, self.checkpoint, self.faults):
            part.check(self)
        return self

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
        return self.replica_groups.group_gpus()

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
    def cross_group_backend(self) -> str:
        """The process group the groups sync through: localsgd.transport, with 'auto' resolved."""
        if self.localsgd.transport != "auto":
            return self.localsgd.transport
        if not self.uses_gpus:
            return "gloo"
        listed = [x for g in self.group_gpus for x in g]
        return "gloo" if len(set(listed)) < len(listed) else "nccl"

    @property
    def quorum_retries(self) -> int:
        """Retries handed to torchft's Manager (localsgd.quorum_retries, or the automatic count)."""
        if self.localsgd.quorum_retries >= 0:
            return self.localsgd.quorum_retries
        return self.automatic_quorum_retries

    @property
    def automatic_quorum_retries(self) -> int:
        """Retries for a try every QUORUM_RETRY_INTERVAL_S within quorum_timeout_s (quorum_retries: -1)."""
        # torchft sleeps quorum_timeout / (retries + 1) after a failed try; the Python side gives
        # up after quorum_timeout anyway, so more retries only shorten the wait after an outage.
        return max(1, int(self.localsgd.quorum_timeout_s / QUORUM_RETRY_INTERVAL_S) - 1)

    @property
    def quorum_pause_s(self) -> float:
        """How long torchft waits after a failed quorum request before it asks again."""
        return self.localsgd.quorum_timeout_s / (self.quorum_retries + 1)

    def advice(self) -> List[str]:
        """Settings that are valid but make failures costly, each with the fix (printed at launch, never refused)."""
        notes = []
        if self.quorum_pause_s > QUORUM_PAUSE_WARN_S:
            notes.append(
                f"localsgd.quorum_retries {self.localsgd.quorum_retries} with localsgd.quorum_timeout_s "
                f"{self.localsgd.quorum_timeout_s:g}: after a failed quorum request torchft waits "
                f"{self.quorum_pause_s:.1f} s before it asks again (quorum_timeout_s / (quorum_retries + 1)), so "
                f"every lighthouse outage or refused quorum costs the groups at least that; leave quorum_retries "
                f"at -1 (automatic: a try every {QUORUM_RETRY_INTERVAL_S:g} s) or set it to "
                f"{self.automatic_quorum_retries}")
        ls, inner = self.localsgd, self.optimizer
        if (ls.algorithm == "diloco" and ls.outer_optimizer.momentum >= OUTER_MOMENTUM_WARN
                and inner.name == "sgd" and inner.momentum > 0):
            notes.append(
                f"localsgd.outer_optimizer.momentum {ls.outer_optimizer.momentum:g} with optimizer.name sgd and "
                f"optimizer.momentum {inner.momentum:g}: the two momenta compound, and on the fixture DiLoCo "
                f"diverged at sync_every 10 and reached about 0.5 test accuracy at 20-100, where outer momentum "
                f"0.5 (the default) reached 0.94-0.99; set localsgd.outer_optimizer.momentum: 0.5, or use "
                f"optimizer.name: adamw as the DiLoCo paper does")
        return notes

    @property
    def initial_syncs(self) -> int:
        """Syncs before the first step at each job start: LocalSGD in sync mode begins with one that aligns every
        group. DiLoCo needs none: its first quorum heals a joining group before any pseudo-gradient is sent."""
        return 1 if self.localsgd.recovery == "sync" and self.localsgd.algorithm == "localsgd" else 0

    @cached_property
    def fault_plan(self) -> List[Fault]:
        """Every failure this run injects, in step order (empty unless faults.enabled).

        Drawn once per config object: the checks, the lighthouse and every trainer read it many times, and a
        config is never changed after validation.
        """
        return plan_faults(self)
