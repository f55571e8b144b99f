"""The networks an experiment can train, chosen by ``model.arch``.

Neither uses BatchNorm: LocalSGD averages parameters only, so running-stat
buffers would drift apart between replica groups and the groups' final models
would differ even when their parameters are identical.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig


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


def build_model(cfg: ModelConfig) -> nn.Module:
    return {"cnn": SmallCNN, "resnet": ResNet}[cfg.arch](cfg.width)
