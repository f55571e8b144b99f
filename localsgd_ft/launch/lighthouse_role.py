"""The lighthouse role: supervises torchft's lighthouse, serves the completion service, ends when training does.

Run by the component as ``python -m localsgd_ft.lighthouse --config C --host-env VAR``; its exit code is
the run's verdict. What it does when, and why: docs/lifecycle.md and docs/fault-tolerance.md.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import ThreadingHTTPServer
from typing import Callable, List, Optional, Tuple

from localsgd_ft.config import ExperimentConfig, resolved_yaml, to_dict
from localsgd_ft.contract import FaultEvent, Snapshot, Summary, read_event
from localsgd_ft.contract.names import CONFIG_FILE, GROUPS_DIR, METRICS_DIR, REPORT_DIR, SUMMARY_FILE
from localsgd_ft.launch import addresses, lifecycle
from localsgd_ft.launch.completion.server import serve as serve_completion
from localsgd_ft.launch.completion.state import CompletionState
from localsgd_ft.launch.torchft_lighthouse import command as lighthouse_command
from localsgd_ft.results.metrics import metrics_dir
from localsgd_ft.results.summary import summarize
from localsgd_ft.storage import fired_faults, ownership, set_aside
from localsgd_ft.storage.atomic import write_json_atomic, write_text_atomic
from localsgd_ft.storage.fired_faults import FiredFaultsUnreadable
from localsgd_ft.storage.ownership import Claim, DirectoryBusy
from localsgd_ft.storage.set_aside import SetAsideError, set_aside_checkpoints, set_aside_outputs

REPORT_TIMEOUT_S = 120


class PortTaken(RuntimeError):
    """A port this role must own is held by another process (often another run)."""


def listen_host(bind_host: str) -> str:
    """The host to bind a server to: '' (every interface) for addresses.bind_address's '::'."""
    return "" if bind_host == "::" else bind_host


def port_taken(host: str, port: int, what: str, e: OSError) -> PortTaken:
    """The one-line error for a port this role cannot bind, naming the fix."""
    return PortTaken(f"port {port} ({what}) is already in use on {host or 'all interfaces'} ({e.strerror}), "
                     "probably by another run; stop it, or set lighthouse.port to a free port (this run uses "
                     "lighthouse.port and lighthouse.port + 1)")


