"""A replica-group role: runs the group's torchrun and reports its end to the lighthouse role.

Run by the component as
``python -m localsgd_ft.replica --config C --group G --host-env VAR``. It
finds the lighthouse through ``$VAR`` (torchx's rank-0 host macro), starts
``torchrun --standalone --nproc_per_node=W --max_restarts=R train_localsgd.py``
in its own process group, and when torchrun exits (training done, or restarts
exhausted) posts the exit code and the trainer's result to the completion
service. A group that asks for GPUs it cannot see is reported as failed
without starting torchrun. Once the lighthouse role has that report it exits 0 (the lighthouse
role's exit code is the run's verdict); if it cannot report, it exits with
torchrun's code. If the lighthouse role aborts the run (too few groups left),
it stops its torchrun.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

from . import gpus, roles
from .config import ExperimentConfig
from .control import CompletionClient


def result_path(cfg: ExperimentConfig, group: int) -> Path:
    """Where group ``group``'s trainer (worker 0) leaves its final result."""
    return cfg.run_dir / "groups" / f"{group}.json"


def torchrun_command(cfg: ExperimentConfig, config_path: str, script: str,
                     config_b64: Optional[str] = None) -> List[str]:
    rg = cfg.replica_groups
    # The embedded config travels on to the trainer, so no role ever needs the file on disk.
    embedded = ["--config-b64", config_b64] if config_b64 else []
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone",  # a free rendezvous port per group, so groups can share a host
        "--nnodes=1",
        f"--nproc_per_node={rg.workers}",
        f"--max_restarts={rg.max_restarts}",
        script, "--config", config_path, *embedded,
    ]


ABORT_POLL_S = 1.0


def _wait_or_abort(proc: subprocess.Popen, client: CompletionClient, group: int) -> int:
    """Wait for torchrun; stop it early if the lighthouse role aborts the run."""
    while True:
        try:
            return proc.wait(ABORT_POLL_S)
        except subprocess.TimeoutExpired:
            pass
        try:
            reason = client.status(deadline_s=ABORT_POLL_S).get("abort")
        except Exception:  # lighthouse role busy or restarting: keep training
            continue
        if reason:
            print(f"replica {group}: stopping: the run was aborted: {reason}", file=sys.stderr, flush=True)
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                return proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                return proc.wait()


def _refuse(client: CompletionClient, group: int, error: str) -> int:
    """Report a group that cannot start at all (no torchrun, so no pointless restarts)."""
    print(f"replica {group}: error: {error}", file=sys.stderr, flush=True)
    try:
        client.finished(group, 2, {"error": error})
    except Exception as e:
        print(f"replica {group}: could not report to the lighthouse at {client.url}: {e}", file=sys.stderr)
        return 2
    return 0


def run(cfg: ExperimentConfig, config_path: str, group: int, host: str, script: str,
        config_b64: Optional[str] = None) -> int:
    env = dict(os.environ)
    env[roles.GROUP_ENV] = str(group)
    env[roles.NUM_GROUPS_ENV] = str(cfg.replica_groups.count)
    env["TORCHFT_LIGHTHOUSE"] = roles.lighthouse_url(cfg, host)
    env[roles.COMPLETION_ENV] = roles.completion_url(cfg, host)
    env.setdefault("PYTHONUNBUFFERED", "1")
    client = CompletionClient(env[roles.COMPLETION_ENV])

    gpu_problem = gpus.check_role(cfg, group, env)
    if gpu_problem:
        return _refuse(client, group, gpu_problem)

    result_file = result_path(cfg, group)
    result_file.unlink(missing_ok=True)  # never report a previous run's result

    proc = subprocess.Popen(torchrun_command(cfg, config_path, script, config_b64), env=env,
                            start_new_session=True)

    def forward(signum: int, _frame: object) -> None:
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = _wait_or_abort(proc, client, group)
    try:  # torchrun's workers are in its session; leave nothing behind
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass

    result = None
    if result_file.is_file():
        try:
            result = json.loads(result_file.read_text())
        except (OSError, ValueError) as e:
            print(f"replica {group}: cannot read {result_file}: {e}", file=sys.stderr)
    if code != 0:
        print(f"replica {group}: torchrun exited with {code} "
              f"(max_restarts={cfg.replica_groups.max_restarts} exhausted or training failed)", file=sys.stderr)
    try:
        client.finished(group, code, result)
    except Exception as e:  # the lighthouse role is gone: our own exit code must tell
        print(f"replica {group}: could not report to the lighthouse at {client.url}: {e}", file=sys.stderr)
        return code or 1
    # Reported: the lighthouse role now owns the verdict (its exit code is the run's). Exiting 0
    # keeps a lost group from failing the whole app (Slurm kills every role on a non-zero exit).
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--group", type=int, required=True, help="this role's replica group id")
    parser.add_argument("--script", default="train_localsgd.py", help="what torchrun runs")
    args, cfg, host = roles.parse_role_args(parser, argv, "replica")
    return run(cfg, args.config, args.group, host, args.script, args.config_b64)


if __name__ == "__main__":
    sys.exit(main())
