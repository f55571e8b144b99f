"""Durable checkpoints on disk: atomic files, validation, fallback, pruning, compatibility, start-over."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import REPO, TORCHX, small_config, write_config

from localsgd_ft.config import ConfigError, parse_config
from localsgd_ft.storage import checkpoints as checkpoint


def _cfg(tmp_path, **over):
    raw = {"output_dir": str(tmp_path / "out"), "checkpoint": {"keep": 2}}
    for k, v in over.items():
        raw.setdefault(k, {}).update(v)
    return parse_config(raw)


def _save(cfg, step):
    payload = {"model": {"w": torch.full((3,), float(step))}, "optimizer": {}, "manager": {"step": step // 10},
               "step": step, "offset": 1}
    return checkpoint.save(cfg, payload, step, step // 10 + 1)


def _digests(directory: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_round_trip_and_pruning(tmp_path):
    cfg = _cfg(tmp_path)
    for step in (100, 200, 300):
        _save(cfg, step)
    valid = checkpoint.list_valid(cfg.checkpoint_dir)
    assert [f.step for f in valid] == [300, 200]  # keep: 2
    assert sorted(p.name for p in cfg.checkpoint_dir.iterdir()) == [
        "step_000000200.json", "step_000000200.pt", "step_000000300.json", "step_000000300.pt"]
    state = checkpoint.load(valid[0], "cpu")
    assert torch.equal(state["model"]["w"], torch.full((3,), 300.0)) and state["offset"] == 1
    assert valid[0].meta["config"]["checkpoint"]["keep"] == 2


def test_truncated_newest_falls_back_with_a_warning(tmp_path, capsys):
    cfg = _cfg(tmp_path)
    _save(cfg, 100)
    newest = _save(cfg, 200)
    newest.write_bytes(newest.read_bytes()[:50])
    found, how = checkpoint.resume_point(cfg, start_over=False)
    assert found.step == 100 and "step 100" in how
    out = capsys.readouterr().out
    assert "WARNING: skipping checkpoint" in out and "step_000000200.pt" in out
    assert newest.exists()  # reported, not deleted


def test_unreadable_metadata_is_skipped(tmp_path):
    cfg = _cfg(tmp_path)
    _save(cfg, 100)
    p = _save(cfg, 200)
    p.with_suffix(".json").write_text("{not json")
    assert checkpoint.latest(cfg.checkpoint_dir).step == 100


def test_no_checkpoint_or_off_or_fresh_starts_from_scratch(tmp_path):
    cfg = _cfg(tmp_path)
    assert checkpoint.resume_point(cfg, start_over=False)[0] is None
    _save(cfg, 100)
    assert checkpoint.resume_point(cfg, start_over=True)[0] is None
    off = _cfg(tmp_path, checkpoint={"enabled": False})
    assert checkpoint.resume_point(off, start_over=False)[0] is None


def test_compatible_changes_resume_incompatible_ones_are_refused(tmp_path):
    cfg = _cfg(tmp_path)
    _save(cfg, 100)
    longer = _cfg(tmp_path, train={"max_steps": 5000, "eval_every": 0}, lighthouse={"heartbeat_timeout_ms": 900})
    assert checkpoint.resume_point(longer, start_over=False)[0].step == 100
    wider = _cfg(tmp_path, model={"width": 64}, replica_groups={"count": 3})
    with pytest.raises(ConfigError) as e:
        checkpoint.resume_point(wider, start_over=False)
    msg = str(e.value)
    assert "model.width was 32, the config says 64" in msg and "replica_groups.count was 2" in msg
    assert "--fresh True" in msg


def test_a_checkpoint_older_than_a_key_resumes_with_its_default_and_an_algorithm_change_is_refused(tmp_path):
    import json

    cfg = _cfg(tmp_path)
    _save(cfg, 100)
    (meta_path,) = cfg.checkpoint_dir.glob("*.json")
    meta = json.loads(meta_path.read_text())
    del meta["config"]["localsgd"]["algorithm"], meta["config"]["localsgd"]["fragments"]  # written before they existed
    meta_path.write_text(json.dumps(meta))
    assert checkpoint.resume_point(cfg, start_over=False)[0].step == 100  # their defaults kept the old meaning
    streaming = _cfg(tmp_path, localsgd={"algorithm": "diloco", "fragments": 2})
    with pytest.raises(ConfigError) as e:
        checkpoint.resume_point(streaming, start_over=False)
    assert "localsgd.algorithm was 'localsgd', the config says 'diloco'" in str(e.value)
    assert "localsgd.fragments was 1, the config says 2" in str(e.value)


def test_cli_refuses_an_incompatible_resume_and_touches_nothing(tmp_path, cifar_root):
    raw = small_config(tmp_path, cifar_root)
    cfg = parse_config(raw)
    _save(cfg, 100)
    before = _digests(cfg.checkpoint_dir)
    raw["model"]["width"] = 24
    path = write_config(tmp_path, raw)
    res = subprocess.run([TORCHX, "run", "--", "--config", str(path)], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode != 0 and "cannot resume from checkpoint" in res.stderr, res.stderr
    assert "model.width was 16, the config says 24" in res.stderr and "Traceback" not in res.stderr
    assert _digests(cfg.checkpoint_dir) == before


def test_cadence_by_syncs_by_time_and_always_at_the_end():
    from localsgd_ft.training.checkpointer import CheckpointPolicy

    policy = CheckpointPolicy(every_syncs=50, every_s=300.0, now=0.0)
    assert policy.due(50, final=False, now=10.0) and policy.due(7, final=True, now=10.0)
    assert not policy.due(7, final=False, now=299.0)
    assert policy.due(7, final=False, now=300.0)  # five minutes of work at stake: write one
    policy.wrote(now=300.0)
    assert not policy.due(8, final=False, now=301.0)
    assert not CheckpointPolicy(every_syncs=50, every_s=0.0, now=0.0).due(7, final=False, now=1e9)


def test_a_run_shorter_than_every_syncs_is_accepted_with_a_time_cadence(tmp_path):
    cfg = _cfg(tmp_path, train={"max_steps": 200}, checkpoint={"every_syncs": 50})  # 20 syncs; every_s 300
    assert cfg.training_syncs == 20 and cfg.checkpoint.every_s == 300.0


@pytest.mark.integration
def test_time_cadence_writes_checkpoints_in_a_real_run(tmp_path, cifar_root, torchx_run):
    """every_syncs beyond the run's 60 syncs, every_s 1: checkpoints come by the clock, and at the end."""
    from conftest import read_summary, wait_no_processes

    cfg = small_config(tmp_path, cifar_root, train={"max_steps": 600, "eval_every": 0},
                       checkpoint={"every_syncs": 1000, "every_s": 1.0, "keep": 100})
    path = write_config(tmp_path, cfg)
    run = torchx_run(path)
    assert run.wait(240) == 0, run.tail()
    assert wait_no_processes(path) == []
    summary = read_summary(cfg)
    written = [e for e in summary["events"] if e["kind"] == "checkpoint"]
    steps = [e["step"] for e in written]
    assert steps[-1] == 600 and len(steps) >= 3 and steps == sorted(steps), steps
    # By the clock, a second apart (the final one comes whenever the run ends); stamped on arrival at the
    # lighthouse role, so allow for the reports' own delays. By sync count they would be ~0.1 s apart.
    times = [e["time"] for e in written[:-1]]
    assert all(b - a >= 0.5 for a, b in zip(times, times[1:])), times
    assert [f.step for f in checkpoint.list_valid(Path(cfg["output_dir"]) / "checkpoints")][0] == 600


