"""Which NVIDIA GPUs this machine (or container) has, without torch and without needing nvidia-smi.

Used twice, so a config that asks for GPUs where there are none fails before
anything trains: by the component for explicit ``replica_groups.gpus`` lists
(device indices of the machine you launch from), and by every replica role
before it starts torchrun (the machine the scheduler picked).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import List, Mapping, Optional

from localsgd_ft.config import ExperimentConfig


def physical_gpus() -> int:
    """Number of NVIDIA GPUs present here; 0 when there are none or no driver."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
            if out.returncode == 0:
                return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))
        except (OSError, subprocess.SubprocessError):
            pass  # a broken nvidia-smi: fall back to the device files
    # Containers get only their allocated /dev/nvidiaN nodes, so prefer them over /proc.
    devices = [p for p in Path("/dev").glob("nvidia*") if re.fullmatch(r"nvidia\d+", p.name)]
    if devices:
        return len(devices)
    proc = Path("/proc/driver/nvidia/gpus")
    return len(list(proc.iterdir())) if proc.is_dir() else 0


def visible_gpus(env: Mapping[str, str], present: Optional[int] = None) -> int:
    """How many GPUs CUDA would show a process with ``env`` (CUDA_VISIBLE_DEVICES semantics)."""
    n = physical_gpus() if present is None else present
    if "CUDA_VISIBLE_DEVICES" not in env:
        return n
    count = 0
    for entry in (e.strip() for e in env["CUDA_VISIBLE_DEVICES"].split(",")):
        if not entry:
            break
        if entry.isdigit():
            if int(entry) >= n:
                break  # CUDA stops at the first invalid index
        elif n == 0:  # a UUID or MIG name needs a GPU to point at
            break
        count += 1
    return count


def check_local_lists(cfg: ExperimentConfig, present: Optional[int] = None) -> Optional[str]:
    """Why explicit ``replica_groups.gpus`` indices cannot be used on this machine, or None."""
    wanted: List[int] = sorted({i for g in cfg.group_gpus for i in g})
    if not wanted:
        return None
    n = physical_gpus() if present is None else present
    missing = [i for i in wanted if i >= n]
    if not missing:
        return None
    have = "no NVIDIA GPU" if n == 0 else f"{n} GPU(s) (indices 0..{n - 1})"
    return (f"replica_groups.gpus asks for GPU(s) {missing}, but this machine has {have}; "
            "set replica_groups.gpus: [] to train on CPU, or on a cluster use "
            "replica_groups.gpus_per_group and let the scheduler pick the devices")


def check_role(cfg: ExperimentConfig, group: int, env: Mapping[str, str] = os.environ,
               present: Optional[int] = None) -> Optional[str]:
    """Why replica group ``group`` cannot train here (too few visible GPUs), or None."""
    need = cfg.gpus_per_group
    if not need:
        return None
    have = visible_gpus(env, present)
    if have >= need:
        return None
    where = f"CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']!r}" if "CUDA_VISIBLE_DEVICES" in env else "no CUDA_VISIBLE_DEVICES"
    return (f"replica group {group} needs {need} GPU(s) but sees {have} on {os.uname().nodename} ({where}); "
            "run on a machine with GPUs (the scheduler must grant them) or set replica_groups.gpus: [] "
            "and replica_groups.gpus_per_group: 0 to train on CPU")
