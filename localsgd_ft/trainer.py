"""One replica group's training: CIFAR-10 with torchft's fault-tolerant LocalSGD.

Runs in every torchrun worker (``train_localsgd.py``). Reads top to bottom:
config -> device and data -> model and optimizer -> torchft Manager -> wait for
all groups -> LocalSGD loop until the agreed number of committed syncs ->
final evaluation -> result file for the replica wrapper.

Stopping rule: every group stops once ``ExperimentConfig.training_syncs``
training syncs are committed (the Manager's committed-sync count minus the
offset of syncs that trained nothing). Count and offset are agreed through the
quorum (a recovering group inherits both), so all live groups stop after the
same commit and their final parameters are bit-identical.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import sys
import time
from datetime import timedelta
from collections import deque
from typing import Any, Callable, Deque, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint, lifecycle, quorums, roles
from .config import ConfigError, ExperimentConfig, OptimizerConfig, load_config
from .control import CompletionClient, Refused
from .data import DataError, ShardedBatches, eval_batches, load_cifar10
from .faults import FaultInjector
from .files import peak_rss_mb, write_json_atomic
from .metrics import MetricsLog, metrics_path
from .model import build_model

log = logging.getLogger("localsgd_ft.trainer")


class SyncMonitor:
    """Watches every sync: counts commits, reports stalls and the first full commit after a disruption.

    A sync *stalls* when it takes more than ``STALL_FACTOR`` times the median of
    recent syncs (and at least ``STALL_MIN_S``): the survivors' wait for a dead
    peer to time out, or for a lighthouse to come back. A group is *disrupted*
    after a stall, a failed or partial sync, a restart or a hang; its next
    committed sync with every group in it is reported as ``recovered``.

    Stalls, recoveries, failed syncs and every change of the quorum (id or
    size) also go to the group's metrics log.
    """

    STALL_FACTOR = 5.0
    STALL_MIN_S = 0.25

    def __init__(self, group: int, num_groups: int, completion: CompletionClient, disrupted: bool,
                 fingerprint: Callable[[], str], metrics: Optional[MetricsLog],
                 healed_from: Callable[[], Optional[int]]) -> None:
        self.group, self.num_groups, self.completion = group, num_groups, completion
        self.fingerprint = fingerprint  # parameters' hash, sent with "recovered" so rejoins can be checked
        self.metrics = metrics
        self.healed_from = healed_from  # the group whose live state we last loaded (None: none yet)
        self.disrupted = disrupted
        self.disrupted_at: Optional[float] = time.monotonic() if disrupted else None
        self.recent: Deque[float] = deque(maxlen=50)
        self.attempted = self.committed = 0
        self.total_s = self.max_s = 0.0
        self.quorum: Tuple[int, int] = (-1, 0)  # (id, size) of the last sync's quorum

    def disrupt(self, since: Optional[float] = None) -> None:
        """Mark the group disrupted (from ``since``, a monotonic time; default now)."""
        if not self.disrupted:
            self.disrupted, self.disrupted_at = True, time.monotonic() if since is None else since

    def after_sync(self, manager: Any, step: int, local_step: int, duration: float, committed: bool) -> None:
        """Account for the sync that just ended; ``step`` is the training step after it."""
        self.attempted += 1
        self.committed += committed
        self.total_s += duration
        self.max_s = max(self.max_s, duration)
        typical = sorted(self.recent)[len(self.recent) // 2] if self.recent else None
        self.recent.append(duration)
        participants = manager.num_participants()
        if participants > self.num_groups:
            # Impossible with replica ids that carry the run id; if it happens, this run's weights
            # were averaged with a stranger's: stop rather than train on.
            raise ForeignQuorum(
                f"the quorum has {participants} members but this run has {self.num_groups} replica groups: "
                "groups of another run joined this lighthouse; stop the other run and start this one again")
        # torchft has no public accessor for the quorum id; it is the one value that tells a new
        # quorum of the same size (a group swapped) from the old one, so we read the private field.
        quorum = (int(getattr(manager, "_quorum_id", -1)), participants)
        if quorum != self.quorum or not committed:
            self.quorum = quorum
            self._record("sync", step, local_step=local_step, committed=committed, duration_s=round(duration, 3),
                         quorum_id=quorum[0], quorum_size=participants, global_sync=manager.current_step())
        if typical is not None and duration > max(self.STALL_MIN_S, self.STALL_FACTOR * typical):
            self.disrupt(since=time.monotonic() - duration)
            self._report("sync_stall", step=step, local_step=local_step, duration_s=round(duration, 3),
                         committed=committed, participants=participants)
        if not committed or participants < self.num_groups:
            self.disrupt()
        elif self.disrupted:
            self.disrupted = False
            since = round(time.monotonic() - self.disrupted_at, 3) if self.disrupted_at is not None else None
            self._report("recovered", step=step, local_step=local_step, participants=participants,
                         global_sync=manager.current_step(), params_sha256=self.fingerprint(),
                         healed_from=self.healed_from(), disrupted_s=since)

    def _record(self, kind: str, step: int, flush: bool = False, **fields: Any) -> None:
        if self.metrics is not None:
            self.metrics.add(kind, step, flush=flush, **fields)

    def _report(self, kind: str, step: int, **fields: Any) -> None:
        self._record(kind, step, flush=kind == "recovered", **fields)
        report(self.completion, self.group, kind, step=step, **fields)


class ForeignQuorum(RuntimeError):
    """The quorum holds groups that are not this run's."""


