"""A training group's durable checkpoints: when to write one, what goes in it, and resuming from one.

Exactly one process writes: worker 0 of the group ranked 0 in the quorum that
just committed, so every checkpoint holds state all live groups agreed on (a
group's workers hold identical state, so one worker's is the group's). It
writes at every ``checkpoint.every_syncs``-th committed sync, at the first
committed sync ``checkpoint.every_s`` seconds after its last checkpoint (or
its start), and always at the final sync, so that a group restarted after the
end finds the final state. The files themselves (atomic, checksummed) are
``localsgd_ft.storage.checkpoints``' business.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from localsgd_ft.config import ExperimentConfig
from localsgd_ft.contract import EventKind, clip
from localsgd_ft.launch.completion.client import CompletionClient
from localsgd_ft.results.metrics import MetricsLog
from localsgd_ft.storage import checkpoints
from localsgd_ft.training.data import ShardedBatches
from localsgd_ft.training.optim import apply_settings, settings
from localsgd_ft.training.position import Position


class CheckpointPolicy:
    """The cadence, apart from any I/O: ``due`` says whether a committed sync should be saved."""

    def __init__(self, every_syncs: int, every_s: float, now: float) -> None:
        self.every_syncs, self.every_s = every_syncs, every_s
        self.last = now  # when the last checkpoint was written (or the clock started)

    def due(self, syncs: int, final: bool, now: float) -> bool:
        return (final or syncs % self.every_syncs == 0
                or (self.every_s > 0 and now - self.last >= self.every_s))

    def wrote(self, now: float) -> None:
        self.last = now


class Checkpointer:
    def __init__(self, cfg: ExperimentConfig, group: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                 algorithm: Any, position: Position, batches: ShardedBatches, completion: CompletionClient,
                 metrics: Optional[MetricsLog], clock: Callable[[], float] = time.monotonic,
                 writer: bool = True) -> None:
        self.cfg, self.group = cfg, group
        self.model, self.optimizer, self.algorithm = model, optimizer, algorithm
        self.position, self.batches = position, batches
        self.completion, self.metrics = completion, metrics
        self.clock = clock
        self.writer = writer  # worker 0 of the group: DDP keeps every worker's state identical
        self.policy = CheckpointPolicy(cfg.checkpoint.every_syncs, cfg.checkpoint.every_s, clock())
        self.written: List[int] = []  # training steps of the checkpoints this process wrote
        self.stopped: Optional[str] = None  # why this process writes no more checkpoints

    def restore(self, found: checkpoints.Found, device: torch.device) -> int:
        """Load ``found`` into model, optimizer, algorithm and Manager; returns its training step."""
        state = checkpoints.load(found, device)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        apply_settings(self.optimizer, settings(self.cfg.optimizer))  # the config's lr, not the saved one
        self.algorithm.load_state_dict(state.get("algorithm", {}))
        manager = self.position.manager
        # Re-enter one alignment sync before the checkpoint (sync mode): after a whole-job restart
        # that sync brings every group back to the saved count; a group that restarts while
        # others still train is then behind them, so it heals from them rather than trusting
        # a checkpoint they have already moved past.
        manager.load_state_dict({**state["manager"], "step": state["manager"]["step"] - self.cfg.initial_syncs})
        self.position.offset = int(state["offset"])
        return int(state["step"])

    def after_commit(self) -> None:
        """Called after every committed sync: write a checkpoint if this group should, now."""
        pos = self.position
        if (not self.cfg.checkpoint.enabled or not self.writer or self.stopped is not None
                or pos.manager.participating_rank() != 0):
            return
        now = self.clock()
        if not self.policy.due(pos.syncs, pos.done(), now):
            return
        step = pos.step()
        try:
            path = checkpoints.save(self.cfg, self._payload(step), step, pos.global_syncs)
        except OSError as e:
            self._stop(step, e)
            return
        self.policy.wrote(self.clock())
        self.written.append(step)
        print(f"LocalSGD: checkpoint written: {path} (step {step})", flush=True)
        self.completion.report(self.group, EventKind.CHECKPOINT, step=step, sync=pos.global_syncs)
        if self.metrics is not None:
            self.metrics.add(EventKind.CHECKPOINT, step, global_sync=pos.global_syncs)

    def _stop(self, step: int, e: OSError) -> None:
        """A write failed (a full disk, a quota, the volume gone): say so once and train on without checkpoints.

        Retrying at every sync would crash-loop nothing now, but would fill the log and pause every sync for a
        write that fails; the live groups still hold the state, and the summary says checkpoints stopped."""
        self.stopped = f"{type(e).__name__}: {e}"
        print(f"LocalSGD: WARNING: checkpoint at step {step} could not be written ({self.stopped}); this group "
              f"writes no more checkpoints and trains on. Free space in {self.cfg.checkpoint_dir} and resume from "
              "the newest valid checkpoint should the run stop", flush=True)
        self.completion.report(self.group, EventKind.CHECKPOINT_FAILED, step=step, error=clip(self.stopped))
        if self.metrics is not None:
            self.metrics.add(EventKind.CHECKPOINT_FAILED, step, error=self.stopped)

    def _payload(self, step: int) -> Dict[str, Any]:
        epoch, batch_in_epoch = self.batches.position(step)
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "algorithm": self.algorithm.state_dict(),
            "manager": self.position.manager.state_dict(),
            "step": step,
            "offset": self.position.offset,
            # Every group's data position and augmentation randomness follow from (seed, group, step).
            "data": {"epoch": epoch, "batch_in_epoch": batch_in_epoch, "seed": self.cfg.train.seed},
        }
