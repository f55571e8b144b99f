"""torchx component: an experiment YAML -> AppDef (a lighthouse role + one role per replica group).

It reads the config, runs the checks before a launch (localsgd_ft.launch.preflight),
arms the client's exit hooks on local runs, and returns the plan
(localsgd_ft.launch.appdef).

The same AppDef runs on local_cwd, Slurm and Kubernetes (see
docs/clusters.md). Every role gets the YAML's text embedded (base64, in
``--config-b64``), so no role needs the file: pods on Kubernetes share no
filesystem with the machine that ran ``torchx run``.
"""

import atexit
import sys
import time

import torchx.specs as specs
from torchx.specs.finder import ComponentValidationException

from localsgd_ft.config import ConfigError, embed_config, load_config
from localsgd_ft.launch import preflight
from localsgd_ft.launch.appdef import Launch, build_app
from localsgd_ft.launch.client_hooks import is_local_launch, say_how_to_resume, scheduler_from_argv, watch_for_interrupt


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
        preflight.check(cfg, config, image=image, fresh=fresh, argv=sys.argv)
    except ConfigError as e:
        # torchx prints this one message and exits 1 (a plain exception would print a traceback).
        raise ComponentValidationException(str(e)) from None
    local = is_local_launch(sys.argv)
    if local:
        watch_for_interrupt()
        atexit.register(say_how_to_resume, cfg, time.time(), fresh)
    scheduler = scheduler_from_argv(sys.argv)
    launch = Launch(config=config, embedded=embedded, image=image, script=script, fresh=fresh, local=local,
                    rendezvous_ports=preflight.rendezvous_ports(cfg, scheduler))
    return build_app(cfg, launch)
