"""The workers of one replica group: their process group, gradient averaging, and decisions they share.

A replica group is one torchrun of ``replica_groups.workers`` processes per
node (``WORLD_SIZE`` in all). Inside the group the ordinary torch.distributed
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
from typing import Any, List, Optional, Tuple

import torch
from torch import nn


class GroupWorkers:
    def __init__(self, rank: int, world_size: int, local_rank: int, host: str) -> None:
        self.rank, self.world_size, self.local_rank, self.host = rank, world_size, local_rank, host
        self._store: Any = None  # the Manager store this process serves (worker 0 only)

    @classmethod
    def from_env(cls) -> "GroupWorkers":
        """This process's place in its group, as torchrun describes it (a lone process: rank 0 of 1)."""
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)),
                   env.get("MASTER_ADDR", "127.0.0.1"))

    @property
    def leader(self) -> bool:
        """Worker 0: the one that speaks for the group (metrics, events, results, checkpoints)."""
        return self.rank == 0

    @property
    def many(self) -> bool:
        return self.world_size > 1

    def start(self, device: torch.device) -> None:
        """Join the group's default process group; nothing with one worker.

        It meets in torchrun's store under a prefix of its own per restart:
        torchrun keeps one store for every restart of the group, and gloo would
        otherwise find the dead incarnation's addresses there and fail to
        connect (every restart, until the group is lost). Its collectives keep
        torch's default timeout: a worker that dies makes torchrun restart the
        group long before, and the others may rightly wait out a peer's
        evaluation, a hang or a slow quorum.
        """
        if not self.many:
            return
        import torch.distributed as dist

        env = os.environ
        agent_store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False,
                                    wait_for_workers=False)
        store = dist.PrefixStore(f"localsgd_ft/restart_{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", agent_store)
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=store, rank=self.rank, world_size=self.world_size)

    def manager_store(self) -> Tuple[str, int]:
        """(host, port) of a store for this incarnation's torchft Managers, served by worker 0.

        torchft keeps the Manager server's address under a fixed key in the
        store it is given. torchrun's store outlives a restart of the group, so a
        restarted worker could read the address of the dead incarnation's server
        before worker 0 has replaced it. A store per incarnation has no such key.
        """
        from torch.distributed import TCPStore

        port = 0
        if self.leader:
            self._store = TCPStore(self.host, 0, is_master=True, wait_for_workers=False)
            port = self._store.port
        return self.host, int(self.agree(port))

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
