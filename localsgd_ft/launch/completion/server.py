"""The completion service's HTTP server: bounds each connection, checks each request's token and body, then
updates the state.

Nothing a client sends can hold the service or reach the state unchecked: a whole request (its headers
too, which arrive before the token can be checked) must arrive within ``request_deadline_s``; at most
``max_connections`` are served at once (the excess is answered 503, which clients retry); a body has a
plain Content-Length of at most MAX_BODY bytes and is parsed, its nesting bounded, into its record
(:mod:`localsgd_ft.contract`) before anything is stored; and whatever goes wrong in here, the client gets
an answer.
"""

from __future__ import annotations

import hmac
import io
import json
import re
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional, Tuple

from localsgd_ft.contract import (LENIENT, TOKEN_HEADER, CompletedRequest, ContractError, ErrorReply, EventReply,
                                  FaultEvent, FinishedRequest, GroupRequest, HeartbeatRequest, OkReply, Route,
                                  StartedReply, StartedRequest, read, read_json, read_request)
from localsgd_ft.launch.completion.state import CompletionState, RequestError

MAX_BODY = 1 << 20
REQUEST_DEADLINE_S = 10.0  # a whole request, headers and body; ours take milliseconds
# Connections served at once: every role's heartbeat, its trainers' events and a margin, and never fewer than
# this (a run's roles connect for milliseconds each; the excess retries at once).
MIN_CONNECTIONS = 64
CONNECTIONS_PER_ROLE = 4
_LENGTH = re.compile(r"[0-9]{1,19}")
_BUSY_BODY = json.dumps({"error": "too many connections at once; retry"}).encode()
_BUSY = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
         b"Content-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))


class _DeadlineSocket(io.RawIOBase):
    """A connection's socket as a file whose reads and writes all end by one deadline.

    A per-read timeout alone lets a client that sends a byte now and then hold its
    connection (and its thread) forever.
    """

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        self._sock, self._deadline = sock, deadline

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def _arm(self) -> None:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request did not arrive within its deadline")
        self._sock.settimeout(left)

    def readinto(self, buffer: Any) -> int:
        self._arm()
        return self._sock.recv_into(buffer)

    def write(self, data: Any) -> int:
        self._arm()
        self._sock.sendall(data)
        return len(data)


