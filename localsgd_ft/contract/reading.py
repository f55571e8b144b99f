"""Reading a record: JSON values checked against their model, refusals said in one line naming the field."""

from __future__ import annotations

from typing import Any, Dict, Optional

from pydantic import ValidationError

from localsgd_ft.config.errors import explain
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
