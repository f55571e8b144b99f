"""Reading an experiment: the file (or the text embedded in a role's command), overrides, and validation.

Bad input raises :class:`~localsgd_ft.config.errors.ConfigError` whose message
names the file, the key, the bad value and what is allowed. The document is
bounded before the schema sees it (:mod:`localsgd_ft.config.limits`): its size,
its nesting, and its nodes with every YAML alias expanded, since validation
visits each copy an alias stands for.
"""

from __future__ import annotations

import base64
import copy
import itertools
from pathlib import Path
from typing import Any, Optional, Sequence, Set, Tuple, Union

import yaml
from pydantic import ValidationError

from localsgd_ft.config.errors import ConfigError, refusal, shown
from localsgd_ft.config.experiment import ExperimentConfig
from localsgd_ft.config.limits import SHOWN_MAX, YAML_MAX_CHARS, YAML_MAX_DEPTH, YAML_MAX_NODES

_TOO_MANY = (f"more than {YAML_MAX_NODES} values with every YAML alias expanded (validation visits each copy); a "
             "config needs a few thousand at most")
_TOO_DEEP = f"nested deeper than {YAML_MAX_DEPTH} levels; the schema is four levels deep"


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, counting the nodes the document would have with its aliases expanded.

    An alias costs nothing to parse but stands for a whole copy of what it names, so a few KB of nested
    aliases (a 'billion laughs') expand to billions of values. The count is taken while composing, from
    the size of each anchored node, so the refusal comes before any expansion; nesting is bounded too,
    because PyYAML composes and constructs recursively.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._nodes = 0
        self._depth = 0
        self._sizes: dict = {}  # anchor -> nodes of what it names, its own aliases expanded
        self._open: Set[str] = set()  # anchors whose node is still being composed

    def _count(self, nodes: int) -> None:
        self._nodes += nodes
        if self._nodes > YAML_MAX_NODES:
            raise ConfigError(f"the YAML document has {_TOO_MANY}")

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self._open:
                raise ConfigError(f"the YAML alias *{_cut(event.anchor, SHOWN_MAX // 2)} refers to a node that "
                                  "contains it (an endless document)")
            self._count(self._sizes.get(event.anchor, 1))
            return super().compose_node(parent, index)
        self._depth += 1
        if self._depth > YAML_MAX_DEPTH:
            raise ConfigError(f"the YAML document is {_TOO_DEEP}")
        anchor, start = getattr(event, "anchor", None), self._nodes
        self._count(1)
        if anchor is not None:
            self._open.add(anchor)
        node = super().compose_node(parent, index)
        if anchor is not None:
            self._open.discard(anchor)
            self._sizes[anchor] = self._nodes - start
        self._depth -= 1
        return node


def _cut(text: str, limit: int = SHOWN_MAX) -> str:
    """``text`` as a message quotes it unquoted: at most ``limit`` characters."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's message on one line: what is wrong and where (its own quotes the offending line, any length)."""
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark or e.context_mark
        text = "; ".join(str(part) for part in (e.context, e.problem) if part)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    else:
        text, where = " ".join(str(e).split()), ""
    return _cut(text, 2 * SHOWN_MAX) + where


def load_yaml(text: str, what: str, malformed: str = "malformed YAML") -> Any:
    """One YAML document, safely and within the bounds; ``what`` names it in a refusal, e.g. the file or an
    override."""
    if len(text) > YAML_MAX_CHARS:
        raise ConfigError(f"{what}: {len(text)} characters, more than {YAML_MAX_CHARS}; a config is a few KB")
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as e:
        raise ConfigError(f"{what}: {malformed}: {_yaml_problem(e)}") from None
    except ConfigError as e:  # a bound
        raise ConfigError(f"{what}: {e}") from None
    except ValueError as e:  # a value PyYAML recognised but Python cannot build: 2001-13-01, a 5000-digit integer
        raise ConfigError(f"{what}: {malformed}: {_cut(str(e))}") from None
    finally:
        loader.dispose()


