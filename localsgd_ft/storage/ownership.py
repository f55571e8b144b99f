"""Sole ownership of a directory by one run: a claim file that names its holder, renewed while the run lives.

Ports keep two runs on one host apart; they do not keep apart two runs that
share an output directory (different ports, the same job submitted twice to a
cluster). Before a run moves or writes anything in its output directory (and
its checkpoint directory, wherever that lives), its lighthouse role claims it:

- The claim is ``<dir>/.owner.json``, created with ``O_CREAT | O_EXCL``, which
  is atomic on local filesystems and on NFS (v3 and later), unlike ``flock``
  across hosts. It holds the holder's run id, host, boot id, pid and start time.
- The holder renews it (the file's mtime) every :data:`RENEW_S` seconds.
- A claim is stale, and taken over, when its holder is provably gone: on this
  host (same boot) its pid is dead or is no longer a process of that run; on
  another host (or before a reboot) it has not been renewed for
  :data:`STALE_S` seconds. A claim of the same run id (a scheduler's restart of
  this very run) is this run's own.
- Taking over renames the stale claim to a unique name first, so of two runs
  racing for one stale claim exactly one wins; the loser sees the winner's.

Standard library only (and the contract's names).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

from localsgd_ft.contract.names import RUN_ID_ENV

if TYPE_CHECKING:
    from localsgd_ft.config import ExperimentConfig

OWNER_FILE = ".owner.json"
RENEW_S = 5.0
# A holder on another host renews every RENEW_S; after this long without a renewal it is gone.
# Long enough for an NFS client's attribute cache (60 s at most by default) and a clock skew.
STALE_S = 90.0


class DirectoryBusy(RuntimeError):
    """Another live run holds the directory; the message names it and how to proceed."""


@dataclass(frozen=True)
class Holder:
    """Who holds a directory."""

    run_id: str
    host: str
    boot_id: str
    pid: int
    started_at: float  # wall-clock time of the claim

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started_at))
        return f"run {self.run_id or '(unnamed)'} (pid {self.pid} on host {self.host}, since {when})"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def me(run_id: str) -> Holder:
    return Holder(run_id=run_id, host=socket.gethostname(), boot_id=_boot_id(), pid=os.getpid(),
                  started_at=time.time())


def _read(path: Path) -> Optional[Holder]:
    """The holder recorded at ``path``; None if there is no claim. A claim that cannot be parsed (a
    holder killed between create and write) reads as an unnamed holder of unknown liveness."""
    try:
        data = json.loads(path.read_text())
        return Holder(run_id=str(data["run_id"]), host=str(data["host"]), boot_id=str(data.get("boot_id", "")),
                      pid=int(data["pid"]), started_at=float(data["started_at"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return Holder(run_id="", host="", boot_id="", pid=0, started_at=0.0)


def _alive_here(holder: Holder) -> bool:
    """Whether ``holder``'s process (on this host, this boot) still runs as part of its run."""
    try:
        # A killed holder whose parent died too may linger as a zombie no one reaps (a container's init).
        stat = Path(f"/proc/{holder.pid}/stat").read_text()
        if stat[stat.rindex(")") + 2:][:1] in ("Z", "X"):
            return False
        with open(f"/proc/{holder.pid}/environ", "rb") as f:
            env = f.read().split(b"\0")
    except PermissionError:  # another user's process: it exists, and we cannot prove it is not the holder
        return True
    except (OSError, ValueError):  # gone (ENOENT, ESRCH) or unreadable as a process
        return False
    return not holder.run_id or f"{RUN_ID_ENV}={holder.run_id}".encode() in env


def stale_reason(holder: Holder, age_s: float, mine: Holder) -> Optional[str]:
    """Why ``holder``'s claim (last renewed ``age_s`` ago) is stale, seen from ``mine``; None if it may be live."""
    if holder.run_id and holder.run_id == mine.run_id:
        return "it is this run's own (restarted)"
    if holder.host == mine.host and holder.boot_id == mine.boot_id and holder.pid:
        return None if _alive_here(holder) else f"its process {holder.pid} is gone"
    if age_s > STALE_S:
        return f"it was last renewed {age_s:.0f} s ago (a live holder renews every {RENEW_S:g} s)"
    return None


