"""The cross-group sync algorithm: one object, chosen from the YAML, that the training loop steps.

An algorithm owns what happens at an optimizer step: the step itself and, at
the end of each ``sync_every`` interval, the fault-tolerant sync across
replica groups (quorum, allreduce, commit or roll back). It reports each sync
as a :class:`Sync` and carries any state of its own that must travel with
live recovery and checkpoints (``state_dict``), so neither the loop nor the
checkpoint code has to know which algorithm runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
from torch import nn

from .config import ExperimentConfig
from .position import Position


@dataclass
class Sync:
    """One sync as the training loop sees it."""

    duration_s: float
    committed: bool


class LocalSGDSync:
    """torchft's LocalSGD: every ``sync_every`` steps, average the parameters of every live group."""

    name = "localsgd"

    def __init__(self, cfg: ExperimentConfig, manager: Any, model: nn.Module, optimizer: torch.optim.Optimizer,
                 position: Position) -> None:
        from torchft.local_sgd import LocalSGD

        self.manager, self.optimizer, self.position = manager, optimizer, position
        # LocalSGD registers an optimizer-step hook that syncs on every sync_every-th step.
        self._impl = LocalSGD(manager, model, optimizer, sync_every=cfg.localsgd.sync_every)

    def __enter__(self) -> "LocalSGDSync":
        self._impl.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._impl.__exit__(*exc)

    def initial_sync(self) -> Sync:
        """A sync before the first step: a joining group takes the live weights; at a fresh start
        every group lines up on identical weights."""
        return self._timed(self._impl.sync)

    def step(self) -> Optional[Sync]:
        """One optimizer step, and the sync if it ended an interval (None otherwise)."""
        def step() -> None:
            self.optimizer.step()
            self.position.local_steps += 1

        sync = self._timed(step)
        return sync if self.position.at_sync() else None

    def state_dict(self) -> Dict[str, Any]:
        return {}  # LocalSGD keeps nothing beyond the model and the inner optimizer

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass

    def _timed(self, fn: Any) -> Sync:
        before, t = self.manager.current_step(), time.monotonic()
        fn()
        return Sync(time.monotonic() - t, self.manager.current_step() > before)


def build_algorithm(cfg: ExperimentConfig, manager: Any, model: nn.Module, optimizer: torch.optim.Optimizer,
                    position: Position) -> LocalSGDSync:
    return LocalSGDSync(cfg, manager, model, optimizer, position)
