"""Facts shared by the component and the role processes: addresses and environment names."""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
from typing import List, Mapping, Optional, Tuple

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


def in_kubernetes() -> bool:
    """Whether this process runs in a Kubernetes pod (the kubelet sets this in every container)."""
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


def bind_address(host: str) -> str:
    """Where the lighthouse role's servers listen: loopback only when no other machine needs them.

    On Kubernetes torchx hands role 0 ``localhost`` as its own host, yet the
    replica pods reach it by its DNS name: there it must listen on all interfaces.
    """
    return "127.0.0.1" if is_loopback(host) and not in_kubernetes() else "::"


def is_loopback(host: str) -> bool:
    """Whether ``host`` only names this machine, so servers may bind loopback."""
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
    except (socket.gaierror, ValueError):
        return False


def first_contact_s(cfg: ExperimentConfig, local: bool) -> float:
    """How long a replica role waits for the lighthouse role's first answer before it gives up.

    The roles of a local run start together; on a cluster pods or nodes may come up minutes apart.
    """
    return cfg.lighthouse.role_timeout_s if local else max(120.0, cfg.lighthouse.role_timeout_s)


def never_seen_s(cfg: ExperimentConfig, local: bool) -> float:
    """After how long the lighthouse role declares lost a replica role that never made contact.

    Longer than any replica role waits for it (:func:`first_contact_s`): a role that gave up has exited.
    """
    twice = 2 * cfg.lighthouse.role_timeout_s
    return twice if local else max(300.0, twice)


def rendezvous_port(cfg: ExperimentConfig, group: int) -> int:
    """Where a multi-node group's torchrun agents meet on a cluster: its first node, this port."""
    return cfg.lighthouse.port + 2 + group


def group_first_host(group: int, nodes: int, lighthouse_host: str, env: Mapping[str, str] = os.environ) -> str:
    """The host of node 0 of replica group ``group``, where its torchrun agents rendezvous.

    torchx gives every replica of every role a scheduler unit of its own, in
    role order: on Slurm a het-job group (the lighthouse is group 0, then each
    group's nodes), on Kubernetes a Volcano task whose pods' DNS names the svc
    plugin exports as ``VC_<TASK>_HOSTS``. A local run has all nodes here.
    """
    if env.get("SLURM_JOB_ID"):
        var = f"SLURM_JOB_NODELIST_HET_GROUP_{1 + group * nodes}"
    elif in_kubernetes():
        var = f"VC_REPLICA{group}_0_HOSTS"
    elif is_loopback(lighthouse_host):
        return "127.0.0.1"
    else:
        raise RuntimeError(f"cannot find the first node of replica group {group}: not on Slurm or Kubernetes, "
                           f"and the lighthouse ({lighthouse_host}) is not on this host; replica_groups.nodes > 1 "
                           "runs on local_cwd, slurm or kubernetes")
    host = env.get(var, "")
    if not host:
        raise RuntimeError(f"${var} is not set: cannot find the first node of replica group {group}")
    return host.split(",")[0]


def rendezvous_timeout_s(cfg: ExperimentConfig, local: bool) -> float:
    """How long a multi-node group's agents wait for all its nodes (at the start and after a failure).

    A node that never comes (back) fails the group after this long; on a
    cluster nodes may come up minutes apart.
    """
    return 2 * cfg.lighthouse.role_timeout_s if local else max(300.0, 2 * cfg.lighthouse.role_timeout_s)


def lighthouse_url(cfg: ExperimentConfig, host: str) -> str:
    return f"http://{host}:{cfg.lighthouse.port}"


def completion_url(cfg: ExperimentConfig, host: str) -> str:
    return f"http://{host}:{cfg.lighthouse.port + 1}"


def parse_role_args(parser: argparse.ArgumentParser, argv: Optional[List[str]],
                    who: str) -> Tuple[argparse.Namespace, ExperimentConfig, str]:
    """Parse a role's ``--config`` / ``--config-b64`` and ``--host-env`` (plus ``parser``'s own options).

    Returns (args, config, lighthouse host); on a bad config or a missing host
    it prints one line prefixed with ``who`` and exits 2.
    """
    parser.add_argument("--config", required=True, help="the experiment YAML")
    parser.add_argument("--config-b64", default=None,
                        help="the config's text in base64 (set by the component); then --config only names it")
    parser.add_argument("--host-env", default="TORCHX_RANK0_HOST", help="variable holding role 0's host")
    args = parser.parse_args(argv)
    try:
        return args, load_config(args.config, args.config_b64), lighthouse_host(args.host_env)
    except (ConfigError, RuntimeError) as e:
        print(f"{who}: error: {e}", file=sys.stderr)
        sys.exit(2)


def free_port() -> int:
    """A port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_pair() -> int:
    """A port p such that p and p + 1 are both free on loopback right now (a lighthouse.port for a local run)."""
    for _ in range(100):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            p = a.getsockname()[1]
            if p >= 65535:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", p + 1))
                except OSError:
                    continue
                return p
    raise RuntimeError("no free port pair on loopback")
