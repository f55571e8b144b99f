"""What a training group tells its user as it goes: progress lines, evaluations, and their metrics.

Every ``train.log_every`` local steps a group prints the line users know from
torchft's example (``LocalSGD: Number of local optimizer steps completed: N``)
and one line of its own (training step, loss, accuracy, samples/s, quorum,
committed syncs, ETA), and appends a ``train`` event to its metrics file.
Every ``train.eval_every`` local steps it evaluates on the test set; the time
spent evaluating is left out of samples/s. The evaluations kept for the result
are bounded (``Evaluation.thin``): a long run's result still fits the
completion service's cap, and the metrics file keeps every one. The loss stays
on the device and is read once per progress line: no host sync per step. A
loss that is not a finite number there stops the run (:class:`Diverged`, a
permanent error).
"""

from __future__ import annotations

import math
import time
from typing import Callable, Dict, List, Optional

import torch

from localsgd_ft.config import ExperimentConfig
from localsgd_ft.contract import Evaluation
from localsgd_ft.results.metrics import MetricsLog
from localsgd_ft.training.position import Position
from localsgd_ft.training.sync_monitor import SyncMonitor


class Diverged(RuntimeError):
    """The loss is no longer a number: every further step is wasted (and with averaging, every group's)."""


class Progress:
    def __init__(self, cfg: ExperimentConfig, group: int, position: Position, monitor: SyncMonitor,
                 optimizer: torch.optim.Optimizer, evaluate: Callable[[], float], metrics: Optional[MetricsLog],
                 device: torch.device, quiet: bool = False) -> None:
        self.cfg, self.group, self.position, self.monitor = cfg, group, position, monitor
        self.optimizer, self.evaluate, self.metrics = optimizer, evaluate, metrics
        # A group's other workers leave lines and evaluations to worker 0: their parameters are its.
        self.quiet = quiet
        self.loss_sum = torch.zeros((), device=device)
        self.evals: List[Dict[str, float]] = []  # for the result: thinned at the cap, the latest always last
        self.evals_count = 0
        self.started = time.monotonic()
        # The measuring window since the last progress line (evaluations excluded).
        self._t, self._steps, self._paused_s = self.started, 0, 0.0
        self._syncs = (0.0, 0.0, 0.0)  # the monitor's sync, quorum and commit seconds at the last line

    def add_loss(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss

    def after_step(self) -> None:
        if self.quiet:
            return
        steps, tr = self.position.local_steps, self.cfg.train
        if tr.eval_every and steps % tr.eval_every == 0:
            self._evaluate(steps)
        if steps % tr.log_every == 0:
            self._line(steps)

    def _evaluate(self, steps: int) -> None:
        t = time.monotonic()
        acc = self.evaluate()
        self._paused_s += time.monotonic() - t
        self.evals_count += 1
        self.evals.append({"step": steps, "test_accuracy": acc})
        self.evals = Evaluation.thin(self.evals)
        print(f"LocalSGD: group {self.group} step {steps} test_accuracy {acc:.4f}", flush=True)
        if self.metrics is not None:
            self.metrics.add("eval", self.position.step(), flush=True, local_step=steps, test_accuracy=acc)

    def _line(self, steps: int) -> None:
        cfg, pos, monitor = self.cfg, self.position, self.monitor
        loss = self.loss_sum.item() / cfg.train.log_every  # the one host sync for the loss
        self.loss_sum.zero_()
        if not math.isfinite(loss):
            raise Diverged(
                f"training diverged: the mean loss of local steps {steps - cfg.train.log_every + 1}..{steps} is "
                f"{loss} (train_step {pos.step()}). Lower optimizer.lr" + (" or localsgd.outer_optimizer.lr / momentum"
                                        if cfg.localsgd.algorithm == "diloco" else "")
                + " and start over (torchx run -- --fresh True ...)")
        now = time.monotonic()
        busy = max(now - self._t - self._paused_s, 1e-9)
        steps_per_s = (steps - self._steps) / busy
        samples_per_s = steps_per_s * cfg.group_batch
        step, max_steps = pos.step(), cfg.train.max_steps
        eta = _duration(max(max_steps - step, 0) / steps_per_s) if steps_per_s > 0 else "?"
        acc = f"{self.evals[-1]['test_accuracy']:.4f}" if self.evals else "-"
        global_sync = pos.global_syncs
        print(f"LocalSGD: Number of local optimizer steps completed: {steps}", flush=True)
        print(f"LocalSGD: group {self.group} step {steps} train_step {step}/{max_steps} "
              f"({100 * step // max_steps}%) loss {loss:.4f} acc {acc} samples/s {samples_per_s:.0f} "
              f"quorum {monitor.quorum[1]}/{cfg.replica_groups.count} committed_syncs {global_sync} eta {eta}",
              flush=True)
        syncs = (monitor.total_s, monitor.quorum_s, monitor.commit_s)
        sync_s, quorum_s, commit_s = (round(now_s - then_s, 3) for now_s, then_s in zip(syncs, self._syncs))
        if self.metrics is not None:
            self.metrics.add("train", step, flush=True, local_step=steps, loss=round(loss, 5),
                             lr=self.optimizer.param_groups[0]["lr"], samples_per_s=round(samples_per_s, 1),
                             quorum_id=monitor.quorum[0], quorum_size=monitor.quorum[1], global_sync=global_sync,
                             syncs_committed=monitor.committed, syncs_attempted=monitor.attempted,
                             sync_s=sync_s, quorum_s=quorum_s, commit_s=commit_s)
        self._t, self._steps, self._paused_s, self._syncs = now, steps, 0.0, syncs


def _duration(seconds: float) -> str:
    """``75`` -> ``1m15s``: short enough for a progress line."""
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"
