"""A replica-group role: runs the group's torchrun, keeps it tied to the run, and reports its end.

Run by the component as ``python -m localsgd_ft.replica --config C --group G --node N --host-env VAR``
(one per node of the group). In order: it proves it talks to its own run (its first heartbeat), checks
what no restart can fix (GPUs, data), runs torchrun tied to itself, heartbeats until torchrun ends or the
run is aborted, and posts torchrun's exit code and the trainer's result; see docs/lifecycle.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

from localsgd_ft.config import ExperimentConfig
from localsgd_ft.contract import (COMPLETION_ENV, GROUP_ENV, HEARTBEAT_S, NUM_GROUPS_ENV, TORCHFT_LIGHTHOUSE_ENV,
                                  EventKind, Status, StopReason, TrainerResult, read)
from localsgd_ft.contract.names import GROUPS_DIR
from localsgd_ft.launch import addresses, gpus, lifecycle
from localsgd_ft.launch.completion.client import CompletionClient, Refused
from localsgd_ft.launch.trainer_watch import TrainerWatch
from localsgd_ft.storage.cifar10 import DataError, locate


@dataclass(frozen=True)
class Stop:
    """Why this role stops its torchrun: the reason, and the line that says it."""

    reason: StopReason
    message: str


def result_path(cfg: ExperimentConfig, group: int) -> Path:
    """Where group ``group``'s trainer (worker 0) leaves its final result."""
    return cfg.run_dir / GROUPS_DIR / f"{group}.json"


def torchrun_command(cfg: ExperimentConfig, config_path: str, script: str,
                     config_b64: Optional[str] = None, rendezvous: Optional[Tuple[str, int, str, float]] = None,
                     ) -> List[str]:
    """torchrun's command line; ``rendezvous`` (host, port, id, timeout) for a group of several nodes."""
    rg = cfg.replica_groups
    # The embedded config travels on to the trainer, so no role ever needs the file on disk.
    embedded = ["--config-b64", config_b64] if config_b64 else []
    if rendezvous is None:
        # A free rendezvous port per group, so groups can share a host.
        meet = ["--standalone", "--nnodes=1"]
    else:
        host, port, rdzv_id, timeout_s = rendezvous
        meet = [f"--nnodes={rg.nodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={host}:{port}",
                # read_timeout: how long a node waits for node 0's store to come up (or answer) at all.
                f"--rdzv-id={rdzv_id}", f"--rdzv-conf=join_timeout={int(timeout_s)},read_timeout={int(timeout_s)}"]
    return [
        sys.executable, "-m", "torch.distributed.run",
        *meet,
        f"--nproc_per_node={rg.workers}",
        f"--max_restarts={rg.max_restarts}",
        script, "--config", config_path, *embedded,
    ]


def read_result(path: Path, group: int) -> Optional[TrainerResult]:
    """The trainer's result left at ``path`` (None: none, or not a result, which is said on stderr)."""
    if not path.is_file():
        return None
    try:
        return read(TrainerResult, json.loads(path.read_text()))
    except (OSError, ValueError) as e:  # ContractError is a ValueError
        print(f"replica {group}: cannot read {path}: {e}", file=sys.stderr, flush=True)
        return None


def stop_torchrun(proc: subprocess.Popen) -> int:
    """SIGKILL torchrun; its workers die with it (parent-death signal), checkpoints are atomic.

    Nothing is lost against a SIGTERM (trainers do not handle it), and torchrun
    prints no traceback of its own shutdown.
    """
    if proc.poll() is None:
        proc.kill()
    return proc.wait()


