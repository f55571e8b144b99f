"""A test bed of real hosts on one machine: network namespaces on a private bridge, for tests and benchmarks.

Each host is a network namespace with its own address on one test bridge, its own hostname (a UTS
namespace per command) and an ``/etc/netns/<ns>/hosts`` that names every host, so that what torchft
advertises (``socket.gethostname()``) resolves on every other host. Its link can be cut (its bridge port
down: packets vanish both ways, and nobody gets a reset) and restored, and rate-limited (tc ``tbf`` on
both ends of its link; this kernel has no ``netem``, so no delay or loss); a host can go down for good
(its link cut, then everything on it killed). Its ``/etc/hosts`` names its link (``TESTBED_MARK``), so the
``partition`` and ``host_down`` faults of a run's YAML can cut it from inside.

Safety, checked before anything runs on it (:meth:`TestBed.check_isolated`): the addresses come from the
benchmarking range 198.18.0.0/15 and live only on the test bridge; the bridge has no port but the hosts'
links (no physical interface); forwarding is off, so nothing is routed or NATed off the bridge; the root
namespace reaches each host through the bridge (``ip route get``), never the default route; no host has a
route beyond the bridge. Everything is removed on exit, also when a test fails; ``cleanup()`` removes what
a killed test left. Needs root and iproute2 (``ip``, ``tc``): :func:`unavailable` says why not.

    with TestBed(3) as bed:
        bed.run(0, ["python", "-m", "http.server"])      # on host 0, hostname bed.name(0)
        bed.cut(0); bed.restore(0); bed.limit(1, mbit=50); bed.host_down(2)

``python tests/hosts.py cleanup`` removes every test bed of this machine (what a killed run left);
``python tests/hosts.py up TAG NAME...`` builds one that outlives the command (the CI's Slurm cluster).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from localsgd_ft.contract import TESTBED_MARK

RANGE = ipaddress.ip_network("198.18.0.0/15")  # RFC 2544's benchmarking range: never routed on the internet
PREFIX = "lsft"  # every namespace, link and bridge of a test bed starts with it
NETNS_ETC = Path("/etc/netns")
TAG = re.compile(r"[A-Za-z0-9]{1,6}")  # keeps every link name within the kernel's 15 characters
HOST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,62}")
REPO = Path(__file__).resolve().parent.parent


def unavailable() -> Optional[str]:
    """Why a test bed cannot be built here (None: it can)."""
    if os.geteuid() != 0:
        return "the multi-host test bed needs root (network namespaces, a bridge); CI runs as root"
    for tool in ("ip", "tc", "unshare"):
        if shutil.which(tool) is None:
            return f"the multi-host test bed needs '{tool}' (iproute2, util-linux)"
    probe = f"{PREFIX}probe{os.getpid() % 100000}"
    made = _sh(["ip", "netns", "add", probe], check=False)
    if made.returncode != 0:
        return f"network namespaces are not available here: {made.stderr.strip()}"
    _sh(["ip", "netns", "del", probe], check=False)
    return None


def _sh(argv: Sequence[str], check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {res.returncode}: {res.stderr.strip() or res.stdout.strip()}")
    return res


ROUTE_TYPES = {"local", "broadcast", "unreachable", "prohibit", "blackhole", "anycast", "multicast", "throw"}


def _used_networks() -> List[ipaddress.IPv4Network]:
    """Every IPv4 network this machine's root namespace has an address or a route in (not the default route)."""
    nets = []
    for line in _sh(["ip", "-4", "-o", "addr", "show"]).stdout.splitlines():
        parts = line.split()
        if "inet" in parts:
            nets.append(ipaddress.ip_interface(parts[parts.index("inet") + 1]).network)
    for line in _sh(["ip", "-4", "route", "show", "table", "all"]).stdout.splitlines():
        words = [w for w in line.split()[:2] if w not in ROUTE_TYPES]  # "local 10.0.0.1 ..." names its network second
        if words and words[0] != "default":
            try:
                nets.append(ipaddress.ip_network(words[0], strict=False))
            except ValueError:
                continue
    return nets


