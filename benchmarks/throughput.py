"""Throughput benchmark: where the time of a training step goes, measured side by side in one run.

    python benchmarks/throughput.py            # a few minutes on a 2-core CPU machine
    python benchmarks/throughput.py --quick    # smaller, for a smoke check
    python benchmarks/throughput.py --workers  # only method 6 (about 2 minutes)

Measures, with the same model, batch size and one intra-op thread per process:

1. pure compute: forward + backward + optimizer step on pre-made batches (the upper bound);
2. the project's training loop for one group, torchft off (batches from ``ShardedBatches``:
   gather, batched crop/flip, normalise, then the same ``backward`` + ``optimizer.step``);
   2b. two such loops in two processes at once: what this machine gives two busy
   processes before any torchft (its cores share caches and memory bandwidth);
3. the common torchvision pipeline: PIL transforms in 2 DataLoader worker processes;
4. two replica groups under LocalSGD, launched with the real ``torchx run``, at
   sync_every 1, 10 and 100 (per-group and aggregate samples/s);
5. peak RSS per worker process (from the runs' summary.json);
6. groups of 2 workers (DDP inside each group) against groups of 1, 2 groups,
   sync_every 10, the same batch per worker, run one after the other: the
   group's samples/s of 2 x 2 over 2 x 1 (``workers_ratio``; 2.0 would be
   perfect scaling where every worker has a core of its own).

Methods 1 and 2 alternate over several rounds and the median is kept, so
machine noise hits both alike. Prints a table, then one JSON line with
``loop_efficiency`` (2/1), ``ft_overhead_ratio`` (4 per group / 2, by
sync_every), ``scaling_efficiency`` (4 aggregate / twice 2), ``torchvision_pipeline_ratio``
(3/1), ``peak_rss_gb``, and, to tell torchft's cost from the machine's,
``two_loops_ratio`` (2b per process / 2) and ``ft_overhead_vs_two_loops`` (4 per group / 2b).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import free_port_pair, torchx_run  # noqa: E402
from localsgd_ft.config import DataConfig, ModelConfig, OptimizerConfig  # noqa: E402
from localsgd_ft.storage.fixture import write_fixture  # noqa: E402
from localsgd_ft.training.data import MEAN, STD, ShardedBatches, load_cifar10  # noqa: E402
from localsgd_ft.training.model import build_model  # noqa: E402
from localsgd_ft.training.optim import build_optimizer  # noqa: E402
from localsgd_ft.training.trainer import backward  # noqa: E402


def _timed(step: Callable[[int], None], steps: int, warmup: int) -> float:
    """Seconds per step over ``steps`` steps, after ``warmup`` untimed ones."""
    for s in range(warmup):
        step(s)
    t0 = time.perf_counter()
    for s in range(warmup, warmup + steps):
        step(s)
    return (time.perf_counter() - t0) / steps


def _loop_worker(data_root: str, batch_size: int, width: int, steps: int) -> None:
    """``--loop-worker``: one process of method 2b; prints its seconds per step."""
    torch.set_num_threads(1)
    train, _ = load_cifar10(DataConfig(root=data_root, verify=False), torch.device("cpu"))
    print(json.dumps(project_loop(ShardedBatches(train, 0, 1, batch_size, seed=0, augment=True), width, steps)))


def two_loops(data_root: Path, batch_size: int, width: int, steps: int) -> float:
    """Seconds per step of each of two project loops running at the same time (mean of both)."""
    cmd = [sys.executable, __file__, "--loop-worker", str(data_root), "--batch-size", str(batch_size),
           "--width", str(width), "--steps", str(steps)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    return statistics.mean(float(p.communicate(timeout=600)[0].strip().splitlines()[-1]) for p in procs)


def _model(width: int):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="cnn", width=width))
    return model, build_optimizer(OptimizerConfig(lr=0.02), model.parameters())


def pure_compute(batches: ShardedBatches, width: int, steps: int) -> float:
    model, opt = _model(width)
    premade = [batches.batch(s) for s in range(8)]

    def step(s: int) -> None:
        x, y = premade[s % len(premade)]
        backward(model, opt, x, y, False)
        opt.step()

    return _timed(step, steps, warmup=5)


def project_loop(batches: ShardedBatches, width: int, steps: int) -> float:
    model, opt = _model(width)

    def step(s: int) -> None:
        x, y = batches.batch(s)
        backward(model, opt, x, y, False)
        opt.step()

    return _timed(step, steps, warmup=5)


class _PILDataset(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        from torchvision import transforms

        self.images = images.permute(0, 2, 3, 1).numpy()  # HWC uint8, as PIL wants
        self.labels = labels.tolist()
        self.tf = transforms.Compose([
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.tf(Image.fromarray(self.images[i])), self.labels[i]


def torchvision_pipeline(images: torch.Tensor, labels: torch.Tensor, batch_size: int, width: int,
                         steps: int) -> float:
    model, opt = _model(width)
    loader = torch.utils.data.DataLoader(_PILDataset(images, labels), batch_size=batch_size, shuffle=True,
                                         num_workers=2, persistent_workers=True, drop_last=True)

    def batches():
        while True:
            yield from loader

    it = batches()

    def step(_: int) -> None:
        x, y = next(it)
        backward(model, opt, x, y, False)
        opt.step()

    return _timed(step, steps, warmup=5)  # the worker processes end with the loader


def localsgd_run(tmp: Path, data_root: Path, sync_every: int, steps: int, batch_size: int, width: int,
                 workers: int = 1) -> dict:
    """A real 2-group ``torchx run`` of ``workers`` workers per group; returns its summary.json."""
    name = f"sync{sync_every}" + (f"w{workers}" if workers > 1 else "")
    out = tmp / name
    cfg = {
        "name": f"bench{name}",
        "output_dir": str(out),
        "replica_groups": {"count": 2, "max_restarts": 0, "cpus": workers, "workers": workers},
        "localsgd": {"sync_every": sync_every, "timeout_s": 30, "quorum_timeout_s": 60},
        "lighthouse": {"port": free_port_pair(), "join_timeout_ms": 10000},
        "data": {"root": str(data_root), "verify": False, "batch_size": batch_size},
        "model": {"arch": "cnn", "width": width},
        "optimizer": {"lr": 0.02},
        "train": {"max_steps": steps, "eval_every": 0, "log_every": 10_000},
        "checkpoint": {"enabled": False},
    }
    summary = torchx_run(tmp, name, cfg)
    if not summary["succeeded"]:
        raise RuntimeError(f"torchx run failed for sync_every={sync_every}: {summary['failure_reason']}")
    return summary


def workers_row(tmp: Path, data_root: Path, steps: int, batch_size: int, width: int) -> dict:
    """Method 6: the group's samples/s with 2 workers per group over 1, and both rates."""
    rates = {}
    for workers in (1, 2):
        summary = localsgd_run(tmp, data_root, 10, steps, batch_size, width, workers=workers)
        rates[workers] = statistics.mean(g["samples_per_s"] for g in summary["replica_groups"].values())
    return {"group_samples_per_s": {"2x1": round(rates[1]), "2x2": round(rates[2])},
            "workers_ratio": round(rates[2] / rates[1], 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and rounds (a smoke check)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--workers", action="store_true", help="only method 6: 2 x 2 workers against 2 x 1")
    parser.add_argument("--loop-worker", metavar="DATA_ROOT", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loop_worker:
        _loop_worker(args.loop_worker, args.batch_size, args.width, args.steps)
        return 0
    steps, rounds, ft_steps = (20, 2, 200) if args.quick else (40, 5, 500)
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="bench-") as tmpdir:
        tmp = Path(tmpdir)
        write_fixture(tmp / "data", train_per_batch=2000, test_size=500)
        if args.workers:
            result = workers_row(tmp, tmp / "data", ft_steps, args.batch_size, args.width)
            print(f"6. 2 groups x 2 workers vs 2 x 1, sync_every 10, batch {args.batch_size} per worker: group "
                  f"samples/s {result['group_samples_per_s']['2x2']} vs {result['group_samples_per_s']['2x1']}")
            print(json.dumps(result))
            return 0
        train, _ = load_cifar10(DataConfig(root=str(tmp / "data"), verify=False), torch.device("cpu"))
        batches = ShardedBatches(train, 0, 1, args.batch_size, seed=0, augment=True)

        compute, loop = [], []
        for _ in range(rounds):  # alternate, so noise hits both
            compute.append(pure_compute(batches, args.width, steps))
            loop.append(project_loop(batches, args.width, steps))
        t_compute, t_loop = statistics.median(compute), statistics.median(loop)
        t_two = two_loops(tmp / "data", args.batch_size, args.width, 3 * steps)
        t_tv = torchvision_pipeline(train.images, train.labels, args.batch_size, args.width, steps)

        runs = {k: localsgd_run(tmp, tmp / "data", k, ft_steps, args.batch_size, args.width) for k in (1, 10, 100)}
        workers = workers_row(tmp, tmp / "data", ft_steps, args.batch_size, args.width)

    sps = lambda t: args.batch_size / t  # noqa: E731
    rows: List[tuple] = [
        ("1. pure compute (pre-made batches)", sps(t_compute), 1.0),
        ("2. project loop, 1 group, torchft off", sps(t_loop), t_compute / t_loop),
        ("2b. two project loops at once: per process", sps(t_two), t_compute / t_two),
        ("3. torchvision PIL + DataLoader(2 workers)", sps(t_tv), t_compute / t_tv),
    ]
    ft_overhead: Dict[str, float] = {}
    ft_vs_two: Dict[str, float] = {}
    scaling: Dict[str, float] = {}
    rss = []
    for k, summary in runs.items():
        groups = list(summary["replica_groups"].values())
        per_group = statistics.mean(g["samples_per_s"] for g in groups)
        aggregate = sum(g["samples_per_s"] for g in groups)
        ft_overhead[str(k)] = round(per_group / sps(t_loop), 3)
        ft_vs_two[str(k)] = round(per_group / sps(t_two), 3)
        scaling[str(k)] = round(aggregate / (2 * sps(t_loop)), 3)
        rss += [g["peak_rss_mb"] for g in groups]
        rows.append((f"4. LocalSGD 2 groups, sync_every={k}: per group", per_group, per_group / sps(t_compute)))
        rows.append((f"   aggregate of 2 groups (vs 2x loop: {scaling[str(k)]:.3f})", aggregate, None))
    rows.append(("6. 2 groups x 2 workers, sync_every=10: per group", workers["group_samples_per_s"]["2x2"], None))
    rows.append((f"   vs 2 groups x 1 worker: {workers['workers_ratio']:.3f}", workers["group_samples_per_s"]["2x1"],
                 None))

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
          f"batch {args.batch_size}, cnn width {args.width}, 1 thread per process")
    print(f"{'method':<58} {'samples/s':>10} {'vs compute':>10}")
    for name, value, ratio in rows:
        print(f"{name:<58} {value:>10.0f} {'' if ratio is None else f'{ratio:.3f}':>10}")
    print(f"peak RSS per worker: {max(rss) / 1024:.2f} GB")
    result = {
        "loop_efficiency": round(t_compute / t_loop, 3),
        "ft_overhead_ratio": ft_overhead,
        "scaling_efficiency": scaling,
        "torchvision_pipeline_ratio": round(t_compute / t_tv, 3),
        "two_loops_ratio": round(t_loop / t_two, 3),
        "ft_overhead_vs_two_loops": ft_vs_two,
        "peak_rss_gb": round(max(rss) / 1024, 3),
        "workers_ratio": workers["workers_ratio"],
        "samples_per_s": {"compute": round(sps(t_compute)), "loop": round(sps(t_loop)),
                          "two_loops_per_process": round(sps(t_two)), "torchvision": round(sps(t_tv))},
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
