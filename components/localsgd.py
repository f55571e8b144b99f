"""torchx component: an experiment YAML -> AppDef (a lighthouse role + one role per replica group)."""

import sys
from typing import Dict

import torchx.specs as specs
from torchx.specs.finder import ComponentValidationException

from localsgd_ft.config import ConfigError, load_config
from localsgd_ft.cifar_files import DataError, locate
from localsgd_ft.checkpoint import resume_point
from localsgd_ft.roles import FRESH_ENV, GROUP_ENV, NUM_GROUPS_ENV


def localsgd(
    config: str = "configs/default.yaml",
    image: str = "",
    script: str = "train_localsgd.py",
    fresh: bool = False,
) -> specs.AppDef:
    """Fault-tolerant LocalSGD on CIFAR-10 with torchft: a lighthouse role and N replica-group roles.

    Everything about the experiment (replica groups, sync_every, recovery mode,
    GPUs, model, data, steps, timeouts, output directory) lives in the YAML file;
    see configs/ and the README's config reference. The lighthouse role ends
    on its own once every group has finished, writing OUTPUT_DIR/summary.json;
    the app SUCCEEDS only if every replica group trained to the end.

    Args:
        config: the experiment YAML file, relative to the working directory
        image: container image on Slurm/Kubernetes; leave empty for local_cwd
        script: the script torchrun runs in every replica group
        fresh: start over instead of resuming from the newest checkpoint (old ones are moved aside)
    """
    try:
        cfg = load_config(config)
    except ConfigError as e:
        # torchx prints this one message and exits 1 (a plain exception would print a traceback).
        raise ComponentValidationException(str(e)) from None
    if not image and not cfg.data.download:
        # Local runs share this filesystem: catch missing data before any process starts.
        try:
            locate(cfg.data)
        except DataError as e:
            raise ComponentValidationException(f"{config}: {e}") from None

    if not image and not fresh:
        # Refuse an incompatible resume before anything starts (clusters check in the trainer).
        try:
            resume_point(cfg, start_over=not cfg.checkpoint.resume)
        except ConfigError as e:
            raise ComponentValidationException(f"{config}: {e}") from None

    # Locally the roles run from the current virtualenv; in an image, its `python`.
    python = "python" if image else sys.executable
    host_env = ["--host-env", specs.macros.rank0_env]
    common_env = {"PYTHONUNBUFFERED": "1", FRESH_ENV: "1" if fresh else "0"}

    roles = [
        specs.Role(
            name="lighthouse",
            image=image,
            entrypoint=python,
            args=["-m", "localsgd_ft.lighthouse", "--config", config, *host_env],
            env=dict(common_env),
            resource=specs.resource(cpu=1, gpu=0, memMB=512),
            port_map={"lighthouse": cfg.lighthouse.port, "completion": cfg.lighthouse.port + 1},
            max_retries=0,
        )
    ]
    for group, gpus in enumerate(cfg.group_gpus):
        env: Dict[str, str] = {
            **common_env,
            GROUP_ENV: str(group),
            NUM_GROUPS_ENV: str(cfg.replica_groups.count),
            # Each group sees only its own GPUs; none on CPU runs.
            "CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in gpus),
        }
        roles.append(
            specs.Role(
                name=f"replica_{group}",
                image=image,
                entrypoint=python,
                args=["-m", "localsgd_ft.replica", "--config", config, "--group", str(group),
                      "--script", script, *host_env],
                env=env,
                resource=specs.resource(cpu=cfg.replica_groups.cpus, gpu=len(gpus), memMB=cfg.replica_groups.memory_mb),
                # torchrun restarts crashed workers inside the role (replica_groups.max_restarts).
                max_retries=0,
            )
        )
    return specs.AppDef(name=cfg.name, roles=roles)
