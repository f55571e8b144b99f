"""The YAML schema: every shipped config loads, every kind of bad input is refused clearly."""

from __future__ import annotations

import subprocess
import sys
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


@pytest.mark.parametrize("replica_groups, transport, backend", [
    ({}, "auto", "gloo"),  # CPU
    ({"count": 2, "gpus": [0, 1]}, "auto", "nccl"),  # a GPU each
    ({"count": 3, "gpus": [0, 0, 0]}, "auto", "gloo"),  # one GPU for every group: NCCL would refuse the sync
    ({"count": 4, "workers": 2, "cpus": 4, "gpus": [[0, 1], [0, 1], [2, 3], [2, 3]]}, "auto", "gloo"),
    ({"count": 2, "gpus": [0, 1]}, "gloo", "gloo"),
    ({"count": 2, "gpus_per_group": 1}, "auto", "nccl"),  # the scheduler gives each group its own
])
def test_the_transport_between_groups_is_gloo_wherever_groups_share_a_gpu(replica_groups, transport, backend):
    cfg = parse_config({"replica_groups": replica_groups, "localsgd": {"transport": transport}})
    assert cfg.cross_group_backend == backend


def test_sync_mode_begins_with_an_alignment_sync():
    base = {"train": {"max_steps": 100}, "localsgd": {"sync_every": 10}, "checkpoint": {"every_syncs": 5}}
    assert (parse_config(base).training_syncs, parse_config(base).initial_syncs) == (10, 1)
    base["localsgd"]["recovery"] = "async"
    assert (parse_config(base).training_syncs, parse_config(base).initial_syncs) == (10, 0)


# A billion values in a few hundred objects, the way YAML aliases nest: 10 lists of 10 lists ... of 10 zeros.
BOMB: list = [0] * 10
for _ in range(8):
    BOMB = [BOMB] * 10
DEEP: dict = {}
for _ in range(40):
    DEEP = {"d": DEEP}

