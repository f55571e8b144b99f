"""Bounded, finite, filesystem-safe input: the YAML document, the overrides and every key have limits, and each
refusal is one short line before anything starts (issue 20, items 8 and 14). The per-key cases live in
test_config.py's BAD_* lists, which test_json_schema.py checks against the JSON Schema too."""

from __future__ import annotations

import subprocess
import time
import typing
from pathlib import Path

import pytest
import yaml
from conftest import REPO, TORCHX, processes_using, small_config, write_config
from pydantic import BaseModel
from test_config import BAD_DILOCO, BAD_DOCUMENTS, BAD_FAULTS, BAD_NAN, BAD_VALUES
from torchx.specs.finder import get_component

from localsgd_ft.config import ConfigError, ExperimentConfig, load_config, parse_config
from localsgd_ft.config.limits import MAX_RANDOM_FAULTS, SHOWN_MAX, YAML_MAX_CHARS

# A refusal is one line a user reads at once: the key, a cut of the value and what is allowed.
LONGEST_REFUSAL = 400


def _refusal(raw) -> str:
    with pytest.raises(ConfigError) as e:
        parse_config(raw, "exp.yaml")
    return str(e.value)


def _cases():
    for raw, key, _ in BAD_VALUES + BAD_DOCUMENTS + BAD_FAULTS + BAD_NAN:
        yield raw, key
    for localsgd, key, _ in BAD_DILOCO:
        yield {"localsgd": localsgd}, key


CASES = list(_cases())


def test_every_refusal_is_one_short_line():
    """Whatever the value (a billion-element structure, a 10,000-character key), the message stays one line."""
    for raw, key in CASES:
        msg = _refusal(raw)
        assert "\n" not in msg and len(msg) <= LONGEST_REFUSAL, (key, len(msg), msg[:500])
    print(f"\n{len(CASES)} bad configs refused, each in one line of at most {LONGEST_REFUSAL} characters")


def _fields(model: type, prefix: str = ""):
    for name, info in model.model_fields.items():
        tp = info.annotation
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            yield from _fields(tp, f"{prefix}{name}.")
            continue
        yield f"{prefix}{name}", info
        if isinstance(item, type) and issubclass(item, BaseModel):
            yield from _fields(item, f"{prefix}{name}[].")


def _has(info, *names) -> bool:
    return any(getattr(m, n, None) is not None for m in info.metadata for n in names)


def test_every_key_has_a_finite_documented_range():
    """A key added later without bounds fails here: numbers need both ends (floats refuse inf and nan),
    strings and lists a longest length."""
    unbounded = []
    for key, info in _fields(ExperimentConfig):
        tp = info.annotation
        if tp in (int, float):
            ok = _has(info, "ge", "gt") and _has(info, "le", "lt")
            ok = ok and (tp is int or any(getattr(m, "allow_inf_nan", None) is False for m in info.metadata))
        elif tp is str or typing.get_origin(tp) is list:
            ok = _has(info, "max_length")
        else:
            ok = tp is bool or typing.get_origin(tp) is typing.Literal
        if not ok:
            unbounded.append(key)
    assert not unbounded, unbounded


# The bomb: 70 KB naming one list of 10,000 GPU indices 10,000 times, 10^8 values for validation to
# convert and for the refusal (two groups, not 10,000) to print.
ALIAS_BOMB = ("replica_groups:\n  gpus: [&g [" + ", ".join(["0"] * 10_000) + "], "
              + ", ".join(["*g"] * 9_999) + "]\n")
