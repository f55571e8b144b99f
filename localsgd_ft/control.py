"""The completion service: how replica groups tell the lighthouse role they started and finished.

The torchft lighthouse has no notion of a finished job, so the lighthouse role
also serves this small JSON-over-HTTP API on ``lighthouse.port + 1``:

- ``POST /started {"group": g}``: group g's Manager is up (heartbeating).
- ``POST /event {"group": g, "kind": ..., ...}``: something happened (an
  injected failure, a recovery); stamped with the lighthouse's clock.
  Answers ``{"first": true}`` the first time a ``fault_id`` is reported, so
  each planned failure fires once, across restarts.
- ``POST /finished {"group": g, "exit_code": c, "result": {...} | null}``:
  group g's torchrun has exited; ``result`` is what its trainer reported.
- ``GET /status``: ``{"started", "expected", "fired", "finished", "abort"}``.
  Trainers wait on ``started`` so the first quorum holds every group; replica
  wrappers stop their torchrun when ``abort`` names a reason.

The lighthouse role ends when every group has posted ``/finished``, so the app
ends on its own, and it writes ``summary.json`` from those reports: this also
works where the roles share no filesystem (Kubernetes).
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, List, Optional


class CompletionState:
    """What the groups have reported so far; thread-safe."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.started: set[int] = set()
        self.finished: Dict[int, dict] = {}
        self.events: List[dict] = []
        self.fired: set[int] = set()
        self.abort: Optional[str] = None
        self.on_event: Optional[Callable[[dict], None]] = None  # called for every new event
        self._cond = threading.Condition()

    def mark_started(self, group: int) -> None:
        with self._cond:
            self.started.add(group)
            self._cond.notify_all()

    def add_event(self, event: dict) -> bool:
        """Record ``event``; False if it repeats an already fired ``fault_id``."""
        with self._cond:
            fid = event.get("fault_id")
            if fid is not None:
                if fid in self.fired:
                    return False
                self.fired.add(fid)
            event.setdefault("time", time.time())
            self.events.append(event)
            self._cond.notify_all()
        if self.on_event is not None:
            self.on_event(event)
        return True

    def mark_finished(self, group: int, report: dict) -> None:
        with self._cond:
            self.finished[group] = report
            self._cond.notify_all()

    def set_abort(self, reason: str) -> None:
        with self._cond:
            self.abort = reason
            self._cond.notify_all()

    def status(self) -> dict:
        with self._cond:
            return {"started": sorted(self.started), "expected": self.expected, "fired": sorted(self.fired),
                    "finished": sorted(self.finished), "abort": self.abort}

    def wait(self, predicate: Callable[[], bool], timeout: Optional[float] = None) -> bool:
        """Wait until ``predicate()`` (evaluated under the lock) holds, or ``timeout``."""
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def all_finished(self) -> bool:
        return len(self.finished) >= self.expected


def _valid_group(body: Any, expected: int) -> int:
    group = body.get("group") if isinstance(body, dict) else None
    if not isinstance(group, int) or not 0 <= group < expected:
        raise ValueError(f"'group' must be an integer in 0..{expected - 1}")
    return group


class _Handler(BaseHTTPRequestHandler):
    state: CompletionState

    def _reply(self, code: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/status":
            self._reply(200, self.state.status())
        else:
            self._reply(404, {"error": "unknown path"})

    def do_POST(self) -> None:  # noqa: N802
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            group = _valid_group(body, self.state.expected)
        except ValueError as e:
            self._reply(400, {"error": str(e)})
            return
        if self.path == "/started":
            self.state.mark_started(group)
            self._reply(200, {"ok": True})
        elif self.path == "/event":
            self._reply(200, {"first": self.state.add_event(body)})
        elif self.path == "/finished":
            self.state.mark_finished(group, body)
            self._reply(200, {"ok": True})
        else:
            self._reply(404, {"error": "unknown path"})

    def log_message(self, format: str, *args: Any) -> None:  # keep the role's log for training
        pass


def serve(host: str, port: int, state: CompletionState) -> ThreadingHTTPServer:
    """Start the completion service in a daemon thread; ``.shutdown()`` stops it."""
    handler = type("Handler", (_Handler,), {"state": state})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="completion-service", daemon=True).start()
    return server


class CompletionClient:
    """Client side of the completion service, used by replica wrappers and trainers."""

    def __init__(self, url: str, timeout_s: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    def _call(self, path: str, body: Optional[dict] = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
            return json.loads(resp.read())

    def _call_retrying(self, path: str, body: Optional[dict], deadline_s: float) -> dict:
        """Retry while the service is unreachable (it may still be starting), up to ``deadline_s``."""
        end = time.monotonic() + deadline_s
        while True:
            try:
                return self._call(path, body)
            except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
                if isinstance(e, urllib.error.HTTPError) or time.monotonic() >= end:
                    raise
                time.sleep(0.2)

    def started(self, group: int, deadline_s: float = 60.0) -> None:
        self._call_retrying("/started", {"group": group}, deadline_s)

    def status(self, deadline_s: float = 10.0) -> dict:
        return self._call_retrying("/status", None, deadline_s)

    def wait_all_started(self, deadline_s: float) -> list:
        """Poll until every group reported /started or the deadline passes; return who started."""
        end = time.monotonic() + deadline_s
        while True:
            state = self.status(max(1.0, end - time.monotonic()))
            if len(state["started"]) >= state["expected"] or time.monotonic() >= end:
                return state["started"]
            time.sleep(0.1)

    def event(self, group: int, kind: str, deadline_s: float = 10.0, **fields: Any) -> bool:
        """Report an event; returns False if its ``fault_id`` had already fired."""
        return self._call_retrying("/event", {"group": group, "kind": kind, **fields}, deadline_s)["first"]

    def finished(self, group: int, exit_code: int, result: Optional[dict], deadline_s: float = 60.0) -> None:
        self._call_retrying("/finished", {"group": group, "exit_code": exit_code, "result": result}, deadline_s)
