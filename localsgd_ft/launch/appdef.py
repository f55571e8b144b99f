"""The plan of a run: the torchx AppDef (a lighthouse role and one role per replica group), built and not acted on.

Like torchx's own dry runs, building it touches nothing: the checks and the
download that come before a launch live in :mod:`localsgd_ft.launch.preflight`.
It also decides, per scheduler, how the run token reaches the roles (never on a
command line) and where Slurm writes the roles' output (under the run's output
directory); docs/lifecycle.md and docs/clusters.md say why.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import torchx.specs as specs

from localsgd_ft.config import ExperimentConfig
from localsgd_ft.contract import FRESH_ENV, GROUP_ENV, NUM_GROUPS_ENV, PARENT_PID_ENV, RUN_ID_ENV, RUN_TOKEN_ENV
from localsgd_ft.launch.lifecycle import DRY_RUN_TOKEN

# Schedulers whose roles inherit the environment of the `torchx run` client: local_cwd starts them with it,
# sbatch exports it to the job (--export=ALL, its default) and srun to every step. There the token goes that
# way and never into the AppDef: Slurm puts a role's env on srun's command line (--export=ALL,K=V), which
# every user of the node reads in /proc, and a dry run prints the AppDef.
TOKEN_INHERITED = ("local_cwd", "slurm")

# Where the batch script's own output goes, in the run's Slurm directory (sbatch's %j: the job id).
SBATCH_OUTPUT_NAME = "slurm-%j.out"


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
    scheduler: str  # the torchx scheduler ('' if unknown: the token then goes in the roles' env)
    run_id: str  # this launch's run id (localsgd_ft.launch.lifecycle.new_run_id)
    token: str  # this launch's run token; in the AppDef only where the roles do not inherit it
    dry_run: bool  # only planned (--dryrun): a token in the AppDef is shown as DRY_RUN_TOKEN
    slurm_logs: str  # the directory for Slurm's output files ('' : torchx's own place, the job's directory)


def token_inherited(scheduler: str) -> bool:
    """Whether the roles on ``scheduler`` get the run token from the client's environment (else from the AppDef)."""
    return scheduler in TOKEN_INHERITED


def sbatch_export_problem(environ: Mapping[str, str]) -> Optional[str]:
    """Why sbatch would not pass the client's environment (so the token) to the job; None if it does."""
    export = environ.get("SBATCH_EXPORT", "")
    if not export or export.split(",")[0].strip().upper() == "ALL":
        return None
    return (f"SBATCH_EXPORT={export} keeps the run token from reaching the Slurm job (it travels in the "
            "environment sbatch exports, never on a command line): unset SBATCH_EXPORT, or start it with ALL")


def slurm_log_dir(cfg: ExperimentConfig, scheduler: str, scheduler_cfg: Mapping[str, object]) -> str:
    """Where Slurm writes the roles' output: ``<output_dir>/slurm``; '' off Slurm, or with torchx's
    ``job_dir`` (the job then runs in that directory, and its files stay there, where `torchx log` looks)."""
    if scheduler != "slurm" or scheduler_cfg.get("job_dir"):
        return ""
    return str(cfg.run_dir / "slurm")


def build_app(cfg: ExperimentConfig, launch: Launch) -> specs.AppDef:
    """The AppDef of ``cfg`` for ``launch``: a lighthouse role, then replica_0 .. replica_{N-1}."""
    env = _common_env(cfg, launch)
    roles = [_lighthouse_role(cfg, launch, env)]
    roles += [_replica_role(cfg, launch, env, group) for group in range(cfg.replica_groups.count)]
    return specs.AppDef(name=cfg.name, roles=roles)


def _python(launch: Launch) -> str:
    """Locally (and on Slurm) the roles run from the current virtualenv; in an image, its `python`."""
    return "python" if launch.image else sys.executable


def _command(launch: Launch, role: str, args: List[str]) -> Tuple[str, List[str]]:
    """The role's entrypoint and args; on Slurm, led by srun options that put its output in ``slurm_logs``.

    torchx 0.7.0 gives srun ``--output=slurm-<job>-<role>-<k>.out`` (and ``.err``)
    in the job's directory and offers no option to move them. srun reads
    options up to its first operand and the last of a repeated option wins, so
    ours come first: the entrypoint is srun's ``--output`` and its value the
    first arg, where torchx substitutes the replica id (it does not in the
    entrypoint). The file names stay torchx's.
    """
    if not launch.slurm_logs:
        return _python(launch), args
    stem = str(Path(launch.slurm_logs) / f"slurm-{specs.macros.app_id}-{role}-{specs.macros.replica_id}")
    return "--output", [f"{stem}.out", "--error", f"{stem}.err", _python(launch), *args]


def sbatch_output(launch: Launch) -> str:
    """Where the batch script's own output goes (sbatch's SBATCH_OUTPUT; '' : sbatch's own place)."""
    return str(Path(launch.slurm_logs) / SBATCH_OUTPUT_NAME) if launch.slurm_logs else ""


def _config_args(launch: Launch) -> List[str]:
    return ["--config", launch.config, "--config-b64", launch.embedded]


# Every role finds the lighthouse's host in the variable this names (torchx fills it in per scheduler).
HOST_ENV_ARGS = ["--host-env", specs.macros.rank0_env]


def _common_env(cfg: ExperimentConfig, launch: Launch) -> Dict[str, str]:
    """One identity per launch, in every role's environment (never its command line): the completion
    service refuses anyone without the token, torchft replica ids carry the run id. The token is in the
    AppDef only where the roles do not inherit the client's environment (see TOKEN_INHERITED)."""
    env = {"PYTHONUNBUFFERED": "1", FRESH_ENV: "1" if launch.fresh else "0", RUN_ID_ENV: launch.run_id}
    if not token_inherited(launch.scheduler):
        env[RUN_TOKEN_ENV] = DRY_RUN_TOKEN if launch.dry_run else launch.token
    if launch.local:  # the roles are this process's children: each checks it still is before arming
        env[PARENT_PID_ENV] = str(os.getpid())
    return env


def _lighthouse_role(cfg: ExperimentConfig, launch: Launch, env: Dict[str, str]) -> specs.Role:
    lh = cfg.lighthouse
    # A container keeps no files after it ends: print summary.json to the lighthouse's log too.
    print_summary = ["--print-summary"] if launch.image else []
    entrypoint, args = _command(launch, "lighthouse",
                                ["-m", "localsgd_ft.lighthouse", *_config_args(launch), *HOST_ENV_ARGS, *print_summary])
    return specs.Role(
        name="lighthouse",
        image=launch.image,
        entrypoint=entrypoint,
        args=args,
        env=dict(env),
        resource=specs.resource(cpu=lh.cpus, gpu=0, memMB=lh.memory_mb),
        port_map={"lighthouse": lh.port, "completion": lh.completion_port},
        max_retries=0,
    )


def _replica_role(cfg: ExperimentConfig, launch: Launch, common: Dict[str, str], group: int) -> specs.Role:
    rg = cfg.replica_groups
    name = f"replica_{group}"
    entrypoint, args = _command(launch, name, [
        "-m", "localsgd_ft.replica", *_config_args(launch), "--group", str(group), "--script", launch.script,
        *HOST_ENV_ARGS, *_node_args(cfg, launch, group)])
    return specs.Role(
        name=name,
        image=launch.image,
        entrypoint=entrypoint,
        args=args,
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