BAD_VALUES = [
    ({"replica_group": {}}, "replica_group", "unknown key"),
    ({"localsgd": {"sync_evry": 5}}, "localsgd.sync_evry", "allowed keys here"),
    ({"localsgd": {"sync_every": "10"}}, "localsgd.sync_every", "expected an integer"),
    ({"localsgd": {"sync_every": 0}}, "localsgd.sync_every", "in [1, "),
    ({"localsgd": {"sync_every": 2.5}}, "localsgd.sync_every", "expected an integer"),
    ({"replica_groups": {"count": 0}}, "replica_groups.count", "in [1, 256]"),
    ({"replica_groups": {"count": True}}, "replica_groups.count", "expected an integer"),
    ({"replica_groups": {"workers": 0}}, "replica_groups.workers", "in [1, 128]"),
    ({"replica_groups": {"workers": 4, "cpus": 2}}, "replica_groups.cpus", "at least one CPU per worker"),
    ({"replica_groups": {"workers": 8, "cpus": 8, "memory_mb": 1024}}, "replica_groups.memory_mb",
     "expected at least 2048 (256 MiB per worker"),
    ({"replica_groups": {"count": 2, "workers": 2, "cpus": 2, "gpus": [[0, 1], [2]]}}, "replica_groups.gpus[1]",
     "expected 2 GPU index(es) in 0..1023 per group"),
    ({"replica_groups": {"workers": 2, "cpus": 2, "gpus_per_group": 1}}, "replica_groups.gpus_per_group",
     "expected 0 (CPU) or replica_groups.workers (2)"),
    ({"replica_groups": {"count": 2, "gpus": [0]}}, "replica_groups.gpus", "one entry per replica group"),
    ({"replica_groups": {"count": 2, "gpus": [[0, 1], [2]]}}, "replica_groups.gpus[0]", "GPU index"),
    ({"replica_groups": {"gpus": "0,1"}}, "replica_groups.gpus", "expected a list"),
    ({"replica_groups": {"gpus": 1}}, "replica_groups.gpus", "use replica_groups.gpus_per_group instead"),
    ({"faults": {"random_kinds": "kill"}}, "faults.random_kinds", "expected a list of strings, got 'kill'"),
    ({"replica_groups": {"gpus": [0, 0]}, "localsgd": {"transport": "nccl"}}, "localsgd.transport",
     "GPU 0 to groups 0 and 1"),
    ({"replica_groups": {"count": 1, "workers": 2, "cpus": 2, "gpus": [[0, 0]]}}, "replica_groups.gpus[0]",
     "a GPU listed twice"),
    ({"localsgd": {"transport": "nccl"}}, "localsgd.transport", "the groups train on CPU"),
    ({"localsgd": {"transport": "mpi"}}, "localsgd.transport", "auto, nccl, gloo"),
    ({"replica_groups": {"gpus": [0, 0]}, "localsgd": {"algorithm": "diloco", "quantize": True}}, "localsgd.quantize",
     "sync_precision: int8"),
    ({"train": {"max_steps": 105}}, "train.max_steps", "use 100 or 110"),
    ({"localsgd": {"recovery": "lazy"}}, "localsgd.recovery", "'sync' or 'async'"),
    ({"lighthouse": {"min_replicas": 3}}, "lighthouse.min_replicas", "1..replica_groups.count"),
    ({"localsgd": {"quorum_timeout_s": 1}}, "localsgd.quorum_timeout_s", "heartbeat_timeout_ms"),
    ({"data": {"verify": "yes"}}, "data.verify", "true/false"),
    ({"model": {"arch": "vit"}}, "model.arch", "'cnn' or 'resnet'"),
    ({"optimizer": {"name": "lion"}}, "optimizer.name", "'sgd' or 'adamw'"),
    ({"name": "a b"}, "name", "letters, digits"),
    ({"data": []}, "data", "expected a mapping"),
    ({"faults": {"schedule": [{"kind": "lighthouse", "moment": "lunch"}]}}, "faults.schedule[0].moment",
     "step, quorum, allreduce, heal"),
    ({"faults": {"schedule": [{"kind": "kill", "moment": "quorum"}]}}, "faults.schedule[0].moment",
     "only 'lighthouse' failures take any moment"),
    ({"faults": {"schedule": [{"kind": "hang", "moment": "heal"}]}}, "faults.schedule[0].moment",
     "'hang', 'partition' and 'host_down' take 'allreduce'"),
    ({"train": {"max_steps": 200}, "checkpoint": {"every_s": 0}}, "checkpoint.every_syncs", "only 20 syncs"),
    ({"checkpoint": {"every_s": -1}}, "checkpoint.every_s", "expected 0..86400 seconds"),
    ({"lighthouse": {"role_timeout_s": 1}}, "lighthouse.role_timeout_s", "at least 3 seconds"),
    ({"data": {"url": "ftp://x"}}, "data.url", "http(s) URL"),
    ([1, 2], "", "mapping of keys at the top level"),
    # A field's own range answers first, in the words its rule across fields would use.
    ({"replica_groups": {"memory_mb": 100}}, "replica_groups.memory_mb", "expected 256..4194304 (at least 256 MiB per"),
    ({"lighthouse": {"min_replicas": 0}}, "lighthouse.min_replicas", "expected 1..replica_groups.count"),
    ({"optimizer": {"momentum": 1.0}}, "optimizer.momentum", "got 1.0, expected 0 <= momentum < 1"),
    ({"replica_groups": {"cpus": -1}}, "replica_groups.cpus", "expected 0 (one per worker) or 1..1024"),
    # Bounds (issue 20, item 8): every number finite and in range, every string and list bounded.
    ({"replica_groups": {"count": 1_000_000_000}}, "replica_groups.count",
     "got 1000000000, expected an integer in [1, 256]"),
    ({"replica_groups": {"workers": 1000}}, "replica_groups.workers", "in [1, 128]"),
    ({"replica_groups": {"nodes": 100_000}}, "replica_groups.nodes", "in [1, 256]"),
    ({"replica_groups": {"count": 256, "nodes": 256}}, "replica_groups.nodes", "at most 1024 nodes in the whole job"),
    ({"replica_groups": {"gpus": list(range(300))}}, "replica_groups.gpus", "expected at most 256 entries"),
    ({"replica_groups": {"count": 1, "gpus": [list(range(200))]}}, "replica_groups.gpus[0]", "at most 128 entries"),
    ({"replica_groups": {"count": 1, "gpus": [10**30]}}, "replica_groups.gpus[0]", "in 0..1023"),
    ({"replica_groups": {"cpus": 10**6}}, "replica_groups.cpus", "1..1024"),
    ({"replica_groups": {"memory_mb": 10**12}}, "replica_groups.memory_mb", "expected 256..4194304"),
    ({"replica_groups": {"max_restarts": 10**9}}, "replica_groups.max_restarts", "in [0, 10000]"),
    ({"replica_groups": {"gpus_per_group": 10**9}}, "replica_groups.gpus_per_group", "one GPU per worker"),
    ({"lighthouse": {"role_timeout_s": float("inf")}}, "lighthouse.role_timeout_s", "got inf, expected at least 3"),
    ({"lighthouse": {"heartbeat_timeout_ms": 10**12}}, "lighthouse.heartbeat_timeout_ms", "in [1, 86400000]"),
    ({"lighthouse": {"join_timeout_ms": 10**12}}, "lighthouse.join_timeout_ms", "in [1, 86400000]"),
    ({"lighthouse": {"quorum_tick_ms": 10**9}}, "lighthouse.quorum_tick_ms", "in [1, 60000]"),
    ({"lighthouse": {"cpus": 10**6}}, "lighthouse.cpus", "in [1, 1024]"),
    ({"lighthouse": {"min_replicas": 10**6}}, "lighthouse.min_replicas", "expected 1..replica_groups.count"),
    ({"lighthouse": {"memory_mb": 10**12}}, "lighthouse.memory_mb", "expected 256..4194304"),
    ({"localsgd": {"timeout_s": float("inf")}}, "localsgd.timeout_s", "got inf, expected a number > 0 and <= 86400"),
    ({"localsgd": {"quorum_timeout_s": float("inf")}}, "localsgd.quorum_timeout_s", "got inf, expected a number > 0"),
    ({"localsgd": {"quorum_timeout_s": -float("inf")}}, "localsgd.quorum_timeout_s", "got -inf, expected a number > 0"),
    ({"localsgd": {"quorum_timeout_s": "1e999"}}, "localsgd.quorum_timeout_s", "got '1e999', expected a number > 0"),
    ({"localsgd": {"sync_every": 10**12}}, "localsgd.sync_every", "in [1, 100000000]"),
    ({"localsgd": {"quorum_retries": 10**9}}, "localsgd.quorum_retries", "expected 0..1000000, or -1"),
    ({"data": {"download_timeout_s": float("inf")}}, "data.download_timeout_s", "<= 86400"),
    ({"data": {"batch_size": 10**6}}, "data.batch_size", "in [1, 50000]"),
    ({"data": {"url": "https://x/" + "a" * 3000}}, "data.url", "at most 2048 characters"),
    ({"data": {"root": "a\0b"}}, "data.root", "without NUL"),
    ({"data": {"root": "a/" * 3000}}, "data.root", "at most 4096 characters"),
    ({"output_dir": "/tmp/" + "x" * 256 + "/out"}, "output_dir", "each part between slashes at most 255"),
    ({"checkpoint": {"dir": "c" * 300}}, "checkpoint.dir", "each part between slashes at most 255"),
    ({"model": {"width": 10**5}}, "model.width", "in [1, 1024]"),
    ({"optimizer": {"lr": float("inf")}}, "optimizer.lr", "got inf, expected a number > 0 and <= 100"),
    ({"optimizer": {"lr": 1e6}}, "optimizer.lr", "<= 100"),
    ({"optimizer": {"weight_decay": 2.0}}, "optimizer.weight_decay", "in [0, 1.0]"),
    ({"train": {"max_steps": 10**12}}, "train.max_steps", "in [1, 100000000]"),
    ({"train": {"eval_every": 10**12}}, "train.eval_every", "expected 0..100000000"),
    ({"train": {"log_every": 10**12}}, "train.log_every", "in [1, 100000000]"),
    ({"train": {"seed": -1}}, "train.seed", "in [0, 4294967295]"),
    ({"train": {"seed": 2**64}}, "train.seed", "in [0, 4294967295]"),
    ({"train": {"threads": 10**6}}, "train.threads", "expected 0..1024"),
    ({"checkpoint": {"every_s": float("inf")}}, "checkpoint.every_s", "expected 0..86400 seconds"),
    ({"checkpoint": {"every_syncs": 10**12}}, "checkpoint.every_syncs", "in [1, 100000000]"),
    ({"checkpoint": {"keep": 10**6}}, "checkpoint.keep", "in [1, 1000]"),
    ({"name": "n" * 300}, "name", "got 'nnnnnnn"),
    ({"name": "n" * 49}, "name", "expected 1 to 48 letters"),
    ({"name": "-x"}, "name", "the first a letter or digit"),
    ({"name": list(range(10_000))}, "name", "expected a string, got [0, 1, 2, 3, 4, 5, 6, 7, ...]"),
    ({"x" * 10_000: 1}, "xxxxxxxx", "unknown key"),
]

