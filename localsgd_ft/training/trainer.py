"""One replica group's training: CIFAR-10 with fault-tolerant syncs across groups (torchft).

Runs in every torchrun worker (``train_localsgd.py``). ``GroupTraining`` reads
top to bottom: its construction builds device, the group's workers, data,
model, optimizer, torchft Manager and sync algorithm; ``run`` joins the run
(incarnation, resume, wait for all groups), loops, and ends with the final
evaluation and the result the replica wrapper reports. A group of several
workers averages gradients inside itself and agrees its decisions through
:mod:`~localsgd_ft.training.workers`; its worker 0 speaks for it (metrics, events,
checkpoints, the result). The loop only steps; each concern has its own
collaborator: torchft's Manager and what live recovery hands over
(:mod:`~localsgd_ft.training.manager`), the sync algorithm (:mod:`~localsgd_ft.training.algorithms`), where the
group stands and when it stops (:mod:`~localsgd_ft.training.position`), sync accounting
(:mod:`~localsgd_ft.training.sync_monitor`), checkpoints
(:mod:`~localsgd_ft.training.checkpointer`), failure injection
(:mod:`~localsgd_ft.training.faults`) and progress (:mod:`~localsgd_ft.training.progress`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
import uuid
from typing import Any, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from localsgd_ft.config import ConfigError, ExperimentConfig, load_config
from localsgd_ft.contract import (COMPLETION_ENV, GROUP_ENV, TORCHRUN_RESTARTS_ENV, EventKind, FinalSync, Status,
                                  TrainerResult)
from localsgd_ft.launch import addresses, lifecycle
from localsgd_ft.launch.completion.client import CompletionClient, Refused
from localsgd_ft.results.metrics import MetricsLog, metrics_path
from localsgd_ft.storage import checkpoints
from localsgd_ft.storage.atomic import write_json_atomic
from localsgd_ft.training import quorums
from localsgd_ft.training.algorithms import Sync, build_algorithm
from localsgd_ft.training.checkpointer import Checkpointer
from localsgd_ft.training.data import DataError, ShardedBatches, eval_batches, load_cifar10, shard_of
from localsgd_ft.training.faults import FaultInjector
from localsgd_ft.training.liveness import Pulse
from localsgd_ft.training.manager import LiveState, build_manager
from localsgd_ft.training.model import build_model
from localsgd_ft.training.optim import build_optimizer
from localsgd_ft.training.position import Position
from localsgd_ft.training.progress import Diverged, Progress
from localsgd_ft.training.silence import POLL_S, SilenceGuard, report_abandoned
from localsgd_ft.training.sync_monitor import ForeignQuorum, SyncMonitor
from localsgd_ft.training.workers import GroupWorkers

log = logging.getLogger("localsgd_ft.trainer")


def backward(forward: Any, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
             bf16: bool) -> torch.Tensor:
    """Gradients of one batch's loss, ready for ``optimizer.step()``; returns the loss (no host sync)."""
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = F.cross_entropy(forward(images), labels)
    loss.backward()
    return loss.detach()


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


def _agreed_resume(cfg: ExperimentConfig, workers: GroupWorkers,
                   restarts: int) -> Tuple[Optional[checkpoints.Found], str]:
    """The checkpoint to resume from, the same for every worker of the group: worker 0's choice.

    Another group may write a newer checkpoint while this group's workers look.
    Returns the line that says so (worker 0's; empty for the others).
    """
    found, how = (checkpoints.resume_point(cfg, start_over=addresses.fresh_requested(cfg) and restarts == 0)
                  if workers.leader else (None, ""))
    path = workers.agree(str(found.path) if found is not None else None)
    if workers.leader or path is None:
        return found, how
    chosen = next((f for f in checkpoints.list_valid(cfg.checkpoint_dir, warn=False) if str(f.path) == path), None)
    if chosen is None:
        raise RuntimeError(f"worker 0 of this group resumes from {path}, which this worker cannot read")
    return chosen, ""


def train(cfg: ExperimentConfig, group: int, workers: GroupWorkers) -> TrainerResult:
    """Train one worker's part of group ``group`` to the end; the result the replica role reports."""
    return GroupTraining(cfg, group, workers).run()


