"""The lighthouse role: torchft's lighthouse plus the completion service; ends when training does.

Run by the component as ``python -m localsgd_ft.lighthouse --config C --host-env VAR``.
It binds loopback when role 0's host (``$VAR``) is this machine (local
schedulers) and all interfaces otherwise. When every replica group has
reported its end it writes ``summary.json``, stops the lighthouse and exits 0
if every group succeeded, 1 otherwise.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import signal
import sys
import threading
import time
from types import ModuleType
from typing import List, Optional

from . import control, roles
from .config import ExperimentConfig, to_dict
from .files import peak_rss_mb, write_json_atomic



def _torchft_native() -> ModuleType:
    """torchft's native extension, loaded without ``torchft/__init__`` (which imports torch: ~600 MB)."""
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
    from torchft import _torchft  # fall back to the ordinary import

    return _torchft


def build_summary(cfg: ExperimentConfig, reports: dict, started_at: float, config_path: str) -> dict:
    """summary.json's content from the groups' /finished reports."""
    groups = {}
    for g in range(cfg.replica_groups.count):
        report = reports.get(g) or {}
        result = report.get("result") or {}
        groups[str(g)] = {
            "exit_code": report.get("exit_code"),
            "succeeded": report.get("exit_code") == 0 and bool(result),
            **result,
        }
    ok = [g for g in groups.values() if g["succeeded"]]
    hashes = {g.get("params_sha256") for g in ok}
    return {
        "name": cfg.name,
        "config_path": config_path,
        "succeeded": len(ok) == cfg.replica_groups.count,
        "final_test_accuracy": ok[0]["final_test_accuracy"] if ok else None,
        "params_identical": len(ok) > 0 and len(hashes) == 1,
        "wall_time_s": round(time.time() - started_at, 3),
        "lighthouse_peak_rss_mb": peak_rss_mb(),
        "replica_groups": groups,
        "config": to_dict(cfg),
    }


def run(cfg: ExperimentConfig, host: str, config_path: str) -> int:
    started_at = time.time()
    bind_host = "127.0.0.1" if roles.is_loopback(host) else "::"
    native = _torchft_native()
    lh = cfg.lighthouse
    server = native.LighthouseServer(
        bind=f"{'[::]' if bind_host == '::' else bind_host}:{lh.port}",
        min_replicas=lh.min_replicas,
        join_timeout_ms=lh.join_timeout_ms,
        quorum_tick_ms=lh.quorum_tick_ms,
        heartbeat_timeout_ms=lh.heartbeat_timeout_ms,
    )
    state = control.CompletionState(cfg.replica_groups.count)
    completion = control.serve("" if bind_host == "::" else bind_host, lh.port + 1, state)
    print(f"lighthouse: serving {roles.lighthouse_url(cfg, host)} (dashboard at /), "
          f"bound to {bind_host}; waiting for {cfg.replica_groups.count} replica groups", flush=True)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        while not stop.is_set() and not state.wait_all_finished(timeout=0.5):
            pass
    finally:
        completion.shutdown()
        server.shutdown()
    summary = build_summary(cfg, state.finished, started_at, config_path)
    write_json_atomic(cfg.run_dir / "summary.json", summary)
    for g, rep in summary["replica_groups"].items():
        print(f"lighthouse: group {g}: exit_code={rep['exit_code']} steps={rep.get('steps')} "
              f"syncs_committed={rep.get('syncs_committed')} restarts={rep.get('restarts')} "
              f"params_sha256={str(rep.get('params_sha256'))[:12]}", flush=True)
    if stop.is_set():
        print("lighthouse: stopped by a signal before every group finished", flush=True)
    verdict = "SUCCEEDED" if summary["succeeded"] else "FAILED"
    print(f"lighthouse: training {verdict}; final_test_accuracy={summary['final_test_accuracy']}; "
          f"summary: {cfg.run_dir / 'summary.json'}", flush=True)
    return 0 if summary["succeeded"] else 1


def main(argv: Optional[List[str]] = None) -> int:
    args, cfg, host = roles.parse_role_args(argparse.ArgumentParser(description=__doc__), argv, "lighthouse")
    return run(cfg, host, args.config)


if __name__ == "__main__":
    sys.exit(main())
