"""The YAML schema: every shipped config loads, every kind of bad input is refused clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from localsgd_ft.config import ConfigError, ExperimentConfig, load_config, parse_config, reference_markdown

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.train.max_steps % cfg.localsgd.sync_every == 0


def test_defaults_fill_every_omitted_key():
    cfg = parse_config({})
    assert cfg == ExperimentConfig()
    assert cfg.replica_groups.count == 2 and cfg.localsgd.recovery == "sync"
    assert str(cfg.run_dir) == "outputs/localsgd"
    assert cfg.group_gpus == [[], []]


def test_gpu_shorthand_and_lists():
    cfg = parse_config({"replica_groups": {"count": 2, "gpus": [3, [5]]}})
    assert cfg.group_gpus == [[3], [5]]


def test_total_syncs_counts_the_initial_alignment_in_sync_mode():
    base = {"train": {"max_steps": 100}, "localsgd": {"sync_every": 10}}
    assert parse_config(base).total_syncs == 11
    base["localsgd"]["recovery"] = "async"
    assert parse_config(base).total_syncs == 10


@pytest.mark.parametrize(
    "raw, key, words",
    [
        ({"replica_group": {}}, "replica_group", "unknown key"),
        ({"localsgd": {"sync_evry": 5}}, "localsgd.sync_evry", "allowed keys here"),
        ({"localsgd": {"sync_every": "10"}}, "localsgd.sync_every", "expected an integer"),
        ({"localsgd": {"sync_every": 0}}, "localsgd.sync_every", ">= 1"),
        ({"localsgd": {"sync_every": 2.5}}, "localsgd.sync_every", "expected an integer"),
        ({"replica_groups": {"count": 0}}, "replica_groups.count", ">= 1"),
        ({"replica_groups": {"count": True}}, "replica_groups.count", "expected an integer"),
        ({"replica_groups": {"workers": 2}}, "replica_groups.workers", "only 1 worker"),
        ({"replica_groups": {"count": 2, "gpus": [0]}}, "replica_groups.gpus", "one entry per replica group"),
        ({"replica_groups": {"count": 2, "gpus": [[0, 1], [2]]}}, "replica_groups.gpus[0]", "GPU index"),
        ({"replica_groups": {"gpus": "0,1"}}, "replica_groups.gpus", "expected a list"),
        ({"train": {"max_steps": 105}}, "train.max_steps", "use 100 or 110"),
        ({"localsgd": {"recovery": "lazy"}}, "localsgd.recovery", "'sync' or 'async'"),
        ({"lighthouse": {"min_replicas": 3}}, "lighthouse.min_replicas", "1..replica_groups.count"),
        ({"localsgd": {"quorum_timeout_s": 1}}, "localsgd.quorum_timeout_s", "heartbeat_timeout_ms"),
        ({"data": {"verify": "yes"}}, "data.verify", "true/false"),
        ({"model": {"arch": "vit"}}, "model.arch", "'cnn' or 'resnet'"),
        ({"optimizer": {"name": "lion"}}, "optimizer.name", "'sgd' or 'adamw'"),
        ({"name": "a b"}, "name", "letters, digits"),
        ({"data": []}, "data", "expected a mapping"),
        ([1, 2], "", "mapping of keys at the top level"),
    ],
)
def test_bad_values_name_key_value_and_allowed(raw, key, words):
    with pytest.raises(ConfigError) as e:
        parse_config(raw, "exp.yaml")
    msg = str(e.value)
    assert msg.startswith(f"exp.yaml: {key}") and words in msg, msg


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_unreadable_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path)  # a directory: read fails even as root


def test_malformed_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("localsgd: {sync_every: 10\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_config(p)


def test_yaml_is_loaded_safely(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("name: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_config(p)


def test_reference_lists_every_key_with_its_doc():
    table = reference_markdown()
    for key in ["replica_groups.count", "localsgd.sync_every", "localsgd.recovery", "lighthouse.heartbeat_timeout_ms",
                "data.verify", "train.max_steps", "model.arch", "optimizer.lr", "output_dir"]:
        assert f"| `{key}` |" in table


def test_readme_reference_is_current():
    """The README's config reference is the generated table (regenerate: python -m localsgd_ft.config --reference)."""
    assert reference_markdown() in (REPO / "README.md").read_text()


def test_round_trip_through_yaml():
    from localsgd_ft.config import to_dict

    cfg = parse_config({"replica_groups": {"count": 3}, "train": {"max_steps": 30}})
    assert parse_config(yaml.safe_load(yaml.safe_dump(to_dict(cfg)))) == cfg