class Heartbeat:
    """Tells the lighthouse role every ``HEARTBEAT_S`` that this role lives, from a thread of its own.

    A thread, so that nothing this role does (checking or downloading data,
    waiting for torchrun) can make it fall silent. It keeps what the role must
    act on: the reason to stop (the run aborted, a refusal, the lighthouse role
    unreachable for ``lighthouse.role_timeout_s``, a signal); the first one stands. Once ``watch`` is set
    each beat also looks at the trainers (ends a frozen one) and says how long the quietest has been silent.
    """

    def __init__(self, cfg: ExperimentConfig, group: int, client: CompletionClient, node: int = 0) -> None:
        self.cfg, self.group, self.client, self.node = cfg, group, client, node
        self.watch: Optional[TrainerWatch] = None  # set once torchrun starts
        self.last_contact = time.monotonic()
        self.stopping: Optional[Stop] = None
        self.sibling_lost: Optional[str] = None  # why this role last ended its trainers: another node fell silent
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> "Heartbeat":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._done.set()

    def stop_for(self, reason: StopReason, message: str) -> None:
        """Stop torchrun for ``reason`` (unless a reason to stop came first)."""
        self.stopping = self.stopping or Stop(reason, message)

    def _run(self) -> None:
        while not self._done.wait(HEARTBEAT_S):
            quiet = self.watch.check() if self.watch is not None else None
            try:
                status = Status.model_validate(self.client.heartbeat(self.group, deadline_s=HEARTBEAT_S,
                                                                     node=self.node, trainer_quiet_s=quiet))
                self.last_contact = time.monotonic()
                if status.abort:
                    self.stop_for(StopReason.ABORTED, f"the run was aborted: {status.abort}")
                self._end_for_silent_sibling(status)
            except Refused as e:
                self.stop_for(StopReason.REFUSED, f"the completion service refused this role ({e})")
            except Exception:  # the lighthouse role busy or restarting: keep training, within reason
                silent = time.monotonic() - self.last_contact
                if silent > self.cfg.lighthouse.role_timeout_s:
                    self.stop_for(StopReason.UNREACHABLE,
                                  f"the lighthouse role has been unreachable for {silent:.0f} s")


    def _end_for_silent_sibling(self, status: Status) -> None:
        """Another node of this group fell silent (its host dark, its link cut): end this node's trainers.

        They would wait for it in the group's own collectives while their Manager kept heartbeating, and
        torchft's lighthouse forms no quorum without a group that heartbeats (with two groups, never):
        every other group would wait. Ended, the Manager falls silent, the others go on without this group,
        and torchrun restarts it once all its nodes meet again (or fails it, when they do not).
        """
        sibling = next((s for s in status.silent_nodes if s.group == self.group and s.node != self.node), None)
        if sibling is None or self.watch is None:
            return
        why = (f"node {sibling.node} of this group has been silent for {sibling.silent_s:.1f} s "
               f"(lighthouse.heartbeat_timeout_ms {self.cfg.lighthouse.heartbeat_timeout_ms})")
        ended = self.watch.end_all(why)
        if not ended:
            return  # none runs: torchrun is between incarnations, waiting for the group's nodes
        self.sibling_lost = why
        try:
            self.client.event(self.group, EventKind.NODE_SILENT, deadline_s=2.0, node=self.node,
                              silent_node=sibling.node, silent_s=sibling.silent_s, workers=ended)
        except Exception as e:
            print(f"replica {self.group}: could not report the silent node: {e}", file=sys.stderr, flush=True)


def wait_for_torchrun(proc: subprocess.Popen, beat: Heartbeat, group: int) -> int:
    """Wait for torchrun; stop it early when the heartbeat says so (a trainer's permanent error ends it itself)."""
    while True:
        try:
            return proc.wait(HEARTBEAT_S)
        except subprocess.TimeoutExpired:
            pass
        if beat.stopping:
            print(f"replica {group}: stopping torchrun: {beat.stopping.message}", file=sys.stderr, flush=True)
            return stop_torchrun(proc)


def _report(client: CompletionClient, group: int, code: int, result: Optional[TrainerResult],
            deadline_s: float = 60.0, node: int = 0) -> int:
    try:
        client.finished(group, code, result, deadline_s=deadline_s, node=node)
    except Exception as e:  # the lighthouse role is gone: our own exit code must tell
        print(f"replica {group}: could not report to the lighthouse at {client.url}: {e}", file=sys.stderr,
              flush=True)
        return code or 1
    # Reported: the lighthouse role now owns the verdict (its exit code is the run's). Exiting 0
    # keeps a lost group from failing the whole app (Slurm kills every role on a non-zero exit).
    return 0


def _refuse(client: CompletionClient, group: int, error: str, node: int = 0) -> int:
    """Report a group that cannot start at all (no torchrun, so no pointless restarts)."""
    print(f"replica {group}: error: {error}", file=sys.stderr, flush=True)
    return _report(client, group, 2, TrainerResult(error=error, permanent=True), node=node)


