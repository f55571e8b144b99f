"""The completion service's HTTP server: checks each request's token and body, then updates the state."""

from __future__ import annotations

import hmac
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from localsgd_ft.launch.completion.state import CompletionState, RequestError, _check_event, _check_finished, _valid_group, _valid_node
from localsgd_ft.launch.lifecycle import TOKEN_HEADER

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
            if self.path != "/status":
                raise RequestError(404, "unknown path")
            self._reply(200, self.state.status())
        except RequestError as e:
            self._reply(e.code, {"error": str(e)})

    def do_POST(self) -> None:  # noqa: N802
        try:
            self._authorised()
            body = self._body()
            group = _valid_group(body, self.state.expected)
            node = _valid_node(body, self.state.nodes)
            if self.path == "/heartbeat":
                self.state.heartbeat(group, node)
                self._reply(200, self.state.status())
            elif self.path == "/started":
                incarnation = body.get("incarnation", "")
                if not isinstance(incarnation, str):
                    raise RequestError(400, "'incarnation' must be a string")
                self._reply(200, {"ok": True, "restarts": self.state.mark_started(group, incarnation)})
            elif self.path == "/event":
                self._reply(200, {"first": self.state.add_event(_check_event(body, self.state.faults))})
            elif self.path == "/completed":
                if not isinstance(body.get("global_sync"), int) or not isinstance(body.get("params_sha256"), str):
                    raise RequestError(400, "'global_sync' (integer) and 'params_sha256' (string) are required")
                self.state.mark_completed(body)
                self._reply(200, {"ok": True})
            elif self.path == "/finished":
                self.state.mark_finished(group, _check_finished(body), node)
                self._reply(200, {"ok": True})
            else:
                raise RequestError(404, "unknown path")
        except RequestError as e:
            self._reply(e.code, {"error": str(e)})

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
