"""Reading an experiment: the file (or the text embedded in a role's command), overrides, and validation.

Bad input raises :class:`~localsgd_ft.config.errors.ConfigError` whose message
names the file, the key, the bad value and what is allowed.
"""

from __future__ import annotations

import base64
import copy
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import yaml
from pydantic import ValidationError

from localsgd_ft.config.errors import ConfigError, refusal
from localsgd_ft.config.experiment import ExperimentConfig


def parse_config(raw: Any, source: str = "<config>") -> ExperimentConfig:
    """Validate an already-parsed YAML document; errors are prefixed with ``source``."""
    try:
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"expected a mapping of keys at the top level, got {type(raw).__name__}")
        try:
            return ExperimentConfig.model_validate(raw)
        except ValidationError as e:
            raise refusal(e, ExperimentConfig, raw) from None
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}", rule=e.rule) from None


def _read_text(p: Path) -> str:
    try:
        return p.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found (looked in {Path.cwd()}); pass --config PATH") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config file: {e.strerror}") from None


def embed_config(path: Union[str, Path], overrides: Sequence[str] = ()) -> str:
    """The config's text (with overrides merged) as base64, for roles that cannot read the file.

    Base64 has no commas, quotes or spaces, so it survives Slurm's ``--export``
    (which splits on commas), shells and Kubernetes manifests unchanged.
    """
    return base64.b64encode(resolved_text(path, overrides).encode()).decode("ascii")


def apply_overrides(raw: Any, overrides: Sequence[str], source: str = "<config>") -> Any:
    """``raw`` (a parsed YAML document) with each ``dotted.key=value`` set; values are parsed as YAML.

    Only the shape is checked here; the schema checks keys and values afterwards,
    with the same messages as for the file.
    """
    if not overrides:
        return raw
    merged = copy.deepcopy(raw) if raw is not None else {}
    if not isinstance(merged, dict):
        return merged  # parse_config says what is wrong with the file itself
    for item in overrides:
        key, sep, text = item.partition("=")
        if item.startswith("-"):
            raise ConfigError(f"{source}: override {item!r}: options such as --fresh go before the "
                              "dotted.key=value overrides (torchx hands everything after the first one to them)")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"{source}: override {item!r}: expected dotted.key=value, e.g. localsgd.sync_every=50")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: override {item!r}: the value is not valid YAML: {e}") from None
        *parents, leaf = key.split(".")
        node = merged
        for i, part in enumerate(parents):
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parents[: i + 1])
                raise ConfigError(f"{source}: override {item!r}: {where} is {child!r}, not a mapping of keys")
            node = child
        node[leaf] = value
    return merged


def describe_source(path: Union[str, Path], overrides: Sequence[str]) -> str:
    """How messages name a config: its file, and the overrides applied to it."""
    return f"{path} with {' '.join(overrides)}" if overrides else str(path)


def resolved_text(path: Union[str, Path], overrides: Sequence[str] = ()) -> str:
    """The YAML text the roles run: the file's own text, or with overrides the merged document."""
    text = _read_text(Path(path))
    if not overrides:
        return text
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: malformed YAML: {e}") from None
    merged = apply_overrides(raw, overrides, describe_source(path, overrides))
    return f"# {path} with overrides: {' '.join(overrides)}\n" + yaml.safe_dump(merged, sort_keys=False)


def load_config(path: Union[str, Path], embedded: Optional[str] = None,
                overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read and validate the experiment YAML at ``path``, with ``overrides`` (``dotted.key=value``) applied.

    With ``embedded`` (from :func:`embed_config`) the text comes from there and
    ``path`` only names it in messages: the file need not exist here.
    """
    p = Path(path)
    source = describe_source(p, overrides)
    if embedded is None:
        text = _read_text(p)
    else:
        try:
            text = base64.b64decode(embedded.encode("ascii"), validate=True).decode()
        except (ValueError, UnicodeError) as e:
            raise ConfigError(f"{p}: the embedded config (--config-b64) is not base64 of UTF-8 text: {e}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: malformed YAML: {e}") from None
    return parse_config(apply_overrides(raw, overrides, source), source)


def resolved_yaml(cfg: ExperimentConfig, source: str) -> str:
    """Every key of ``cfg`` as YAML, defaults included: what a run records as ``output_dir/config.yaml``."""
    return (f"# The resolved config of this run: {source}, every default filled in.\n"
            f"# Rerun it exactly: torchx run -- --config <this file>\n"
            + yaml.safe_dump(to_dict(cfg), sort_keys=False))


def to_dict(cfg: ExperimentConfig) -> dict:
    """Every key of ``cfg`` as plain YAML/JSON values, in the file's order."""
    return cfg.model_dump()