# The document's own bounds, before any key is looked at: the loader's, which a JSON Schema cannot state; and a
# value no message can spell out. (A JSON Schema validator puts the whole value in its message: a billion
# values, or an integer past Python's 4300 digits, which it cannot even turn into text.)
BAD_DOCUMENTS = [
    ({"train": {"seed": 10**5000}}, "train.seed", "got an integer of 16610 bits, expected an integer in [0, "),
    ({"name": BOMB}, "name", "holds more than 50000 values with every YAML alias expanded"),
    ({"replica_groups": {"gpus": BOMB}}, "replica_groups.gpus", "holds more than 50000 values"),
    ({"data": DEEP}, "data", "nested deeper than 32 levels"),
]


@pytest.mark.parametrize("raw, key, words", BAD_VALUES + BAD_DOCUMENTS)
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


def test_diloco_with_the_papers_outer_momentum_over_sgd_momentum_is_advised_against_and_the_default_is_quiet():
    """Outer momentum 0.9 over SGD momentum diverged or trained badly on the fixture: valid, but warned of."""
    [note] = parse_config({"localsgd": {"algorithm": "diloco", "outer_optimizer": {"momentum": 0.9}}}).advice()
    assert "localsgd.outer_optimizer.momentum 0.9" in note and "set localsgd.outer_optimizer.momentum: 0.5" in note
    assert parse_config({"localsgd": {"algorithm": "diloco"}}).localsgd.outer_optimizer.momentum == 0.5
    assert parse_config({"localsgd": {"algorithm": "diloco"}}).advice() == []
    for quiet in ({"optimizer": {"name": "adamw"}}, {"optimizer": {"momentum": 0}}):
        assert parse_config({"localsgd": {"algorithm": "diloco", "outer_optimizer": {"momentum": 0.9}},
                             **quiet}).advice() == [], quiet


