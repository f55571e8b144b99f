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
import io
import pickle
from pathlib import Path
from typing import List, Tuple

from .config import DataConfig
from .files import file_digest

FOLDER = "cifar-10-batches-py"
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
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


def _download(root: Path) -> None:
    """Download and extract the official archive (md5-checked by torchvision), one process at a time."""
    from torchvision.datasets.utils import download_and_extract_archive  # imports torch: only when needed

    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".cifar10.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # several groups on one host share root
        if all((root / FOLDER / name).exists() for name, _ in TRAIN_FILES + TEST_FILES + [META_FILE]):
            return
        download_and_extract_archive(URL, str(root), filename=ARCHIVE[0], md5=ARCHIVE[1])


def locate(cfg: DataConfig) -> Path:
    """The CIFAR-10 folder for ``cfg``: downloaded if allowed, checksums enforced if ``cfg.verify``."""
    root = Path(cfg.root)
    folder = root / FOLDER
    needed = TRAIN_FILES + TEST_FILES + [META_FILE]
    missing = [name for name, _ in needed if not (folder / name).is_file()]
    if missing and cfg.download:
        _download(root)
        missing = [name for name, _ in needed if not (folder / name).is_file()]
    if missing:
        raise DataError(
            f"CIFAR-10 not found: looked for {', '.join(missing)} in {folder.resolve()}. "
            "Set data.download: true to fetch it, or point data.root at the folder that holds "
            f"'{FOLDER}'."
        )
    if cfg.verify:
        bad = [name for name, md5 in needed if file_digest(folder / name, "md5") != md5]
        if bad:
            raise DataError(
                f"{folder.resolve()} is not the official CIFAR-10: checksum mismatch for {', '.join(bad)}. "
                "If you mean to train on this CIFAR-format data (a subset or a test fixture), set "
                "data.verify: false in the config."
            )
    return folder


