"""Reading a record: JSON text with its nesting bounded, values checked against their model, refusals said in
one line naming the field."""

from __future__ import annotations

import json
import math
import re
from itertools import accumulate
from typing import Any, Dict, Optional

from pydantic import ValidationError

from localsgd_ft.config.errors import explain
from localsgd_ft.contract.names import EventKind, Route
from localsgd_ft.contract.records import (EVENT_MODELS, CompletedRequest, FinishedRequest, GroupRequest,
                                          HeartbeatRequest, StartedRequest, clip)

# The deepest record nests 4 levels (a /finished body, its result, its evals, one evaluation): anything much
# deeper is no record, and refusing it before parsing keeps the parser's recursion far from Python's limit.
MAX_DEPTH = 8
MAX_MESSAGE = 400  # characters of a refusal: it quotes the value, which may be as long as the body
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


class ContractError(ValueError):
    """A record that does not match its model; the message is one line naming the field."""

    def __init__(self, message: str) -> None:
        super().__init__(clip(message, MAX_MESSAGE))


REQUESTS: Dict[Route, Any] = {Route.HEARTBEAT: HeartbeatRequest, Route.STARTED: StartedRequest,
                              Route.COMPLETED: CompletedRequest, Route.FINISHED: FinishedRequest}


def _too_deep(text: str, limit: int) -> bool:
    """Whether ``text``'s arrays and objects nest deeper than ``limit`` (brackets inside strings do not count)."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    return any(depth > limit for depth in accumulate(1 if b in "[{" else -1 for b in brackets))


def _constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON has")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} does not fit a 64-bit float")
    return value


def read_json(data: bytes, max_depth: int = MAX_DEPTH) -> Any:
    """``data`` (UTF-8 JSON) as JSON values; ContractError, in one line, for what no record can be: not UTF-8,
    not JSON, nested deeper than ``max_depth``, or holding a number that is not finite."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ContractError(f"body: not UTF-8 ({e.reason} at byte {e.start}); send JSON in UTF-8") from None
    if _too_deep(text, max_depth):
        raise ContractError(f"body: nests deeper than {max_depth} levels; no record does")
    try:
        return json.loads(text, parse_constant=_constant, parse_float=_finite)
    except ValueError as e:  # json's errors, ours above, and integers past Python's digit limit
        raise ContractError(f"body: not JSON: {e}") from None


def read(model: Any, data: Any, context: Optional[Dict[str, Any]] = None) -> Any:
    """``data`` (JSON values) as a ``model``; ContractError saying what is wrong, in one line."""
    try:
        return model.model_validate(data, context=context)
    except ValidationError as e:
        raise ContractError(explain(e.errors()[0], model, data)) from None


def read_event(data: Any, context: Optional[Dict[str, Any]] = None) -> Any:
    """An event of any kind, by its ``kind``."""
    kind = data.get("kind") if isinstance(data, dict) else None
    model = next((m for k, m in EVENT_MODELS.items() if k.value == kind), None)
    if model is None:
        raise ContractError(f"kind: got {kind!r}, expected one of {', '.join(sorted(EventKind))}")
    return read(model, data, context)


def read_request(route: Route, body: Any, groups: int, nodes: int) -> GroupRequest:
    """The body posted to ``route``, checked against its model and the run's group and node counts."""
    context = {"groups": groups, "nodes": nodes}
    return read_event(body, context) if route is Route.EVENT else read(REQUESTS[route], body, context)
