"""What the ``torchx run`` client checks before it plans a run: every refusal before any process starts.

Acting on this machine (finding or downloading CIFAR-10, reading the GPU list,
looking at old checkpoints) happens here, never while the AppDef is built.
"""

from __future__ import annotations

from typing import List

from localsgd_ft.config import ConfigError, ExperimentConfig
from localsgd_ft.launch.addresses import free_port
from localsgd_ft.launch.client_hooks import is_dry_run, scheduler_from_argv
from localsgd_ft.launch.gpus import check_local_lists
from localsgd_ft.storage import ownership, set_aside
from localsgd_ft.storage.checkpoints import check_extends, resume_point
from localsgd_ft.storage.cifar10 import DataError, locate
from localsgd_ft.storage.ownership import DirectoryBusy
from localsgd_ft.storage.set_aside import SetAsideError

# Schedulers that give every replica of a role a host the others can reach by a name we can find
# (see localsgd_ft.launch.addresses.group_first_host): where a group may span several nodes.
MULTI_NODE_SCHEDULERS = ("local_cwd", "slurm", "kubernetes")


def check(cfg: ExperimentConfig, config: str, image: str, fresh: bool, argv: List[str]) -> None:
    """Refuse what cannot run (ConfigError naming ``config``); without an image, also fetch the data."""
    try:
        if image:
            _check_image_gpus(cfg)
        else:
            # No image: the roles run on this filesystem (local_cwd, or Slurm with a shared one), so
            # catch missing data and absent GPUs before any process starts, and download CIFAR-10 here,
            # once, rather than in every group (each role still checks it before its torchrun starts).
            _check_local_machine(cfg, download=cfg.data.download and not is_dry_run(argv))
            # Another live run in this run's directories, or --fresh where it would move foreign files.
            for directory, what in ownership.directories(cfg):
                ownership.check_free(directory, what)
            if cfg.checkpoint.enabled and (fresh or not cfg.checkpoint.resume):
                set_aside.check_checkpoints(cfg.checkpoint_dir)
            if not fresh:  # an incompatible resume, or one with nothing to train, is refused now
                found, _ = resume_point(cfg, start_over=not cfg.checkpoint.resume)
                if found is not None:
                    check_extends(cfg, found)
        _check_scheduler_places_nodes(cfg, scheduler_from_argv(argv))
    except (ConfigError, DataError, DirectoryBusy, SetAsideError) as e:
        raise ConfigError(f"{config}: {e}") from None


def rendezvous_ports(cfg: ExperimentConfig, scheduler: str) -> List[int]:
    """Where each group's nodes meet (none with one node per group). All nodes of a local run are this
    host: free ports drawn now; on a cluster, the config's port layout at each group's first node."""
    if cfg.replica_groups.nodes == 1:
        return []
    groups = range(cfg.replica_groups.count)
    if scheduler == "local_cwd":
        return [free_port() for _ in groups]
    return [cfg.lighthouse.rendezvous_port(g) for g in groups]


def _check_image_gpus(cfg: ExperimentConfig) -> None:
    if cfg.replica_groups.gpus:
        # Inside a container the runtime renumbers the granted GPUs from 0: host indices mean nothing.
        raise ConfigError(
            f"replica_groups.gpus lists device indices of one machine ({cfg.replica_groups.gpus!r}), "
            "but with an image the scheduler grants each container its own GPUs: use "
            f"replica_groups.gpus_per_group: {cfg.gpus_per_group} and replica_groups.gpus: [] instead")


def _check_local_machine(cfg: ExperimentConfig, download: bool) -> None:
    locate(cfg.data, download=download)  # a dry run only plans: it checks the data, fetches nothing
    gpu_problem = check_local_lists(cfg)
    if gpu_problem:
        raise ConfigError(gpu_problem)


def _check_scheduler_places_nodes(cfg: ExperimentConfig, scheduler: str) -> None:
    nodes = cfg.replica_groups.nodes
    if nodes > 1 and scheduler not in MULTI_NODE_SCHEDULERS:
        raise ConfigError(
            f"replica_groups.nodes: got {nodes}, but the {scheduler or 'default'} scheduler cannot "
            f"place a group's nodes where they find each other; use one of {', '.join(MULTI_NODE_SCHEDULERS)} "
            "or set replica_groups.nodes: 1")
