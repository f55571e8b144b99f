"""What the benchmarks share: one run's copy of a config dict, and a real ``torchx run`` of it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from localsgd_ft.launch.addresses import free_port_pair  # noqa: F401  (re-exported for the benchmarks)

REPO = Path(__file__).resolve().parent.parent


def run_config(base: dict, name: str, out: Path, data: Path) -> dict:
    """A copy of the config dict ``base`` for one run: its name, output directory, data and a free port."""
    cfg = json.loads(json.dumps(base))
    cfg.update(name=name, output_dir=str(out))
    cfg["data"]["root"] = str(data)
    cfg["lighthouse"]["port"] = free_port_pair()
    return cfg


def torchx_run(tmp: Path, name: str, cfg: dict, timeout_s: float = 900) -> dict:
    """Write ``cfg`` to ``tmp/name.yaml``, run it with the real ``torchx run``, return its summary.json."""
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    torchx = str(Path(sys.executable).with_name("torchx"))
    proc = subprocess.run([torchx, "run", "--", "--config", str(path)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout_s, start_new_session=True)
    summary_path = Path(cfg["output_dir"]) / "summary.json"
    if proc.returncode != 0 and not summary_path.is_file():
        raise RuntimeError(f"torchx run failed for {name}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(summary_path.read_text())
