"""torchx component: an experiment YAML -> AppDef (a lighthouse role + one role per replica group).

It reads the config, runs the checks before a launch (localsgd_ft.launch.preflight),
arms the client's exit hooks on local runs, and returns the plan
(localsgd_ft.launch.appdef).

The same AppDef runs on local_cwd, Slurm and Kubernetes (see
docs/clusters.md). Every role gets the YAML's text embedded (base64, in
``--config-b64``), so no role needs the file: pods on Kubernetes share no
filesystem with the machine that ran ``torchx run``. Where the roles inherit
this process's environment (local_cwd, Slurm), the run token is handed to them
through it, and on Slurm the directory for the job's output files is made here
and named on the console.
"""

import atexit
import os
import sys
import time
from pathlib import Path
from typing import Dict, List

import torchx.specs as specs
from torchx.specs.finder import ComponentValidationException

from localsgd_ft.config import ConfigError, embed_config, load_config
from localsgd_ft.launch import appdef, lifecycle, preflight
from localsgd_ft.launch.client_hooks import (is_dry_run, is_local_launch, say_how_to_resume, scheduler_from_argv,
                                             watch_for_interrupt)


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
        fresh: start over instead of resuming from the newest checkpoint (old ones are set aside, never deleted)
    """
    scheduler = scheduler_from_argv(sys.argv)
    try:
        cfg = load_config(config, overrides=overrides)
        embedded = embed_config(config, overrides)
        preflight.check(cfg, config, image=image, fresh=fresh, argv=sys.argv)
        problem = appdef.sbatch_export_problem(os.environ) if scheduler == "slurm" else None
        if problem:
            raise ConfigError(problem)
    except ConfigError as e:
        # torchx prints this one message and exits 1 (a plain exception would print a traceback).
        raise ComponentValidationException(str(e)) from None
    for note in cfg.advice():
        print(f"localsgd: warning: {note}", file=sys.stderr, flush=True)
    local = is_local_launch(sys.argv)
    if local:
        watch_for_interrupt()
        atexit.register(say_how_to_resume, cfg, time.time(), fresh)
    dry_run = is_dry_run(sys.argv)
    launch = appdef.Launch(
        config=config, embedded=embedded, image=image, script=script, fresh=fresh, local=local,
        rendezvous_ports=preflight.rendezvous_ports(cfg, scheduler), scheduler=scheduler,
        run_id=lifecycle.new_run_id(cfg.name), token=lifecycle.new_run_token(), dry_run=dry_run,
        slurm_logs=appdef.slurm_log_dir(cfg, scheduler, _scheduler_cfg(scheduler, sys.argv)))
    if appdef.token_inherited(scheduler):
        lifecycle.hand_token_to_children(launch.token)
    if launch.slurm_logs and not dry_run:
        _prepare_slurm_logs(launch)
    return appdef.build_app(cfg, launch)


def _scheduler_cfg(scheduler: str, argv: List[str]) -> Dict[str, object]:
    """The scheduler options this ``torchx run`` uses (its ``-cfg``, then .torchxconfig's), parsed as torchx does."""
    if not scheduler:
        return {}
    from torchx.runner import config as torchx_config
    from torchx.schedulers import get_scheduler_factories

    args = argv[: argv.index("--")] if "--" in argv else argv
    text = ""
    for i, a in enumerate(args):
        if a in ("-cfg", "--scheduler_args") and i + 1 < len(args):
            text = args[i + 1]
        elif a.startswith(("-cfg=", "--scheduler_args=")):
            text = a.split("=", 1)[1]
    try:
        cfg = get_scheduler_factories()[scheduler]("localsgd").run_opts().cfg_from_str(text)
    except (KeyError, ValueError):
        return {}  # torchx itself refuses these, with its own message
    torchx_config.apply(scheduler=scheduler, cfg=cfg)
    return cfg


def _prepare_slurm_logs(launch: "appdef.Launch") -> None:
    """Make the run's Slurm directory (srun and sbatch do not), send the batch script's output there too
    (unless SBATCH_OUTPUT says otherwise), and say where the files go."""
    Path(launch.slurm_logs).mkdir(parents=True, exist_ok=True)
    ours = appdef.sbatch_output(launch)
    batch = os.environ.setdefault("SBATCH_OUTPUT", ours)
    batch = batch.replace("%j", "<job id>") if batch == ours else batch
    print(f"localsgd: Slurm writes each role's output to {launch.slurm_logs}/slurm-<job id>-<role>-<node>.out and "
          f".err, the batch script's to {batch}", file=sys.stderr, flush=True)
