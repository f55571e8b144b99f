"""What the ``torchx run`` client does for the user beyond building the AppDef (local_cwd only).

On local_cwd the roles' output reaches the terminal through the client; once
the client is interrupted (Ctrl-C, SIGTERM), nothing the roles print is seen.
So the component notes an interrupt (:func:`watch_for_interrupt`) and
registers :func:`say_how_to_resume` to run when the client exits: after an
interrupt it waits briefly for the lighthouse role's summary and prints one
line saying how to resume and from which checkpoint.
"""

from __future__ import annotations

import sys
import time
from typing import List, Optional

from localsgd_ft.config import ConfigError, ExperimentConfig
from localsgd_ft.contract import Summary
from localsgd_ft.storage.checkpoints import resume_point

SUMMARY_WAIT_S = 10.0
_interrupted = False  # set by the hook below when the client ends on a signal


def watch_for_interrupt() -> None:
    """Remember whether the client ends on a signal (torchx raises its SignalException, or KeyboardInterrupt)."""
    previous = sys.excepthook

    def hook(kind, value, tb):  # type: ignore[no-untyped-def]
        if kind.__name__ in ("SignalException", "KeyboardInterrupt"):
            # An interrupt is what the user asked for, not a crash: one line instead of a traceback.
            global _interrupted
            _interrupted = True
            print(f"localsgd: torchx run interrupted ({value or kind.__name__}); every role is being stopped",
                  file=sys.stderr, flush=True)
            return
        previous(kind, value, tb)

    sys.excepthook = hook


def scheduler_from_argv(argv: List[str]) -> str:
    """The scheduler a ``torchx run`` command line uses (``-s``/``--scheduler``, else .torchxconfig's)."""
    args = argv[: argv.index("--")] if "--" in argv else argv
    for i, a in enumerate(args):
        if a in ("-s", "--scheduler") and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--scheduler="):
            return a.split("=", 1)[1]
    try:
        from torchx.runner.config import get_config

        return get_config(prefix="cli", name="run", key="scheduler") or ""
    except Exception:
        return ""


def is_dry_run(argv: List[str]) -> bool:
    """Whether this torchx command only plans (``--dryrun``): nothing may be fetched or started."""
    return "--dryrun" in argv


def is_local_launch(argv: List[str]) -> bool:
    """Whether this process is a ``torchx run`` (not a dry run) whose roles are its own child processes.

    Only local_cwd: local_docker's roles are containers, children of the Docker daemon.
    """
    return "run" in argv[1:3] and not is_dry_run(argv) and scheduler_from_argv(argv) == "local_cwd"


def say_how_to_resume(cfg: ExperimentConfig, launched_at: float, fresh: bool = False) -> None:
    """At the client's exit after an interrupt: if the run stopped before it finished, say how to resume it."""
    if not _interrupted:
        return  # it ended on its own: the lighthouse role already gave the verdict
    path = cfg.run_dir / "summary.json"
    end = time.monotonic() + SUMMARY_WAIT_S
    summary: Optional[Summary] = None
    while time.monotonic() < end:
        try:
            if path.stat().st_mtime >= launched_at:
                summary = Summary.load(path)
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    # The summary says SUCCEEDED only if training had ended before the interrupt. Its "stopped" flag is not
    # enough: a replica role stopped by the same interrupt may report before the lighthouse role sees it.
    if summary is not None and summary.succeeded:
        return
    again = "the same command again" + (" without --fresh" if fresh else "")
    where = "no checkpoint was written yet, so it starts over"
    if not cfg.checkpoint.resume:
        where = "checkpoint.resume is false, so it starts over"
    elif cfg.checkpoint.enabled:
        try:
            found, _ = resume_point(cfg, start_over=False)
            if found is not None:
                where = f"it continues from the newest checkpoint, step {found.step}, in {cfg.checkpoint_dir}"
        except ConfigError:
            pass
    else:
        where = "checkpoint.enabled is false, so it starts over"
    print(f"localsgd: the run stopped before it finished; to resume, run {again} ({where})",
          file=sys.stderr, flush=True)
