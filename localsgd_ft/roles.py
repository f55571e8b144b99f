"""Facts shared by the component and the role processes: addresses and environment names."""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
from typing import List, Optional, Tuple

from .config import ConfigError, ExperimentConfig, load_config

# Environment a replica-group role receives from the component.
GROUP_ENV = "REPLICA_GROUP_ID"
NUM_GROUPS_ENV = "NUM_REPLICA_GROUPS"
# Set by the replica wrapper for the trainer: where the completion service listens.
COMPLETION_ENV = "LOCALSGD_FT_COMPLETION"
# Set by the component on every role for `torchx run -- --fresh True`: ignore old checkpoints.
FRESH_ENV = "LOCALSGD_FT_FRESH"


def fresh_requested(cfg: ExperimentConfig) -> bool:
    """Whether this run starts over instead of resuming (--fresh, or checkpoint.resume: false)."""
    return os.environ.get(FRESH_ENV) == "1" or not cfg.checkpoint.resume


def lighthouse_host(host_env: str) -> str:
    """Role 0's host, read from the variable torchx's ``rank0_env`` macro names (local: localhost)."""
    host = os.environ.get(host_env, "")
    if not host:
        raise RuntimeError(f"${host_env} is not set: cannot find the lighthouse host (is this run by torchx?)")
    return host.split(",")[0]  # Slurm's nodelist may name several hosts; role 0 has one


def is_loopback(host: str) -> bool:
    """Whether ``host`` only names this machine, so servers may bind loopback."""
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
    except (socket.gaierror, ValueError):
        return False


def lighthouse_url(cfg: ExperimentConfig, host: str) -> str:
    return f"http://{host}:{cfg.lighthouse.port}"


def completion_url(cfg: ExperimentConfig, host: str) -> str:
    return f"http://{host}:{cfg.lighthouse.port + 1}"


def parse_role_args(parser: argparse.ArgumentParser, argv: Optional[List[str]],
                    who: str) -> Tuple[argparse.Namespace, ExperimentConfig, str]:
    """Parse a role's ``--config`` and ``--host-env`` (plus ``parser``'s own options).

    Returns (args, config, lighthouse host); on a bad config or a missing host
    it prints one line prefixed with ``who`` and exits 2.
    """
    parser.add_argument("--config", required=True, help="the experiment YAML")
    parser.add_argument("--host-env", default="TORCHX_RANK0_HOST", help="variable holding role 0's host")
    args = parser.parse_args(argv)
    try:
        return args, load_config(args.config), lighthouse_host(args.host_env)
    except (ConfigError, RuntimeError) as e:
        print(f"{who}: error: {e}", file=sys.stderr)
        sys.exit(2)
