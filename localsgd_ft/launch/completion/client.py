"""The completion service's client: what replica wrappers and trainers call, retrying while it starts."""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from typing import Any, Dict, List, Optional, Union

from localsgd_ft.contract import (TOKEN_HEADER, CompletedRequest, ErrorReply, EventKind, EventReply, FinishedRequest,
                                  HeartbeatRequest, Route, StartedReply, StartedRequest, Status, TrainerResult)

log = logging.getLogger("localsgd_ft.control")


class Refused(RuntimeError):
    """The completion service refused the request (4xx): retrying it will not help. A 5xx (starting, busy)
    is a ConnectionError, retried."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class CompletionClient:
    """Client side of the completion service, used by replica wrappers and trainers."""

    def __init__(self, url: str, token: str, timeout_s: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s

    def _call(self, path: str, body: Optional[dict] = None, timeout_s: Optional[float] = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + str(path), data=data,
                                     headers={"Content-Type": "application/json", TOKEN_HEADER: self.token})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s or self.timeout_s) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            try:
                message = ErrorReply.model_validate(json.loads(e.read())).error
            except (ValueError, OSError):
                message = str(e)
            if e.code >= 500:  # starting, busy, or failing on this one request: the service is there, retry
                raise ConnectionError(f"{self.url}{path}: {e.code}: {message}") from None
            raise Refused(e.code, f"{self.url}{path}: {e.code}: {message}") from None

    def _call_retrying(self, path: str, body: Optional[dict], deadline_s: float) -> dict:
        """Retry while the service is unreachable or starting, up to ``deadline_s``; never on a refusal."""
        end = time.monotonic() + deadline_s
        while True:
            try:
                return self._call(path, body, timeout_s=min(self.timeout_s, max(0.5, end - time.monotonic())))
            except OSError:  # unreachable, timed out, or starting (URLError, ConnectionError, TimeoutError)
                if time.monotonic() >= end:
                    raise
                time.sleep(0.2)

    def heartbeat(self, group: int, deadline_s: float = 5.0, node: int = 0,
                  trainer_quiet_s: Optional[float] = None) -> dict:
        """Say this node lives (and how long its quietest trainer has been silent); the run's :class:`Status`
        as JSON."""
        request = HeartbeatRequest(group=group, node=node, trainer_quiet_s=trainer_quiet_s)
        return self._call_retrying(Route.HEARTBEAT, request.wire(), deadline_s)

    def started(self, group: int, incarnation: str = "", deadline_s: float = 60.0) -> int:
        """Report group ``group`` up; returns how many incarnations of it started before this one."""
        body = StartedRequest(group=group, incarnation=incarnation).wire()
        return StartedReply.model_validate(self._call_retrying(Route.STARTED, body, deadline_s)).restarts

    def status(self, deadline_s: float = 10.0) -> dict:
        """The run's :class:`Status` as JSON."""
        return self._call_retrying(Route.STATUS, None, deadline_s)

    def run_status(self, deadline_s: float = 10.0) -> Status:
        return Status.model_validate(self.status(deadline_s))

    def wait_all_started(self, deadline_s: float) -> List[int]:
        """Poll until every group reported /started or the deadline passes; return who started."""
        end = time.monotonic() + deadline_s
        while True:
            state = self.run_status(max(1.0, end - time.monotonic()))
            if len(state.started) >= state.expected or time.monotonic() >= end:
                return state.started
            time.sleep(0.1)

    def event(self, group: int, kind: EventKind, deadline_s: float = 10.0, **fields: Any) -> bool:
        """Report an event (its fields as its model in :mod:`localsgd_ft.contract` names them); returns False
        if its ``fault_id`` had already fired. The service checks it."""
        reply = self._call_retrying(Route.EVENT, {"group": group, "kind": str(kind), **fields}, deadline_s)
        return EventReply.model_validate(reply).first

    def report(self, group: int, kind: EventKind, **fields: Any) -> None:
        """Report an event from training: a failure to report is a warning, never a stopped trainer."""
        try:
            self.event(group, kind, **fields)
        except Exception as e:
            log.warning("could not report %s: %s", kind, e)

    def completed(self, group: int, global_sync: int, params_sha256: str, deadline_s: float = 10.0) -> None:
        body = CompletedRequest(group=group, global_sync=global_sync, params_sha256=params_sha256).wire()
        self._call_retrying(Route.COMPLETED, body, deadline_s)

    def finished(self, group: int, exit_code: int, result: Union[TrainerResult, Dict[str, Any], None],
                 deadline_s: float = 60.0, node: int = 0) -> None:
        """Report this node's end; ``result`` a TrainerResult, or its JSON (the service checks it).

        A result too large for the service (none built as a TrainerResult is) is replaced by the reason it
        was refused: the group's end is then known, with why its result is missing, rather than inferred
        from silence as a lost role.
        """
        report = FinishedRequest(group=group, node=node, exit_code=exit_code, result=None).wire()
        report["result"] = result.wire() if isinstance(result, TrainerResult) else result
        try:
            self._call_retrying(Route.FINISHED, report, deadline_s)
        except Refused as e:
            if e.code != 413 or report["result"] is None:
                raise
            log.warning("the completion service refused this node's result: %s", e)
            report["result"] = TrainerResult(error=f"the completion service refused its result: {e}").wire()
            self._call_retrying(Route.FINISHED, report, deadline_s)
