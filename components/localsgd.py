"""torchx component: an experiment YAML -> AppDef (a lighthouse role + one role per replica group).

The same AppDef runs on local_cwd, Slurm and Kubernetes (see
docs/clusters.md). Every role gets the YAML's text embedded (base64, in
``--config-b64``), so no role needs the file: pods on Kubernetes share no
filesystem with the machine that ran ``torchx run``.
"""

import atexit
import os
import sys
import time
from typing import Dict, List

import torchx.specs as specs
from torchx.specs.finder import ComponentValidationException

from localsgd_ft.config import ConfigError, embed_config, load_config
from localsgd_ft.storage.cifar10 import DataError, locate
from localsgd_ft.storage.checkpoints import resume_point
from localsgd_ft.launch.client_hooks import (is_dry_run, is_local_launch, say_how_to_resume, scheduler_from_argv,
                                watch_for_interrupt)
from localsgd_ft.launch.gpus import check_local_lists
from localsgd_ft.launch.lifecycle import PARENT_PID_ENV, new_identity
from localsgd_ft.launch.addresses import FRESH_ENV, GROUP_ENV, NUM_GROUPS_ENV, free_port, rendezvous_port

# Schedulers that give every replica of a role a host the others can reach by a name we can find
# (see localsgd_ft.roles.group_first_host): where a group may span several nodes.
MULTI_NODE_SCHEDULERS = ("local_cwd", "slurm", "kubernetes")


