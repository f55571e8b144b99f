"""A grid of experiments from one YAML: each point its own ``torchx run``, then a comparison of them all.

    python -m localsgd_ft.sweep configs/smoke.yaml --grid localsgd.sync_every=10,50,100 \\
        --grid localsgd.recovery=sync,async  train.max_steps=400

Every combination of the ``--grid`` values is one point; trailing
``dotted.key=value`` arguments apply to every point. Each point runs as
``torchx run -- --config CONFIG <overrides>`` (the same component, so the
same validation, lifecycle and outputs as a single run), one after another,
into ``SWEEP_DIR/<point>/`` (``--out``, default ``outputs/sweeps/<config
name>``), named after its point. Grid values are parsed as YAML and split at
commas (a value cannot hold a comma); two values of one key that YAML reads
as the same (``10`` and ``1_0``) are refused.

- Point names: ``<name>-<key><value>-...`` with the last part of each key.
  Where that is not the values' own text (characters a name cannot hold,
  such as ``.`` or ``/``, become ``_``) or longer than a name may be, a hash
  of the exact values follows, so distinct points never share a directory
  (``120.5`` and ``120_5`` give ``...120_5-<hash>`` and ``...120_5``); any
  clash left is refused before anything runs.

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
  ``python -m localsgd_ft.compare``). Running a detached sweep again submits
  only the points it has not submitted yet (``--resubmit``: those too).
- A point's verdict is its ``summary.json`` (torchx's own state says FAILED
  whenever a replica role was SIGKILLed, even if the run finished without it).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from localsgd_ft.config import ConfigError, load_config, load_yaml, to_dict
from localsgd_ft.config.errors import shown
from localsgd_ft.config.limits import NAME_MAX
from localsgd_ft.contract import Summary
from localsgd_ft.results.compare import compare, flatten
from localsgd_ft.results.report import ReportError
from localsgd_ft.storage.atomic import write_json_atomic


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
        _refuse_repeats(item, parts)
        grid.append((key, parts))
    return grid


def _refuse_repeats(item: str, values: Sequence[str]) -> None:
    """Two texts of one grid key that YAML reads as one value would run the same point twice."""
    seen: Dict[str, str] = {}
    for text in values:
        value = load_yaml(text, f"--grid {shown(item)}: {shown(text)}", "the value is not valid YAML")  # bounded
        same = seen.setdefault(json.dumps(value, sort_keys=True, default=repr), text)
        if same != text:
            raise ConfigError(f"--grid {shown(item)}: {shown(same)} and {shown(text)} are the same value "
                              f"({shown(value)}) in YAML; give each value once")


_NAME_PART = re.compile(r"[A-Za-z0-9_]+")  # '-' separates the parts, so a value holding one is not its own text
_HASH_CHARS = 8


def point_name(base: str, point: Sequence[Tuple[str, str]]) -> str:
    """A run name that says its point, e.g. ``smoke-sync_every10-recoveryasync`` (letters, digits, - and _).

    Where the readable name loses something (a character it cannot hold) or would be too long for a name, a
    hash of the exact values follows it: two distinct points never get one name, or one output directory.
    """
    parts = [f"{key.split('.')[-1]}{value}" for key, value in point]
    readable = re.sub(r"[^A-Za-z0-9_-]", "_", "-".join([base, *(re.sub("-", "_", p) for p in parts)]))
    exact = all(_NAME_PART.fullmatch(value) for _, value in point)
    if exact and len(readable) <= NAME_MAX:
        return readable
    digest = hashlib.sha256(json.dumps([list(p) for p in point]).encode()).hexdigest()[:_HASH_CHARS]
    return f"{readable[: NAME_MAX - _HASH_CHARS - 1].rstrip('-_')}-{digest}"


def _refuse_shared_names(todo: Sequence[Dict[str, Any]]) -> None:
    """Two points in one directory: the second would resume from, or be skipped for, the first's run."""
    owner: Dict[str, Dict[str, Any]] = {}
    for p in todo:
        first = owner.setdefault(p["name"], p)
        if first is not p:
            raise ConfigError(f"points {first['point']} and {p['point']} would both be named {p['name']} (one "
                              "output directory); change one of the values")


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
    _refuse_shared_names(result)
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


