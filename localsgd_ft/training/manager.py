"""torchft's Manager for one worker of a group: how it is built, and the live state it hands a joining group."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

from localsgd_ft.config import ExperimentConfig
from localsgd_ft.launch import lifecycle
from localsgd_ft.training.position import Position
from localsgd_ft.training.workers import GroupWorkers


class LiveState:
    """What live recovery hands a joining group, and what it does with what it receives.

    Weights, inner optimizer state, the sync offset (see
    :mod:`~localsgd_ft.training.position`), and which group sent it: torchft keeps the
    recovery source to itself; the metrics say whom a group healed from. An
    algorithm's own state (DiLoCo's outer optimizer and last synced
    parameters) torchft's algorithm registers with the Manager itself.
    """

    def __init__(self, group: int, model: nn.Module, optimizer: torch.optim.Optimizer, position: Position) -> None:
        self.group, self.model, self.optimizer, self.position = group, model, optimizer, position
        self.healed_from: Optional[int] = None
        self.on_heal: Optional[Callable[[], None]] = None  # an armed failure may strike then (faults.moment: heal)

    def state_dict(self) -> Dict[str, Any]:
        return {"model": self.model.state_dict(), "optim": self.optimizer.state_dict(),
                "offset": self.position.offset, "group": self.group}

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        self.model.load_state_dict(sd["model"])
        self.optimizer.load_state_dict(sd["optim"])
        self.position.offset = sd["offset"]
        self.healed_from = sd["group"]
        if self.on_heal is not None:
            self.on_heal()


def build_manager(cfg: ExperimentConfig, group: int, live: LiveState,
                  workers: GroupWorkers) -> Any:
    """Group ``group``'s torchft Manager for this worker, from the config's timeouts and the group's stores."""
    from torchft import Manager

    timeout = timedelta(seconds=cfg.localsgd.timeout_s)
    pg = cross_group_process_group(cfg)
    store_host, store_port = workers.manager_store()
    return Manager(
        pg=pg,
        load_state_dict=live.load_state_dict,
        state_dict=live.state_dict,
        min_replica_size=cfg.lighthouse.min_replicas,
        use_async_quorum=cfg.localsgd.recovery == "async",
        timeout=timeout,
        quorum_timeout=timedelta(seconds=cfg.localsgd.quorum_timeout_s),
        connect_timeout=timeout,
        # The run id makes every launch's groups distinct to any lighthouse they might reach.
        replica_id=f"{lifecycle.run_id() or cfg.name}_{group}",
        # Every group seeds its model identically, so step 0 needs no weight transfer;
        # a group that (re)joins later is still healed from a live one.
        init_sync=False,
        quorum_retries=cfg.quorum_retries,
        store_addr=store_host,
        store_port=store_port,
        rank=workers.rank,
        world_size=workers.world_size,
    )


def cross_group_process_group(cfg: ExperimentConfig) -> Any:
    """The reconfigurable process group the groups sync through (localsgd.transport, 'auto' resolved).

    torchft's gloo group takes CUDA tensors too, through host memory: groups that share a GPU sync that way.
    """
    from torchft import ProcessGroupGloo, ProcessGroupNCCL

    timeout = timedelta(seconds=cfg.localsgd.timeout_s)
    return ProcessGroupNCCL(timeout=timeout) if cfg.cross_group_backend == "nccl" else ProcessGroupGloo(timeout=timeout)