def report(completion: CompletionClient, group: int, kind: str, **fields: Any) -> None:
    """Send an event to the lighthouse role; a failure to report never stops training."""
    try:
        completion.event(group, kind, **fields)
    except Exception as e:
        log.warning("could not report %s: %s", kind, e)


def build_optimizer(cfg: OptimizerConfig, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=cfg.nesterov and cfg.momentum > 0)


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


def _manager(cfg: ExperimentConfig, group: int, device: torch.device, model: nn.Module,
             optimizer: torch.optim.Optimizer, progress: Dict[str, int], healed: Dict[str, Any]) -> Any:
    from torchft import Manager, ProcessGroupGloo, ProcessGroupNCCL

    timeout = timedelta(seconds=cfg.localsgd.timeout_s)
    pg = ProcessGroupNCCL(timeout=timeout) if device.type == "cuda" else ProcessGroupGloo(timeout=timeout)

    # What live recovery hands a joining group: weights, optimizer state, and how the
    # committed-sync count maps to training steps (see train()), and which group sent it
    # (torchft keeps the recovery source to itself; the metrics say whom a group healed from).
    def state_dict() -> Dict[str, Any]:
        return {"model": model.state_dict(), "optim": optimizer.state_dict(), "progress": dict(progress),
                "group": group}

    def load_state_dict(sd: Dict[str, Any]) -> None:
        model.load_state_dict(sd["model"])
        optimizer.load_state_dict(sd["optim"])
        progress.update(sd["progress"])
        healed["from"] = sd["group"]
        if healed.get("on_heal"):
            healed["on_heal"]()  # an armed failure may strike right now (faults.moment: heal)

    return Manager(
        pg=pg,
        load_state_dict=load_state_dict,
        state_dict=state_dict,
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
    )


