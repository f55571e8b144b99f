"""Reading a record: JSON values checked against their model, refusals said in one line naming the field."""

from __future__ import annotations

import typing
from typing import Any, Dict, List, Optional

from pydantic import BaseModel, ValidationError

from localsgd_ft.contract.names import EventKind, Route
from localsgd_ft.contract.records import (EVENT_MODELS, CompletedRequest, FinishedRequest, GroupRequest,
                                          HeartbeatRequest, StartedRequest)


class ContractError(ValueError):
    """A record that does not match its model; the message is one line naming the field."""


REQUESTS: Dict[Route, Any] = {Route.HEARTBEAT: HeartbeatRequest, Route.STARTED: StartedRequest,
                              Route.COMPLETED: CompletedRequest, Route.FINISHED: FinishedRequest}


def read(model: Any, data: Any, context: Optional[Dict[str, Any]] = None) -> Any:
    """``data`` (JSON values) as a ``model``; ContractError saying what is wrong, in one line."""
    try:
        return model.model_validate(data, context=context)
    except ValidationError as e:
        raise ContractError(one_line(e, model)) from None


def read_event(data: Any, context: Optional[Dict[str, int]] = None) -> Any:
    """An event of any kind, by its ``kind``."""
    kind = data.get("kind") if isinstance(data, dict) else None
    model = next((m for k, m in EVENT_MODELS.items() if k.value == kind), None)
    if model is None:
        raise ContractError(f"'kind' must be one of {', '.join(sorted(EventKind))}")
    return read(model, data, context)


def read_request(route: Route, body: Any, groups: int, nodes: int) -> GroupRequest:
    """The body posted to ``route``, checked against its model and the run's group and node counts."""
    context = {"groups": groups, "nodes": nodes}
    return read_event(body, context) if route is Route.EVENT else read(REQUESTS[route], body, context)


def _models_in(annotation: Any) -> List[type]:
    """The record types a field's annotation holds (through Optional, List, Dict, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _fields_at(model: Any, loc: tuple) -> Optional[List[str]]:
    """The fields of the record at ``loc`` inside ``model`` (None: it cannot be told)."""
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is not None:
            inner = _models_in(field.annotation)
            if len(inner) != 1:
                return None
            model = inner[0]
    return sorted(model.model_fields)


def one_line(error: ValidationError, model: Any) -> str:
    """pydantic's errors as one line: the first, by its field's dotted name, and how many more."""
    first = error.errors()[0]
    loc = tuple(first["loc"])
    where = ".".join(str(p) for p in loc)
    if first["type"] == "extra_forbidden":
        allowed = _fields_at(model, loc[:-1])
        text = f"'{where}' is not a field here" + (f" (allowed: {', '.join(allowed)})" if allowed else "")
    elif first["type"] == "missing":
        text = f"'{where}' is required"
    else:
        msg = first["msg"][:1].lower() + first["msg"][1:]
        text = f"'{where}': {msg}" if where else msg
    more = error.error_count() - 1
    return text + (f" (and {more} more problem{'s' if more > 1 else ''})" if more else "")
