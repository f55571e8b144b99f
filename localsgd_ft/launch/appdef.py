"""The plan of a run: the torchx AppDef (a lighthouse role and one role per replica group), built and not acted on.

Like torchx's own dry runs, building it touches nothing: the checks and the
download that come before a launch live in :mod:`localsgd_ft.launch.preflight`.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Dict, List

import torchx.specs as specs

from localsgd_ft.config import ExperimentConfig
from localsgd_ft.contract import FRESH_ENV, GROUP_ENV, NUM_GROUPS_ENV, PARENT_PID_ENV
from localsgd_ft.launch.lifecycle import new_identity


@dataclass
class Launch:
    """How this launch runs the experiment: what the component was given and where it runs."""

    config: str  # the YAML file's name, as the roles print it
    embedded: str  # the resolved YAML text, base64 (every role reads this, not the file)
    image: str  # the container image; empty: roles run this Python on this filesystem
    script: str  # what torchrun runs in every replica group
    fresh: bool  # start over instead of resuming
    local: bool  # the roles are children of this `torchx run` process
    rendezvous_ports: List[int]  # per group, where its nodes meet (empty with one node per group)


def build_app(cfg: ExperimentConfig, launch: Launch) -> specs.AppDef:
    """The AppDef of ``cfg`` for ``launch``: a lighthouse role, then replica_0 .. replica_{N-1}."""
    env = _common_env(cfg, launch)
    roles = [_lighthouse_role(cfg, launch, env)]
    roles += [_replica_role(cfg, launch, env, group) for group in range(cfg.replica_groups.count)]
    return specs.AppDef(name=cfg.name, roles=roles)


def _python(launch: Launch) -> str:
    """Locally (and on Slurm) the roles run from the current virtualenv; in an image, its `python`."""
    return "python" if launch.image else sys.executable


def _config_args(launch: Launch) -> List[str]:
    return ["--config", launch.config, "--config-b64", launch.embedded]


# Every role finds the lighthouse's host in the variable this names (torchx fills it in per scheduler).
HOST_ENV_ARGS = ["--host-env", specs.macros.rank0_env]


def _common_env(cfg: ExperimentConfig, launch: Launch) -> Dict[str, str]:
    """One identity per launch, in every role's environment (never its command line): the completion
    service refuses anyone without the token, torchft replica ids carry the run id."""
    env = {"PYTHONUNBUFFERED": "1", FRESH_ENV: "1" if launch.fresh else "0", **new_identity(cfg.name)}
    if launch.local:  # the roles are this process's children: each checks it still is before arming
        env[PARENT_PID_ENV] = str(os.getpid())
    return env


def _lighthouse_role(cfg: ExperimentConfig, launch: Launch, env: Dict[str, str]) -> specs.Role:
    lh = cfg.lighthouse
    # A container keeps no files after it ends: print summary.json to the lighthouse's log too.
    print_summary = ["--print-summary"] if launch.image else []
    return specs.Role(
        name="lighthouse",
        image=launch.image,
        entrypoint=_python(launch),
        args=["-m", "localsgd_ft.lighthouse", *_config_args(launch), *HOST_ENV_ARGS, *print_summary],
        env=dict(env),
        resource=specs.resource(cpu=lh.cpus, gpu=0, memMB=lh.memory_mb),
        port_map={"lighthouse": lh.port, "completion": lh.completion_port},
        max_retries=0,
    )


def _replica_role(cfg: ExperimentConfig, launch: Launch, common: Dict[str, str], group: int) -> specs.Role:
    rg = cfg.replica_groups
    return specs.Role(
        name=f"replica_{group}",
        image=launch.image,
        entrypoint=_python(launch),
        args=["-m", "localsgd_ft.replica", *_config_args(launch), "--group", str(group), "--script", launch.script,
              *HOST_ENV_ARGS, *_node_args(cfg, launch, group)],
        env=_replica_env(cfg, common, group),
        num_replicas=rg.nodes,  # one per node, each a torchrun agent of the group
        resource=specs.resource(cpu=rg.cpus, gpu=cfg.gpus_per_group, memMB=rg.memory_mb),
        # torchrun restarts crashed workers inside the role (replica_groups.max_restarts);
        # no scheduler-level retry, which would restart the whole job on Slurm/Kubernetes.
        max_retries=0,
    )


def _replica_env(cfg: ExperimentConfig, common: Dict[str, str], group: int) -> Dict[str, str]:
    env = {**common, GROUP_ENV: str(group), NUM_GROUPS_ENV: str(cfg.replica_groups.count)}
    gpus = cfg.group_gpus[group]
    if gpus:
        # Explicit lists: each group sees only its own GPUs of this machine. (Slurm's GPU
        # plugin replaces this with the devices it granted, so the count still holds there.)
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)
    elif not cfg.uses_gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""  # CPU training: keep the groups off any GPU
    # gpus_per_group: the scheduler grants the devices and sets what the group sees.
    return env


def _node_args(cfg: ExperimentConfig, launch: Launch, group: int) -> List[str]:
    """Which node of its group a replica is, and where the group's nodes meet (nothing with one node)."""
    if cfg.replica_groups.nodes == 1:
        return []
    return ["--node", specs.macros.replica_id, "--rdzv-port", str(launch.rendezvous_ports[group])]