def _key_path(keys: Tuple[Any, ...]) -> str:
    """Where in the document a refusal happened, as its first keys read: ``replica_groups.gpus``."""
    names = [k if isinstance(k, str) and len(k) <= SHOWN_MAX // 2 else shown(k, SHOWN_MAX // 2) for k in keys[:3]]
    return ".".join(names) or "the config"


def _check_size(raw: Any) -> None:
    """Refuse a parsed document beyond the bounds, naming the key where it overflowed. The walk stops at the
    bound, so it costs little even on a structure of shared references (or one that contains itself)."""
    seen, stack = 0, [(raw, (), 0)]
    while stack:
        value, keys, depth = stack.pop()
        seen += 1
        if seen > YAML_MAX_NODES:
            raise ConfigError(f"{_key_path(keys)}: holds {_TOO_MANY}")
        if depth > YAML_MAX_DEPTH:
            raise ConfigError(f"{_key_path(keys)}: {_TOO_DEEP}")
        # Whatever waits on the stack is counted when it is taken: queue no more than would still fit.
        room = max(0, YAML_MAX_NODES - seen - len(stack)) + 1
        if isinstance(value, dict):
            stack.extend((v, (*keys, k), depth + 1) for k, v in itertools.islice(value.items(), room))
        elif isinstance(value, (list, tuple)):
            stack.extend((v, keys, depth + 1) for v in itertools.islice(value, room))


def parse_config(raw: Any, source: str = "<config>") -> ExperimentConfig:
    """Validate an already-parsed YAML document; errors are prefixed with ``source``."""
    try:
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"expected a mapping of keys at the top level, got {type(raw).__name__}")
        _check_size(raw)
        try:
            return ExperimentConfig.model_validate(raw)
        except ValidationError as e:
            raise refusal(e, ExperimentConfig, raw) from None
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}", rule=e.rule) from None


def _read_text(p: Path) -> str:
    try:
        with p.open() as f:
            text = f.read(YAML_MAX_CHARS + 1)  # bounded: the path may name a device or a huge file
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found (looked in {Path.cwd()}); pass --config PATH") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config file: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: the config file is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if len(text) > YAML_MAX_CHARS:
        raise ConfigError(f"{p}: longer than {YAML_MAX_CHARS} characters; a config is a few KB")
    return text


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
    if sum(len(item) for item in overrides) > YAML_MAX_CHARS:
        raise ConfigError(f"{source}: the overrides have more than {YAML_MAX_CHARS} characters; put such settings "
                          "in the file")
    if not isinstance(raw, (dict, type(None))):
        return raw  # parse_config says what is wrong with the file itself
    _check_size(raw)  # before the copy: a document of shared references must not be copied out in full
    merged = copy.deepcopy(raw) if raw is not None else {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if item.startswith("-"):
            raise ConfigError(f"{source}: override {shown(item)}: options such as --fresh go before the "
                              "dotted.key=value overrides (torchx hands everything after the first one to them)")
        if not sep or not key or any(not part for part in key.split(".")) or key.count(".") >= YAML_MAX_DEPTH:
            raise ConfigError(f"{source}: override {shown(item)}: expected dotted.key=value, e.g. "
                              "localsgd.sync_every=50")
        value = load_yaml(text, f"{source}: override {shown(item)}", "the value is not valid YAML")
        *parents, leaf = key.split(".")
        node = merged
        for i, part in enumerate(parents):
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parents[: i + 1])
                raise ConfigError(f"{source}: override {shown(item)}: {_cut(where)} is {shown(child)}, not a mapping "
                                  "of keys")
            node = child
        node[leaf] = value
    return merged


def describe_source(path: Union[str, Path], overrides: Sequence[str]) -> str:
    """How messages name a config: its file, and the overrides applied to it (each cut to a readable length,
    and the list after a few: a refusal names the one at fault itself)."""
    if not overrides:
        return str(path)
    named = [_cut(item) for item in overrides[:8]]
    more = f" and {len(overrides) - 8} more" if len(overrides) > 8 else ""
    return f"{path} with {' '.join(named)}{more}"


def resolved_text(path: Union[str, Path], overrides: Sequence[str] = ()) -> str:
    """The YAML text the roles run: the file's own text, or with overrides the merged document."""
    text = _read_text(Path(path))
    if not overrides:
        return text
    merged = apply_overrides(load_yaml(text, str(path)), overrides, describe_source(path, overrides))
    _check_size(merged)
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
    elif len(embedded) > 6 * YAML_MAX_CHARS:  # base64 takes 4 characters per 3 bytes, UTF-8 up to 4 per character
        raise ConfigError(f"{p}: the embedded config (--config-b64) is longer than any config the component embeds")
    else:
        try:
            text = base64.b64decode(embedded.encode("ascii"), validate=True).decode()
        except (ValueError, UnicodeError) as e:
            raise ConfigError(f"{p}: the embedded config (--config-b64) is not base64 of UTF-8 text: "
                              f"{shown(str(e))}") from None
    return parse_config(apply_overrides(load_yaml(text, str(p)), overrides, source), source)


def resolved_yaml(cfg: ExperimentConfig, source: str) -> str:
    """Every key of ``cfg`` as YAML, defaults included: what a run records as ``output_dir/config.yaml``."""
    return (f"# The resolved config of this run: {source}, every default filled in.\n"
            f"# Rerun it exactly: torchx run -- --config <this file>\n"
            + yaml.safe_dump(to_dict(cfg), sort_keys=False))


def to_dict(cfg: ExperimentConfig) -> dict:
    """Every key of ``cfg`` as plain YAML/JSON values, in the file's order."""
    return cfg.model_dump()
