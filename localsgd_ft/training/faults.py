"""Failure injection inside a trainer, driven by the config's fault plan (never unless faults.enabled).

A failure fires when the group's training step (committed syncs x sync_every
+ local steps since) reaches its ``at_step``. It is first reported to the
completion service, which answers whether this fault id fires for the first
time: so each planned failure happens once, even though a killed group's next
incarnation passes the same steps again, and a ``lighthouse`` failure is
fired by whichever group gets there first.

A failure hits one worker of its group (``worker``, a rank); the others only
take note of a hang (the group is frozen with that worker) so that the group's
worker 0, which reports for the group, knows it was disrupted. A killed worker
needs no such note: torchrun restarts the whole group. Lighthouse failures are
fired by worker 0 only. ``partition`` and ``host_down`` act on the worker's whole host
(:mod:`localsgd_ft.training.host_faults`): a plan that holds one for this worker is refused at once
where this is no test-bed host.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any, List, Optional

from localsgd_ft.config import ExperimentConfig, Fault
from localsgd_ft.config.sections import HOST_FAULT_KINDS
from localsgd_ft.contract import EventKind
from localsgd_ft.launch import lifecycle
from localsgd_ft.launch.completion.client import CompletionClient
from localsgd_ft.results.metrics import MetricsLog
from localsgd_ft.training import host_faults


def resume_later(seconds: float) -> subprocess.Popen:
    """A helper that sends this process SIGCONT after ``seconds``, and dies with it (parent-death signal), so
    that it never signals a pid reused after we died, nor outlives us: one process, not a shell whose
    ``sleep`` child the signal would not reach (a hang killed by its role left one behind for an hour)."""
    code = f"import os, signal, time; time.sleep({float(seconds)}); os.kill({os.getpid()}, signal.SIGCONT)"
    return subprocess.Popen([sys.executable, "-I", "-S", "-c", code],
                            preexec_fn=lifecycle.preexec_die_with_parent(signal.SIGKILL))


class FaultInjector:
    def __init__(self, cfg: ExperimentConfig, group: int, manager: Any, completion: CompletionClient,
                 already_fired: List[int], metrics: Optional[MetricsLog] = None, worker: int = 0) -> None:
        self.group, self.worker = group, worker
        self.metrics = metrics
        self.manager = manager
        self.completion = completion
        self.pending: List[Fault] = [
            f for f in cfg.fault_plan
            if f.id not in already_fired and (f.group == group or (f.kind == "lighthouse" and worker == 0))
        ]
        self.hung = False  # set when this process was stopped; after_step hands it to the trainer once
        # Lighthouse failures waiting for their moment (quorum, allreduce; heal at once: a recovering
        # group does not know the run's step before it has healed).
        self.armed: List[Fault] = [f for f in self.pending if f.moment == "heal"]
        self.pending = [f for f in self.pending if f.moment != "heal"]
        self.step = 0
        # Refused before any step: a failure this host cannot deliver must not be skipped in silence.
        self.link = next((host_faults.require_bed(f.kind, f.id) for f in self.pending + self.armed
                          if f.kind in HOST_FAULT_KINDS and f.worker == worker), None)
        self._wrap_manager()

    def after_step(self, step: int) -> bool:
        """Fire what is due at training step ``step``; True if this process was frozen meanwhile (a hang)."""
        self.maybe_inject(step)
        hung, self.hung = self.hung, False
        return hung

    def maybe_inject(self, step: int) -> None:
        self.step = step
        while self.pending and self.pending[0].at_step <= step:
            fault = self.pending.pop(0)
            if fault.kind != "lighthouse" and fault.worker != self.worker:
                # Another worker of this group is hit; a hang freezes the whole group with it.
                self.hung = self.hung or fault.kind == "hang"
            elif fault.moment != "step":
                self.armed.append(fault)
            else:
                self._fire(fault)

    def on_heal(self) -> None:
        """This group is loading live state from another (torchft calls our load_state_dict)."""
        self._fire_armed("heal")

    def _fire_armed(self, moment: str, kinds: Optional[tuple] = None) -> None:
        for fault in [f for f in self.armed if f.moment == moment and (kinds is None or f.kind in kinds)]:
            self.armed.remove(fault)
            self._fire(fault)

    def _wrap_manager(self) -> None:
        """Hook the sync's quorum request and allreduce, where armed lighthouse failures strike."""
        if not any(f.moment in ("quorum", "allreduce") for f in self.pending):
            return
        start_quorum, allreduce = self.manager.start_quorum, self.manager.allreduce

        def quorum_then(*args: Any, **kwargs: Any) -> Any:
            self._fire_armed("quorum")
            return start_quorum(*args, **kwargs)

        def allreduce_then(*args: Any, **kwargs: Any) -> Any:
            # A hang strikes before this group's part is sent: its peers wait in the collective for it.
            self._fire_armed("allreduce", kinds=("hang",))
            work = allreduce(*args, **kwargs)
            self._fire_armed("allreduce")  # the collective is in flight
            return work

        self.manager.start_quorum, self.manager.allreduce = quorum_then, allreduce_then

    def _fire(self, fault: Fault) -> None:
        step = self.step
        first = self.completion.event(self.group, EventKind.FAULT, fault=fault.kind, fault_id=fault.id,
                                      target=fault.group, worker=fault.worker, step=step,
                                      duration_s=fault.duration_s, moment=fault.moment)
        if first:
            if self.metrics is not None:  # written before a kill can lose it
                self.metrics.add(EventKind.FAULT, step, flush=True, fault=fault.kind, fault_id=fault.id,
                                 target=fault.group, worker=fault.worker, duration_s=fault.duration_s,
                                 moment=fault.moment)
            self._inject(fault, step)

    def _inject(self, fault: Fault, step: int) -> None:
        where = "" if fault.moment == "step" else f" ({fault.moment})"
        who = f"group {self.group} worker {self.worker}" if fault.kind != "lighthouse" else f"group {self.group}"
        print(f"LocalSGD: {who} FAULT #{fault.id}: injecting {fault.kind} at step {step}{where}", flush=True)
        if fault.kind == "kill":
            _die()
        elif fault.kind == "hang":
            # We stop ourselves, here and now, and a helper process resumes us: the whole process
            # freezes, heartbeats and liveness included, as when a machine stops responding.
            resume_later(fault.duration_s)
            os.kill(os.getpid(), signal.SIGSTOP)
            self.hung = True
        elif fault.kind == "kill_during_sync":
            self._arm_kill_in_allreduce()
        elif fault.kind == "partition":
            assert self.link is not None
            host_faults.partition(self.link, fault.duration_s)
        elif fault.kind == "host_down":
            assert self.link is not None
            sys.stdout.flush()
            host_faults.host_down(self.link)
        # "lighthouse": the lighthouse role acts on the reported event.

    def _arm_kill_in_allreduce(self) -> None:
        """Die right after the next sync has issued its first parameter allreduce: peers are mid-collective."""
        real_allreduce = self.manager.allreduce

        def allreduce_then_die(*args: Any, **kwargs: Any) -> Any:
            real_allreduce(*args, **kwargs)
            _die()

        self.manager.allreduce = allreduce_then_die


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)
