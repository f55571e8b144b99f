"""How a run owns its processes: each one dies with its supervisor (Linux's parent-death signal), and every
one carries the run's identity (its id and secret token, in the environment). Why and who follows whom:
docs/lifecycle.md. Standard library only: torchrun workers and the small roles import this first.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import secrets
import signal
import string
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional, Tuple

from localsgd_ft.contract import PARENT_PID_ENV, RUN_ID_ENV, RUN_TOKEN_ENV, TORCHRUN_ENV

_PR_SET_PDEATHSIG = 1


# What a dry run shows instead of the token in the env of roles that get it there: nothing it prints may
# let anyone talk to a run's completion service, and a role started from that plan refuses to run.
DRY_RUN_TOKEN = "<drawn-at-launch>"


def new_run_id(name: str) -> str:
    """A fresh run id for one launch of experiment ``name``."""
    return f"{name}-{secrets.token_hex(4)}"


def new_run_token() -> str:
    """A fresh run token for one launch: 32 hex, the completion service's shared secret."""
    return secrets.token_hex(16)


def hand_token_to_children(token: str) -> None:
    """Put ``token`` in this process's environment, where the children it starts (local_cwd's roles, sbatch
    and through it a Slurm job) inherit it: the environment of a process is readable by its user only."""
    os.environ[RUN_TOKEN_ENV] = token


def run_id() -> str:
    """This process's run id ('' outside a run started by the component)."""
    return os.environ.get(RUN_ID_ENV, "")


def run_token() -> str:
    """This process's run token; a clear error if the process was not started by the component."""
    token = os.environ.get(RUN_TOKEN_ENV, "")
    if not token:
        raise RuntimeError(f"${RUN_TOKEN_ENV} is not set: the roles of a run are started by the torchx "
                           "component (torchx run -- --config ...), which gives every role the run's token")
    if any(c not in string.hexdigits for c in token):
        raise RuntimeError(f"${RUN_TOKEN_ENV} is not a run token (hex digits; a dry run's plan shows {DRY_RUN_TOKEN} "
                           "there): launch with torchx run without --dryrun, which draws a token per launch")
    return token


# Loaded once, at import: a forked child (Popen's preexec_fn) must only call it, never dlopen.
_prctl = (ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
          if sys.platform.startswith("linux") else None)


def die_with_parent(sig: int = signal.SIGKILL, expected_parent: Optional[int] = None,
                    parent_marker: Optional[Tuple[bytes, ...]] = None) -> bool:
    """Have the kernel send ``sig`` to this process when its parent dies; True if armed.

    If the parent is already gone (it died before we got here and we were
    re-parented: the parent is not ``expected_parent``, or its command line
    lacks ``parent_marker``), the signal is sent now. A process whose parent is
    PID 0 or 1 from the start (a container's first process) has no supervisor
    to follow and is left alone.
    """
    parent = os.getppid()
    if expected_parent is None and parent_marker is None and parent <= 1:
        return False
    armed = _prctl is not None and _prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    orphaned = os.getppid() != (parent if expected_parent is None else expected_parent)
    if parent_marker is not None and not orphaned:
        try:
            with open(f"/proc/{parent}/cmdline", "rb") as f:
                cmdline = f.read()
            orphaned = not any(m in cmdline for m in parent_marker)
        except OSError:
            orphaned = True
    if orphaned:
        os.kill(os.getpid(), sig)
    return armed


def follow_torchrun() -> None:
    """In a torchrun worker: die with torchrun (which starts workers in sessions of their own).

    Call it first, before importing torch: a worker whose torchrun died while
    it was starting ends at once instead of training as an orphan.
    """
    global _torchrun_pid
    if os.environ.get(TORCHRUN_ENV):
        _torchrun_pid = os.getppid()
        die_with_parent(signal.SIGKILL, parent_marker=(b"torch.distributed.run", b"torchrun"))


_torchrun_pid: Optional[int] = None  # the torchrun this worker followed at its start


def is_of_run(pid: int, run: str) -> bool:
    """Whether process ``pid`` carries run id ``run`` in its environment (and so is one of this run's)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return bool(run) and f"{RUN_ID_ENV}={run}".encode() in f.read().split(b"\0")
    except OSError:
        return False


def end_torchrun(sig: int = signal.SIGKILL) -> bool:
    """In a torchrun worker: signal our torchrun (no restart can fix what we met); True if it was signalled.

    Only the torchrun this worker followed at its start, proven still ours: our parent is still that
    pid (an orphan is re-parented, so a reused pid is never our parent) and it carries this run's id.
    """
    parent = os.getppid()
    if _torchrun_pid is None or parent != _torchrun_pid or not is_of_run(parent, run_id()):
        return False
    os.kill(parent, sig)
    return True


def expected_parent() -> Optional[int]:
    """The pid this role's parent must have (set by the component on local launches), else None."""
    value = os.environ.get(PARENT_PID_ENV, "")
    return int(value) if value.isdigit() else None


def preexec_die_with_parent(sig: int) -> Callable[[], None]:
    """A ``Popen(preexec_fn=...)`` that ties the child to the calling process (call from the main thread)."""
    parent = os.getpid()

    def arm() -> None:
        die_with_parent(sig, expected_parent=parent)

    return arm


def processes_of_run(run: str) -> List[int]:
    """PIDs of this user's processes that carry run id ``run`` in their environment (for tests and tools)."""
    me = os.getpid()
    return [int(e) for e in os.listdir("/proc") if e.isdigit() and int(e) != me and is_of_run(int(e), run)]


def wait_for_console_copy(deadline_s: float = 3.0, poll_s: float = 0.05) -> bool:
    """On local_cwd: wait (bounded) until the ``torchx run`` client has copied all we wrote; True if it has.

    The client copies each role's ``stdout.log`` and ``stderr.log`` into
    ``combined.log`` with a thread that polls, and stops showing a role's
    output as soon as the whole app has ended. The last role to exit (the
    lighthouse role, with its verdict) would lose its final lines to the
    console whenever it exits between two polls. Elsewhere (Slurm,
    Kubernetes, a terminal) there is no such copy and this returns at once.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    try:
        out = os.readlink("/proc/self/fd/1")
        err = os.readlink("/proc/self/fd/2")
    except OSError:
        return True
    log_dir = os.path.dirname(out)
    if os.path.basename(out) != "stdout.log" or err != os.path.join(log_dir, "stderr.log"):
        return True
    combined = os.path.join(log_dir, "combined.log")
    end = time.monotonic() + deadline_s
    while True:
        try:
            if os.path.getsize(combined) >= os.path.getsize(out) + os.path.getsize(err):
                return True
        except OSError:  # no copy being made
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(poll_s)


def peak_rss_mb() -> float:
    """This process's peak resident memory, in MiB.

    Linux's VmHWM belongs to this program image; ``ru_maxrss`` would also count
    the parent's memory inherited through fork before exec.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
