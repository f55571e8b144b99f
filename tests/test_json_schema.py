"""The JSON Schema editors use (configs/experiment.schema.json) is current and agrees with the loader.

Checked with an independent validator (jsonschema), as an editor would: every
shipped config passes; a bad value the loader refuses field by field is refused
by the schema too; what only a rule across fields refuses (ConfigError.rule) the
schema cannot state, and accepts.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from test_config import BAD_DILOCO, BAD_FAULTS, BAD_NAN, BAD_VALUES

from localsgd_ft.config import ConfigError, json_schema, parse_config
from localsgd_ft.config.reference import json_schema_text

REPO = Path(__file__).resolve().parent.parent
SCHEMA_FILE = REPO / "configs" / "experiment.schema.json"
EDITOR_HINT = "# yaml-language-server: $schema=experiment.schema.json"
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))

# Where the loader accepts more than the schema says, on purpose: YAML 1.1 reads 1e-3 as a string, which the
# loader takes as the number a user meant (editors read YAML 1.2, where it is a number already); an empty
# section (`data:` with nothing under it) means every default.
LOADER_ONLY = [{"optimizer": {"lr": "1e-3"}}, {"data": None}]


@pytest.fixture(scope="module")
def validator():
    schema = json.loads(SCHEMA_FILE.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_committed_schema_is_current():
    """Regenerate: python -m localsgd_ft.config --json-schema > configs/experiment.schema.json"""
    assert SCHEMA_FILE.read_text() == json_schema_text()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_names_the_schema_and_passes_it(path, validator):
    text = path.read_text()
    assert text.splitlines()[0] == EDITOR_HINT, f"{path.name}: the first line must be the editor hint"
    assert not list(validator.iter_errors(yaml.safe_load(text)))


def test_the_schema_completes_every_key_with_its_doc():
    """What an editor offers while typing: each key of each section, with its description and its choices."""
    schema = json_schema()
    rg = schema["$defs"]["ReplicaGroupsConfig"]["properties"]
    assert {"count", "workers", "nodes", "gpus"} <= set(rg) and rg["count"]["minimum"] == 1
    assert all(p.get("description") for d in schema["$defs"].values() for p in d["properties"].values())
    assert schema["$defs"]["LocalSGDConfig"]["properties"]["recovery"]["enum"] == ["sync", "async"]
    assert schema["additionalProperties"] is False


def _cases():
    for raw, key, _ in BAD_VALUES + BAD_FAULTS:
        yield raw, key
    for localsgd, key, _ in BAD_DILOCO:
        yield {"localsgd": localsgd}, key


@pytest.mark.parametrize("raw, key", list(_cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_schema_refuses_what_the_loader_refuses_field_by_field(raw, key, validator):
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    schema_errors = list(validator.iter_errors(raw))
    if e.value.rule:
        assert not schema_errors, f"{key}: a rule across fields, yet the schema refuses: {schema_errors[0].message}"
    else:
        assert schema_errors, f"{key}: the loader refuses it ({e.value}), the schema accepts it"


@pytest.mark.parametrize("raw", LOADER_ONLY, ids=str)
def test_documented_differences(raw, validator):
    parse_config(raw)
    assert list(validator.iter_errors(raw))


@pytest.mark.parametrize("raw, key", [(raw, key) for raw, key, _ in BAD_NAN],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_nan_is_refused_by_the_loader_only(raw, key, validator):
    """JSON has no NaN, and every comparison with NaN is false, so no JSON Schema bound refuses it."""
    with pytest.raises(ConfigError, match=f"{key}: got nan"):
        parse_config(raw)
    assert not list(validator.iter_errors(raw))


def test_every_key_states_its_range(validator):
    """Each key's description in the schema ends with what it accepts, as docs/config.md's table says it."""
    schema = json_schema()
    props = [p for d in [schema, *schema["$defs"].values()] for p in d["properties"].values() if "$ref" not in p]
    assert props and all(" Allowed: " in p["description"] for p in props)
    assert "Allowed: an integer in [1, 256]." in schema["$defs"]["ReplicaGroupsConfig"]["properties"]["count"][
        "description"]