class TestBed:
    """H hosts on one bridge; a context manager that builds them, checks them isolated, and removes them."""

    __test__ = False  # not a pytest class

    def __init__(self, hosts: int, tag: str = "", names: Optional[Sequence[str]] = None) -> None:
        if not 1 <= hosts <= 200:
            raise ValueError(f"hosts: expected 1..200, got {hosts}")
        if names is not None and (len(names) != hosts or len(set(names)) != hosts
                                  or not all(HOST_NAME.fullmatch(n) for n in names)):
            raise ValueError(f"names: expected {hosts} distinct host names (letters, digits, '-'), got {names}")
        self.count = hosts
        self.names = list(names) if names is not None else None
        self.tag = tag or f"{os.getpid() % 100000}"
        if not TAG.fullmatch(self.tag):
            raise ValueError(f"tag: expected 1 to 6 letters or digits, got {self.tag!r}")
        self.bridge = f"{PREFIX}br{self.tag}"[:15]
        self.subnet: Optional[ipaddress.IPv4Network] = None
        self._made: List[List[str]] = []  # how to undo each step, newest last

    # -------------------------------------------------------------------- names and addresses

    def ns(self, i: int) -> str:
        return f"{PREFIX}-{self.tag}-h{i}"

    def name(self, i: int) -> str:
        """Host ``i``'s hostname (and the name every host resolves to its address)."""
        return self.names[i] if self.names is not None else f"{PREFIX}{self.tag}h{i}"

    @property
    def root_ns(self) -> str:
        """The root namespace's name under ``ip netns`` (a handle, so a host can reach its own bridge port)."""
        return f"{PREFIX}-{self.tag}-root"

    def port_link(self, i: int) -> str:
        """Host ``i``'s bridge port, in the root namespace (15 characters at most)."""
        return f"{PREFIX}{self.tag}p{i}"[:15]

    def address(self, i: int) -> str:
        assert self.subnet is not None
        return str(self.subnet.network_address + 10 + i)

    @property
    def root_address(self) -> str:
        """The root namespace's own address on the bridge (how tests and the lighthouse reach the hosts)."""
        assert self.subnet is not None
        return str(self.subnet.network_address + 1)

    def hosts_file(self) -> str:
        return "".join(f"{self.address(i)}\t{self.name(i)}\n" for i in range(self.count)) + \
            "127.0.0.1\tlocalhost\n"

    # -------------------------------------------------------------------- building, checking, removing

    def __enter__(self) -> "TestBed":
        try:
            self._build()
            self.check_isolated()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _do(self, argv: Sequence[str], undo: Optional[Sequence[str]] = None) -> None:
        _sh(argv)
        if undo is not None:
            self._made.append(list(undo))

    def _pick_subnet(self) -> ipaddress.IPv4Network:
        used = _used_networks()
        for candidate in RANGE.subnets(new_prefix=24):
            if candidate.network_address == RANGE.network_address:
                continue  # leave 198.18.0.0/24 to whoever uses the range by hand
            if not any(candidate.overlaps(u) for u in used):
                return candidate
        raise RuntimeError("no free /24 left in 198.18.0.0/15 for a test bed")

    def _build(self) -> None:
        why = unavailable()
        if why:
            raise RuntimeError(why)
        self.subnet = self._pick_subnet()
        # Deleting this name only unmounts the handle: the root namespace itself lives on.
        self._do(["ip", "netns", "attach", self.root_ns, str(os.getpid())], ["ip", "netns", "del", self.root_ns])
        self._do(["ip", "link", "add", self.bridge, "type", "bridge"], ["ip", "link", "del", self.bridge])
        self._do(["ip", "addr", "add", f"{self.root_address}/24", "dev", self.bridge])
        self._do(["ip", "link", "set", self.bridge, "up"])
        for i in range(self.count):
            ns, port = self.ns(i), self.port_link(i)
            self._do(["ip", "netns", "add", ns], ["ip", "netns", "del", ns])
            self._do(["ip", "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns],
                     ["ip", "link", "del", port])
            self._do(["ip", "link", "set", port, "master", self.bridge])
            self._do(["ip", "link", "set", port, "up"])
            self._do(["ip", "-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", "eth0"])
            self._do(["ip", "-n", ns, "link", "set", "eth0", "up"])
            self._do(["ip", "-n", ns, "link", "set", "lo", "up"])
            etc = NETNS_ETC / ns
            etc.mkdir(parents=True, exist_ok=True)
            self._made.append(["rm", "-rf", str(etc)])
            # The mark names the host's link, for the `partition` and `host_down` faults run on it.
            (etc / "hosts").write_text(self.hosts_file() + f"{TESTBED_MARK} link={port} root={self.root_ns}\n")

    def check_isolated(self) -> None:
        """Refuse to go on unless the bed is cut off from everything but this machine (see the module doc)."""
        assert self.subnet is not None
        if not self.subnet.subnet_of(RANGE):
            raise RuntimeError(f"{self.subnet} is outside {RANGE}")
        if Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() != "0":
            raise RuntimeError("IPv4 forwarding is on in the root namespace: the bridge could route off this "
                               "machine; turn it off (sysctl net.ipv4.ip_forward=0)")
        ports = _sh(["ip", "-o", "link", "show", "master", self.bridge]).stdout
        names = sorted(line.split(":")[1].strip().split("@")[0] for line in ports.splitlines() if ":" in line)
        expected = sorted(self.port_link(i) for i in range(self.count))
        if names != expected:
            raise RuntimeError(f"the test bridge {self.bridge} has ports {names}, expected only {expected}")
        for i in range(self.count):
            route = _sh(["ip", "route", "get", self.address(i)]).stdout
            if f"dev {self.bridge}" not in route:
                raise RuntimeError(f"host {i} ({self.address(i)}) is not reached through the test bridge: {route}")
            inside = _sh(["ip", "-n", self.ns(i), "route", "show"]).stdout
            if "default" in inside or any(not line.startswith(str(self.subnet)) for line in inside.splitlines()):
                raise RuntimeError(f"host {i} has a route beyond the test bridge: {inside}")

    def close(self) -> None:
        """Remove everything this bed made, newest first (what is gone already is skipped)."""
        while self._made:
            _sh(self._made.pop(), check=False)

    # -------------------------------------------------------------------- using it

    def command(self, i: int, argv: Sequence[str]) -> List[str]:
        """``argv`` as it runs on host ``i``: in its namespace, under its own hostname."""
        return ["ip", "netns", "exec", self.ns(i), "unshare", "--uts", "sh", "-c",
                f'hostname {self.name(i)} && exec "$@"', "sh", *argv]

    def run(self, i: int, argv: Sequence[str], **popen: object) -> subprocess.Popen:
        """Start ``argv`` on host ``i`` (``popen``: Popen's keyword arguments)."""
        return subprocess.Popen(self.command(i, argv), **popen)  # type: ignore[call-overload]

    def check_output(self, i: int, argv: Sequence[str], timeout: float = 30) -> str:
        return subprocess.run(self.command(i, argv), check=True, capture_output=True, text=True,
                              timeout=timeout).stdout

    def cut(self, i: int) -> None:
        """Host ``i``'s link goes dark: its bridge port down; packets vanish both ways, no reset reaches anyone."""
        _sh(["ip", "link", "set", self.port_link(i), "down"])

    def restore(self, i: int) -> None:
        _sh(["ip", "link", "set", self.port_link(i), "up"])

    def host_down(self, i: int) -> List[int]:
        """Host ``i`` goes dark for good: its link cut, then every process on it SIGKILLed; their pids."""
        self.cut(i)
        pids = [int(p) for p in _sh(["ip", "netns", "pids", self.ns(i)]).stdout.split()]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids

    def qdisc(self, i: int) -> str:
        """What shapes host ``i``'s link at its bridge end (``tc qdisc show``)."""
        return _sh(["tc", "qdisc", "show", "dev", self.port_link(i)]).stdout

    def limit(self, i: int, mbit: Optional[float], burst_kb: int = 64, latency_ms: int = 200) -> None:
        """Rate-limit host ``i``'s link to ``mbit`` Mbit/s each way (tc tbf on both ends); None: unlimited."""
        for prefix, dev in self._ends(i):
            _sh([*prefix, "tc", "qdisc", "del", "dev", dev, "root"], check=False)
        if mbit is not None:
            self._tbf(i, "add", mbit, burst_kb, latency_ms)

    def reshape(self, i: int, mbit: float, burst_kb: int, latency_ms: int = 200) -> None:
        """Change host ``i``'s tbf (set by :meth:`limit`) to ``mbit`` in place, mid-run: ``tc qdisc change`` keeps
        the queued packets, where deleting the qdisc would drop them and stall TCP for a retransmit."""
        self._tbf(i, "change", mbit, burst_kb, latency_ms)

    def _ends(self, i: int) -> List[Tuple[List[str], str]]:
        """Both ends of host ``i``'s link: its own eth0 (inside its namespace) and its bridge port."""
        return [(["ip", "netns", "exec", self.ns(i)], "eth0"), ([], self.port_link(i))]

    def _tbf(self, i: int, verb: str, mbit: float, burst_kb: int, latency_ms: int) -> None:
        for prefix, dev in self._ends(i):
            _sh([*prefix, "tc", "qdisc", verb, "dev", dev, "root", "tbf", "rate", f"{mbit}mbit",
                 "burst", f"{burst_kb}kb", "latency", f"{latency_ms}ms"])

def cleanup(tag: Optional[str] = None) -> List[str]:
    """Remove the test beds left on this machine (namespaces, links, bridges, /etc/netns entries): every
    one, or only the one tagged ``tag``; what went."""
    ns_prefix = f"{PREFIX}-{tag}-" if tag else f"{PREFIX}-"
    link = re.compile(rf"{PREFIX}{tag}p\d+|{PREFIX}br{tag}" if tag else rf"{PREFIX}.*")
    gone = []
    for line in _sh(["ip", "netns", "list"], check=False).stdout.splitlines():
        ns = line.split()[0] if line.split() else ""
        if ns.startswith(ns_prefix):
            _sh(["ip", "netns", "del", ns], check=False)
            gone.append(ns)
    for line in _sh(["ip", "-o", "link", "show"], check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        if link.fullmatch(name):
            _sh(["ip", "link", "del", name], check=False)
            gone.append(name)
    if NETNS_ETC.is_dir():
        for d in NETNS_ETC.iterdir():
            if d.name.startswith(ns_prefix):
                shutil.rmtree(d, ignore_errors=True)
                gone.append(str(d))
    return gone


USAGE = """usage: python tests/hosts.py up TAG NAME... | cleanup [TAG]

  up TAG NAME...   build a test bed tagged TAG with one host per NAME (its hostname) and leave it up
                   (for a cluster that outlives this command: .ci/slurm_setup.sh); prints it as JSON
  cleanup [TAG]    remove every test bed of this machine, or only the one tagged TAG
"""


def main(argv: List[str]) -> int:
    if argv[:1] == ["cleanup"] and len(argv) <= 2:
        print("\n".join(cleanup(argv[1] if len(argv) == 2 else None)) or "nothing to remove")
        return 0
    if argv[:1] == ["up"] and len(argv) >= 3:
        bed = TestBed(len(argv) - 2, tag=argv[1], names=argv[2:])
        cleanup(bed.tag)  # what an earlier bed of this tag left
        bed.__enter__()  # checked isolated, or removed again; never closed here: `cleanup TAG` removes it
        print(json.dumps({"tag": bed.tag, "subnet": str(bed.subnet), "root_address": bed.root_address,
                          "hosts": [{"name": bed.name(i), "ns": bed.ns(i), "address": bed.address(i)}
                                    for i in range(bed.count)]}))
        return 0
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
