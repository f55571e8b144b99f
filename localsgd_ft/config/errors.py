"""How the schema refuses a config: :class:`ConfigError`, and pydantic's errors as one line naming key, value and fix.

pydantic finds what is wrong; this module says it the way a user reads it:
``localsgd.sync_every: got 0, expected an integer >= 1``.
"""

from __future__ import annotations

import reprlib
import typing
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple, Union

from pydantic import BaseModel, ValidationError

from localsgd_ft.config.limits import SHOWN_MAX


class ConfigError(ValueError):
    """A config file that cannot be used; the message says why and how to fix it.

    ``rule`` is true when a rule across fields refused it (one a JSON Schema cannot state): set by
    :func:`refusal` for whatever a section's ``check(cfg)`` raised.
    """

    def __init__(self, message: str, rule: bool = False) -> None:
        super().__init__(message)
        self.rule = rule


@dataclass(frozen=True)
class Allowed:
    """Field metadata: what a refusal of this field's value says is allowed (replaces the generic text)."""

    text: str


@dataclass(frozen=True)
class Hint:
    """Field metadata: what a refusal of this field's *type* adds, where a natural guess needs another key."""

    text: str


# reprlib stops at these sizes while it builds the text, so quoting a value costs little even when it
# is a huge (or alias-shared, exponentially large) structure; `shown` then cuts the line itself.
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxset = 3, 8, 8, 6, 6
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = SHOWN_MAX


def shown(value: Any, limit: int = SHOWN_MAX) -> str:
    """``repr(value)`` as a message quotes it: at most ``limit`` characters, cut with '...'."""
    try:
        text = _REPR.repr(value)
    except ValueError:  # an integer past Python's limit for turning one into text (4300 digits)
        text = f"an integer of {value.bit_length()} bits" if isinstance(value, int) else f"a {type(value).__name__}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def need(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Refuse ``value`` of ``key`` unless ``ok``: one line naming the key, the value and what is allowed."""
    if not ok:
        raise ConfigError(f"{key}: got {shown(value)}, {allowed}")


_SINGULAR = {int: "an integer", float: "a number", bool: "true/false", str: "a string"}
_PLURAL = {int: "integers", float: "numbers", bool: "true/false values", str: "strings"}


def type_name(tp: Any, plural: bool = False) -> str:
    """How a message names type ``tp``: 'an integer', 'a list of integers', 'a list whose entries are ...'."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return type_name(typing.get_args(tp)[0], plural)
    if origin is list:
        (item,) = typing.get_args(tp)
        if typing.get_origin(item) is Union:
            name = f"a list whose entries are each {type_name(item)}"
        else:
            name = f"a list of {type_name(item, plural=True)}"
        return f"lists ({name[2:]})" if plural else name
    if origin is Union:
        return " or ".join(type_name(a, plural) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return type_name(type(typing.get_args(tp)[0]), plural)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return "mappings" if plural else "a mapping of keys"
    return (_PLURAL if plural else _SINGULAR).get(tp, getattr(tp, "__name__", str(tp)))


def choices_text(tp: Any) -> str:
    """'expected 'a' or 'b'' / 'expected one of a, b, c' for a Literal type."""
    values = typing.get_args(tp)
    if len(values) == 2:
        return f"expected {values[0]!r} or {values[1]!r}"
    return f"expected one of {', '.join(map(str, values))}"


_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))


def bounds_text(tp: Any, metadata: Sequence[Any]) -> str:
    """'expected an integer in [1, 256]' / 'expected a number > 0 and <= 86400': a field's range, from its metadata."""
    found = {name: getattr(m, name) for m in metadata for name, _ in _BOUNDS if getattr(m, name, None) is not None}
    if "ge" in found and "le" in found:
        return f"expected {type_name(tp)} in [{found['ge']}, {found['le']}]"
    if not found:
        return "expected a finite number"
    return f"expected {type_name(tp)} " + " and ".join(f"{op} {found[name]}" for name, op in _BOUNDS if name in found)


@dataclass
class _Place:
    """Where an error's location lands in the schema: the dotted key, its type and the field's metadata."""

    key: str
    tp: Any
    metadata: List[Any]
    model: Optional[type]  # the model holding the last named key (for unknown keys: where it was written)
    depth: int  # how many location items were consumed (a union's member tags are not)


def _through_optional(tp: Any) -> Any:
    """``X`` for ``Optional[X]``: pydantic's locations do not name the ``None`` branch."""
    if typing.get_origin(tp) is Union:
        others = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(others) == 1:
            return others[0]
    return tp


