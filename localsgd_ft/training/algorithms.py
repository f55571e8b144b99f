"""The cross-group sync algorithm: one object, chosen by ``localsgd.algorithm``, that the training loop steps.

An algorithm owns the optimizer step and, every ``steps_per_sync`` steps, the fault-tolerant sync across
groups; it reports each sync as a :class:`Sync`, counts the bytes it sends and carries its own state for
checkpoints, so neither the loop nor the checkpoint code knows which one runs. LocalSGD, DiLoCo and
Streaming DiLoCo, and what each one's final model is: docs/algorithms.md.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from localsgd_ft.config import ConfigError, ExperimentConfig
from localsgd_ft.training import precision
from localsgd_ft.training.model import split_into_fragments
from localsgd_ft.training.optim import apply_settings
from localsgd_ft.training.position import Position


@dataclass
class Sync:
    """One sync as the training loop sees it."""

    duration_s: float  # time spent in the optimizer steps that synced (quorum, allreduce, commit)
    committed: bool
    quorum_s: float = 0.0  # of it, waiting for the quorum (torchft's wait_quorum)
    commit_s: float = 0.0  # of it, agreeing to commit (torchft's should_commit)

    def after(self, start: "Sync") -> "Sync":
        """This sync's completing step together with the step that started it (its commit decision is ours)."""
        return Sync(start.duration_s + self.duration_s, self.committed, start.quorum_s + self.quorum_s,
                    start.commit_s + self.commit_s)