def test_a_long_pause_after_a_failed_quorum_is_advised_against_with_the_fix_and_shipped_configs_are_quiet():
    """The independent storm run that set quorum_retries 5 by hand beside quorum_timeout_s 120 paid 20 s per
    lighthouse outage: such a setting is valid but gets a warning naming the pause and the fix."""
    cfg = parse_config({"localsgd": {"quorum_retries": 5, "quorum_timeout_s": 120}})
    [note] = cfg.advice()
    assert "waits 20.0 s before it asks again" in note and "leave quorum_retries at -1" in note
    assert "set it to 239" in note  # the automatic count: a try every 0.5 s
    assert parse_config({"localsgd": {"quorum_retries": 10, "quorum_timeout_s": 30}}).advice() == []
    for path in sorted((REPO / "configs").glob("*.yaml")):
        assert load_config(path).advice() == [], path
    out = subprocess.run([sys.executable, "-m", "localsgd_ft.config", str(REPO / "configs" / "default.yaml"),
                          "localsgd.quorum_retries=5"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "warning: localsgd.quorum_retries 5" in out.stderr, out.stderr


def test_config_doc_reference_is_current():
    """docs/config.md's config reference is the generated table (regenerate: python -m localsgd_ft.config --reference)."""
    assert reference_markdown() in (REPO / "docs" / "config.md").read_text()


def test_round_trip_through_yaml():
    from localsgd_ft.config import to_dict

    cfg = parse_config({"replica_groups": {"count": 3}, "train": {"max_steps": 30}, "checkpoint": {"every_syncs": 3}})
    assert parse_config(yaml.safe_load(yaml.safe_dump(to_dict(cfg)))) == cfg


def _faults(**f):
    return {"faults": {"enabled": True, **f}, "train": {"max_steps": 1000}, "localsgd": {"quorum_retries": 3}}


def test_fault_plan_is_off_unless_enabled():
    raw = _faults(schedule=[{"kind": "kill", "group": 1, "at_step": 100}])
    assert len(parse_config(raw).fault_plan) == 1
    raw["faults"]["enabled"] = False
    assert parse_config(raw).fault_plan == []


def test_fault_plan_is_deterministic_sorted_and_resolves_random_groups():
    raw = _faults(schedule=[{"kind": "hang", "group": -1, "at_step": 500}, {"kind": "lighthouse", "at_step": 50}],
                  mtbf_steps=200, max_random=3, random_kinds=["kill", "kill_during_sync"], seed=7)
    a, b = parse_config(raw).fault_plan, parse_config(raw).fault_plan
    assert a == b and len(a) == 5
    assert [f.at_step for f in a] == sorted(f.at_step for f in a) and [f.id for f in a] == list(range(5))
    assert all(0 <= f.group < 2 for f in a if f.kind != "lighthouse")
    assert [f.group for f in a if f.kind == "lighthouse"] == [-1]
    raw["faults"]["seed"] = 8
    assert parse_config(raw).fault_plan != a


def test_fault_plan_picks_workers_only_in_groups_of_many():
    raw = _faults(schedule=[{"kind": "hang", "at_step": 500}], mtbf_steps=100, max_random=6, seed=3)
    one = parse_config(raw).fault_plan
    assert {f.worker for f in one} == {0}  # one worker draws nothing: plans stay what they were before workers
    raw["faults"]["schedule"].append({"kind": "kill", "worker": 1, "at_step": 600})
    many = parse_config({**raw, "replica_groups": {"workers": 3, "cpus": 3}}).fault_plan
    assert all(0 <= f.worker < 3 for f in many) and len({f.worker for f in many}) > 1
    assert next(f for f in many if f.at_step == 600).worker == 1  # as named


BAD_FAULTS = [
    (_faults(schedule=[{"kind": "explode", "at_step": 5}]), "faults.schedule[0].kind", "one of kill, hang"),
    (_faults(schedule=[{"kind": "kill", "at_step": 1000}]), "faults.schedule[0].at_step", "inside train.max_steps"),
    (_faults(schedule=[{"kind": "kill", "group": 2, "at_step": 5}]), "faults.schedule[0].group", "0..1"),
    (_faults(schedule=[{"kind": "kill", "worker": 1, "at_step": 5}]), "faults.schedule[0].worker",
     "expected -1 (random) or 0..0 (a rank of the group's 1 worker(s))"),
    (_faults(schedule=[{"kind": "hang", "at_step": 5, "duration_s": 0}]), "faults.schedule[0].duration_s", "> 0"),
    (_faults(schedule=[{"kind": "kill", "at_step": 5, "when": 3}]), "faults.schedule[0].when", "unknown key"),
    (_faults(random_kinds=["meteor"]), "faults.random_kinds[0]", "one of kill"),
    (_faults(mtbf_steps=-1), "faults.mtbf_steps", "expected 0..100000000"),
    ({**_faults(schedule=[{"kind": "kill", "at_step": 5}]), "replica_groups": {"max_restarts": 0}},
     "replica_groups.max_restarts", "faults kill workers"),
    ({**_faults(schedule=[{"kind": "lighthouse", "at_step": 5}]), "localsgd": {"quorum_retries": 0}},
     "localsgd.quorum_retries", "faults kill the lighthouse"),
    # Bounded: the plan is drawn at validation, in every process.
    (_faults(mtbf_steps=1, max_random=1_000_000_000), "faults.max_random", "in [0, 10000]"),
    (_faults(schedule=[{"kind": "kill", "at_step": 5}] * 1001), "faults.schedule", "at most 1000 entries"),
    (_faults(random_kinds=["kill"] * 65), "faults.random_kinds", "at most 64 entries"),
    (_faults(schedule=[{"kind": "hang", "at_step": 5, "duration_s": float("inf")}]),
     "faults.schedule[0].duration_s", "got inf, expected a number > 0 and <= 86400"),
    (_faults(schedule=[{"kind": "kill", "at_step": 10**12}]), "faults.schedule[0].at_step", "inside train.max_steps"),
    (_faults(schedule=[{"kind": "kill", "group": 10**6, "at_step": 5}]), "faults.schedule[0].group",
     "0..replica_groups"),
    (_faults(mtbf_steps=10**12), "faults.mtbf_steps", "expected 0..100000000"),
    (_faults(seed=2**64), "faults.seed", "in [0, 4294967295]"),
]

# NaN is refused like any value out of range, but JSON has no NaN: the JSON Schema cannot say it.
NAN = float("nan")
BAD_NAN = [
    ({"lighthouse": {"role_timeout_s": NAN}}, "lighthouse.role_timeout_s", "got nan, expected at least 3 seconds"),
    ({"localsgd": {"timeout_s": NAN}}, "localsgd.timeout_s", "got nan, expected a number > 0"),
    ({"localsgd": {"quorum_timeout_s": NAN}}, "localsgd.quorum_timeout_s", "got nan, expected a number > 0"),
    ({"optimizer": {"lr": NAN}}, "optimizer.lr", "got nan, expected a number > 0"),
    ({"optimizer": {"weight_decay": NAN}}, "optimizer.weight_decay", "got nan, expected a number in [0, 1.0]"),
    ({"checkpoint": {"every_s": NAN}}, "checkpoint.every_s", "got nan, expected 0..86400 seconds"),
]


@pytest.mark.parametrize("raw, key, words", BAD_FAULTS + BAD_NAN)
def test_bad_faults_are_refused(raw, key, words):
    with pytest.raises(ConfigError) as e:
        parse_config(raw, "exp.yaml")
    assert str(e.value).startswith(f"exp.yaml: {key}") and words in str(e.value), str(e.value)


def test_threads_default_to_cpus_per_worker():
    assert parse_config({}).threads == 1
    assert parse_config({"replica_groups": {"cpus": 4}}).threads == 4
    assert parse_config({"replica_groups": {"cpus": 4}, "train": {"threads": 2}}).threads == 2


def test_type_names_read_as_english():
    """Messages built from types never say 'a list of an integer' (every list field, every item type)."""
    import typing

    from pydantic import BaseModel

    from localsgd_ft.config.errors import type_name as _type_name

    def fields(cls):
        for f in cls.model_fields.values():
            tp = f.annotation
            if isinstance(tp, type) and issubclass(tp, BaseModel):
                yield from fields(tp)
            else:
                yield tp

    names = [_type_name(tp) for tp in fields(ExperimentConfig)]
    assert names and not [n for n in names if " of a " in n or " of an " in n], names
    assert _type_name(typing.List[typing.Union[int, typing.List[int]]]) == \
        "a list whose entries are each an integer or a list of integers"


DILOCO = {"algorithm": "diloco"}


BAD_DILOCO = [
    ({"algorithm": "adam"}, "localsgd.algorithm", "localsgd, diloco"),
    ({**DILOCO, "recovery": "async"}, "localsgd.recovery", "synchronous quorum"),
    ({**DILOCO, "fragments": 3}, "localsgd.fragments", "divides localsgd.sync_every (10)"),
    ({**DILOCO, "fragments": 0}, "localsgd.fragments", "in 1..64"),
    ({**DILOCO, "fragments": 2, "fragment_sync_delay": 5}, "localsgd.fragment_sync_delay", "expected 0..4"),
    ({**DILOCO, "fragment_update_alpha": 1.5}, "localsgd.fragment_update_alpha", "in [0, 1]"),
    ({**DILOCO, "outer_optimizer": {"lr": 0}}, "localsgd.outer_optimizer.lr", "> 0"),
    ({**DILOCO, "outer_optimizer": {"momentum": 1.0}}, "localsgd.outer_optimizer.momentum", "< 1"),
    ({**DILOCO, "outer_optimizer": {"lrr": 1}}, "localsgd.outer_optimizer.lrr", "unknown key"),
    ({**DILOCO, "quantize": True}, "localsgd.quantize", "GPUs only"),
    ({**DILOCO, "bucket_cap_mb": -1}, "localsgd.bucket_cap_mb", "expected 0..65536"),
    ({**DILOCO, "sync_precision": "fp8"}, "localsgd.sync_precision", "float32, bfloat16, int8"),
    ({**DILOCO, "sync_precision": "int8", "quantize": True}, "localsgd.quantize", "keep one"),
    ({"sync_precision": "bfloat16"}, "localsgd.sync_precision", "with localsgd.outer_optimizer lr: 1.0"),
    ({"fragments": 2}, "localsgd.fragments", "localsgd.algorithm is 'localsgd'"),
    ({"outer_optimizer": {"lr": 0.5}}, "localsgd.outer_optimizer", "set localsgd.algorithm: diloco"),
    ({"fragment_update_alpha": 0.5}, "localsgd.fragment_update_alpha", "a DiLoCo setting"),
    ({**DILOCO, "outer_optimizer": {"lr": float("inf")}}, "localsgd.outer_optimizer.lr", "got inf, expected a number"),
    ({**DILOCO, "fragments": 10**9}, "localsgd.fragments", "in 1..64"),
    ({**DILOCO, "fragment_sync_delay": 10**12}, "localsgd.fragment_sync_delay", "expected 0..sync_every / fragments"),
    ({**DILOCO, "bucket_cap_mb": 10**9}, "localsgd.bucket_cap_mb", "expected 0..65536"),
]


@pytest.mark.parametrize("localsgd, key, words", BAD_DILOCO)
def test_diloco_settings_that_torchft_would_reject_or_mishandle_are_refused(localsgd, key, words):
    with pytest.raises(ConfigError) as e:
        parse_config({"localsgd": localsgd}, "exp.yaml")
    msg = str(e.value)
    assert msg.startswith(f"exp.yaml: {key}") and words in msg, msg


def test_streaming_diloco_syncs_one_fragment_per_share_of_sync_every():
    cfg = parse_config({"localsgd": {**DILOCO, "sync_every": 10, "fragments": 2}, "train": {"max_steps": 100}})
    assert (cfg.steps_per_sync, cfg.training_syncs, cfg.initial_syncs) == (5, 20, 0)
    plain = parse_config({"localsgd": {"sync_every": 10}, "train": {"max_steps": 100}})
    assert (plain.steps_per_sync, plain.training_syncs, plain.initial_syncs) == (10, 10, 1)


def test_model_fragments_are_consecutive_balanced_and_cover_every_parameter():
    from localsgd_ft.training.model import build_model, split_into_fragments

    model = build_model(parse_config({"model": {"arch": "resnet", "width": 16}}).model)
    for n in (1, 2, 3, 4):
        fragments = split_into_fragments(model, n)
        params = [p for f in fragments for p in f.parameters()]
        assert len(fragments) == n and [id(p) for p in params] == [id(p) for p in model.parameters()]
    sizes = [sum(p.numel() for p in f.parameters()) for f in split_into_fragments(model, 2)]
    assert max(sizes) < 0.7 * sum(sizes)
    with pytest.raises(ConfigError, match="localsgd.fragments: got 13, .* at most 12 fragments"):
        split_into_fragments(model, 13)


def test_overrides_are_merged_before_validation_and_checked_like_the_file(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("name: x\ntrain: {max_steps: 105}\nlocalsgd: {sync_every: 10}\n")  # 105: not a multiple of 10
    with pytest.raises(ConfigError, match="use 100 or 110"):
        load_config(path)
    cfg = load_config(path, overrides=["train.max_steps=200", "localsgd.outer_optimizer.lr=0.5",
                                       "localsgd.algorithm=diloco", "replica_groups.gpus=[]"])
    assert (cfg.train.max_steps, cfg.localsgd.algorithm, cfg.localsgd.outer_optimizer.lr) == (200, "diloco", 0.5)
    assert load_config(path, overrides=["train.max_steps=200", "optimizer.lr=1e-3"]).optimizer.lr == 0.001
    # The same number in the file means the same (YAML reads 1e-3 without a dot as a string).
    path.write_text("name: x\noptimizer: {lr: 1e-3}\n")
    assert load_config(path).optimizer.lr == 0.001
    assert load_config(path, overrides=["name=1e3"]).name == "1e3"  # a string field keeps the text
    for override, words in [("localsgd.sync_evry=5", "localsgd.sync_evry: unknown key; allowed keys here:"),
                            ("localsgd.sync_every=ten", "localsgd.sync_every: expected an integer, got 'ten'"),
                            ("sync_every", "expected dotted.key=value"),
                            ("name.first=x", "name is 'x', not a mapping"),
                            ("train.max_steps=[1", "not valid YAML"),
                            ("--fresh", "options such as --fresh go before")]:
        with pytest.raises(ConfigError) as e:
            load_config(path, overrides=["train.max_steps=200", override])
        assert str(e.value).startswith(f"{path} with train.max_steps=200 {override}") and words in str(e.value)


def test_config_cli_prints_the_resolved_config_with_overrides(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "x.yaml"
    path.write_text("name: x\n")
    res = subprocess.run([sys.executable, "-m", "localsgd_ft.config", str(path), "localsgd.sync_every=25",
                          "train.max_steps=100"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert res.returncode == 0, res.stderr
    resolved = yaml.safe_load(res.stdout)
    assert resolved["localsgd"]["sync_every"] == 25 and resolved["lighthouse"]["port"] == 29510
    res = subprocess.run([sys.executable, "-m", "localsgd_ft.config", str(path), "train.max_steps=99"],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert res.returncode == 1 and "train.max_steps: got 99" in res.stderr


def test_every_choice_the_schema_offers_is_implemented():
    """Each value of model.arch and optimizer.name builds (the schema's Literal types are the one list of them)."""
    import typing

    import torch

    from localsgd_ft.config.sections import ModelArch, OptimizerName
    from localsgd_ft.training.model import ARCHITECTURES, build_model
    from localsgd_ft.training.optim import build_optimizer

    assert set(ARCHITECTURES) == set(typing.get_args(ModelArch))
    model = build_model(parse_config({"model": {"width": 8}}).model)
    built = {name: type(build_optimizer(parse_config({"optimizer": {"name": name}}).optimizer, model.parameters()))
             for name in typing.get_args(OptimizerName)}
    assert built == {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}