def _name(item: Any) -> str:
    """A key of the file as a message names it: an unknown key may be any text, of any length."""
    text = str(item)
    return text if len(text) <= SHOWN_MAX // 2 else text[: SHOWN_MAX // 2 - 3] + "..."


def _place(root: type, loc: Tuple[Any, ...]) -> _Place:
    key, tp, metadata, model = "", root, [], root
    for depth, item in enumerate(loc):
        tp = _through_optional(tp)
        origin = typing.get_origin(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            model = tp
            key = f"{key}.{_name(item)}" if key else _name(item)
            info = tp.model_fields.get(item)
            if info is None:
                return _Place(key, None, [], model, depth + 1)
            tp, metadata = info.annotation, list(info.metadata)
        elif origin is list and isinstance(item, int):
            key, tp, metadata = f"{key}[{item}]", typing.get_args(tp)[0], []
        elif origin is dict:
            key, tp, metadata = f"{key}.{_name(item)}", typing.get_args(tp)[1], []
        else:  # a union's member tag, or deeper than the schema names: report at this level
            return _Place(key, tp, metadata, model, depth)
    return _Place(key, _through_optional(tp), metadata, model, len(loc))


def _value_at(raw: Any, loc: Sequence[Any]) -> Any:
    for item in loc:
        if isinstance(raw, dict) and item in raw:
            raw = raw[item]
        elif isinstance(raw, list) and isinstance(item, int) and item < len(raw):
            raw = raw[item]
        else:
            return None
    return raw


def _first(metadata: Sequence[Any], kind: type) -> Optional[Any]:
    return next((m for m in metadata if isinstance(m, kind)), None)


def explain(error: dict, root: type, raw: Any) -> str:
    """One of pydantic's errors (validating ``raw`` as the model ``root``) as one line: the dotted key, the
    value and what is allowed. The config and the records between processes both say refusals this way."""
    kind, loc = error["type"], tuple(error["loc"])
    place = _place(root, loc)
    place.key = place.key or "the record"  # the whole body is not a mapping (the config says so before this)
    value = _value_at(raw, loc[: place.depth])
    if kind == "extra_forbidden":
        return f"{place.key}: unknown key; allowed keys here: {', '.join(sorted(place.model.model_fields))}"
    if kind == "missing":
        return f"{place.key}: missing; expected {type_name(place.tp)}"
    if kind.endswith("_type") or kind in ("model_attributes_type", "union_tag_invalid"):
        hint = _first(place.metadata, Hint)
        return f"{place.key}: expected {type_name(place.tp)}, got {shown(value)}" + (f": {hint.text}" if hint else "")
    allowed = _first(place.metadata, Allowed)
    ctx = error.get("ctx") or {}
    if allowed is not None:
        text = allowed.text
    elif kind == "literal_error":
        text = choices_text(place.tp)
    elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number"):
        text = bounds_text(place.tp, place.metadata)
    elif kind == "too_long":
        text = f"expected at most {ctx.get('max_length')} entries"
    elif kind == "string_too_long":
        text = f"expected at most {ctx.get('max_length')} characters"
    else:  # a validator's own words
        text = error["msg"][:1].lower() + error["msg"][1:]
    return f"{place.key}: got {shown(value)}, {text}"


def _first_error(errors: List[dict], root: type) -> dict:
    """The error to report: the first, except where a value fits no member of a union (pydantic reports one
    error per member): there a member's range or length says more than another member's 'wrong type'."""
    first = errors[0]
    loc = tuple(first["loc"])
    depth = _place(root, loc).depth
    if first["type"].endswith("_type") and depth < len(loc):  # loc[depth] names a member of a union
        for other in errors[1:]:
            there = tuple(other["loc"])
            if there[:depth] == loc[:depth] and len(there) > depth and not other["type"].endswith("_type"):
                return other
    return first


def refusal(e: ValidationError, root: type, raw: Any) -> ConfigError:
    """The first of pydantic's errors as a :class:`ConfigError`; what a section's ``check(cfg)`` raised
    comes back as it was written, marked as a rule across fields."""
    error = _first_error(e.errors(), root)
    raised = (error.get("ctx") or {}).get("error")
    if error["type"] == "value_error" and isinstance(raised, ConfigError):
        raised.rule = True
        return raised
    return ConfigError(explain(error, root, raw))