class GroupTraining:
    """One worker of one group: its parts are built at construction, ``run`` trains them.

    ``run`` reads top to bottom: join the run (this incarnation, resume, wait for
    the other groups), the loop, the result. Worker 0 speaks for the group.
    """

    def __init__(self, cfg: ExperimentConfig, group: int, workers: GroupWorkers) -> None:
        self.cfg, self.group, self.workers = cfg, group, workers
        self.leader = workers.leader
        torch.set_num_threads(cfg.threads)
        self.device = device = _device(cfg, group)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if workers.world_size != cfg.group_size:
            raise ConfigError(f"torchrun started {workers.world_size} worker(s) for group {group}, the config asks "
                              f"for {cfg.group_size} (replica_groups.workers x nodes): launch through the component")
        workers.start(device)

        train_split, self.test_split = load_cifar10(cfg.data, device)
        self.batches = ShardedBatches(train_split, shard_of(group, workers.rank, cfg.group_size),
                                      cfg.replica_groups.count * cfg.group_size, cfg.data.batch_size,
                                      cfg.train.seed, cfg.data.augment, cfg.train.channels_last)

        torch.manual_seed(cfg.train.seed)  # identical initial weights in every group
        self.model = model = build_model(cfg.model).to(device)
        if cfg.train.channels_last:
            self.model = model = model.to(memory_format=torch.channels_last)
        # Syncs, checkpoints and recovery use `model`; only the forward pass goes through `forward`
        # (DDP over the group's workers averages the gradients of the backward pass).
        forward = workers.parallel(model)
        self.forward = torch.compile(forward) if cfg.train.compile else forward
        self.optimizer = build_optimizer(cfg.optimizer, model.parameters())
        self.position = Position(cfg.steps_per_sync, cfg.training_syncs, offset=cfg.initial_syncs)
        self.live = LiveState(group, model, self.optimizer, self.position)
        self.manager = self.position.manager = build_manager(cfg, group, self.live, workers)
        self.completion = completion = CompletionClient(os.environ[COMPLETION_ENV], lifecycle.run_token())
        # Quorum ids unique across lighthouse restarts: no rendezvous under a prefix already used.
        self.unique = quorums.install(self.manager,
                                      lambda: completion.run_status(deadline_s=1.0).lighthouse_incarnation)
        # A sync whose peer falls silent ends within seconds, not after localsgd.timeout_s. Built before the
        # algorithm, whose reduced-precision sends must go through it (localsgd.sync_precision).
        self.metrics: Optional[MetricsLog] = None
        self.silence = SilenceGuard(
            self.manager, group, cfg.group_size, cfg.lighthouse.heartbeat_timeout_ms / 1000,
            silent=lambda: completion.run_status(deadline_s=POLL_S).silent,
            on_abandon=report_abandoned(completion, group, lambda: self.metrics, self.position.step)
            if self.leader else None)
        self.algorithm = build_algorithm(cfg, self.manager, model, self.optimizer, self.position)

    def eval_data(self) -> Iterable[Tuple[torch.Tensor, torch.Tensor]]:
        return eval_batches(self.test_split, channels_last=self.cfg.train.channels_last)

    def run(self) -> TrainerResult:
        self._join()
        status = Status.model_validate(self.workers.leader_answer(self.completion.status))
        if status.completed is not None:
            # The others already committed the final sync: training alone from here would only diverge.
            return self._finished_late(status.completed)
        self._watch(status.fired)
        position, progress, algorithm = self.position, self.progress, self.algorithm
        with algorithm:
            if self.cfg.initial_syncs:
                self._after_sync(algorithm.initial_sync(), trained=False)
            while not position.done():
                images, labels = self.batches.batch(position.step())
                progress.add_loss(backward(self.forward, self.optimizer, images, labels, self.cfg.train.bf16))
                sync = algorithm.step()
                if sync is not None and (late := self._after_sync(sync)) is not None:
                    return late
                if self.faults is not None and self.faults.after_step(position.step()):
                    self.monitor.disrupt()  # we were frozen: disrupted until a full commit
                progress.after_step()
        return self._result(time.monotonic() - progress.started)

    def _join(self) -> None:
        """This incarnation: its number, its metrics, its checkpoints, where it resumes; then wait for the others."""
        cfg, group, workers, completion = self.cfg, self.group, self.workers, self.completion
        restarts, first = 0, True
        if self.leader:
            # The lighthouse role counts the group's incarnations: torchrun's restart count is each agent's
            # own, and the agents of a multi-node group do not always count alike.
            index = completion.started(group, uuid.uuid4().hex)
            # An incarnation killed during its start-up never reached the lighthouse role, but torchrun
            # counted its restart: count what torchrun counted where it counted more.
            restarts = max(index, int(os.environ.get(TORCHRUN_RESTARTS_ENV, "0") or 0))
            first = index == 0
            # Only after the lighthouse role is up: it moves a previous job's metrics aside at its start.
            self.metrics = MetricsLog(metrics_path(cfg.run_dir, group), group)
        self.restarts = restarts = int(workers.agree(restarts))
        self.checkpointer = Checkpointer(cfg, group, self.model, self.optimizer, self.algorithm, self.position,
                                         self.batches, completion, self.metrics, writer=self.leader)
        # A restarted incarnation always resumes: old runs' checkpoints were set aside at the start.
        found, how = _agreed_resume(cfg, workers, restarts)
        self.resumed_from = self.checkpointer.restore(found, self.device) if found is not None else 0
        if not self.leader:
            return  # the others follow worker 0 into the next collective
        print(f"LocalSGD: group {group}: {how}", flush=True)
        if first:  # the group's first incarnation to reach the lighthouse role says where the run starts
            completion.report(group, EventKind.RESUMED, step=self.resumed_from)
        started = completion.wait_all_started(cfg.lighthouse.join_timeout_ms / 1000)
        print(f"LocalSGD: group {group} (restart {restarts}) ready; groups started: {started}; "
              f"training to step {cfg.train.max_steps}; syncing through {cfg.cross_group_backend}"
              + ("" if cfg.localsgd.sync_precision == "float32" else f" in {cfg.localsgd.sync_precision}"),
              flush=True)
        assert self.metrics is not None
        self.metrics.add("start", self.resumed_from, flush=True, restart=restarts, resumed_from=self.resumed_from,
                         max_steps=cfg.train.max_steps, batch_size=cfg.data.batch_size, pid=os.getpid())

    def _watch(self, fired: List[int]) -> None:
        """The loop's collaborators: planned failures, sync accounting, progress."""
        cfg, group, leader = self.cfg, self.group, self.leader
        self.faults = (FaultInjector(cfg, group, self.manager, self.completion, fired, self.metrics,
                                     worker=self.workers.rank) if cfg.fault_plan else None)
        if self.faults is not None:
            self.live.on_heal = self.faults.on_heal
        # A restarted group is disrupted until its first committed sync with every group in it.
        self.monitor = SyncMonitor(group, cfg.replica_groups.count, self.completion if leader else None,
                                   cfg.lighthouse.heartbeat_timeout_ms / 1000, disrupted=self.restarts > 0,
                                   fingerprint=lambda: params_sha256(self.model), metrics=self.metrics,
                                   healed_from=lambda: self.live.healed_from,
                                   lighthouse_restarted=self.unique.take_restart)
        self.progress = Progress(cfg, group, self.position, self.monitor, self.optimizer,
                                 lambda: evaluate(self.model, self.eval_data()), self.metrics, self.device,
                                 quiet=not leader)

    def _after_sync(self, sync: Sync, trained: bool = True) -> Optional[TrainerResult]:
        """The monitor, then a checkpoint; a result if the run ended without us."""
        position = self.position
        self.monitor.after_sync(self.manager, position.step(), position.local_steps, sync.duration_s, sync.committed,
                                quorum_s=sync.quorum_s, commit_s=sync.commit_s)
        if sync.committed and trained:  # an alignment sync has nothing new to save
            self.checkpointer.after_commit()
        if not self.monitor.full and not position.done():
            # A partial quorum: if the others have already finished the run, we are training alone.
            final = self.workers.leader_answer(lambda: _run_completed(self.completion))
            if final is not None:
                return self._finished_late(FinalSync.model_validate(final), position.local_steps)
        return None

    def _finished_late(self, final: FinalSync, steps: int = 0) -> TrainerResult:
        """The result of a group that (re)started after the run's final sync: the final state, no training alone.

        The final state comes from the final checkpoint (the final commit always
        writes one when checkpoints are on); without it the group reports that it
        has no final state, and is neither lost nor counted among the groups that
        finished with identical weights.
        """
        cfg, group, model, workers = self.cfg, self.group, self.model, self.workers
        self.manager.shutdown(wait=False)
        late = dict(steps=steps, restarts=self.restarts, finished_late=True, global_syncs=final.global_sync,
                    peak_rss_mb=lifecycle.peak_rss_mb())
        last = [f for f in checkpoints.list_valid(cfg.checkpoint_dir, warn=False)
                if int(f.meta.get("sync", -1)) == final.global_sync] if cfg.checkpoint.enabled else []
        if not last:
            error = (f"restarted after the run's final sync {final.global_sync}, with no checkpoint "
                     "of it to take the final state from (enable checkpoints); did not train alone")
            print(f"LocalSGD: group {group}: {error}", flush=True)
            return TrainerResult(**late, error=error)
        model.load_state_dict(checkpoints.load(last[0], self.device)["model"])
        digest = params_sha256(model)
        every_worker = workers.gather(digest)
        if not workers.leader:
            return TrainerResult(**late)
        acc = evaluate(model, self.eval_data())
        print(f"LocalSGD: group {group} restarted after the run's final sync {final.global_sync}: took "
              f"the final state from the final checkpoint (params_sha256 {digest}); not training alone",
              flush=True)
        return TrainerResult(**late, params_sha256=digest, worker_params_sha256=every_worker,
                             final_test_accuracy=acc)

    def _result(self, train_time: float) -> TrainerResult:
        """Report the final sync, evaluate, and say what this group did (worker 0; the others only hash)."""
        cfg, group, monitor, position = self.cfg, self.group, self.monitor, self.position
        digest = params_sha256(self.model)
        every_worker = self.workers.gather(digest)
        committed_total = self.manager.current_step()
        if not self.leader:
            self.manager.shutdown(wait=False)
            return TrainerResult(params_sha256=digest)
        try:  # first, so that a group restarting from now on takes this final state
            self.completion.completed(group, committed_total, digest)
        except Exception as e:
            log.warning("could not report the final sync: %s", e)
        final_acc = evaluate(self.model, self.eval_data())
        self.manager.shutdown(wait=False)
        steps = position.local_steps
        print(f"LocalSGD: group {group} finished: steps {steps}, committed syncs {committed_total}, "
              f"final test_accuracy {final_acc:.4f}, params_sha256 {digest}", flush=True)
        samples_per_s = round(steps * cfg.group_batch / train_time, 1) if train_time > 0 else None
        if self.metrics is not None:
            self.metrics.add("end", position.step(), flush=True, local_step=steps, test_accuracy=final_acc,
                             syncs_committed=monitor.committed, syncs_attempted=monitor.attempted,
                             global_sync=committed_total, samples_per_s=samples_per_s,
                             train_time_s=round(train_time, 3))
        return TrainerResult(
            algorithm=self.algorithm.name,
            sync_bytes=self.algorithm.sync_bytes,
            steps=steps,
            syncs_attempted=monitor.attempted,
            syncs_committed=monitor.committed,
            sync_time_s=round(monitor.total_s, 3),
            max_sync_s=round(monitor.max_s, 3),
            global_syncs=committed_total,
            restarts=self.restarts,
            resumed_from_step=self.resumed_from,
            checkpoints_written=self.checkpointer.written,
            params_sha256=digest,
            worker_params_sha256=every_worker,
            final_test_accuracy=final_acc,
            evals=self.progress.evals,
            evals_count=self.progress.evals_count,
            train_time_s=round(train_time, 3),
            samples_per_s=samples_per_s,
            peak_rss_mb=lifecycle.peak_rss_mb(),
        )