def localsgd(
    *overrides: str,
    config: str = "configs/default.yaml",
    image: str = "",
    script: str = "train_localsgd.py",
    fresh: bool = False,
) -> specs.AppDef:
    """Fault-tolerant LocalSGD on CIFAR-10 with torchft: a lighthouse role and N replica-group roles.

    Everything about the experiment (replica groups, sync_every, recovery mode,
    GPUs, model, data, steps, timeouts, output directory) lives in the YAML file;
    see configs/ and docs/config.md. The lighthouse role ends
    on its own once every group has finished, writing OUTPUT_DIR/summary.json;
    the app SUCCEEDS only if every replica group trained to the end.

    Trailing dotted.key=value arguments override the file's keys, each value
    parsed as YAML (e.g. ``localsgd.sync_every=50 train.max_steps=4000``); the
    run records its resolved config as OUTPUT_DIR/config.yaml.

    Args:
        overrides: dotted.key=value settings applied over the YAML file, validated like it
        config: the experiment YAML file, relative to the working directory; its text is embedded in every role
        image: container image (Kubernetes, local_docker); leave empty for local_cwd and Slurm (roles use this Python)
        script: the script torchrun runs in every replica group
        fresh: start over instead of resuming from the newest checkpoint (old ones are moved aside)
    """
    try:
        cfg = load_config(config, overrides=overrides)
        embedded = embed_config(config, overrides)
    except ConfigError as e:
        # torchx prints this one message and exits 1 (a plain exception would print a traceback).
        raise ComponentValidationException(str(e)) from None
    if image and cfg.replica_groups.gpus:
        # Inside a container the runtime renumbers the granted GPUs from 0: host indices mean nothing.
        raise ComponentValidationException(
            f"{config}: replica_groups.gpus lists device indices of one machine ({cfg.replica_groups.gpus!r}), "
            "but with an image the scheduler grants each container its own GPUs: use "
            f"replica_groups.gpus_per_group: {cfg.gpus_per_group} and replica_groups.gpus: [] instead"
        )
    if not image:
        # No image: the roles run on this filesystem (local_cwd, or Slurm with a shared one), so
        # catch missing data and absent GPUs before any process starts, and download CIFAR-10 here,
        # once, rather than in every group (each role still checks it before its torchrun starts).
        try:
            # A dry run only plans: it checks data that should be there but fetches nothing.
            locate(cfg.data, download=cfg.data.download and not is_dry_run(sys.argv))
        except DataError as e:
            raise ComponentValidationException(f"{config}: {e}") from None
        gpu_problem = check_local_lists(cfg)
        if gpu_problem:
            raise ComponentValidationException(f"{config}: {gpu_problem}")

    if not image and not fresh:
        # Refuse an incompatible resume before anything starts (in images the trainer checks).
        try:
            resume_point(cfg, start_over=not cfg.checkpoint.resume)
        except ConfigError as e:
            raise ComponentValidationException(f"{config}: {e}") from None

    rg = cfg.replica_groups
    scheduler = scheduler_from_argv(sys.argv)
    if rg.nodes > 1 and scheduler not in MULTI_NODE_SCHEDULERS:
        raise ComponentValidationException(
            f"{config}: replica_groups.nodes: got {rg.nodes}, but the {scheduler or 'default'} scheduler cannot "
            f"place a group's nodes where they find each other; use one of {', '.join(MULTI_NODE_SCHEDULERS)} "
            "or set replica_groups.nodes: 1")

    local = is_local_launch(sys.argv)
    if local:
        watch_for_interrupt()
        atexit.register(say_how_to_resume, cfg, time.time(), fresh)

    # Locally (and on Slurm) the roles run from the current virtualenv; in an image, its `python`.
    python = "python" if image else sys.executable
    config_args = ["--config", config, "--config-b64", embedded]
    host_env = ["--host-env", specs.macros.rank0_env]
    # One identity per launch, in every role's environment (never its command line): the
    # completion service refuses anyone without the token, torchft replica ids carry the run id.
    common_env = {"PYTHONUNBUFFERED": "1", FRESH_ENV: "1" if fresh else "0", **new_identity(cfg.name)}
    if local:  # the roles are this process's children: each checks it still is before arming
        common_env[PARENT_PID_ENV] = str(os.getpid())
    def node_args(group: int) -> List[str]:
        """Which node of its group a replica is, and where the group's nodes meet (nothing with one node)."""
        if rg.nodes == 1:
            return []
        # All nodes of a local run are this host: any free port; on a cluster, each group's first node.
        port = free_port() if scheduler == "local_cwd" else rendezvous_port(cfg, group)
        return ["--node", specs.macros.replica_id, "--rdzv-port", str(port)]

    # A container keeps no files after it ends: print summary.json to the lighthouse's log too.
    print_summary: List[str] = ["--print-summary"] if image else []

    lh = cfg.lighthouse
    roles = [
        specs.Role(
            name="lighthouse",
            image=image,
            entrypoint=python,
            args=["-m", "localsgd_ft.lighthouse", *config_args, *host_env, *print_summary],
            env=dict(common_env),
            resource=specs.resource(cpu=lh.cpus, gpu=0, memMB=lh.memory_mb),
            port_map={"lighthouse": lh.port, "completion": lh.port + 1},
            max_retries=0,
        )
    ]
    for group, gpus in enumerate(cfg.group_gpus):
        env: Dict[str, str] = {**common_env, GROUP_ENV: str(group), NUM_GROUPS_ENV: str(rg.count)}
        if gpus:
            # Explicit lists: each group sees only its own GPUs of this machine. (Slurm's GPU
            # plugin replaces this with the devices it granted, so the count still holds there.)
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)
        elif not cfg.uses_gpus:
            env["CUDA_VISIBLE_DEVICES"] = ""  # CPU training: keep the groups off any GPU
        # gpus_per_group: the scheduler grants the devices and sets what the group sees.
        roles.append(
            specs.Role(
                name=f"replica_{group}",
                image=image,
                entrypoint=python,
                args=["-m", "localsgd_ft.replica", *config_args, "--group", str(group),
                      "--script", script, *host_env, *node_args(group)],
                env=env,
                num_replicas=rg.nodes,  # one per node, each a torchrun agent of the group
                resource=specs.resource(cpu=rg.cpus, gpu=cfg.gpus_per_group, memMB=rg.memory_mb),
                # torchrun restarts crashed workers inside the role (replica_groups.max_restarts);
                # no scheduler-level retry, which would restart the whole job on Slurm/Kubernetes.
                max_retries=0,
            )
        )
    return specs.AppDef(name=cfg.name, roles=roles)