class _Handler(BaseHTTPRequestHandler):
    state: CompletionState
    token: str
    request_deadline_s: float = REQUEST_DEADLINE_S

    def setup(self) -> None:
        self.connection = self.request
        stream = _DeadlineSocket(self.connection, time.monotonic() + self.request_deadline_s)
        self.rfile = io.BufferedReader(stream)
        self.wfile = stream

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

    def _length(self) -> int:
        """The body's length, from one plain Content-Length (none: an empty body)."""
        if self.headers.get("Transfer-Encoding") is not None:
            raise RequestError(411, "send the body with a Content-Length (no Transfer-Encoding)")
        given = self.headers.get_all("Content-Length") or []
        if len(set(given)) > 1:
            raise RequestError(400, f"Content-Length: got several ({', '.join(v[:20] for v in given[:4])}); send one")
        if not given:
            return 0
        if not _LENGTH.fullmatch(given[0].strip()):
            raise RequestError(400, f"Content-Length: got {given[0][:40]!r}, expected the body's size in bytes")
        return int(given[0])

    def _body(self) -> Any:
        length = self._length()
        if length > MAX_BODY:
            # Read what was sent (bounded, and by the deadline), so the client gets this answer rather than a reset.
            left = min(length, 16 * MAX_BODY)
            while left > 0:
                chunk = self.rfile.read(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)
            raise RequestError(413, f"body too large ({length} bytes; at most {MAX_BODY})")
        data = self.rfile.read(length)
        if len(data) < length:
            raise RequestError(400, f"body: got {len(data)} bytes, Content-Length said {length}")
        try:
            return read_json(data or b"{}")
        except ContractError as e:
            raise RequestError(400, str(e)) from None

    def do_GET(self) -> None:  # noqa: N802
        self._answering(self._get)

    def do_POST(self) -> None:  # noqa: N802
        self._answering(self._post)

    def _answering(self, serve_it: Callable[[], Tuple[int, dict]]) -> None:
        """Serve the request; every refusal, and any failure in here, becomes an answer to the client."""
        try:
            code, payload = serve_it()
        except RequestError as e:
            code, payload = e.code, ErrorReply(error=str(e)).wire()
        except OSError:
            raise  # the connection failed (its deadline passed): nobody to answer
        except Exception as e:  # a bug here must cost neither the client its answer nor the run its verdict
            print(f"lighthouse: completion service: {self.command} {self.path[:80]}: {type(e).__name__}: {e}",
                  file=sys.stderr, flush=True)
            code, payload = 500, ErrorReply(error=f"the completion service failed: {type(e).__name__}: {e}").wire()
        self._reply(code, payload)

    def _get(self) -> Tuple[int, dict]:
        self._authorised()
        if self.path != Route.STATUS.value:
            raise RequestError(404, "unknown path")
        return 200, self.state.status()

    def _post(self) -> Tuple[int, dict]:
        self._authorised()
        body = self._body()
        route = next((r for r in Route if r.value == self.path and r is not Route.STATUS), None)
        if route is None:
            raise RequestError(404, "unknown path")
        try:
            request = read_request(route, body, self.state.expected, self.state.nodes)
        except ContractError as e:
            if route is Route.FINISHED:
                self._note_refused_report(body, str(e))
            raise RequestError(400, str(e)) from None
        return 200, self._answer(request)

    def _note_refused_report(self, body: Any, reason: str) -> None:
        """Remember whose end report was refused, when the body names a sender of this run."""
        context = {"groups": self.state.expected, "nodes": self.state.nodes, **LENIENT}
        try:
            sender = read(GroupRequest, body, context)
        except ContractError:
            return
        self.state.refuse_report(sender.group, sender.node, reason)

    def _answer(self, request: GroupRequest) -> dict:
        """Update the state with a checked request; its reply."""
        state = self.state
        if isinstance(request, HeartbeatRequest):
            state.heartbeat(request.group, request.node, request.trainer_quiet_s)
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

    def __init__(self, address: Tuple[str, int], handler: type, max_connections: int) -> None:
        self.max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve on a thread of its own while a slot is free; else answer 503 at once, from this thread."""
        if not self._slots.acquire(blocking=False):
            self._turn_away(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _turn_away(self, request: socket.socket) -> None:
        # Never blocking: this is the thread that accepts. The reply fits any socket's send buffer.
        try:
            request.setblocking(False)
            request.send(_BUSY)
        except OSError:
            pass
        self.shutdown_request(request)

    def shutdown_request(self, request: socket.socket) -> None:
        """Close a connection without resetting it: what the client sent that was not read (a body refused
        unread, bytes past its Content-Length) is read first, or the kernel's reset could destroy the answer."""
        try:
            request.shutdown(socket.SHUT_WR)
            request.setblocking(False)
            for _ in range(2 * MAX_BODY >> 16):  # what has arrived, at most twice the cap; never waiting for more
                if not request.recv(1 << 16):
                    break
        except OSError:
            pass
        self.close_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that failed outside a request's answer (the client vanished): one line, no traceback."""
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            print(f"lighthouse: completion service: dropped a connection: {type(error).__name__}: {error}",
                  file=sys.stderr, flush=True)


def serve(host: str, port: int, state: CompletionState, token: str, request_deadline_s: float = REQUEST_DEADLINE_S,
          max_connections: Optional[int] = None) -> ThreadingHTTPServer:
    """Bind ``host:port`` (OSError if taken) and serve in a daemon thread; ``.shutdown()`` stops it.

    ``max_connections`` (default: CONNECTIONS_PER_ROLE for each replica role, at least MIN_CONNECTIONS)
    are served at once.
    """
    handler = type("Handler", (_Handler,), {"state": state, "token": token, "request_deadline_s": request_deadline_s})
    slots = max_connections or max(MIN_CONNECTIONS, CONNECTIONS_PER_ROLE * state.expected * state.nodes)
    server = _Server((host, port), handler, slots)
    threading.Thread(target=server.serve_forever, name="completion-service", daemon=True).start()
    return server
