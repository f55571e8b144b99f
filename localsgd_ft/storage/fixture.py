"""A small, learnable stand-in for CIFAR-10, written in CIFAR-10's exact file format.

For tests and offline smoke runs: ``python -m localsgd_ft.fixture DIR`` writes
``DIR/cifar-10-batches-py`` (five training batches, a test batch and
``batches.meta``). Each class has its own colour and stripe pattern plus
noise, so a small CNN learns it in a few hundred steps. It is not the official
data set, so configs using it must set ``data.verify: false``.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np

from localsgd_ft.storage.cifar10 import FOLDER, META_FILE, TEST_FILES, TRAIN_FILES

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _images(rng: np.random.Generator, labels: np.ndarray, noise: float) -> np.ndarray:
    palette = np.random.default_rng(1234).integers(40, 216, size=(10, 3))
    y, x = np.mgrid[0:32, 0:32]
    imgs = np.empty((len(labels), 3, 32, 32), dtype=np.float32)
    for i, c in enumerate(labels):
        stripes = np.sin((x if c % 2 else y) * (0.4 + 0.15 * c)) * 40
        imgs[i] = palette[c][:, None, None] + stripes[None] + rng.normal(0, noise, (3, 32, 32))
    return np.clip(imgs, 0, 255).astype(np.uint8).reshape(len(labels), 3072)


def _write(path: Path, payload: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(payload, f, protocol=2)  # the protocol of the official files


def write_fixture(root: Path, train_per_batch: int = 200, test_size: int = 500, seed: int = 0,
                  noise: float = 30.0) -> Path:
    """Write the fixture under ``root``; returns the ``cifar-10-batches-py`` folder.

    ``noise``: the standard deviation of the pixel noise (0-255 scale); at the default a small CNN is
    near 1.0 within a hundred steps, at 200 it takes a few hundred (benchmarks that time accuracy use it).
    """
    folder = Path(root) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, _ in TRAIN_FILES + TEST_FILES:
        n = test_size if (name, _) in TEST_FILES else train_per_batch
        labels = rng.integers(0, 10, size=n)
        _write(folder / name, {"batch_label": name, "labels": labels.tolist(), "data": _images(rng, labels, noise)})
    _write(folder / META_FILE[0], {"label_names": CLASSES, "num_cases_per_batch": train_per_batch, "num_vis": 3072})
    return folder


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="data.root to write into")
    parser.add_argument("--train-per-batch", type=int, default=200)
    parser.add_argument("--test-size", type=int, default=500)
    parser.add_argument("--noise", type=float, default=30.0, help="pixel noise (std, 0-255): higher is harder")
    args = parser.parse_args(argv)
    print(write_fixture(Path(args.root), args.train_per_batch, args.test_size, noise=args.noise))
    return 0


if __name__ == "__main__":
    sys.exit(main())