def _run_completed(completion: CompletionClient) -> Optional[dict]:
    """The run's final sync as the lighthouse role knows it, as JSON (None: training goes on, or no answer)."""
    try:
        final = completion.run_status(deadline_s=2.0).completed
        return final.wire() if final is not None else None
    except Exception as e:
        log.warning("could not ask whether the run has completed: %s", e)
        return None


def main(argv: Optional[List[str]] = None) -> int:
    import argparse

    from torch.distributed.elastic.multiprocessing.errors import record

    parser = argparse.ArgumentParser(description="Train one replica group (run under torchrun by the replica role).")
    parser.add_argument("--config", required=True)
    parser.add_argument("--config-b64", default=None, help="the config's text in base64; then --config only names it")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    # torchrun starts us in a session of our own: without this a dead torchrun leaves us running.
    lifecycle.follow_torchrun()
    # From now on our replica role can tell a frozen trainer from a busy one.
    Pulse().start()

    @record
    def _run() -> int:
        from localsgd_ft.launch.replica_role import result_path

        workers = GroupWorkers.from_env()
        cfg = None
        try:
            cfg = load_config(args.config, args.config_b64)
            group = int(os.environ.get(GROUP_ENV, 0))
            if not 0 <= group < cfg.replica_groups.count:
                raise ConfigError(f"${GROUP_ENV}={group} is outside 0..{cfg.replica_groups.count - 1}")
            result = train(cfg, group, workers)
        except (ConfigError, DataError, Diverged, ForeignQuorum, Refused) as e:
            # No restart can fix these: leave the reason for the replica role, then end torchrun (and with
            # it every worker, this one included) before it can restart us. Whichever worker meets the
            # error first says why (worker 0 may be waiting for it in a collective).
            print(f"error: {e}", file=sys.stderr, flush=True)
            if cfg is not None:
                path = result_path(cfg, group)
                if workers.leader or not path.exists():
                    write_json_atomic(path, TrainerResult(error=str(e), permanent=True).wire())
                lifecycle.end_torchrun()  # only our own torchrun, proven ours
            return 2
        if workers.leader:
            write_json_atomic(result_path(cfg, group), result.wire())
        workers.close()
        return 0

    return _run()
