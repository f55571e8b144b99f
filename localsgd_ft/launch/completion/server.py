"""The completion service's HTTP server: checks each request's token and body, then updates the state."""

from __future__ import annotations

import hmac
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from localsgd_ft.contract import (TOKEN_HEADER, CompletedRequest, ContractError, ErrorReply, EventReply, FaultEvent,
                                  FinishedRequest, GroupRequest, HeartbeatRequest, OkReply, Route, StartedReply,
                                  StartedRequest, read_request)
from localsgd_ft.launch.completion.state import CompletionState, RequestError

MAX_BODY = 1 << 20
SOCKET_TIMEOUT_S = 10.0


class _Handler(BaseHTTPRequestHandler):
    state: CompletionState
    token: str
    timeout = SOCKET_TIMEOUT_S  # a client that stalls mid-request is dropped, not waited on

    def _reply(self, code: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorised(self) -> None:
        given = self.headers.get(TOKEN_HEADER, "")
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            raise RequestError(403, "wrong or missing run token: this service belongs to another run")
        if not self.state.ready:
            raise RequestError(503, "the lighthouse role is starting")

    def _body(self) -> Any:
        try:
            length = int(self.headers.get("Content-Length", 0))
        except ValueError:
            raise RequestError(400, "bad Content-Length") from None
        if length > MAX_BODY:
            # Read what was sent (bounded), so the client gets this answer rather than a reset.
            left = min(length, 16 * MAX_BODY)
            while left > 0 and self.rfile.read(min(left, 1 << 16)):
                left -= 1 << 16
            raise RequestError(413, f"body too large ({length} bytes; at most {MAX_BODY})")
        try:
            return json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            raise RequestError(400, "body is not JSON") from None

    def do_GET(self) -> None:  # noqa: N802
        try:
            self._authorised()
            if self.path != Route.STATUS.value:
                raise RequestError(404, "unknown path")
            self._reply(200, self.state.status())
        except RequestError as e:
            self._reply(e.code, ErrorReply(error=str(e)).wire())

    def do_POST(self) -> None:  # noqa: N802
        try:
            self._authorised()
            body = self._body()
            route = next((r for r in Route if r.value == self.path and r is not Route.STATUS), None)
            if route is None:
                raise RequestError(404, "unknown path")
            try:
                request = read_request(route, body, self.state.expected, self.state.nodes)
            except ContractError as e:
                raise RequestError(400, str(e)) from None
            self._reply(200, self._answer(request))
        except RequestError as e:
            self._reply(e.code, ErrorReply(error=str(e)).wire())

    def _answer(self, request: GroupRequest) -> dict:
        """Update the state with a checked request; its reply."""
        state = self.state
        if isinstance(request, HeartbeatRequest):
            state.heartbeat(request.group, request.node)
            return state.status()
        if isinstance(request, StartedRequest):
            return StartedReply(ok=True, restarts=state.mark_started(request.group, request.incarnation)).wire()
        if isinstance(request, CompletedRequest):
            state.mark_completed(request.final())
        elif isinstance(request, FinishedRequest):
            state.mark_finished(request.group, request.report().wire(), request.node)
        else:  # an event
            if isinstance(request, FaultEvent) and not state.planned(request.fault_id, request.fault):
                raise RequestError(403, "no such failure in this run's plan (faults are injected only when "
                                        "faults.enabled is true, and only as planned)")
            return EventReply(first=state.add_event(request.wire())).wire()
        return OkReply(ok=True).wire()

    def log_message(self, format: str, *args: Any) -> None:  # keep the role's log for training
        pass


class _Server(ThreadingHTTPServer):
    # SO_REUSEADDR: a previous run's connections in TIME_WAIT must not block a rerun. On Linux it
    # never lets two servers listen on one port: a port another run still holds fails the bind.
    daemon_threads = True
    allow_reuse_address = True


def serve(host: str, port: int, state: CompletionState, token: str) -> ThreadingHTTPServer:
    """Bind ``host:port`` (OSError if taken) and serve in a daemon thread; ``.shutdown()`` stops it."""
    handler = type("Handler", (_Handler,), {"state": state, "token": token})
    server = _Server((host, port), handler)
    threading.Thread(target=server.serve_forever, name="completion-service", daemon=True).start()
    return server