def _verdict(run_dir: Path, since: float = 0.0) -> Optional[bool]:
    """Whether the run in ``run_dir`` SUCCEEDED per its summary.json (None: none written since ``since``).

    The summary is the run's verdict: torchx's own app state says FAILED when a replica role was
    SIGKILLed, even where the run finished without that group.
    """
    path = run_dir / "summary.json"
    try:
        if path.stat().st_mtime < since:
            return None
        return Summary.load(path).succeeded
    except (OSError, ValueError):
        return None


def _previous_submissions(out: Path) -> Dict[str, str]:
    """Points an earlier --detach sweep into ``out`` submitted: name -> app handle."""
    try:
        record = json.loads((out / "sweep.json").read_text())
    except (OSError, ValueError):
        return {}
    return {p["name"]: p.get("app_handle") or "?" for p in record.get("points", []) if p.get("status") == "SUBMITTED"}


def torchx_command(config: Path, overrides: Sequence[str], scheduler: str, scheduler_args: str,
                   detach: bool) -> List[str]:
    """The ``torchx run`` of one point: local runs wait by themselves; on a cluster wait (with its log)
    unless detached."""
    cmd = [str(Path(sys.executable).with_name("torchx")), "run", "-s", scheduler]
    if scheduler_args:
        cmd += ["-cfg", scheduler_args]
    if scheduler != "local_cwd" and not detach:
        cmd += ["--wait", "--log"]
    return cmd + ["--", "--config", str(config), *overrides]


def _torchx(cmd: List[str]) -> Tuple[int, str]:
    """Run one point; its output streams to ours. Returns the exit code and the app handle (if printed)."""
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
    except KeyboardInterrupt:
        # The terminal interrupted the point's torchx client too: let it stop its run and keep the
        # checkpoint (see localsgd_ft.launch.client_hooks), then stop the sweep.
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise


def run_sweep(config: Path, grid: List[Tuple[str, List[str]]], fixed: Sequence[str], out: Path,
              scheduler: str = "local_cwd", scheduler_args: str = "", detach: bool = False,
              resubmit: bool = False) -> int:
    todo = points(config, grid, fixed, out)
    check_not_reused(todo, config)
    submitted = {} if resubmit else _previous_submissions(out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"config": str(config), "grid": {k: v for k, v in grid}, "overrides": list(fixed), "points": todo}
    failed = 0
    for i, p in enumerate(todo, 1):
        run_dir = Path(p["output_dir"])
        if _verdict(run_dir):
            p.update(status="SUCCEEDED", exit_code=0, skipped=True)
            print(f"sweep: point {i}/{len(todo)} {p['name']}: already SUCCEEDED in {run_dir}; skipped", flush=True)
            continue
        if p["name"] in submitted:
            # Submitting again would start a second job into the same directory, checkpoints and port.
            p.update(status="SUBMITTED", app_handle=submitted[p["name"]], skipped=True)
            print(f"sweep: point {i}/{len(todo)} {p['name']}: submitted earlier ({submitted[p['name']]}) and not "
                  "finished; not submitted again (--resubmit to do so once it has ended)", flush=True)
            continue
        print(f"sweep: point {i}/{len(todo)} {p['name']}: {' '.join(p['overrides'])}", flush=True)
        launched = time.time()
        code, handle = _torchx(torchx_command(config, p["overrides"], scheduler, scheduler_args, detach))
        verdict = None if detach else _verdict(run_dir, since=launched)
        ok = code == 0 if verdict is None else verdict
        status = "SUBMITTED" if detach and code == 0 else "SUCCEEDED" if ok else "FAILED"
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
    parser.add_argument("--resubmit", action="store_true",
                        help="submit again points an earlier --detach sweep submitted and that have not finished")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the options
    if args.detach and args.scheduler == "local_cwd":
        parser.error("--detach needs a cluster scheduler (-s slurm, -s kubernetes): local runs end with the sweep")
    try:
        grid = parse_grid(args.grid)
        if not grid:
            raise ConfigError("no --grid given: name at least one swept key, e.g. --grid localsgd.sync_every=10,50")
        name = load_config(args.config, overrides=args.overrides).name
        out = args.out or Path("outputs") / "sweeps" / name
        return run_sweep(args.config, grid, args.overrides, out, args.scheduler, args.scheduler_args, args.detach,
                         args.resubmit)
    except (ConfigError, ReportError) as e:
        print(f"sweep: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