# The classic one, a billion laughs: each level ten copies of the one below, nine levels deep, in 300 bytes.
NESTED_BOMB = ("name: [&l0 [0, 0, 0, 0, 0, 0, 0, 0, 0, 0], "
               + ", ".join(f"&l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 9)) + "]\n")


@pytest.mark.parametrize("text, words", [
    (ALIAS_BOMB, "the YAML document has more than 50000 values with every YAML alias expanded"),
    (NESTED_BOMB, "the YAML document has more than 50000 values with every YAML alias expanded"),
    ("name: &a [*a]\n", "the YAML alias *a refers to a node that contains it"),
    ("name: " + "[" * 100_000 + "]" * 100_000 + "\n", "nested deeper than 32 levels"),
    ("name: " + "x" * (YAML_MAX_CHARS + 1) + "\n", f"longer than {YAML_MAX_CHARS} characters"),
    ("localsgd: {sync_every: 10\n", "malformed YAML: while parsing a flow mapping; expected ',' or '}'"),
    ("name: 'a" + "b" * 5000 + "\n", "malformed YAML"),
    ("name: 2001-13-01\n", "malformed YAML: month must be in 1..12"),
    ("train: {seed: " + "7" * 5000 + "}\n", "malformed YAML: Exceeds the limit (4300 digits)"),
], ids=["alias-bomb", "nested-alias-bomb", "recursive-alias", "deep", "huge", "malformed", "malformed-long", "bad-date", "huge-int"])
def test_the_yaml_document_is_bounded_before_the_schema_sees_it(tmp_path, text, words):
    path = tmp_path / "x.yaml"
    path.write_text(text)
    start = time.monotonic()
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and words in msg, msg[:500]
    assert "\n" not in msg and len(msg) <= LONGEST_REFUSAL, msg[:500]
    assert time.monotonic() - start < 5  # the bomb is refused while composing, before any expansion


def test_the_bombs_are_small_texts():
    """What makes them dangerous: the bound that matters is on expanded nodes, not on characters."""
    assert len(ALIAS_BOMB) < 80_000 and len(NESTED_BOMB) < 1_000


def test_a_few_shared_aliases_are_fine(tmp_path):
    """Aliases as people use them (one fault written once, reused) load as before."""
    path = tmp_path / "x.yaml"
    path.write_text("train: {max_steps: 1000}\nlocalsgd: {quorum_retries: 3}\n"
                    "faults:\n  enabled: true\n  schedule:\n"
                    "    - &kill {kind: kill, group: 0, at_step: 100}\n    - *kill\n    - {<<: *kill, at_step: 300}\n")
    assert [f.at_step for f in load_config(path).fault_plan] == [100, 100, 300]


def test_overrides_are_bounded_like_the_file(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("name: x\n")
    nested = "&b [" + ", ".join(["&a [" + ", ".join(["0"] * 100) + "]"] + ["*a"] * 99) + "]"  # 10,100 values
    for overrides, words in [
        ([f"faults.random_kinds=[{nested}, *b, *b, *b, *b, *b]"], "more than 50000 values"),
        (["name=" + "[" * 1000 + "]" * 1000], "nested deeper than 32 levels"),
        (["a." * 40 + "b=1"], "expected dotted.key=value"),
        ([f"x{i}=" + "y" * 1000 for i in range(YAML_MAX_CHARS // 1000 + 1)], "the overrides have more than"),
        (["replica_groups.count=1000000000"], "replica_groups.count: got 1000000000, expected an integer in [1, 256]"),
        (["name=" + "n" * 300], "name: got 'nnnnn"),
    ]:
        with pytest.raises(ConfigError) as e:
            load_config(path, overrides=overrides)
        msg = str(e.value)
        assert words in msg and "\n" not in msg and len(msg) <= LONGEST_REFUSAL + 8 * SHOWN_MAX, msg[:600]


def test_an_embedded_config_is_bounded_too(tmp_path):
    with pytest.raises(ConfigError, match="longer than any config the component embeds"):
        load_config(tmp_path / "x.yaml", embedded="A" * (6 * YAML_MAX_CHARS + 4))


def test_the_fault_plan_is_drawn_once_and_bounded():
    """The largest plan the schema allows validates in well under a second, and every later read is free."""
    raw = {"faults": {"enabled": True, "mtbf_steps": 1, "max_random": MAX_RANDOM_FAULTS},
           "train": {"max_steps": 100_000}, "localsgd": {"quorum_retries": 3}, "checkpoint": {"every_syncs": 10}}
    start = time.monotonic()
    cfg = parse_config(raw)
    assert time.monotonic() - start < 5
    assert len(cfg.fault_plan) == MAX_RANDOM_FAULTS and cfg.fault_plan is cfg.fault_plan
    assert cfg == parse_config(raw)  # the cached plan is no field: configs still compare by their keys


def test_the_cpu_request_follows_the_workers_unless_set():
    assert parse_config({"replica_groups": {"workers": 2}}).replica_groups.cpus == 2
    assert parse_config({"replica_groups": {"workers": 2}}).threads == 1
    assert parse_config({"replica_groups": {"workers": 2, "cpus": 8}}).threads == 4
    assert parse_config({}).replica_groups.cpus == 1
    with pytest.raises(ConfigError, match="replica_groups.cpus: got 1, expected at least one CPU per worker"):
        parse_config({"replica_groups": {"workers": 2, "cpus": 1}})
    # What a run records is the resolved request, and reading it back gives the same config.
    cfg = parse_config({"replica_groups": {"workers": 3}})
    assert parse_config(yaml.safe_load(yaml.safe_dump(cfg.model_dump()))) == cfg


def test_the_launch_plan_requests_the_derived_cpus(tmp_path, cifar_root):
    cfg = small_config(tmp_path, cifar_root, replica_groups={"workers": 2})
    app = get_component(str(REPO / "components/localsgd.py") + ":localsgd").fn(config=str(write_config(tmp_path, cfg)))
    assert [r.resource.cpu for r in app.roles[1:]] == [2, 2] and app.roles[0].resource.cpu == 1


def test_slurm_asks_for_the_derived_cpus_per_task(tmp_path, cifar_root):
    """The real torchx CLI's Slurm dry run: a config that only sets workers asks for a CPU per worker."""
    path = write_config(tmp_path, small_config(tmp_path, cifar_root, replica_groups={"workers": 2}))
    res = subprocess.run([TORCHX, "run", "--dryrun", "-s", "slurm", "components/localsgd.py:localsgd", "--config",
                          str(path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    heads = [line for line in res.stdout.splitlines() if line.startswith("#SBATCH --job-name=replica_")]
    assert len(heads) == 2 and all("--cpus-per-task=2 " in line for line in heads), heads


def _refused_by_the_cli(tmp_path: Path, config: Path, *args: str, words: str) -> str:
    """Run the real ``torchx run``; it must exit non-zero with one line naming the problem, having started
    nothing: no process holds the config, no run was announced, no output directory exists."""
    start = time.monotonic()
    res = subprocess.run([TORCHX, "run", *args, "--", "--config", str(config)], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    took = time.monotonic() - start
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "Traceback" not in out, out[-3000:]
    lines = [line for line in res.stderr.splitlines() if words in line]
    assert len(lines) == 1 and len(lines[0]) <= LONGEST_REFUSAL, out[-3000:]
    assert "lighthouse: run" not in out and not (tmp_path / "out").exists()
    assert processes_using(config) == []
    assert took < 60, took  # refused at once, not after building a billion roles
    return lines[0]


@pytest.mark.integration
def test_the_cli_refuses_an_infinite_timeout_and_starts_nothing(tmp_path, cifar_root):
    path = write_config(tmp_path, small_config(tmp_path, cifar_root, lighthouse={"role_timeout_s": float("inf")}))
    assert "role_timeout_s: .inf" in path.read_text()
    _refused_by_the_cli(tmp_path, path, words="lighthouse.role_timeout_s: got inf, expected at least 3 seconds")


@pytest.mark.integration
def test_the_cli_dry_run_refuses_a_billion_groups_at_once(tmp_path, cifar_root):
    path = write_config(tmp_path, small_config(tmp_path, cifar_root, replica_groups={"count": 1_000_000_000}))
    _refused_by_the_cli(tmp_path, path, "--dryrun",
                        words="replica_groups.count: got 1000000000, expected an integer in [1, 256]")


@pytest.mark.integration
def test_the_cli_refuses_an_alias_bomb_and_starts_nothing(tmp_path, cifar_root):
    cfg = small_config(tmp_path, cifar_root)
    del cfg["replica_groups"]
    path = tmp_path / "bomb.yaml"
    path.write_text(yaml.safe_dump(cfg) + ALIAS_BOMB)
    _refused_by_the_cli(tmp_path, path, words="more than 50000 values with every YAML alias expanded")
