"""Atomic, durable text and JSON writes (a reader never sees a half-written file) and file digests.

Durable: the data is fsynced before the rename, and the directory after it, so that once a write
returns, a power cut leaves the new file under its name (not the old one, not none).
"""

from __future__ import annotations

import hashlib
import json
import os
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
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make the names in ``directory`` durable (a rename or unlink is only in memory until then)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems (and FUSE mounts) cannot fsync a directory; the data itself was synced
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: Path, payload: Any) -> None:
    """JSON, written as :func:`write_text_atomic` does."""
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of a file's bytes (``algorithm``: any hashlib name), read in 1 MiB chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
