"""Output-file helpers: atomic text and JSON writes (a reader never sees a half-written file), process facts."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import tempfile
from pathlib import Path
from typing import Any


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file in the same folder, fsync it, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_json_atomic(path: Path, payload: Any) -> None:
    """JSON, written as :func:`write_text_atomic` does."""
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def peak_rss_mb() -> float:
    """This process's peak resident memory, in MiB.

    Linux's VmHWM belongs to this program image; ``ru_maxrss`` would also count
    the parent's memory inherited through fork before exec.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of a file's bytes (``algorithm``: any hashlib name), read in 1 MiB chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