def train(cfg: ExperimentConfig, group: int) -> Dict[str, Any]:
    from torchft.local_sgd import LocalSGD

    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    rank = int(os.environ.get("RANK", 0))
    torch.set_num_threads(cfg.threads)
    device = _device(cfg, group)
    if device.type == "cuda":
        torch.cuda.set_device(device)

    train_split, test_split = load_cifar10(cfg.data, device)
    batches = ShardedBatches(train_split, group, cfg.replica_groups.count, cfg.data.batch_size,
                             cfg.train.seed, cfg.data.augment, cfg.train.channels_last)
    eval_data = lambda: eval_batches(test_split, channels_last=cfg.train.channels_last)  # noqa: E731

    torch.manual_seed(cfg.train.seed)  # identical initial weights in every group
    model = build_model(cfg.model).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # LocalSGD, checkpoints and recovery use `model`; only the forward pass goes through `forward`.
    forward = torch.compile(model) if cfg.train.compile else model
    optimizer = build_optimizer(cfg.optimizer, model.parameters())
    # Committed syncs that trained nothing: each job start in sync mode begins with one
    # alignment sync. Training step = (committed syncs - offset) x sync_every + local steps.
    progress = {"offset": cfg.initial_syncs}
    healed: Dict[str, Any] = {}
    manager = _manager(cfg, group, device, model, optimizer, progress, healed)
    completion = CompletionClient(os.environ[roles.COMPLETION_ENV], lifecycle.run_token())
    # Quorum ids unique across lighthouse restarts: no rendezvous under a prefix already used.
    quorums.install(manager, lambda: completion.status(deadline_s=1.0)["lighthouse_incarnation"])

    # A restarted incarnation always resumes: old runs' checkpoints were moved aside at the start.
    found, how = checkpoint.resume_point(cfg, start_over=roles.fresh_requested(cfg) and restarts == 0)
    resumed_from = 0
    if found is not None:
        state = checkpoint.load(found, device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        # Re-enter one alignment sync before the checkpoint (sync mode): after a whole-job restart
        # that sync brings every group back to the saved count; a group that restarts while
        # others still train is then behind them, so it heals from them rather than trusting
        # a checkpoint they have already moved past.
        manager.load_state_dict({**state["manager"], "step": state["manager"]["step"] - cfg.initial_syncs})
        progress["offset"] = int(state["offset"])
        resumed_from = int(state["step"])
    print(f"LocalSGD: group {group}: {how}", flush=True)

    metrics: Optional[MetricsLog] = None
    if rank == 0:
        completion.started(group)
        # Only after the lighthouse role is up: it moves a previous job's metrics aside at its start.
        metrics = MetricsLog(metrics_path(cfg.run_dir, group), group)
        if restarts == 0:
            report(completion, group, "resumed", step=resumed_from)
    started = completion.wait_all_started(cfg.lighthouse.join_timeout_ms / 1000)
    print(f"LocalSGD: group {group} (restart {restarts}) ready; groups started: {started}; "
          f"training to step {cfg.train.max_steps}", flush=True)
    if metrics is not None:
        metrics.add("start", resumed_from, flush=True, restart=restarts, resumed_from=resumed_from,
                    max_steps=cfg.train.max_steps, batch_size=cfg.data.batch_size, pid=os.getpid())
    status = completion.status()
    if status["completed"] is not None:
        # The others already committed the final sync: training alone from here would only diverge.
        return _finished_late(cfg, group, model, eval_data, manager, status["completed"], restarts)
    faults = FaultInjector(cfg, group, manager, completion, status["fired"], metrics) if cfg.fault_plan else None
    if faults is not None:
        healed["on_heal"] = faults.on_heal
    # A restarted group is disrupted until its first committed sync with every group in it.
    monitor = SyncMonitor(group, cfg.replica_groups.count, completion, disrupted=restarts > 0,
                          fingerprint=lambda: params_sha256(model), metrics=metrics,
                          healed_from=lambda: healed.get("from"))

    sync_every = cfg.localsgd.sync_every
    steps = 0  # local optimizer steps of this incarnation

    def train_step() -> int:
        """Where training stands: training syncs committed x sync_every + local steps since."""
        return max(0, (manager.current_step() - progress["offset"]) * sync_every + steps % sync_every)

    def done() -> bool:
        # Agreed through the quorum (a recovering group inherits count and offset), so every
        # live group stops after the same commit, with identical parameters.
        return manager.current_step() - progress["offset"] >= cfg.training_syncs

    loss_sum = torch.zeros((), device=device)
    evals: List[Dict[str, float]] = []
    written: List[int] = []
    t0 = time.monotonic()
    window = {"t": t0, "steps": 0, "paused_s": 0.0}  # since the last progress line (evaluations excluded)
    with LocalSGD(manager, model, optimizer, sync_every=sync_every) as local_sgd:
        if cfg.initial_syncs:
            # A joining group takes the live weights before its first step; at a fresh
            # start this first quorum simply lines every group up on identical weights.
            before, t_sync = manager.current_step(), time.monotonic()
            local_sgd.sync()
            monitor.after_sync(manager, train_step(), 0, time.monotonic() - t_sync, manager.current_step() > before)
        while not done():
            images, labels = batches.batch(train_step())
            loss = backward(forward, optimizer, images, labels, cfg.train.bf16)
            before, t_step = manager.current_step(), time.monotonic()
            optimizer.step()  # LocalSGD's hook averages parameters every sync_every steps
            steps += 1
            loss_sum += loss
            if steps % sync_every == 0:
                committed = manager.current_step() > before
                monitor.after_sync(manager, train_step(), steps, time.monotonic() - t_step, committed)
                syncs = manager.current_step() - progress["offset"]
                # Exactly one group saves: the one ranked 0 in the quorum that just committed; the
                # final commit always saves, so a group restarted after the end finds the final state.
                if (committed and cfg.checkpoint.enabled and manager.participating_rank() == 0
                        and (syncs % cfg.checkpoint.every_syncs == 0 or done())):
                    written.append(_save_checkpoint(cfg, batches, model, optimizer, manager, train_step(),
                                                    progress["offset"]))
                    report(completion, group, "checkpoint", step=written[-1], sync=manager.current_step())
                    if metrics is not None:
                        metrics.add("checkpoint", written[-1], global_sync=manager.current_step())
                if monitor.quorum[1] < cfg.replica_groups.count and not done():
                    # A partial quorum: if the others have already finished the run, we are training alone.
                    final = _run_completed(completion)
                    if final is not None:
                        return _finished_late(cfg, group, model, eval_data, manager, final, restarts, steps)
            if faults is not None:
                faults.maybe_inject(train_step())
                if faults.hung:  # we were frozen: count as disrupted until a full commit
                    faults.hung = False
                    monitor.disrupt()
            if cfg.train.eval_every and steps % cfg.train.eval_every == 0:
                t_eval = time.monotonic()
                acc = evaluate(model, eval_data())
                window["paused_s"] += time.monotonic() - t_eval
                evals.append({"step": steps, "test_accuracy": acc})
                print(f"LocalSGD: group {group} step {steps} test_accuracy {acc:.4f}", flush=True)
                if metrics is not None:
                    metrics.add("eval", train_step(), flush=True, local_step=steps, test_accuracy=acc)
            if steps % cfg.train.log_every == 0:
                # The only host sync for the loss: once per progress line, never per step.
                _progress(cfg, group, steps, train_step(), loss_sum.item() / cfg.train.log_every,
                          optimizer.param_groups[0]["lr"], evals, monitor, manager.current_step(), window, metrics)
                loss_sum.zero_()
    train_time = time.monotonic() - t0

    digest = params_sha256(model)
    committed_total = manager.current_step()
    try:  # first, so that a group restarting from now on takes this final state
        completion.completed(group, committed_total, digest)
    except Exception as e:
        log.warning("could not report the final sync: %s", e)
    final_acc = evaluate(model, eval_data())
    manager.shutdown(wait=False)
    print(f"LocalSGD: group {group} finished: steps {steps}, committed syncs {committed_total}, "
          f"final test_accuracy {final_acc:.4f}, params_sha256 {digest}", flush=True)
    samples_per_s = round(steps * cfg.data.batch_size / train_time, 1) if train_time > 0 else None
    if metrics is not None:
        metrics.add("end", train_step(), flush=True, local_step=steps, test_accuracy=final_acc,
                    syncs_committed=monitor.committed, syncs_attempted=monitor.attempted,
                    global_sync=committed_total, samples_per_s=samples_per_s, train_time_s=round(train_time, 3))
    return {
        "steps": steps,
        "syncs_attempted": monitor.attempted,
        "syncs_committed": monitor.committed,
        "sync_time_s": round(monitor.total_s, 3),
        "max_sync_s": round(monitor.max_s, 3),
        "global_syncs": committed_total,
        "restarts": restarts,
        "resumed_from_step": resumed_from,
        "checkpoints_written": written,
        "params_sha256": digest,
        "final_test_accuracy": final_acc,
        "evals": evals,
        "train_time_s": round(train_time, 3),
        "samples_per_s": samples_per_s,
        "peak_rss_mb": peak_rss_mb(),
    }


def _run_completed(completion: CompletionClient) -> Optional[dict]:
    """The run's final sync as the lighthouse role knows it (None: training goes on, or no answer)."""
    try:
        return completion.status(deadline_s=2.0).get("completed")
    except Exception as e:
        log.warning("could not ask whether the run has completed: %s", e)
        return None


def _finished_late(cfg: ExperimentConfig, group: int, model: nn.Module, eval_data: Callable[[], Any],
                   manager: Any, final: dict, restarts: int, steps: int = 0) -> Dict[str, Any]:
    """The result of a group that (re)started after the run's final sync: the final state, no training alone.

    The final state comes from the final checkpoint (the final commit always
    writes one when checkpoints are on); without it the group reports that it
    has no final state, and is neither lost nor counted among the groups that
    finished with identical weights.
    """
    manager.shutdown(wait=False)
    result: Dict[str, Any] = {"steps": steps, "restarts": restarts, "finished_late": True,
                              "global_syncs": int(final["global_sync"]), "peak_rss_mb": peak_rss_mb()}
    last = [f for f in checkpoint.list_valid(cfg.checkpoint_dir, warn=False)
            if int(f.meta.get("sync", -1)) == final["global_sync"]] if cfg.checkpoint.enabled else []
    if last:
        device = next(model.parameters()).device
        model.load_state_dict(checkpoint.load(last[0], device)["model"])
        digest = params_sha256(model)
        acc = evaluate(model, eval_data())
        result.update(params_sha256=digest, final_test_accuracy=acc)
        print(f"LocalSGD: group {group} restarted after the run's final sync {final['global_sync']}: took the "
              f"final state from the final checkpoint (params_sha256 {digest}); not training alone", flush=True)
    else:
        result["error"] = (f"restarted after the run's final sync {final['global_sync']}, with no checkpoint of "
                           "it to take the final state from (enable checkpoints); did not train alone")
        print(f"LocalSGD: group {group}: {result['error']}", flush=True)
    return result


def _progress(cfg: ExperimentConfig, group: int, steps: int, step: int, loss: float, lr: float,
              evals: List[Dict[str, float]], monitor: SyncMonitor, global_sync: int, window: Dict[str, float],
              metrics: Optional[MetricsLog]) -> None:
    """Print the progress line(s) and record a ``train`` event; then start a new measuring window."""
    now = time.monotonic()
    busy = max(now - window["t"] - window["paused_s"], 1e-9)
    steps_per_s = (steps - window["steps"]) / busy
    samples_per_s = steps_per_s * cfg.data.batch_size
    left = max(cfg.train.max_steps - step, 0)
    eta = _duration(left / steps_per_s) if steps_per_s > 0 else "?"
    acc = f"{evals[-1]['test_accuracy']:.4f}" if evals else "-"
    print(f"LocalSGD: Number of local optimizer steps completed: {steps}", flush=True)
    print(f"LocalSGD: group {group} step {steps} train_step {step}/{cfg.train.max_steps} "
          f"({100 * step // cfg.train.max_steps}%) loss {loss:.4f} acc {acc} samples/s {samples_per_s:.0f} "
          f"quorum {monitor.quorum[1]}/{cfg.replica_groups.count} committed_syncs {global_sync} eta {eta}",
          flush=True)
    if metrics is not None:
        metrics.add("train", step, flush=True, local_step=steps, loss=round(loss, 5), lr=lr,
                    samples_per_s=round(samples_per_s, 1), quorum_id=monitor.quorum[0],
                    quorum_size=monitor.quorum[1], global_sync=global_sync,
                    syncs_committed=monitor.committed, syncs_attempted=monitor.attempted)
    window.update(t=now, steps=steps, paused_s=0.0)


def _duration(seconds: float) -> str:
    """``75`` -> ``1m15s``: short enough for a progress line."""
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _save_checkpoint(cfg: ExperimentConfig, batches: ShardedBatches, model: nn.Module,
                     optimizer: torch.optim.Optimizer, manager: Any, step: int, sync_offset: int) -> int:
    epoch, batch_in_epoch = batches.position(step)
    payload = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "manager": manager.state_dict(),
        "step": step,
        "offset": sync_offset,
        # Every group's data position and augmentation randomness follow from (seed, group, step).
        "data": {"epoch": epoch, "batch_in_epoch": batch_in_epoch, "seed": cfg.train.seed},
    }
    path = checkpoint.save(cfg, payload, step, manager.current_step())
    print(f"LocalSGD: checkpoint written: {path} (step {step})", flush=True)
    return step


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

    @record
    def _run() -> int:
        from .replica import result_path

        rank0 = int(os.environ.get("RANK", 0)) == 0
        cfg = None
        try:
            cfg = load_config(args.config, args.config_b64)
            group = int(os.environ.get(roles.GROUP_ENV, 0))
            if not 0 <= group < cfg.replica_groups.count:
                raise ConfigError(f"${roles.GROUP_ENV}={group} is outside 0..{cfg.replica_groups.count - 1}")
            result = train(cfg, group)
        except (ConfigError, DataError, ForeignQuorum, Refused) as e:
            # No restart can fix these: leave the reason for the replica role, then end torchrun (and with
            # it every worker, this one included) before it can restart us.
            print(f"error: {e}", file=sys.stderr, flush=True)
            if cfg is not None and rank0:
                write_json_atomic(result_path(cfg, group), {"error": str(e), "permanent": True})
                if os.environ.get("TORCHELASTIC_RUN_ID"):  # our parent is torchrun
                    os.kill(os.getppid(), signal.SIGKILL)
            return 2
        if rank0:
            write_json_atomic(result_path(cfg, group), result)
        return 0

    return _run()
