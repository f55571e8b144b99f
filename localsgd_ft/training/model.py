"""The networks an experiment can train, chosen by ``model.arch``.

Neither uses BatchNorm: LocalSGD averages parameters only, so running-stat
buffers would drift apart between replica groups and the groups' final models
would differ even when their parameters are identical.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
from torch import nn

from localsgd_ft.config import ConfigError, ModelConfig


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2))


class SmallCNN(nn.Module):
    """Three conv/pool stages and a linear head: trains CIFAR-10 fast on a CPU core."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.features = nn.Sequential(_conv_block(3, width), _conv_block(width, 2 * width), _conv_block(2 * width, 4 * width))
        self.head = nn.Linear(4 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).amax(dim=(2, 3)))


class _Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.GroupNorm(8, channels),
            nn.GELU(),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.GroupNorm(8, channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(x + self.body(x))


class ResNet(nn.Module):
    """A small residual network with GroupNorm, for GPU runs."""

    def __init__(self, width: int) -> None:
        super().__init__()
        w = max(8, width - width % 8)  # GroupNorm(8, ...) needs a multiple of 8
        layers: list[nn.Module] = [nn.Conv2d(3, w, 3, padding=1, bias=False), nn.GroupNorm(8, w), nn.GELU()]
        for cin, cout in ((w, 2 * w), (2 * w, 4 * w), (4 * w, 8 * w)):
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.GroupNorm(8, cout), nn.GELU(), _Residual(cout)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(8 * w, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).amax(dim=(2, 3)))


# One network per choice of model.arch (the schema's ModelArch names them).
ARCHITECTURES = {"cnn": SmallCNN, "resnet": ResNet}


def build_model(cfg: ModelConfig) -> nn.Module:
    return ARCHITECTURES[cfg.arch](cfg.width)


def _layers(module: nn.Module) -> List[nn.Module]:
    """The model's layers in forward order: containers (Sequential, the model itself) are opened up."""
    out: List[nn.Module] = []
    for child in module.children():
        out += _layers(child) if isinstance(child, nn.Sequential) else [child]
    return out


def split_into_fragments(model: nn.Module, n: int) -> List[nn.Module]:
    """``model`` as ``n`` fragments of consecutive layers, as equal in parameter count as its layers allow.

    Streaming DiLoCo syncs one fragment at a time; a fragment is a ModuleList
    over the model's own layers (no copy), so its parameters are the model's.
    """
    layers = [m for m in _layers(model) if sum(p.numel() for p in m.parameters()) > 0]
    if not 1 <= n <= len(layers):
        raise ConfigError(f"localsgd.fragments: got {n}, but this model ({type(model).__name__}) has "
                          f"{len(layers)} layers with parameters, so at most {len(layers)} fragments")
    sizes = [sum(p.numel() for p in m.parameters()) for m in layers]
    cuts = _balanced_cuts(sizes, n)
    fragments = [nn.ModuleList(layers[a:b]) for a, b in zip([0] + cuts, cuts + [len(layers)])]
    covered = sum(p.numel() for f in fragments for p in f.parameters())
    if covered != sum(p.numel() for p in model.parameters()):
        raise RuntimeError(f"{type(model).__name__}: its layers do not hold all its parameters; "
                           "split_into_fragments needs updating for this model")
    return fragments


def _balanced_cuts(sizes: List[int], n: int) -> List[int]:
    """Where to cut ``sizes`` into ``n`` non-empty consecutive runs so the largest run is smallest."""
    prefix = [0]
    for s in sizes:
        prefix.append(prefix[-1] + s)
    # best[k][i]: (largest run, cuts) splitting the first i layers into k runs
    best: List[List[Tuple[float, List[int]]]] = [[(float("inf"), [])] * (len(sizes) + 1) for _ in range(n + 1)]
    best[0][0] = (0, [])
    for k in range(1, n + 1):
        for i in range(k, len(sizes) + 1):
            for j in range(k - 1, i):
                worst = max(best[k - 1][j][0], prefix[i] - prefix[j])
                if worst < best[k][i][0]:
                    best[k][i] = (worst, best[k - 1][j][1] + ([j] if j else []))
    return best[n][len(sizes)][1]
