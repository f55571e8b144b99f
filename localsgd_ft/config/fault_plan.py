"""The failures a run injects, resolved from its ``faults`` section: who, what, when, drawn once and reproducibly."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, List

if TYPE_CHECKING:
    from localsgd_ft.config.experiment import ExperimentConfig

RANDOM_DURATION_S = 3.0  # how long a randomly drawn hang or lighthouse outage lasts


@dataclass
class Fault:
    """One planned failure, resolved from the config: who, what, when."""

    id: int
    kind: str
    group: int  # -1 for the lighthouse
    at_step: int
    duration_s: float
    moment: str = "step"
    worker: int = 0  # rank inside the group (0 for the lighthouse)


def plan_faults(cfg: ExperimentConfig) -> List[Fault]:
    """Every failure ``cfg`` injects, in step order (empty unless faults.enabled)."""
    f = cfg.faults
    if not f.enabled:
        return []
    rng = random.Random(f.seed)
    count, workers = cfg.replica_groups.count, cfg.group_size
    planned = [(x.kind, x.group, x.at_step, x.duration_s, x.moment, x.worker) for x in f.schedule]
    step = 0
    for _ in range(f.max_random if f.mtbf_steps else 0):
        step += max(1, round(rng.expovariate(1 / f.mtbf_steps)))
        if step >= cfg.train.max_steps:
            break
        planned.append((rng.choice(f.random_kinds), -1, step, RANDOM_DURATION_S, "step", -1))
    plan = []
    for i, (kind, group, at_step, duration, moment, worker) in enumerate(sorted(planned, key=lambda p: p[2])):
        if kind == "lighthouse":
            group, worker = -1, 0
        else:
            if group < 0:
                group = rng.randrange(count)
            if worker < 0:  # one worker draws nothing, so such plans stay what they were
                worker = rng.randrange(workers) if workers > 1 else 0
        plan.append(Fault(i, kind, group, at_step, duration, moment, worker))
    return plan
