"""torchft's lighthouse as a process of its own, which the lighthouse role supervises and restarts.

``python -m localsgd_ft.lighthouse_server --bind HOST:PORT --min_replicas N ...``
serves until SIGTERM, or until its parent (the lighthouse role) is gone. It loads torchft's native extension
without importing torch (``torchft/__init__`` does): see :mod:`localsgd_ft.launch` for what that saves.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import signal
import sys
import time
from types import ModuleType
from typing import List, Optional

from localsgd_ft.config import LighthouseConfig
from localsgd_ft.launch.lifecycle import die_with_parent

ORPHAN_POLL_S = 0.1


def torchft_native() -> ModuleType:
    """torchft's native extension, loaded on its own (falls back to the ordinary import)."""
    spec = importlib.util.find_spec("torchft")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("torchft is not installed: pip install torchft")
    libs = glob.glob(os.path.join(spec.submodule_search_locations[0], "_torchft*.so"))
    if libs:
        ext = importlib.util.spec_from_file_location("torchft._torchft", libs[0])
        if ext is not None and ext.loader is not None:
            module = importlib.util.module_from_spec(ext)
            ext.loader.exec_module(module)
            return module
    from torchft import _torchft

    return _torchft


def command(cfg: LighthouseConfig, bind_host: str) -> List[str]:
    """The command line that serves ``cfg``'s lighthouse on ``bind_host``."""
    bind = f"[{bind_host}]" if ":" in bind_host else bind_host
    return [
        sys.executable, "-m", "localsgd_ft.lighthouse_server",
        "--bind", f"{bind}:{cfg.port}",
        "--min_replicas", str(cfg.min_replicas),
        "--join_timeout_ms", str(cfg.join_timeout_ms),
        "--quorum_tick_ms", str(cfg.quorum_tick_ms),
        "--heartbeat_timeout_ms", str(cfg.heartbeat_timeout_ms),
    ]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bind", required=True)
    for name in ("min_replicas", "join_timeout_ms", "quorum_tick_ms", "heartbeat_timeout_ms"):
        parser.add_argument(f"--{name}", type=int, required=True)
    args = parser.parse_args(argv)
    # The kernel stops us when the lighthouse role dies, however it died (the poll below is a backstop).
    die_with_parent(signal.SIGKILL)
    server = torchft_native().LighthouseServer(
        bind=args.bind,
        min_replicas=args.min_replicas,
        join_timeout_ms=args.join_timeout_ms,
        quorum_tick_ms=args.quorum_tick_ms,
        heartbeat_timeout_ms=args.heartbeat_timeout_ms,
    )
    stop = {"now": False}  # set by the handler; an Event's lock could deadlock a handler run mid-wait

    def on_signal(*_: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    parent = os.getppid()
    # Backstop to the parent-death signal: leave when the lighthouse role is gone.
    while not stop["now"] and os.getppid() == parent:
        time.sleep(ORPHAN_POLL_S)
    server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
