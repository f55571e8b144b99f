"""The failures of a whole host, on the multi-host test bed only: its link cut for a while, or for good with
everything on it killed.

A test-bed host (``tests/hosts.py``) is a network namespace whose ``/etc/hosts`` names its link, the host's
port on the test bridge, and the root namespace that port lives in, as ``ip netns`` names it (the line
:data:`TESTBED_MARK`). Taking that port down makes every packet to and from the host vanish, both ways,
with no reset: what a pulled cable, a dead switch or a host that lost power looks like to its peers.
``partition`` takes it down for ``duration_s`` and leaves the processes running; ``host_down`` takes it
down for good and kills every process in the host's namespace (its replica role, torchrun, the trainers,
a slurmd), the trainer that fires it last.

Nothing here acts anywhere else: a real machine's network is not ours to cut, so a plan that holds these
kinds is refused (a :class:`ConfigError`, before training starts) on a host that is not a test-bed host,
and the host must prove it is one twice: the mark, and a network namespace other than init's.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from localsgd_ft.config import ConfigError
from localsgd_ft.contract import RUN_ID_ENV, RUN_TOKEN_ENV, TESTBED_MARK

HOSTS_FILE = Path("/etc/hosts")
NETNS_DIR = Path("/run/netns")
# The bed's names (tests/hosts.py): a port of 15 characters at most, a namespace of its own prefix.
MARK_LINE = re.compile(re.escape(TESTBED_MARK) + r" link=(lsft[A-Za-z0-9]{1,11}) root=(lsft-[A-Za-z0-9-]{1,40})")


@dataclass(frozen=True)
class BedLink:
    """Where a test-bed host's link lives: its bridge port, in the namespace ``ip netns`` calls ``root``."""
    port: str
    root: str


def _net_of(path: str) -> int:
    return os.stat(path).st_ino


def bed_link(hosts_file: Path = HOSTS_FILE) -> Optional[BedLink]:
    """This host's link on the test bed, or None where this is no test-bed host."""
    try:
        lines = hosts_file.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        m = MARK_LINE.fullmatch(line.strip())
        if m:
            link = BedLink(m.group(1), m.group(2))
            try:
                if _net_of(str(NETNS_DIR / link.root)) != _net_of("/proc/self/ns/net"):
                    return link
            except OSError:
                pass
            return None  # the bed is gone, or this is its root namespace itself: never a test-bed host
    return None


def require_bed(kind: str, fault_id: int) -> BedLink:
    """This host's link, or a ConfigError saying why a ``kind`` failure cannot run here."""
    link = bed_link()
    if link is None:
        raise ConfigError(
            f"faults: failure #{fault_id} is a '{kind}', which cuts this host's network link; it runs only on a "
            f"host of the multi-host test bed (tests/hosts.py), and {socket.gethostname()} is not one. Run the "
            f"experiment on the test bed, or plan 'kill' or 'hang' failures instead")
    return link


def _set_link(link: BedLink, state: str) -> List[str]:
    """The command that sets the host's bridge port ``up`` or ``down``, in the root namespace."""
    return ["ip", "-n", link.root, "link", "set", link.port, state]


def _outside_the_run() -> dict:
    """An environment without the run's identity: a helper that must outlive the run is not one of its
    processes (the run's cleanup would end it, and a cut link would stay cut)."""
    return {k: v for k, v in os.environ.items() if k not in (RUN_ID_ENV, RUN_TOKEN_ENV)}


def partition(link: BedLink, duration_s: float) -> None:
    """Cut ``link`` now and restore it after ``duration_s``, from a helper of its own session that outlives
    this process (it may be ended while it is cut off); returns once the link is down."""
    subprocess.run(_set_link(link, "down"), check=True, timeout=30, capture_output=True)
    subprocess.Popen(["sh", "-c", f"sleep {float(duration_s)}; {shlex.join(_set_link(link, 'up'))}"],
                     start_new_session=True,
                     env=_outside_the_run(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)


def host_down(link: BedLink) -> None:
    """Cut ``link`` for good, then SIGKILL every process in this host's network namespace, this one last."""
    own, me = _net_of("/proc/self/ns/net"), os.getpid()
    if _net_of(str(NETNS_DIR / link.root)) == own:  # bed_link proved it; proven again before anything is killed
        raise RuntimeError("host_down: this is the test bed's root namespace, not one of its hosts")
    subprocess.run(_set_link(link, "down"), check=True, timeout=30, capture_output=True)
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            if _net_of(f"/proc/{entry}/ns/net") == own:
                os.kill(int(entry), signal.SIGKILL)
        except OSError:
            continue  # gone meanwhile, or not ours to look at
    os.kill(me, signal.SIGKILL)
