"""One replica group's training: CIFAR-10 with torchft's fault-tolerant LocalSGD.

Runs in every torchrun worker (``train_localsgd.py``). Reads top to bottom:
config -> device and data -> model and optimizer -> torchft Manager -> wait for
all groups -> LocalSGD loop until the agreed number of committed syncs ->
final evaluation -> result file for the replica wrapper.

Stopping rule: every group stops once the Manager's committed-sync count
reaches ``ExperimentConfig.total_syncs``. That count is agreed through the
quorum (a recovering group inherits it), so all live groups stop after the
same commit and their final parameters are bit-identical.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from datetime import timedelta
from collections import deque
from typing import Any, Callable, Deque, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import roles
from .config import ConfigError, ExperimentConfig, OptimizerConfig, load_config
from .control import CompletionClient
from .data import DataError, ShardedBatches, eval_batches, load_cifar10
from .faults import FaultInjector
from .files import peak_rss_mb, write_json_atomic
from .model import build_model

log = logging.getLogger("localsgd_ft.trainer")


class SyncMonitor:
    """Watches every sync: counts commits, reports stalls and the first full commit after a disruption.

    A sync *stalls* when it takes more than ``STALL_FACTOR`` times the median of
    recent syncs (and at least ``STALL_MIN_S``): the survivors' wait for a dead
    peer to time out, or for a lighthouse to come back. A group is *disrupted*
    after a stall, a failed or partial sync, a restart or a hang; its next
    committed sync with every group in it is reported as ``recovered``.
    """

    STALL_FACTOR = 5.0
    STALL_MIN_S = 0.25

    def __init__(self, group: int, num_groups: int, completion: CompletionClient, disrupted: bool,
                 fingerprint: Callable[[], str]) -> None:
        self.group, self.num_groups, self.completion = group, num_groups, completion
        self.fingerprint = fingerprint  # parameters' hash, sent with "recovered" so rejoins can be checked
        self.disrupted = disrupted
        self.recent: Deque[float] = deque(maxlen=50)
        self.attempted = self.committed = 0
        self.total_s = self.max_s = 0.0

    def after_sync(self, manager: Any, step: int, duration: float, committed: bool) -> None:
        self.attempted += 1
        self.committed += committed
        self.total_s += duration
        self.max_s = max(self.max_s, duration)
        typical = sorted(self.recent)[len(self.recent) // 2] if self.recent else None
        self.recent.append(duration)
        participants = manager.num_participants()
        if typical is not None and duration > max(self.STALL_MIN_S, self.STALL_FACTOR * typical):
            self.disrupted = True
            self._report("sync_stall", step=step, duration_s=round(duration, 3), committed=committed,
                         participants=participants)
        if not committed or participants < self.num_groups:
            self.disrupted = True
        elif self.disrupted:
            self.disrupted = False
            self._report("recovered", step=step, participants=participants,
                         global_sync=manager.current_step(), params_sha256=self.fingerprint())

    def _report(self, kind: str, **fields: Any) -> None:
        try:
            self.completion.event(self.group, kind, **fields)
        except Exception as e:  # reporting must never stop training
            log.warning("could not report %s: %s", kind, e)


def build_optimizer(cfg: OptimizerConfig, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=cfg.nesterov and cfg.momentum > 0)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Top-1 accuracy in [0, 1]."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.int64)
    total = 0
    for images, labels in batches:
        correct += (model(images).argmax(1) == labels).sum().cpu()
        total += len(labels)
    model.train(was_training)
    return correct.item() / max(total, 1)


def params_sha256(model: nn.Module) -> str:
    """SHA-256 over every parameter's name and bytes: equal iff the parameters are bit-identical."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _device(cfg: ExperimentConfig, group: int) -> torch.device:
    if not cfg.uses_gpus:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"replica group {group} is configured for {cfg.gpus_per_group} GPU(s) per group, but CUDA is not "
            "available here; use a machine with GPUs or set replica_groups.gpus: [] and "
            "replica_groups.gpus_per_group: 0 to train on CPU"
        )
    # The group sees only its own GPUs (CUDA_VISIBLE_DEVICES from the component or the
    # scheduler), numbered from 0: worker LOCAL_RANK takes the LOCAL_RANK-th of them.
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def _manager(cfg: ExperimentConfig, group: int, device: torch.device, model: nn.Module,
             optimizer: torch.optim.Optimizer) -> Any:
    from torchft import Manager, ProcessGroupGloo, ProcessGroupNCCL

    timeout = timedelta(seconds=cfg.localsgd.timeout_s)
    pg = ProcessGroupNCCL(timeout=timeout) if device.type == "cuda" else ProcessGroupGloo(timeout=timeout)

    def state_dict() -> Dict[str, Any]:
        return {"model": model.state_dict(), "optim": optimizer.state_dict()}

    def load_state_dict(sd: Dict[str, Any]) -> None:
        model.load_state_dict(sd["model"])
        optimizer.load_state_dict(sd["optim"])

    return Manager(
        pg=pg,
        load_state_dict=load_state_dict,
        state_dict=state_dict,
        min_replica_size=cfg.lighthouse.min_replicas,
        use_async_quorum=cfg.localsgd.recovery == "async",
        timeout=timeout,
        quorum_timeout=timedelta(seconds=cfg.localsgd.quorum_timeout_s),
        connect_timeout=timeout,
        replica_id=f"{cfg.name}_{group}",
        # Every group seeds its model identically, so step 0 needs no weight transfer;
        # a group that (re)joins later is still healed from a live one.
        init_sync=False,
        quorum_retries=cfg.localsgd.quorum_retries,
    )


