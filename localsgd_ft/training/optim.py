"""The inner (local) optimizer, built from ``optimizer.*``, and its settings kept the config's.

``torch.optim.Optimizer.load_state_dict`` restores the saved ``param_groups``,
settings included: a run resumed from a checkpoint would train with the lr of
the run that wrote it, not the one its config (or an override) says.
:func:`apply_settings` puts the config's back after every load.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable

import torch
from torch import nn

from localsgd_ft.config import OptimizerConfig


def settings(cfg: OptimizerConfig) -> Dict[str, Any]:
    """The param-group settings the config asks for."""
    if cfg.name == "adamw":
        return {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    return {"lr": cfg.lr, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay,
            "nesterov": cfg.nesterov and cfg.momentum > 0}


def build_optimizer(cfg: OptimizerConfig, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, **settings(cfg))
    return torch.optim.SGD(params, **settings(cfg))


def apply_settings(optimizer: torch.optim.Optimizer, values: Dict[str, Any]) -> None:
    """Set ``values`` in every param group (after a load_state_dict brought older ones back)."""
    for group in optimizer.param_groups:
        group.update(values)
