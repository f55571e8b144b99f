"""The workers of one replica group: their process group, gradient averaging, and decisions they share.

A replica group is ``replica_groups.nodes`` torchrun agents of
``replica_groups.workers`` processes each (``WORLD_SIZE`` in all). Inside the group the ordinary torch.distributed
default process group (gloo on CPU; gloo for control and NCCL for tensors on
GPU) averages gradients at every step (DDP), so the group's workers hold
identical parameters throughout. Across groups each worker has its own torchft
Manager: LocalSGD averages worker r of every group with worker r of the
others, and the Manager server of worker 0 agrees commits for the whole group.

Some decisions depend on what one worker asks the lighthouse role (has the run
already finished? which checkpoint to resume?); the workers of a group must
take the same one, or they wait for each other in different collectives
forever. :meth:`GroupWorkers.agree` hands worker 0's answer to all. Values
travel as JSON, never pickled.

With one worker there is no process group, nothing is wrapped, and every
method is the identity.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any, Callable, List, Optional, Tuple

import torch
from torch import nn


class GroupWorkers:
    """This process's place in its replica group (rank, world size, local rank) and what the group does together."""

    def __init__(self, rank: int, world_size: int, local_rank: int) -> None:
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self._store: Any = None  # the Manager store this process serves (worker 0 only)

    @classmethod
    def from_env(cls) -> "GroupWorkers":
        """This process's place in its group, as torchrun describes it (a lone process: rank 0 of 1)."""
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))

    @property
    def leader(self) -> bool:
        """Worker 0: the one that speaks for the group (metrics, events, results, checkpoints)."""
        return self.rank == 0

    @property
    def many(self) -> bool:
        return self.world_size > 1

    def start(self, device: torch.device) -> None:
        """Join the group's default process group; nothing with one worker.

        It meets in the store at ``MASTER_ADDR:MASTER_PORT``, which worker 0
        serves: the replica role starts torchrun with
        ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, so every restart of the group
        meets in a new store. (torchrun's own store outlives restarts: gloo found
        the dead incarnation's addresses there and every restart failed to
        connect, until the group was lost. A prefix per restart count would not
        do: the agents of a multi-node group do not always count alike.) Its
        collectives keep torch's default timeout: a worker that dies makes
        torchrun restart the group long before, and the others may rightly wait
        out a peer's evaluation, a hang or a slow quorum.
        """
        if not self.many:
            return
        import torch.distributed as dist

        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend)

    def manager_store(self) -> Tuple[str, int]:
        """(host, port) of a store for this incarnation's torchft Managers, served by worker 0.

        torchft keeps the Manager server's address under a fixed key in the
        store it is given, so the store must be new with every incarnation. Its
        host is the one torchft's own servers advertise (this host's name): the
        other groups' workers meet in it too, for the cross-group process group.
        """
        from torch.distributed import TCPStore

        where: List[Any] = ["", 0]
        if self.leader:
            host = socket.gethostname()
            self._store = TCPStore(host, 0, is_master=True, wait_for_workers=False)
            where = [host, self._store.port]
        host, port = self.agree(where)
        return str(host), int(port)

    def parallel(self, model: nn.Module) -> nn.Module:
        """What the forward pass goes through: DDP over the group's workers (``model`` itself with one)."""
        if not self.many:
            return model
        from torch.nn.parallel import DistributedDataParallel

        on_gpu = next(model.parameters()).device.type == "cuda"
        return DistributedDataParallel(model, device_ids=[self.local_rank] if on_gpu else None)

    def agree(self, value: Any) -> Any:
        """Worker 0's ``value`` (JSON-able), in every worker of the group."""
        if not self.many:
            return value
        import torch.distributed as dist

        sizes = torch.zeros(1, dtype=torch.int64)
        data = json.dumps(value).encode() if self.leader else b""
        sizes[0] = len(data)
        dist.broadcast(sizes, src=0)
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if self.leader else torch.empty(
            int(sizes[0]), dtype=torch.uint8)
        dist.broadcast(buf, src=0)
        return json.loads(bytes(buf.tolist()).decode()) if not self.leader else value

    def leader_answer(self, ask: Callable[[], Any]) -> Any:
        """``ask()`` run by worker 0 alone (a question to the lighthouse role), its answer in every worker."""
        return self.agree(ask() if self.leader else None)

    def gather(self, value: Any) -> Optional[List[Any]]:
        """Every worker's ``value`` (JSON-able) in rank order, at worker 0; None elsewhere."""
        if not self.many:
            return [value]
        import torch.distributed as dist

        data = json.dumps(value).encode()
        size = torch.tensor([len(data)], dtype=torch.int64)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        dist.all_gather(sizes, size)
        longest = int(max(s.item() for s in sizes))
        padded = torch.zeros(longest, dtype=torch.uint8)
        padded[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        chunks = [torch.zeros(longest, dtype=torch.uint8) for _ in range(self.world_size)]
        dist.all_gather(chunks, padded)
        if not self.leader:
            return None
        return [json.loads(bytes(c[: int(s.item())].tolist()).decode()) for c, s in zip(chunks, sizes)]

    def close(self) -> None:
        if self.many:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
