"""CIFAR-10 as tensors: load, shard, batch and augment (files are found and checked by cifar_files).

Images stay uint8 tensors on the training device; a batch is gathered,
augmented (random crop with padding, horizontal flip) and normalised in one go,
with no per-sample Python and no DataLoader worker processes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Tuple

import torch

from localsgd_ft.config import DataConfig
from localsgd_ft.storage.cifar10 import TEST_FILES, TRAIN_FILES, DataError, locate, read_batch

# Channel statistics of the CIFAR-10 training set, for normalisation.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
PAD = 4  # pixels of padding for the random crop


def load_split(folder: Path, train: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 of one split."""
    images, labels = [], []
    for name, _ in TRAIN_FILES if train else TEST_FILES:
        batch = read_batch(folder / name)
        try:
            images.append(torch.from_numpy(batch["data"]).reshape(-1, 3, 32, 32))
            labels.append(torch.tensor(batch["labels"], dtype=torch.int64))
        except (KeyError, TypeError, RuntimeError) as e:
            raise DataError(f"{folder / name}: not in CIFAR-10's format ({e})") from None
    return torch.cat(images), torch.cat(labels)


@dataclass
class Split:
    images: torch.Tensor  # uint8 (N, 3, 32, 32) on the device
    labels: torch.Tensor  # int64 (N,) on the device


def load_cifar10(cfg: DataConfig, device: torch.device) -> Tuple[Split, Split]:
    """(train, test) splits on ``device``, after the checks ``cfg`` asks for."""
    folder = locate(cfg)
    train = Split(*(t.to(device) for t in load_split(folder, train=True)))
    test = Split(*(t.to(device) for t in load_split(folder, train=False)))
    return train, test


@functools.lru_cache(maxsize=None)
def _stats(device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and 1/std in uint8 units, made once per device (not per batch)."""
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1) * 255
    inv_std = 1 / (torch.tensor(STD, device=device).view(1, 3, 1, 1) * 255)
    return mean, inv_std


def normalize(images: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 images -> normalised float32, in two in-place passes over one new tensor."""
    mean, inv_std = _stats(images.device)
    out = images.float()
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    return out.sub_(mean).mul_(inv_std)


def augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding and horizontal flip of a uint8 batch, all at once."""
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (PAD, PAD, PAD, PAD))
    dy = torch.randint(0, 2 * PAD + 1, (n,), generator=gen, device=gen.device).to(images.device)
    dx = torch.randint(0, 2 * PAD + 1, (n,), generator=gen, device=gen.device).to(images.device)
    rows = (dy[:, None] + torch.arange(h, device=images.device))[:, :, None]  # (n, h, 1)
    cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, :]  # (n, 1, w)
    flip = torch.rand(n, generator=gen, device=gen.device).to(images.device) < 0.5
    cols = torch.where(flip[:, None, None], cols.flip(-1), cols)
    batch = torch.arange(n, device=images.device)[:, None, None]
    # Advanced indexing puts the indexed dims first: (n, h, w, c) -> (n, c, h, w).
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


class ShardedBatches:
    """One worker's training batches, addressed by training step.

    Every worker of the run (``shards`` = groups x workers per group) has a
    shard of its own, as with torchft's DistributedSampler: each epoch a
    permutation seeded by (seed, epoch) is shared by all and shard s takes every
    ``num_shards``-th index starting at s, so no two workers see the same sample
    in an epoch and all see equally many. Worker w of group g has shard
    ``g * workers + w`` (:func:`shard_of`).

    ``batch(step)`` depends only on (seed, shard, step), augmentation included,
    so the data position needs no state of its own: a group that heals or
    resumes at step S simply continues with batch S (``position(S)`` says which
    epoch and offset that is).
    """

    def __init__(self, split: Split, shard: int, num_shards: int, batch_size: int, seed: int, augment: bool,
                 channels_last: bool = False) -> None:
        self.split = split
        self.channels_last = channels_last
        self.shard, self.num_shards = shard, num_shards
        self.batch_size, self.seed, self.augment = batch_size, seed, augment
        self.shard_size = len(split.labels) // num_shards
        if self.shard_size < batch_size:
            raise DataError(
                f"each worker's shard has {self.shard_size} training images ({len(split.labels)} over "
                f"{num_shards} workers in all), fewer than data.batch_size ({batch_size}); lower data.batch_size "
                "or use fewer replica groups or workers"
            )
        self.batches_per_epoch = self.shard_size // batch_size
        self.gen = torch.Generator(device=split.images.device)
        self._epoch = -1
        self._shard = torch.empty(0, dtype=torch.int64)

    def position(self, step: int) -> Tuple[int, int]:
        """(epoch, batch offset within the epoch) of training step ``step``."""
        return divmod(step, self.batches_per_epoch)

    def _shard_of(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:  # one permutation per epoch, not per step
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(len(self.split.labels), generator=g)
            self._shard = order[self.shard :: self.num_shards][: self.shard_size].to(self.split.images.device)
            self._epoch = epoch
        return self._shard

    def batch(self, step: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Normalised (and, if configured, augmented) images and labels of training step ``step``."""
        epoch, offset = self.position(step)
        idx = self._shard_of(epoch)[offset * self.batch_size : (offset + 1) * self.batch_size]
        images = self.split.images[idx]
        if self.augment:
            self.gen.manual_seed(((self.seed * 1_000_003 + self.shard) * 1_000_000_007 + step) % (1 << 62))
            images = augment(images, self.gen)
        return normalize(images, self.channels_last), self.split.labels[idx]


def shard_of(group: int, worker: int, workers: int) -> int:
    """The data shard of worker ``worker`` of replica group ``group`` (``workers`` per group)."""
    return group * workers + worker


def eval_batches(split: Split, batch_size: int = 1000,
                 channels_last: bool = False) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """The whole split in order, normalised, never augmented."""
    for start in range(0, len(split.labels), batch_size):
        yield normalize(split.images[start : start + batch_size], channels_last), split.labels[start : start + batch_size]