def claim_port(host: str, port: int, what: str) -> None:
    """Fail at once, naming the fix, if ``host:port`` cannot be bound (e.g. another run holds it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # As torchft's server binds (Rust sets SO_REUSEADDR): TIME_WAIT is no obstacle, a listener is.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise port_taken(host, port, what, e) from None


class SupervisedLighthouse:
    """torchft's lighthouse in a child process that is restarted whenever it dies."""

    def __init__(self, cfg: ExperimentConfig, bind_host: str, on_start: Callable[[], None] = lambda: None) -> None:
        self.on_start = on_start  # counts an incarnation before the new lighthouse can form a quorum
        # A lighthouse that cannot be restarted for as long as a group waits for a quorum ends the
        # run with the reason, rather than leaving the groups to time out one by one.
        self.give_up_s = cfg.localsgd.quorum_timeout_s
        self.cmd = lighthouse_command(cfg.lighthouse, bind_host)
        self.port = cfg.lighthouse.port
        self.bind_host = bind_host
        self.connect_host = "127.0.0.1" if bind_host != "::" else "localhost"
        self.proc: Optional[subprocess.Popen] = None
        self.restarts = 0
        self._down_until = 0.0  # an injected outage: do not restart before this time
        self._failing_since: Optional[float] = None
        self._lock = threading.Lock()
        self._stopped = False

    def start(self, deadline_s: float = 30.0) -> None:
        """Start the child and wait until it accepts connections."""
        claim_port(listen_host(self.bind_host), self.port, "torchft lighthouse")
        self.on_start()
        # The torchft lighthouse dies with this role, however the role dies (SIGKILL included), and
        # at once: SIGKILL frees the port for the next run without a grace.
        self.proc = subprocess.Popen(self.cmd, preexec_fn=lifecycle.preexec_die_with_parent(signal.SIGKILL))
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the torchft lighthouse exited with {self.proc.returncode} at start "
                                   f"(port {self.port})")
            try:
                socket.create_connection((self.connect_host, self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        self.proc.kill()
        raise RuntimeError(f"the torchft lighthouse did not listen on port {self.port} within {deadline_s}s")

    def kill_for(self, duration_s: float) -> None:
        """Injected failure: SIGKILL the lighthouse; it comes back after ``duration_s``."""
        with self._lock:
            self._down_until = time.monotonic() + duration_s
            if self.proc is not None:
                self.proc.kill()
                self.proc.wait()
        print(f"lighthouse: FAULT: lighthouse killed; restarting in {duration_s:g}s", flush=True)

    def watch(self) -> Optional[str]:
        """Restart the child if it is gone (called periodically); a reason to end the run if it cannot be."""
        with self._lock:
            if self._stopped or self.proc is None or self.proc.poll() is None:
                return None
            if time.monotonic() < self._down_until:
                return None
            code = self.proc.returncode
            try:
                if self._failing_since is None:
                    self.restarts += 1
                    print(f"lighthouse: torchft lighthouse exited ({code}); restart #{self.restarts}", flush=True)
                self.start(deadline_s=10.0)
                self._failing_since = None
            except RuntimeError as e:
                now = time.monotonic()
                self._failing_since = self._failing_since or now
                print(f"lighthouse: restarting the torchft lighthouse failed: {e}", flush=True)
                if now - self._failing_since > self.give_up_s:
                    return (f"the torchft lighthouse could not be restarted for {self.give_up_s:.0f} s "
                            f"(last error: {e})")
                self._down_until = now + 1.0  # try again in a second
        return None

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            if self.proc is not None and self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()


def _check_losses(cfg: ExperimentConfig, state: CompletionState) -> None:
    """Abort when too few groups are left to form a quorum (lighthouse.min_replicas)."""
    reports = Snapshot.model_validate(state.snapshot(events=False))
    lost = {g: rep for g, rep in sorted(reports.finished.items()) if rep.exit_code != 0}
    if not lost or reports.abort:
        return
    alive = cfg.replica_groups.count - len(lost)
    if alive < cfg.lighthouse.min_replicas:
        errors = {g: rep.result.error for g, rep in lost.items() if rep.result is not None and rep.result.error}
        why = ("; ".join(f"group {g}: {e}" for g, e in errors.items()) if errors
               else f"exhausted replica_groups.max_restarts ({cfg.replica_groups.max_restarts})")
        reason = (f"replica group(s) {list(lost)} failed ({why}); {alive} group(s) left, fewer than "
                  f"lighthouse.min_replicas ({cfg.lighthouse.min_replicas}): training cannot continue")
        if state.set_abort(reason, quoted=errors):
            print(f"lighthouse: ABORT: {reason}", flush=True)


def _on_fault(lighthouse: SupervisedLighthouse, cfg: ExperimentConfig, state: CompletionState
              ) -> Callable[[dict], None]:
    plan = {f.id: f for f in cfg.fault_plan}

    def on_event(recorded: dict) -> None:
        event = read_event(recorded)
        if not isinstance(event, FaultEvent):
            return
        print(f"lighthouse: FAULT #{event.fault_id}: {event.fault} of "
              f"{'the lighthouse' if event.fault == 'lighthouse' else 'group %s' % event.target} "
              f"at step {event.step}", flush=True)
        if cfg.checkpoint.enabled:  # before the group hears back and strikes: a restarted job must not repeat it
            try:
                fired_faults.save(cfg.checkpoint_dir, state.fired_ids())
            except OSError as e:
                print(f"lighthouse: WARNING: could not record the fired failure in {cfg.checkpoint_dir} "
                      f"({type(e).__name__}: {e}); a whole-job restart would fire it again", flush=True)
        if event.fault == "lighthouse":
            # Off the HTTP thread: the reporting group must get its answer before the kill.
            # The outage lasts as planned, whatever the report claims.
            threading.Thread(target=lighthouse.kill_for, args=(plan[event.fault_id].duration_s,),
                             daemon=True).start()

    return on_event


def _supervise(cfg: ExperimentConfig, state: CompletionState, lighthouse: SupervisedLighthouse,
               stop: threading.Event, opened: float, never_seen: float) -> None:
    """Until every group has finished (or a signal came): keep the torchft lighthouse up, settle and
    declare lost groups, and abort when too few are left."""
    while not stop.is_set() and not state.wait(state.all_finished, timeout=0.5):
        failure = lighthouse.watch()
        if failure and state.set_abort(failure):
            print(f"lighthouse: ABORT: {failure}", flush=True)
        state.settle_failing()
        for g, reason in state.declare_silent_lost(cfg.lighthouse.role_timeout_s):
            print(f"lighthouse: group {g}: {reason} (lighthouse.role_timeout_s {cfg.lighthouse.role_timeout_s:g})",
                  flush=True)
        if time.monotonic() - opened > never_seen:
            for g in state.declare_never_seen_lost(never_seen):
                print(f"lighthouse: group {g}: role lost: it never reached the lighthouse role in "
                      f"{never_seen:.0f} s", flush=True)
        _check_losses(cfg, state)


def run(cfg: ExperimentConfig, host: str, config_path: str, print_summary: bool = False) -> int:
    """Own the ports and the output, prepare it, supervise until training ends, then give the verdict (the exit code)."""
    started_at = time.time()
    stop = _stop_on_signals()
    bind_host = addresses.bind_address(host)
    state, completion, lighthouse = _bind(cfg, bind_host)
    local = bind_host != "::"
    try:
        owned = _own_outputs(cfg, config_path, state)
    except (DirectoryBusy, SetAsideError, FiredFaultsUnreadable) as e:
        _refuse_run(cfg, state, str(e), local)
        _close(completion, lighthouse)
        raise RuntimeError(str(e)) from None
    try:
        return _supervise_and_conclude(cfg, host, bind_host, config_path, print_summary, started_at, stop,
                                       state, completion, lighthouse, local)
    finally:
        owned.release()


def _supervise_and_conclude(cfg: ExperimentConfig, host: str, bind_host: str, config_path: str,
                            print_summary: bool, started_at: float, stop: threading.Event, state: CompletionState,
                            completion: ThreadingHTTPServer, lighthouse: "SupervisedLighthouse", local: bool) -> int:
    role_error: Optional[str] = None
    try:
        state.on_event = _on_fault(lighthouse, cfg, state)
        state.open()
        opened = time.monotonic()
        _announce(cfg, host, bind_host)
        # A role that never reaches us (it died at start, its pod was never scheduled) is lost too.
        never_seen = addresses.never_seen_s(cfg, local=local)
        _supervise(cfg, state, lighthouse, stop, opened, never_seen)
    except Exception as e:  # never end without a verdict: the summary says what went wrong
        role_error = f"lighthouse role error: {type(e).__name__}: {e}"
        print(f"lighthouse: {role_error}", flush=True)
    finally:
        _close(completion, lighthouse)  # free the ports now, not when the report is done
    summary = _summary(cfg, state, started_at, config_path, lighthouse.restarts, role_error, stop.is_set())
    try:
        return _conclude(cfg, summary, stop.is_set(), print_summary)
    except OSError:  # even the console's log cannot be written (its disk is full): the exit code still tells
        return 0 if summary.succeeded else 1


def _refuse_run(cfg: ExperimentConfig, state: CompletionState, reason: str, local: bool) -> None:
    """This run may not use its output: tell its replica roles at their first contact (they stop without
    touching a file), bounded by how long they would look for us, then leave without writing anything."""
    state.set_abort(reason)
    state.open()
    state.wait(state.all_finished, timeout=addresses.first_contact_s(cfg, local=local) + 5.0)


def _summary(cfg: ExperimentConfig, state: CompletionState, started_at: float, config_path: str, restarts: int,
             role_error: Optional[str], signalled: bool) -> Summary:
    """The run's summary; should building it fail, one that says so (never an end without a verdict)."""
    try:
        reports = state.snapshot()
        return summarize(cfg, reports, started_at, config_path, restarts, lifecycle.peak_rss_mb(),
                         run_id=lifecycle.run_id(), role_error=role_error,
                         stopped=signalled and not _all_trained(cfg, reports))
    except Exception as e:
        reason = f"lighthouse role error: the summary could not be built: {type(e).__name__}: {e}"
        print(f"lighthouse: {reason}", flush=True)
        # Every key summary.json's readers rely on, set (a record dumps only what was set).
        return Summary(name=cfg.name, algorithm=cfg.localsgd.algorithm, run_id=lifecycle.run_id(),
                       config_path=config_path, succeeded=False, failure_reason=role_error or reason,
                       final_test_accuracy=None, params_identical=False, replica_groups={}, config=to_dict(cfg))


def _stop_on_signals() -> threading.Event:
    """An event SIGTERM and SIGINT set (Ctrl-C, a scheduler's cancel): the role then ends with a partial summary."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    return stop


def _bind(cfg: ExperimentConfig, bind_host: str) -> Tuple[CompletionState, ThreadingHTTPServer,
                                                          "SupervisedLighthouse"]:
    """Own both ports before anything is moved or written: a port held by another run ends this role at
    once with one line, and the replica roles, refused by that run's service, stop too."""
    state = CompletionState(cfg.replica_groups.count, lifecycle.run_id(), {f.id: f.kind for f in cfg.fault_plan},
                            nodes=cfg.replica_groups.nodes,
                            silent_after_s=cfg.lighthouse.heartbeat_timeout_ms / 1000)
    port = cfg.lighthouse.completion_port
    try:
        completion = serve_completion(listen_host(bind_host), port, state, lifecycle.run_token())
    except OSError as e:
        raise port_taken(listen_host(bind_host), port, "completion service", e) from None
    lighthouse = SupervisedLighthouse(cfg, bind_host, on_start=state.new_incarnation)
    try:
        lighthouse.start()
    except RuntimeError:
        _close(completion)
        raise
    return state, completion, lighthouse


def _close(completion: ThreadingHTTPServer, lighthouse: Optional["SupervisedLighthouse"] = None) -> None:
    """Stop serving and free the ports (the completion service's, the torchft lighthouse's)."""
    completion.shutdown()
    completion.server_close()
    if lighthouse is not None:
        lighthouse.stop()


# A previous job's outputs in the run directory, set aside at every start so the directory describes one job:
# its verdict (a stale summary.json must never stand beside a new run's files), the config it ran, its
# metrics, report and group results.
PREVIOUS_OUTPUTS = (SUMMARY_FILE, CONFIG_FILE, METRICS_DIR, REPORT_DIR, GROUPS_DIR)
# More set-aside folders than this in a run directory and the start says how to remove them.
SET_ASIDE_NOTICE = 10


def _own_outputs(cfg: ExperimentConfig, config_path: str, state: CompletionState) -> Claim:
    """Claim the output (and checkpoint) directory, then prepare it; the claim, held until the verdict is out.

    Before anything is moved or written: a directory another live run holds is refused (DirectoryBusy),
    and so is a checkpoint directory that is not only ours (SetAsideError), with nothing touched. A
    resumed run learns which planned failures an earlier job already fired (unreadable: refused).
    """
    owned, notes = ownership.claim(ownership.directories(cfg), lifecycle.run_id())
    try:
        for note in notes:
            print(f"lighthouse: {note}", flush=True)
        _prepare_outputs(cfg, config_path)
        if cfg.checkpoint.enabled and cfg.fault_plan:
            fired = fired_faults.load(cfg.checkpoint_dir, [f.id for f in cfg.fault_plan])
            if fired:
                state.remember_fired(fired)
                print(f"lighthouse: resuming: planned failure(s) {fired} fired in an earlier job of this run and "
                      "will not fire again", flush=True)
    except BaseException:
        owned.release()
        raise
    return owned


def _prepare_outputs(cfg: ExperimentConfig, config_path: str) -> None:
    """Set aside what a previous job left (its checkpoints with --fresh, its outputs); record this run's config."""
    if cfg.checkpoint.enabled and addresses.fresh_requested(cfg):
        moved = set_aside_checkpoints(cfg.checkpoint_dir)
        if moved:
            print(f"lighthouse: starting over: old checkpoints set aside in {moved}", flush=True)
    previous = set_aside_outputs(cfg.run_dir, PREVIOUS_OUTPUTS)
    if previous:
        print(f"lighthouse: a previous run's outputs set aside in {previous}", flush=True)
    folders = set_aside.find(cfg.run_dir)
    if len(folders) > SET_ASIDE_NOTICE:
        mb = sum(f.bytes for f in folders) / 2**20
        print(f"lighthouse: {len(folders)} set-aside folders under {cfg.run_dir} hold {mb:.0f} MB; list or remove "
              f"them with: python -m localsgd_ft.cleanup {cfg.run_dir} [--delete --keep N]", flush=True)
    # What this run ran, every default filled in (overrides included): rerunnable as it is.
    write_text_atomic(cfg.run_dir / CONFIG_FILE, resolved_yaml(cfg, config_path))


def _announce(cfg: ExperimentConfig, host: str, bind_host: str) -> None:
    url = addresses.lighthouse_url(cfg, host)
    print(f"lighthouse: run {lifecycle.run_id()}: serving {url}, bound to {bind_host}; "
          f"waiting for {cfg.replica_groups.count} replica groups", flush=True)
    print(f"lighthouse: dashboard: {url}/ ; metrics: {metrics_dir(cfg.run_dir)}", flush=True)
    for note in cfg.advice():
        print(f"lighthouse: warning: {note}", flush=True)
    if cfg.fault_plan:
        print(f"lighthouse: {len(cfg.fault_plan)} failure(s) will be injected: "
              + "; ".join(f"#{f.id} {f.kind} group {f.group} at step {f.at_step}" for f in cfg.fault_plan),
              flush=True)


def _conclude(cfg: ExperimentConfig, summary: Summary, stopped: bool, print_summary: bool) -> int:
    """Write summary.json, say what happened and make the report; the role's exit code (the run's verdict)."""
    summary_path = cfg.run_dir / SUMMARY_FILE
    try:
        write_json_atomic(summary_path, summary.wire())
    except OSError as e:  # a full disk must not cost the verdict: it is still printed, and is the exit code
        print(f"lighthouse: ERROR: could not write {summary_path} ({type(e).__name__}: {e}); the verdict "
              "below stands, and the summary is printed in full", flush=True)
        summary_path, print_summary = None, True
    for g, rep in summary.replica_groups.items():
        print(f"lighthouse: group {g}: exit_code={rep.exit_code} steps={rep.steps} "
              f"syncs_committed={rep.syncs_committed} restarts={rep.restarts} "
              f"params_sha256={str(rep.params_sha256)[:12]}", flush=True)
    if stopped:
        print("lighthouse: stopped by a signal before every group finished", flush=True)
        written = summary.checkpoints_written
        if cfg.checkpoint.enabled:
            where = f"newest checkpoint: step {written[-1].step}" if written else "no checkpoint yet: it starts over"
            print(f"lighthouse: to resume, run the same command again ({where}, in {cfg.checkpoint_dir})", flush=True)
    if summary.lost_groups:
        print(f"lighthouse: lost replica groups: {summary.lost_groups}", flush=True)
    if summary.checkpoints_stopped:
        print(f"lighthouse: WARNING: checkpoints stopped ({summary.checkpoints_stopped}); the newest is in "
              f"{cfg.checkpoint_dir}", flush=True)
    if print_summary:
        # One line, so it can be cut out of `torchx log` / kubectl logs: the container keeps no files.
        print("lighthouse: SUMMARY_JSON " + json.dumps(summary.wire(), separators=(",", ":")), flush=True)
    # Stopped (Ctrl-C, a cancel, the client gone): leave at once; the plots can be made later.
    report_ok = False if stopped or summary_path is None else _run_report(cfg)
    if stopped:
        print(f"lighthouse: report skipped; make it with: python -m localsgd_ft.report {cfg.run_dir}", flush=True)
    verdict = "SUCCEEDED" if summary.succeeded else "FAILED"
    why = f" ({summary.failure_reason})" if summary.failure_reason else ""
    print(f"lighthouse: training {verdict}{why}; final_test_accuracy={summary.final_test_accuracy}; "
          f"summary: {summary_path or 'not written (see above)'}"
          + (f"; report: {cfg.run_dir / 'report'}" if report_ok else ""), flush=True)
    if not stopped:  # stopped, the client is tearing the run down and copies nothing more
        lifecycle.wait_for_console_copy()
    return 0 if summary.succeeded else 1


def _run_report(cfg: ExperimentConfig) -> bool:
    """Print the summary table and write the plots; True if the report was written.

    In a subprocess: matplotlib never enters this small process, and a plotting problem cannot
    change the verdict.
    """
    try:
        code = subprocess.run([sys.executable, "-m", "localsgd_ft.report", str(cfg.run_dir)], timeout=REPORT_TIMEOUT_S,
                              preexec_fn=lifecycle.preexec_die_with_parent(signal.SIGKILL)).returncode
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"lighthouse: the report could not be made: {e}", flush=True)
        return False
    if code != 0:
        print(f"lighthouse: the report exited with {code} (see above); summary.json is complete", flush=True)
    return code == 0


def _all_trained(cfg: ExperimentConfig, reports: dict) -> bool:
    """Whether every group ended well (a group the same signal stopped first reports a failed exit)."""
    finished = Snapshot.model_validate(reports).finished
    return len(finished) == cfg.replica_groups.count and all(r.exit_code == 0 for r in finished.values())


def main(argv: Optional[List[str]] = None) -> int:
    # First of all: locally the role follows the `torchx run` client, on Slurm its step process
    # (SIGTERM: it still writes its verdict). Its own children follow it in turn.
    lifecycle.die_with_parent(signal.SIGTERM, expected_parent=lifecycle.expected_parent())
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--print-summary", action="store_true", help="also print summary.json to the log")
    args, cfg, host = addresses.parse_role_args(parser, argv, "lighthouse")
    try:
        return run(cfg, host, args.config, args.print_summary)
    except RuntimeError as e:
        print(f"lighthouse: error: {e}", file=sys.stderr, flush=True)
        lifecycle.wait_for_console_copy()
        return 1


if __name__ == "__main__":
    sys.exit(main())
