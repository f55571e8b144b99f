"""Where the component and the role processes find each other: hosts, ports, URLs and timeouts."""

from __future__ import annotations

import argparse
import ipaddress
import os
import random
import socket
import sys
from typing import List, Mapping, Optional, Tuple

from localsgd_ft.config import ConfigError, ExperimentConfig, load_config
from localsgd_ft.contract import FRESH_ENV


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


def one_exit_ends_every_role(env: Mapping[str, str] = os.environ) -> bool:
    """Whether a role's non-zero exit ends every other role of the run: on Slurm, where torchx starts them all
    with one ``srun --kill-on-bad-exit=1``."""
    return bool(env.get("SLURM_JOB_ID"))


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
    return never_seen_s(cfg, local)  # as long as a role that never arrives is waited for


def lighthouse_url(cfg: ExperimentConfig, host: str) -> str:
    return f"http://{host}:{cfg.lighthouse.port}"


def completion_url(cfg: ExperimentConfig, host: str) -> str:
    return f"http://{host}:{cfg.lighthouse.completion_port}"


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


# Ports are drawn below the kernel's ephemeral range: a port drawn from it (bind to port 0) is
# free now, but any outgoing connection or `srun` may be given it before the role binds it,
# seconds later (a Slurm job in CI lost its lighthouse that way).
_EPHEMERAL_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"
_LOWEST_DRAWN_PORT = 10000


def _ephemeral_range() -> Tuple[int, int]:
    try:
        with open(_EPHEMERAL_RANGE_FILE) as f:
            low, high = (int(v) for v in f.read().split()[:2])
        return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def _bindable(*ports: int) -> bool:
    socks = []
    try:
        for port in ports:
            s = socket.socket()
            socks.append(s)
            s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        for s in socks:
            s.close()


def _free_ports(n: int) -> int:
    """The first of ``n`` consecutive ports free on loopback now, outside the ephemeral range if it can."""
    low, high = _ephemeral_range()
    spans = [(a, b) for a, b in ((_LOWEST_DRAWN_PORT, low - n), (high + 1, 65535 - n)) if a <= b]
    rng = random.SystemRandom()
    for _ in range(200 if spans else 0):
        a, b = rng.choice(spans)
        port = rng.randint(a, b)
        if _bindable(*range(port, port + n)):
            return port
    for _ in range(100):  # every port is ephemeral here: the kernel's choice is the best there is
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + n - 1 <= 65535 and _bindable(*range(port, port + n)):
            return port
    raise RuntimeError(f"no {n} consecutive free port(s) on loopback")


def free_port() -> int:
    """A port free on loopback right now, and unlikely to be handed to a connection before it is bound."""
    return _free_ports(1)


def free_port_pair() -> int:
    """A port p such that p and p + 1 are both free on loopback right now (a lighthouse.port for a local run)."""
    return _free_ports(2)
