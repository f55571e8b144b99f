"""A grid of experiments from one YAML: each point its own ``torchx run``, then a comparison of them all.

    python -m localsgd_ft.sweep configs/smoke.yaml --grid localsgd.sync_every=10,50,100 \\
        --grid localsgd.recovery=sync,async  train.max_steps=400

Every combination of the ``--grid`` values is one point; trailing
``dotted.key=value`` arguments apply to every point. Each point runs as
``torchx run -- --config CONFIG <overrides>`` (the same component, so the
same validation, lifecycle and outputs as a single run), one after another,
into ``SWEEP_DIR/<point>/`` (``--out``, default ``outputs/sweeps/<config
name>``), named after its point. Grid values are parsed as YAML and split at
commas (a value cannot hold a comma).

- Progress: each point's line (``point i/n``) and its run's own output.
- A failed point is recorded and the sweep goes on; the exit code is 1 if any
  point failed.
- Resumable: running the same sweep again skips every point whose
  ``summary.json`` says SUCCEEDED; the others run (or resume from their
  checkpoints) again. A point's directory holding a run of another config
  (other fixed overrides, an edited YAML) is refused before anything runs.
- ``SWEEP_DIR/sweep.json`` records every point: its overrides, output
  directory, status and exit code.
- At the end ``localsgd_ft.compare`` compares the points that finished into
  ``SWEEP_DIR/compare/``.
- ``-s slurm`` (or another scheduler, with ``--scheduler-args``) submits each
  point and waits for it (``torchx run --wait``); with ``--detach`` it only
  submits them all and records their app handles (compare them later with
  ``python -m localsgd_ft.compare``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from .compare import compare, flatten
from .config import ConfigError, load_config, to_dict
from .files import write_json_atomic


def parse_grid(items: Sequence[str]) -> List[Tuple[str, List[str]]]:
    """``["a.b=1,2", ...]`` -> ``[("a.b", ["1", "2"]), ...]``; values stay text (the config parses them)."""
    grid = []
    for item in items:
        key, sep, values = item.partition("=")
        parts = [v.strip() for v in values.split(",")]
        if not sep or not key or not all(parts):
            raise ConfigError(f"--grid {item!r}: expected dotted.key=value1,value2,... "
                              "(e.g. localsgd.sync_every=10,50,100)")
        if key in [k for k, _ in grid]:
            raise ConfigError(f"--grid {item!r}: {key} is already swept; give all its values in one --grid")
        grid.append((key, parts))
    return grid


def point_name(base: str, point: Sequence[Tuple[str, str]]) -> str:
    """A run name that says its point, e.g. ``smoke-sync_every10-recoveryasync`` (letters, digits, - and _)."""
    parts = [base] + [f"{key.split('.')[-1]}{value}" for key, value in point]
    return re.sub(r"[^A-Za-z0-9_-]", "_", "-".join(parts))


def points(config: Path, grid: List[Tuple[str, List[str]]], fixed: Sequence[str],
           out: Path) -> List[Dict[str, Any]]:
    """Every point of the grid with its overrides, each checked against the schema before anything runs."""
    base = load_config(config, overrides=fixed)
    result = []
    for combo in itertools.product(*[[(k, v) for v in values] for k, values in grid]):
        name = point_name(base.name, combo)
        run_dir = (out / name).resolve()
        overrides = [*fixed, *(f"{k}={v}" for k, v in combo), f"name={name}", f"output_dir={run_dir}"]
        load_config(config, overrides=overrides)  # a bad value fails the sweep now, not after hours
        result.append({"name": name, "point": dict(combo), "overrides": overrides, "output_dir": str(run_dir)})
    return result


def _recorded_config(run_dir: Path) -> Optional[dict]:
    """The resolved config a run in ``run_dir`` recorded (None: no run there yet)."""
    try:
        recorded = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    return recorded if isinstance(recorded, dict) else None


def check_not_reused(todo: Sequence[Dict[str, Any]], config: Path) -> None:
    """Refuse to run a point into a directory that holds a run of another config (it would resume from or
    be skipped for a different experiment)."""
    for p in todo:
        recorded = _recorded_config(Path(p["output_dir"]))
        if recorded is None:
            continue
        was, wanted = flatten(recorded), flatten(to_dict(load_config(config, overrides=p["overrides"])))
        differ = sorted(k for k in set(was) | set(wanted) if was.get(k) != wanted.get(k))
        if differ:
            raise ConfigError(
                f"point {p['name']}: {p['output_dir']} holds a run of another config (it differs in "
                f"{', '.join(differ[:5])}{', ...' if len(differ) > 5 else ''}); sweep into another --out, or move "
                "that directory away")


def _succeeded(run_dir: Path) -> bool:
    try:
        return bool(json.loads((run_dir / "summary.json").read_text()).get("succeeded"))
    except (OSError, ValueError):
        return False


def _torchx(config: Path, overrides: Sequence[str], scheduler: str, scheduler_args: str,
            detach: bool) -> Tuple[int, str]:
    """Run one point; its output streams to ours. Returns the exit code and the app handle (if printed)."""
    torchx = str(Path(sys.executable).with_name("torchx"))
    cmd = [torchx, "run", "-s", scheduler]
    if scheduler_args:
        cmd += ["-cfg", scheduler_args]
    if scheduler != "local_cwd" and not detach:
        cmd.append("--wait")
    cmd += ["--", "--config", str(config), *overrides]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    handle = ""
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            m = re.search(r"\b([a-z_]+://\S*/\S+)", line)
            if m and not handle:
                handle = m.group(1)
        return proc.wait(), handle
    except BaseException:
        proc.kill()  # Ctrl-C: the point's own client passes it on to its run (see localsgd_ft.client)
        proc.wait()
        raise


def run_sweep(config: Path, grid: List[Tuple[str, List[str]]], fixed: Sequence[str], out: Path,
              scheduler: str = "local_cwd", scheduler_args: str = "", detach: bool = False) -> int:
    todo = points(config, grid, fixed, out)
    check_not_reused(todo, config)
    out.mkdir(parents=True, exist_ok=True)
    record = {"config": str(config), "grid": {k: v for k, v in grid}, "overrides": list(fixed), "points": todo}
    failed = 0
    for i, p in enumerate(todo, 1):
        run_dir = Path(p["output_dir"])
        if _succeeded(run_dir):
            p.update(status="SUCCEEDED", exit_code=0, skipped=True)
            print(f"sweep: point {i}/{len(todo)} {p['name']}: already SUCCEEDED in {run_dir}; skipped", flush=True)
            continue
        print(f"sweep: point {i}/{len(todo)} {p['name']}: {' '.join(p['overrides'])}", flush=True)
        code, handle = _torchx(config, p["overrides"], scheduler, scheduler_args, detach)
        status = "SUBMITTED" if detach and code == 0 else "SUCCEEDED" if code == 0 else "FAILED"
        p.update(status=status, exit_code=code, skipped=False, app_handle=handle or None)
        failed += status == "FAILED"
        print(f"sweep: point {i}/{len(todo)} {p['name']}: {status} (exit {code})", flush=True)
        write_json_atomic(out / "sweep.json", record)
    write_json_atomic(out / "sweep.json", record)
    print(f"sweep: {len(todo) - failed} of {len(todo)} points {'submitted' if detach else 'succeeded'}; "
          f"record: {out / 'sweep.json'}", flush=True)
    finished = [Path(p["output_dir"]) for p in todo if (Path(p["output_dir"]) / "summary.json").is_file()]
    if finished and not detach:
        table, files = compare(finished, out / "compare")
        print(table)
        print(f"sweep: comparison: {out / 'compare'} ({', '.join(f.name for f in files)})", flush=True)
    return 1 if failed else 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m localsgd_ft.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path, help="the experiment YAML every point starts from")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value settings for every point")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...", help="a swept key")
    parser.add_argument("--out", type=Path, default=None, help="the sweep directory (default outputs/sweeps/<name>)")
    parser.add_argument("-s", "--scheduler", default="local_cwd", help="torchx scheduler (default local_cwd)")
    parser.add_argument("--scheduler-args", default="", help="torchx -cfg for the scheduler")
    parser.add_argument("--detach", action="store_true", help="submit every point and exit (not on local_cwd)")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the options
    if args.detach and args.scheduler == "local_cwd":
        parser.error("--detach needs a cluster scheduler (-s slurm, -s kubernetes): local runs end with the sweep")
    try:
        grid = parse_grid(args.grid)
        if not grid:
            raise ConfigError("no --grid given: name at least one swept key, e.g. --grid localsgd.sync_every=10,50")
        name = load_config(args.config, overrides=args.overrides).name
        out = args.out or Path("outputs") / "sweeps" / name
        return run_sweep(args.config, grid, args.overrides, out, args.scheduler, args.scheduler_args, args.detach)
    except ConfigError as e:
        print(f"sweep: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