def test_a_resume_trains_with_the_configs_optimizer_settings_not_the_saved_ones(tmp_path):
    from types import SimpleNamespace

    from localsgd_ft.training.checkpointer import Checkpointer
    from localsgd_ft.training.optim import build_optimizer
    from localsgd_ft.training.position import Position

    before = _cfg(tmp_path, optimizer={"lr": 0.05, "momentum": 0.9})
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(before.optimizer, model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    checkpoint.save(before, {"model": model.state_dict(), "optimizer": opt.state_dict(), "algorithm": {},
                             "manager": {"step": 3}, "step": 20, "offset": 1}, 20, 3)
    now = _cfg(tmp_path, optimizer={"lr": 0.01, "momentum": 0.5})  # e.g. optimizer.lr=0.01 on the command line
    fresh = build_optimizer(now.optimizer, model.parameters())
    position = Position(10, 10, offset=1)
    position.manager = SimpleNamespace(load_state_dict=lambda sd: None)
    algorithm = SimpleNamespace(load_state_dict=lambda sd: None)
    ckpt = Checkpointer(now, 0, model, fresh, algorithm, position, None, None, None)
    assert ckpt.restore(checkpoint.latest(now.checkpoint_dir), torch.device("cpu")) == 20
    assert (fresh.param_groups[0]["lr"], fresh.param_groups[0]["momentum"]) == (0.01, 0.5)
    assert fresh.state  # the momentum buffers came back