def train(cfg: ExperimentConfig, group: int) -> Dict[str, Any]:
    from torchft.local_sgd import LocalSGD

    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    rank = int(os.environ.get("RANK", 0))
    torch.set_num_threads(cfg.train.threads)
    device = _device(cfg, group)
    if device.type == "cuda":
        torch.cuda.set_device(device)

    train_split, test_split = load_cifar10(cfg.data, device)
    batches = iter(ShardedBatches(train_split, group, cfg.replica_groups.count, cfg.data.batch_size,
                                  cfg.train.seed + restarts, cfg.data.augment))

    torch.manual_seed(cfg.train.seed)  # identical initial weights in every group
    model = build_model(cfg.model).to(device)
    optimizer = build_optimizer(cfg.optimizer, model.parameters())
    manager = _manager(cfg, group, device, model, optimizer)

    completion = CompletionClient(os.environ[roles.COMPLETION_ENV])
    if rank == 0:
        completion.started(group)
    started = completion.wait_all_started(cfg.lighthouse.join_timeout_ms / 1000)
    print(f"LocalSGD: group {group} (restart {restarts}) ready; groups started: {started}; "
          f"training until {cfg.total_syncs} committed syncs", flush=True)
    faults = FaultInjector(cfg, group, manager, completion, completion.status()["fired"]) if cfg.fault_plan else None
    # A restarted group is disrupted until its first committed sync with every group in it.
    monitor = SyncMonitor(group, cfg.replica_groups.count, completion, disrupted=restarts > 0,
                          fingerprint=lambda: params_sha256(model))

    sync_every, total = cfg.localsgd.sync_every, cfg.total_syncs
    steps = 0
    loss_sum = torch.zeros((), device=device)
    evals: List[Dict[str, float]] = []
    t0 = time.monotonic()
    with LocalSGD(manager, model, optimizer, sync_every=sync_every) as local_sgd:
        if cfg.initial_syncs:
            # A joining group takes the live weights before its first step; at a fresh
            # start this first quorum simply lines every group up on identical weights.
            before, t_sync = manager.current_step(), time.monotonic()
            local_sgd.sync()
            monitor.after_sync(manager, 0, time.monotonic() - t_sync, manager.current_step() > before)
        while manager.current_step() < total:
            images, labels = next(batches)
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(images), labels)
            loss.backward()
            before, t_step = manager.current_step(), time.monotonic()
            optimizer.step()  # LocalSGD's hook averages parameters every sync_every steps
            steps += 1
            loss_sum += loss.detach()
            if steps % sync_every == 0:
                monitor.after_sync(manager, steps, time.monotonic() - t_step, manager.current_step() > before)
            if faults is not None:
                faults.maybe_inject((manager.current_step() - cfg.initial_syncs) * sync_every + steps % sync_every)
                if faults.hung:  # we were frozen: count as disrupted until a full commit
                    faults.hung, monitor.disrupted = False, True
            if steps % cfg.train.log_every == 0:
                print(f"LocalSGD: Number of local optimizer steps completed: {steps}", flush=True)
                print(f"LocalSGD: group {group} step {steps} committed_syncs {manager.current_step()}/{total} "
                      f"loss {loss_sum.item() / cfg.train.log_every:.4f}", flush=True)
                loss_sum.zero_()
            if cfg.train.eval_every and steps % cfg.train.eval_every == 0:
                acc = evaluate(model, eval_batches(test_split))
                evals.append({"step": steps, "test_accuracy": acc})
                print(f"LocalSGD: group {group} step {steps} test_accuracy {acc:.4f}", flush=True)
    train_time = time.monotonic() - t0

    final_acc = evaluate(model, eval_batches(test_split))
    digest = params_sha256(model)
    committed_total = manager.current_step()
    manager.shutdown(wait=False)
    print(f"LocalSGD: group {group} finished: steps {steps}, committed syncs {committed_total}, "
          f"final test_accuracy {final_acc:.4f}, params_sha256 {digest}", flush=True)
    return {
        "steps": steps,
        "syncs_attempted": monitor.attempted,
        "syncs_committed": monitor.committed,
        "sync_time_s": round(monitor.total_s, 3),
        "max_sync_s": round(monitor.max_s, 3),
        "global_syncs": committed_total,
        "restarts": restarts,
        "params_sha256": digest,
        "final_test_accuracy": final_acc,
        "evals": evals,
        "train_time_s": round(train_time, 3),
        "samples_per_s": round(steps * cfg.data.batch_size / train_time, 1) if train_time > 0 else None,
        "peak_rss_mb": peak_rss_mb(),
    }


def main(argv: Optional[List[str]] = None) -> int:
    import argparse

    from torch.distributed.elastic.multiprocessing.errors import record

    parser = argparse.ArgumentParser(description="Train one replica group (run under torchrun by the replica role).")
    parser.add_argument("--config", required=True)
    parser.add_argument("--config-b64", default=None, help="the config's text in base64; then --config only names it")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    @record
    def _run() -> int:
        try:
            cfg = load_config(args.config, args.config_b64)
            group = int(os.environ.get(roles.GROUP_ENV, 0))
            if not 0 <= group < cfg.replica_groups.count:
                raise ConfigError(f"${roles.GROUP_ENV}={group} is outside 0..{cfg.replica_groups.count - 1}")
            result = train(cfg, group)
        except (ConfigError, DataError) as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 2
        from .replica import result_path

        if int(os.environ.get("RANK", 0)) == 0:
            write_json_atomic(result_path(cfg, group), result)
        return 0

    return _run()