def run(cfg: ExperimentConfig, config_path: str, group: int, host: str, script: str,
        config_b64: Optional[str] = None, node: int = 0, rdzv_port: int = 0) -> int:
    env = dict(os.environ)
    # Workers meet in a store their worker 0 serves, new with every restart: torchrun's own store
    # outlives restarts, and gloo would find the dead incarnation's addresses in it.
    env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    env[GROUP_ENV] = str(group)
    env[NUM_GROUPS_ENV] = str(cfg.replica_groups.count)
    env[TORCHFT_LIGHTHOUSE_ENV] = addresses.lighthouse_url(cfg, host)
    env[COMPLETION_ENV] = addresses.completion_url(cfg, host)
    env.setdefault("PYTHONUNBUFFERED", "1")
    client = CompletionClient(env[COMPLETION_ENV], lifecycle.run_token())

    local = addresses.is_loopback(host)
    status = _first_contact(cfg, client, group, node, local)
    if status is None:
        return 1
    if status.abort:  # e.g. another run holds the output directory: touch nothing, start nothing
        print(f"replica {group}: not started: the lighthouse role refused this run (its line says why)",
              file=sys.stderr, flush=True)
        return _report(client, group, 2, TrainerResult(error=status.abort, permanent=True), deadline_s=5.0,
                       node=node)

    beat = Heartbeat(cfg, group, client, node).start()
    gpu_problem = gpus.check_role(cfg, group, env)
    if gpu_problem:
        beat.stop()
        return _refuse(client, group, gpu_problem, node)
    try:  # on this filesystem the component already did this; in an image each role does it
        locate(cfg.data)
    except DataError as e:
        beat.stop()
        return _refuse(client, group, str(e), node)
    rendezvous = None
    if cfg.replica_groups.nodes > 1:
        try:
            first = addresses.group_first_host(group, cfg.replica_groups.nodes, host)
        except RuntimeError as e:
            beat.stop()
            return _refuse(client, group, str(e), node)
        rendezvous = (first, rdzv_port or cfg.lighthouse.rendezvous_port(group),
                      f"{lifecycle.run_id() or cfg.name}-{group}", addresses.rendezvous_timeout_s(cfg, local))

    result_file = result_path(cfg, group)
    result_file.unlink(missing_ok=True)  # never report a previous run's result

    def on_signal(signum: int, _frame: object) -> None:
        # Ctrl-C / a scheduler's cancel: stop torchrun (and so its workers) before leaving.
        beat.stop_for(StopReason.SIGNAL, f"received {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # From now on each heartbeat also looks at the trainers (and ends a frozen one).
    beat.watch = watch = TrainerWatch(group, cfg.replica_groups.trainer_timeout_s, lifecycle.run_id(),
                                      _report_frozen(client, group, node))
    env.update(watch.env())
    try:
        # torchrun follows this role, even if this role is SIGKILLed; its workers follow torchrun.
        proc = subprocess.Popen(torchrun_command(cfg, config_path, script, config_b64, rendezvous), env=env,
                                start_new_session=True,
                                preexec_fn=lifecycle.preexec_die_with_parent(signal.SIGKILL))
        code = wait_for_torchrun(proc, beat, group)
        if proc.poll() is None:
            code = stop_torchrun(proc)
    finally:
        beat.stop()
        watch.close()
    return _report_end(cfg, client, group, node, code, read_result(result_file, group), beat.stopping,
                       watch.ended, beat.sibling_lost)


def _report_frozen(client: CompletionClient, group: int, node: int) -> Callable[[int, float], None]:
    """What this role does after ending a frozen trainer: a ``trainer_frozen`` event (the line on stderr says it
    too, should the event not get through)."""

    def report(local_rank: int, quiet_s: float) -> None:
        try:
            client.event(group, EventKind.TRAINER_FROZEN, deadline_s=2.0, node=node, worker=local_rank,
                         quiet_s=round(quiet_s, 3))
        except Exception as e:
            print(f"replica {group}: could not report the frozen trainer: {e}", file=sys.stderr, flush=True)

    return report


def _first_contact(cfg: ExperimentConfig, client: CompletionClient, group: int, node: int,
                   local: bool) -> Optional[Status]:
    """Where the run stands, if this run's lighthouse role answers; if not, None and one line on stderr says why."""
    # The lighthouse role may still be starting (on a cluster its pod or node may come up later
    # than ours); a stranger on its port refuses us at once.
    try:
        return Status.model_validate(client.heartbeat(group, deadline_s=addresses.first_contact_s(cfg, local=local),
                                                      node=node))
    except Refused as e:
        print(f"replica {group}: error: the completion service at {client.url} refused this run ({e}); "
              f"another run holds port {cfg.lighthouse.completion_port} (lighthouse.port + 1): stop it, or set "
              "lighthouse.port to a free port", file=sys.stderr, flush=True)
    except Exception as e:
        print(f"replica {group}: error: the lighthouse role at {client.url} is not reachable: {e}",
              file=sys.stderr, flush=True)
    return None


def _report_end(cfg: ExperimentConfig, client: CompletionClient, group: int, node: int, code: int,
                result: Optional[TrainerResult], stop: Optional[Stop], frozen: Sequence[str] = (),
                sibling_lost: Optional[str] = None) -> int:
    """Report torchrun's exit and the trainer's result; why this role stopped it, if it did, is the error
    (and with torchrun failing after this role ended its trainers, for a silent node of the group or a frozen
    trainer, that is the reason)."""
    ended_here = False  # whether the error is why this role ended the trainers
    if stop:
        result = TrainerResult.failed(result, stop.message)
    elif code != 0 and sibling_lost:
        result = TrainerResult.failed(result, f"this node ended its trainers: {sibling_lost}; torchrun could not "
                                              "bring the group back without it")
        ended_here = True
    elif code != 0 and frozen:  # a reason the trainer left stands (failed() keeps it)
        result = TrainerResult.failed(result, f"{frozen[-1]}, and torchrun had no restart left "
                                              f"(replica_groups.max_restarts {cfg.replica_groups.max_restarts})")
        ended_here = True
    if code != 0:
        why = (stop.message if stop else f"permanent error: {result.error}" if result and result.permanent
               else result.error if ended_here and result
               else f"max_restarts={cfg.replica_groups.max_restarts} exhausted or training failed")
        print(f"replica {group}: torchrun exited with {code} ({why})", file=sys.stderr, flush=True)
    # Stopping on a signal, the lighthouse role is most likely stopping too; unreachable, it is gone:
    # either way try once, briefly, rather than keep a finished run waiting on this role.
    cut_off = stop is not None and stop.reason == StopReason.UNREACHABLE
    brief = cut_off or (stop is not None and stop.reason == StopReason.SIGNAL)
    exit_code = _report(client, group, code, result, deadline_s=1.0 if brief else 60.0, node=node)
    if exit_code and cut_off and addresses.one_exit_ends_every_role():
        # Cut off from the lighthouse role (a partition of this node): a non-zero exit here would end the
        # groups still training. Where the lighthouse role itself is gone, its own end (its process's exit,
        # its node's failure) already ends the job.
        print(f"replica {group}: exiting 0 so that Slurm does not end the other groups' roles with this one; the "
              "lighthouse role's verdict is the run's", file=sys.stderr, flush=True)
        return 0
    return exit_code


def main(argv: Optional[List[str]] = None) -> int:
    # First of all: locally the role follows the `torchx run` client (SIGTERM lets it stop its
    # torchrun first), on Slurm its step process.
    lifecycle.die_with_parent(signal.SIGTERM, expected_parent=lifecycle.expected_parent())
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--group", type=int, required=True, help="this role's replica group id")
    parser.add_argument("--script", default="train_localsgd.py", help="what torchrun runs")
    parser.add_argument("--node", type=int, default=0, help="which node of the group this is (the role's replica)")
    parser.add_argument("--rdzv-port", type=int, default=0,
                        help="where a multi-node group's agents meet (0: lighthouse.rendezvous_port(group))")
    args, cfg, host = addresses.parse_role_args(parser, argv, "replica")
    try:
        return run(cfg, args.config, args.group, host, args.script, args.config_b64, args.node, args.rdzv_port)
    except RuntimeError as e:
        print(f"replica {args.group}: error: {e}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