class _Algorithm:
    """What every algorithm shares: the step, its timing, and counting what is sent."""

    name = ""

    def __init__(self, manager: Any, optimizer: torch.optim.Optimizer, position: Position) -> None:
        self.manager, self.optimizer, self.position = manager, optimizer, position
        self.sync_bytes = 0  # bytes of tensors handed to allreduce by this process
        self._committed: Optional[bool] = None  # the last commit decision (None: none since asked)
        self._quorum_s = self._commit_s = 0.0  # waits since the current sync began
        self._watch_manager()

    def _watch_manager(self) -> None:
        """Count what is handed to allreduce, record every commit decision, and time the waits of a sync.

        A commit cannot be read from the step count: healing raises it too, and a group that heals
        and then fails to commit in the same sync would look committed. What is neither quorum nor
        commit in a sync is the allreduce itself (and a heal's state transfer).
        """
        m = self.manager
        allreduce, should_commit, wait_quorum = m.allreduce, m.should_commit, m.wait_quorum

        def counted(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self.sync_bytes += tensor.numel() * tensor.element_size()
            return allreduce(tensor, *args, **kwargs)

        def recorded(*args: Any, **kwargs: Any) -> bool:
            t = time.monotonic()
            try:
                self._committed = bool(should_commit(*args, **kwargs))
            finally:
                self._commit_s += time.monotonic() - t
            return self._committed

        def waited() -> None:
            t = time.monotonic()
            try:
                wait_quorum()
            finally:
                self._quorum_s += time.monotonic() - t

        m.allreduce, m.should_commit, m.wait_quorum = counted, recorded, waited

    def _timed(self, fn: Callable[[], None]) -> Sync:
        self._committed, t = None, time.monotonic()
        self._quorum_s = self._commit_s = 0.0
        fn()
        return Sync(time.monotonic() - t, self._committed is True, self._quorum_s, self._commit_s)

    def _optimizer_step(self) -> None:
        self.optimizer.step()  # the algorithm's hook syncs when an interval ends
        self.position.local_steps += 1

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass

    def __enter__(self) -> "_Algorithm":
        self._impl.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._impl.__exit__(*exc)


class LocalSGDSync(_Algorithm):
    """torchft's LocalSGD: every ``sync_every`` steps, average the parameters of every live group."""

    name = "localsgd"

    def __init__(self, cfg: ExperimentConfig, manager: Any, model: nn.Module, optimizer: torch.optim.Optimizer,
                 position: Position) -> None:
        from torchft.local_sgd import LocalSGD

        super().__init__(manager, optimizer, position)
        self._impl = LocalSGD(manager, model, optimizer, sync_every=cfg.localsgd.sync_every)

    def initial_sync(self) -> Sync:
        """A sync before the first step: a joining group takes the live weights; at a fresh start
        every group lines up on identical weights."""
        return self._timed(self._impl.sync)

    def step(self) -> Optional[Sync]:
        """One optimizer step, and the sync if it ended an interval (None otherwise)."""
        sync = self._timed(self._optimizer_step)
        return sync if self.position.at_sync() else None


class DiLoCoSync(_Algorithm):
    """torchft's DiLoCo (Streaming DiLoCo with fragments > 1), with one outer SGD per fragment."""

    name = "diloco"

    def __init__(self, cfg: ExperimentConfig, manager: Any, model: nn.Module, optimizer: torch.optim.Optimizer,
                 position: Position) -> None:
        from torchft.local_sgd import DiLoCo

        super().__init__(manager, optimizer, position)
        ls, oo = cfg.localsgd, cfg.localsgd.outer_optimizer
        if ls.quantize:
            _require_triton()
        # Over the byte count (which then counts what travels) and the silence guard (built before us).
        precision.install(manager, ls.sync_precision)
        fragments = split_into_fragments(model, ls.fragments)
        self._outer_settings = {"lr": oo.lr, "momentum": oo.momentum, "nesterov": oo.nesterov and oo.momentum > 0}
        self.outer = [torch.optim.SGD(f.parameters(), **self._outer_settings) for f in fragments]
        self._impl = DiLoCo(
            manager, fragments, optimizer, self.outer, sync_every=ls.sync_every,
            use_bucketization=ls.bucket_cap_mb > 0, bucket_cap_mb=ls.bucket_cap_mb or None,
            should_quantize=ls.quantize, fragment_sync_delay=ls.fragment_sync_delay,
            fragment_update_alpha=ls.fragment_update_alpha,
        )
        # Each fragment's outer-optimizer state and last synced parameters, as torchft registered them with
        # the Manager for live recovery: the same functions give a durable checkpoint the same state.
        self._keys = [f"StreamingDiLoCoFragment_{i}" for i in range(len(fragments))]
        saves, loads = getattr(manager, "_user_state_dicts", {}), getattr(manager, "_load_state_dict_fns", {})
        if not all(k in saves and k in loads for k in self._keys):
            raise RuntimeError("this torchft's DiLoCo registers no per-fragment state with the Manager; "
                               "localsgd_ft.training.algorithms needs updating")
        self._save = [saves[k] for k in self._keys]
        self._load = [loads[k] for k in self._keys]
        if not hasattr(self._impl, "_restore_parameters"):
            raise RuntimeError("this torchft's DiLoCo cannot restore the synced parameters; "
                               "localsgd_ft.training.algorithms needs updating")
        # The quorum and the allreduce start this many steps before the sync completes.
        self._prepare_at = cfg.steps_per_sync - ls.fragment_sync_delay
        self._prepared = Sync(0.0, False)

    def initial_sync(self) -> Sync:
        raise RuntimeError("DiLoCo has no alignment sync: a joining group heals at its first quorum")

    def step(self) -> Optional[Sync]:
        """One optimizer step, and the fragment sync if it ended an interval (None otherwise).

        A sync's duration is that of the step that started it (quorum and
        allreduce) plus the step that completed it (wait, outer step, commit).
        """
        in_interval = self.position.local_steps % self.position.steps_per_sync + 1
        sync = self._timed(self._optimizer_step)
        if in_interval == self._prepare_at:
            self._prepared = sync
        if not self.position.at_sync():
            return None
        if self._prepare_at != self.position.steps_per_sync:
            sync = sync.after(self._prepared)
        if sync.committed and self.position.done():
            # The run's result is the synced model: every fragment as of its own last sync. With fragments
            # the others trained locally since theirs, and with fragment_update_alpha > 0 the local
            # parameters were mixed in: both differ between groups, the synced parameters do not.
            self._impl._restore_parameters()
        return sync

    def state_dict(self) -> Dict[str, Any]:
        return {"fragments": [save() for save in self._save]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        saved: List[Dict[str, Any]] = state.get("fragments", [])
        if len(saved) != len(self._load):
            raise ConfigError(f"the checkpoint holds DiLoCo state for {len(saved)} fragment(s), the config asks "
                              f"for {len(self._load)}; restore localsgd.fragments or start over (--fresh True)")
        for load, fragment_state in zip(self._load, saved):
            load(fragment_state)
        for outer in self.outer:  # the config's outer settings, not the saved ones
            apply_settings(outer, self._outer_settings)


def _require_triton() -> None:
    try:
        import triton  # noqa: F401
    except ImportError:
        raise ConfigError("localsgd.quantize: true, but triton is not installed here; torchft quantizes with "
                          "triton kernels (without them it silently sends the data unquantized): install "
                          "triton, or set localsgd.quantize: false") from None


ALGORITHM_CLASSES = {"localsgd": LocalSGDSync, "diloco": DiLoCoSync}


def build_algorithm(cfg: ExperimentConfig, manager: Any, model: nn.Module, optimizer: torch.optim.Optimizer,
                    position: Position) -> _Algorithm:
    """The algorithm ``localsgd.algorithm`` names, wrapped around ``model`` and its inner ``optimizer``."""
    return ALGORITHM_CLASSES[cfg.localsgd.algorithm](cfg, manager, model, optimizer, position)
