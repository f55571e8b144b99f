"""CIFAR-10's files on disk: where they are, whether they are official, how to read them safely.

Imports no torch (the torchx component uses it to check data before launching).
The files are torchvision's python format (pickled dicts). They are read with a
restricted unpickler that can only rebuild plain containers and numpy arrays,
so even an unverified directory (``data.verify: false``) cannot run code. With
verification on, the official md5 checksums are enforced; they are the same
values torchvision checks (a unit test keeps the two in step).
"""

from __future__ import annotations

import fcntl
import http.client
import io
import pickle
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import List, Optional, Tuple

from localsgd_ft.config import DataConfig
from localsgd_ft.storage.atomic import file_digest

FOLDER = "cifar-10-batches-py"
ARCHIVE = ("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a")
TRAIN_FILES: List[Tuple[str, str]] = [
    ("data_batch_1", "c99cafc152244af753f735de768cd75f"),
    ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
    ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
    ("data_batch_4", "634d18415352ddfa80567beed471001a"),
    ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb"),
]
TEST_FILES: List[Tuple[str, str]] = [("test_batch", "40351d587109b95175f43aff81a1287e")]
META_FILE: Tuple[str, str] = ("batches.meta", "5ff9c542aee3614f3951f8cda6e48888")


class DataError(RuntimeError):
    """CIFAR-10 is missing, incomplete or not what the config allows."""


class _ArraysOnly(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and numpy arrays; refuses anything else."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):  # noqa: D401
        if (module, name) not in self.ALLOWED:
            raise DataError(f"refusing to unpickle {module}.{name}: not a CIFAR-10 batch file")
        return super().find_class(module, name)


def read_batch(path: Path) -> dict:
    data = path.read_bytes()
    try:
        return _ArraysOnly(io.BytesIO(data), encoding="latin1").load()
    except DataError:
        raise
    except Exception as e:  # a truncated or foreign file
        raise DataError(f"{path}: not a readable CIFAR-10 batch file ({type(e).__name__}: {e})") from None


NEEDED = TRAIN_FILES + TEST_FILES + [META_FILE]  # every file of a complete folder
STALL_TIMEOUT_S = 30.0


def _fetch(url: str, dest: Path, deadline_s: float, progress: bool) -> None:
    """Download ``url`` to ``dest`` within ``deadline_s`` (a stalled connection gives up sooner)."""
    end = time.monotonic() + deadline_s
    with urllib.request.urlopen(url, timeout=min(STALL_TIMEOUT_S, deadline_s)) as resp, open(dest, "wb") as out:
        total = int(resp.headers.get("Content-Length") or 0)
        done, shown = 0, -1
        while True:
            if time.monotonic() > end:
                raise TimeoutError(f"not finished within data.download_timeout_s ({deadline_s:g} s)")
            chunk = resp.read(1 << 20)
            if not chunk:
                break
            out.write(chunk)
            done += len(chunk)
            pct = 100 * done // total if total else -1
            if progress and pct // 5 != shown // 5:
                shown = pct
                size = f"{done / 2**20:.0f}/{total / 2**20:.0f} MB ({pct}%)" if total else f"{done / 2**20:.0f} MB"
                print(f"CIFAR-10: downloading {size}", file=sys.stderr, flush=True)
        if total and done != total:
            raise OSError(f"the connection closed after {done} of {total} bytes")


def _by_hand(cfg: DataConfig, root: Path) -> str:
    return (f"To place it by hand: download {cfg.url} elsewhere and unpack it into {root.resolve()} (giving "
            f"{root.resolve() / FOLDER}); or, to try the product without CIFAR-10, make the synthetic fixture "
            "with `python -m localsgd_ft.fixture DIR` and set data.root: DIR, data.verify: false.")


def fetch(cfg: DataConfig, progress: bool = True) -> None:
    """Download, check and unpack CIFAR-10 into ``cfg.root``, once, atomically.

    The archive is fetched and unpacked inside a temporary folder under root,
    checked, and only then renamed to ``cifar-10-batches-py``: a failure or a
    kill leaves nothing that looks like data. Processes sharing root wait on a
    file lock and find the folder ready. Any failure is one DataError naming the
    URL, the error and how to place the files by hand.
    """
    root = Path(cfg.root)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".cifar10.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # several groups on one host share root
        if all((root / FOLDER / name).is_file() for name, _ in NEEDED):
            return
        tmp = Path(tempfile.mkdtemp(prefix=".cifar10-download-", dir=root))
        try:
            archive = tmp / ARCHIVE[0]
            try:
                _fetch(cfg.url, archive, cfg.download_timeout_s, progress)
            except (OSError, ValueError, http.client.HTTPException) as e:  # TimeoutError is an OSError
                why = str(e) or type(e).__name__
                raise DataError(f"CIFAR-10 download from {cfg.url} failed: {why}. {_by_hand(cfg, root)}") from None
            if cfg.verify and file_digest(archive, "md5") != ARCHIVE[1]:
                raise DataError(f"CIFAR-10 download from {cfg.url} is not the official archive (md5 mismatch). "
                                + _by_hand(cfg, root))
            try:
                with tarfile.open(archive, "r:gz") as tar:
                    tar.extractall(tmp, filter="data")
            except (tarfile.TarError, OSError, EOFError) as e:
                raise DataError(f"CIFAR-10 archive from {cfg.url} could not be unpacked: {e}. "
                                + _by_hand(cfg, root)) from None
            if not (tmp / FOLDER).is_dir():
                raise DataError(f"the archive from {cfg.url} has no '{FOLDER}' folder. {_by_hand(cfg, root)}")
            if (root / FOLDER).exists():  # an incomplete folder from an older tool: keep it, beside
                (root / FOLDER).rename(root / f"{FOLDER}.incomplete-{int(time.time())}")
            (tmp / FOLDER).rename(root / FOLDER)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def locate(cfg: DataConfig, download: Optional[bool] = None) -> Path:
    """The CIFAR-10 folder for ``cfg``: downloaded if allowed, checksums enforced if ``cfg.verify``.

    ``download`` overrides ``cfg.download`` (False: only check); a folder that
    is missing while a download is allowed but not done now is not an error.
    """
    allowed = cfg.download if download is None else download
    root = Path(cfg.root)
    folder = root / FOLDER
    missing = [name for name, _ in NEEDED if not (folder / name).is_file()]
    if missing and allowed:
        fetch(cfg)
        missing = [name for name, _ in NEEDED if not (folder / name).is_file()]
    if missing and cfg.download and not allowed:
        return folder  # fetched later, where it is allowed
    if missing:
        raise DataError(
            f"CIFAR-10 not found: looked for {', '.join(missing)} in {folder.resolve()}. "
            "Set data.download: true to fetch it, or point data.root at the folder that holds "
            f"'{FOLDER}'."
        )
    if cfg.verify:
        bad = [name for name, md5 in NEEDED if file_digest(folder / name, "md5") != md5]
        if bad:
            raise DataError(
                f"{folder.resolve()} is not the official CIFAR-10: checksum mismatch for {', '.join(bad)}. "
                "If you mean to train on this CIFAR-format data (a subset or a test fixture), set "
                "data.verify: false in the config"
                + (f"; to download it again, delete {folder.resolve()}." if cfg.download else ".")
            )
    return folder