class Claim:
    """A held claim on one or more directories; :meth:`release` gives them up (also on failure paths)."""

    def __init__(self, paths: List[Path], holder: Holder) -> None:
        self.paths, self.holder = paths, holder
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="ownership", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        warned = False
        while not self._stop.wait(RENEW_S):
            for path in self.paths:
                try:
                    os.utime(path)
                except OSError as e:
                    if not warned:
                        print(f"WARNING: cannot renew the claim {path} ({e.strerror}); another run may take "
                              "this directory over", flush=True)
                        warned = True

    def release(self) -> None:
        """Stop renewing and remove each claim file that is still this holder's."""
        self._stop.set()
        _release(self.paths, self.holder)


def _release(paths: List[Path], holder: Holder) -> None:
    for path in paths:
        held = _read(path)
        if held is not None and (held.run_id, held.pid, held.host) == (holder.run_id, holder.pid, holder.host):
            try:
                path.unlink()
            except OSError:
                pass


def _create(path: Path, holder: Holder) -> bool:
    """Create the claim file atomically; False if one exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(holder), f)
        f.flush()
        os.fsync(f.fileno())
    return True


def _busy(directory: Path, what: str, current: Holder) -> DirectoryBusy:
    return DirectoryBusy(
        f"{what} {directory} is in use by {current.describe()}: two runs must not share it. Wait for that run "
        f"to end or stop it, or give this run its own (set output_dir, or checkpoint.dir). If that run is gone "
        f"for sure, delete {directory / OWNER_FILE}")


def _live_holder(path: Path, mine: Holder) -> Tuple[Optional[Holder], Optional[str]]:
    """(the holder of the claim at ``path``, why it is stale or None if it may be live); (None, None): no claim."""
    current = _read(path)
    if current is None:
        return None, None
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None, None
    return current, stale_reason(current, age, mine)


def check_free(directory: Path, what: str) -> None:
    """Raise DirectoryBusy if a live run holds ``directory`` (the client's early check; it claims nothing)."""
    current, why = _live_holder(Path(directory) / OWNER_FILE, me(""))
    if current is not None and why is None:
        raise _busy(Path(directory), what, current)


def _claim_one(directory: Path, holder: Holder, what: str) -> Optional[str]:
    """Claim ``directory``; the stale holder taken over (a line saying so), None if it was free. Raises
    DirectoryBusy when a live run holds it."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / OWNER_FILE
    for _ in range(5):  # each retry follows a race lost to another claimant; a handful is plenty
        if _create(path, holder):
            return None
        current, why = _live_holder(path, holder)
        if current is None:
            continue  # released meanwhile
        if why is None:
            raise _busy(directory, what, current)
        aside = path.with_name(f"{OWNER_FILE}.stale-{os.getpid()}-{time.monotonic_ns()}")
        try:
            os.rename(path, aside)  # exactly one taker wins the rename of this claim
        except FileNotFoundError:
            continue
        created = _create(path, holder)
        os.unlink(aside)
        if created:
            return f"took over {path} from {current.describe()}: {why}"
    raise DirectoryBusy(f"could not claim {what} {directory}: other runs keep claiming it at the same time")


def directories(cfg: "ExperimentConfig") -> List[Tuple[Path, str]]:
    """What a run owns: its run directory, and its checkpoint directory where that lies outside it."""
    owned = [(cfg.run_dir, "output_dir")]
    ckpt = cfg.checkpoint_dir
    if cfg.checkpoint.enabled and not ckpt.resolve().is_relative_to(cfg.run_dir.resolve()):
        owned.append((ckpt, "checkpoint.dir"))
    return owned


def claim(directories: Sequence[Tuple[Path, str]], run_id: str) -> Tuple[Claim, List[str]]:
    """Claim each ``(directory, what)`` in order; (the Claim, lines about stale holders taken over).
    On DirectoryBusy, what was already claimed is released before it propagates."""
    holder = me(run_id)
    held: List[Path] = []
    notes: List[str] = []
    try:
        for directory, what in directories:
            note = _claim_one(Path(directory), holder, what)
            held.append(Path(directory) / OWNER_FILE)
            if note:
                notes.append(note)
    except BaseException:
        _release(held, holder)  # what was claimed before the refusal
        raise
    return Claim(held, holder), notes

