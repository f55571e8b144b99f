"""The completion service: how replica roles and trainers talk to the lighthouse role.

The torchft lighthouse has no notion of a run that ends, so the lighthouse role
also serves this small JSON-over-HTTP API on ``lighthouse.port + 1``. Every
request must carry the run's token (header ``X-LocalSGD-Run-Token``): a process
of another run, or any other process that can reach the port, is refused (403).

- ``POST /heartbeat {"group": g}``: replica role g is alive (every second);
  answers the status below. A role silent for ``lighthouse.role_timeout_s``
  is declared lost.
- ``POST /started {"group": g}``: group g's Manager is up (heartbeating).
- ``POST /event {"group": g, "kind": ..., ...}``: something happened (an
  injected failure, a recovery, a checkpoint); stamped with the lighthouse's
  clock. Answers ``{"first": true}`` the first time a ``fault_id`` is
  reported, so each planned failure fires once, across restarts. A ``fault``
  event is accepted only for a failure of this run's plan.
- ``POST /completed {"group": g, "global_sync": n, "params_sha256": h}``:
  group g committed the final sync. From then on the run's training is over:
  a group that (re)starts takes the final state instead of training alone.
- ``POST /finished {"group": g, "exit_code": c, "result": {...} | null}``:
  group g's torchrun has exited; ``result`` is what its trainer reported
  (checked against :data:`RESULT_FIELDS`).
- ``GET /status``: ``{"run", "started", "expected", "fired", "finished",
  "abort", "completed", "lighthouse_incarnation"}``.

Until the lighthouse role is ready (its ports bound, old outputs moved aside)
every request is answered 503 and clients retry. Bodies are capped at
:data:`MAX_BODY` bytes and connections time out after :data:`SOCKET_TIMEOUT_S`.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, List, Optional, Tuple

from .lifecycle import TOKEN_HEADER

log = logging.getLogger("localsgd_ft.control")

MAX_BODY = 1 << 20
SOCKET_TIMEOUT_S = 10.0

# What a trainer's result may hold, and of which JSON types. The summary's computed
# fields (exit_code, succeeded, lost) are not among them: a result cannot set them.
RESULT_FIELDS: Dict[str, Tuple[type, ...]] = {
    "steps": (int,), "syncs_attempted": (int,), "syncs_committed": (int,), "sync_time_s": (int, float),
    "max_sync_s": (int, float), "global_syncs": (int,), "restarts": (int,), "resumed_from_step": (int,),
    "checkpoints_written": (list,), "params_sha256": (str,), "final_test_accuracy": (int, float),
    "evals": (list,), "train_time_s": (int, float), "samples_per_s": (int, float, type(None)),
    "peak_rss_mb": (int, float), "error": (str,), "permanent": (bool,), "finished_late": (bool,),
    "algorithm": (str,), "sync_bytes": (int,), "worker_params_sha256": (list,),
}
EVENT_KINDS = {"fault", "resumed", "recovered", "sync_stall", "checkpoint"}


class RequestError(ValueError):
    """A request the service refuses; ``code`` is the HTTP status."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class CompletionState:
    """What the groups have reported so far; thread-safe (read it through the methods)."""

    def __init__(self, expected: int, run: str = "", faults: Optional[Dict[int, str]] = None) -> None:
        self.expected = expected
        self.run = run
        self.faults: Dict[int, str] = dict(faults or {})  # fault id -> kind: what may be reported
        self.ready = False
        self.started: set[int] = set()
        self.finished: Dict[int, dict] = {}
        self.events: List[dict] = []
        self.fired: set[int] = set()
        self.abort: Optional[str] = None
        self.completed: Optional[dict] = None
        self.incarnation = 0  # how many times the torchft lighthouse was started (see localsgd_ft.quorums)
        self.last_seen: Dict[int, float] = {}  # group -> monotonic time of its role's last heartbeat
        self.on_event: Optional[Callable[[dict], None]] = None  # called for every new event
        self._cond = threading.Condition()

    def open(self) -> None:
        with self._cond:
            self.ready = True
            self._cond.notify_all()

    def new_incarnation(self) -> None:
        """Count a (re)start of the torchft lighthouse: called before it can form any quorum."""
        with self._cond:
            self.incarnation += 1

    def heartbeat(self, group: int) -> None:
        with self._cond:
            self.last_seen[group] = time.monotonic()

    def mark_started(self, group: int) -> None:
        with self._cond:
            self.started.add(group)
            self._cond.notify_all()

    def add_event(self, event: dict) -> bool:
        """Record ``event``; False if it repeats an already fired ``fault_id``."""
        with self._cond:
            fid = event.get("fault_id")
            if event.get("kind") == "fault":
                if fid in self.fired:
                    return False
                self.fired.add(fid)
            event["time"] = time.time()  # the lighthouse's clock, never the sender's
            self.events.append(event)
            self._cond.notify_all()
        if self.on_event is not None:
            self.on_event(event)
        return True

    def mark_completed(self, report: dict) -> None:
        """The first group to commit the final sync sets the run's final state; later ones only confirm it."""
        with self._cond:
            if self.completed is None:
                self.completed = {k: report.get(k) for k in ("group", "global_sync", "params_sha256")}
                self._cond.notify_all()

    def mark_finished(self, group: int, report: dict) -> None:
        with self._cond:
            earlier = self.finished.get(group)
            # The first report stands, except a loss we only inferred from silence: a role that
            # comes back and reports is better evidence.
            if earlier is not None and not earlier.get("declared_lost"):
                return
            self.finished[group] = report
            self._cond.notify_all()

    def declare_silent_lost(self, timeout_s: float) -> List[Tuple[int, float]]:
        """Groups whose role has heartbeated before but not for ``timeout_s``: mark them finished as lost."""
        now = time.monotonic()
        with self._cond:
            silent = [(g, now - seen) for g, seen in sorted(self.last_seen.items())
                      if g not in self.finished and now - seen > timeout_s]
            self._mark_lost({g: f"role lost: no heartbeat for {s:.0f} s" for g, s in silent})
        return silent

    def declare_never_seen_lost(self, after_s: float) -> List[int]:
        """Groups whose role never made contact (no heartbeat, no report): mark them finished as lost."""
        with self._cond:
            unseen = [g for g in range(self.expected) if g not in self.last_seen and g not in self.finished]
            self._mark_lost({g: f"role lost: it never reached the lighthouse role in {after_s:.0f} s" for g in unseen})
        return unseen

    def _mark_lost(self, reasons: Dict[int, str]) -> None:
        """Record groups as lost by inference (caller holds the lock); a later report of theirs replaces it."""
        for g, reason in reasons.items():
            self.finished[g] = {"group": g, "exit_code": -1, "declared_lost": True, "result": {"error": reason}}
        if reasons:
            self._cond.notify_all()

    def set_abort(self, reason: str) -> bool:
        """Abort the run with ``reason``; False if it was already aborted (the first reason stands)."""
        with self._cond:
            if self.abort is not None:
                return False
            self.abort = reason
            self._cond.notify_all()
            return True

    def status(self) -> dict:
        with self._cond:
            return {"run": self.run, "started": sorted(self.started), "expected": self.expected,
                    "fired": sorted(self.fired), "finished": sorted(self.finished), "abort": self.abort,
                    "completed": self.completed, "lighthouse_incarnation": self.incarnation}

    def snapshot(self, events: bool = True) -> dict:
        """Copies of what was reported, taken under the lock (for the summary and the verdict).

        ``events=False`` leaves the event log out (it grows with every failure; the checks the
        lighthouse role makes twice a second do not need it).
        """
        with self._cond:
            return {"finished": {g: dict(r) for g, r in self.finished.items()},
                    "events": [dict(e) for e in self.events] if events else [], "abort": self.abort,
                    "completed": dict(self.completed) if self.completed else None}

    def wait(self, predicate: Callable[[], bool], timeout: Optional[float] = None) -> bool:
        """Wait until ``predicate()`` (evaluated under the lock) holds, or ``timeout``."""
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def all_finished(self) -> bool:
        with self._cond:
            return len(self.finished) >= self.expected


def _valid_group(body: Any, expected: int) -> int:
    group = body.get("group") if isinstance(body, dict) else None
    if not isinstance(group, int) or isinstance(group, bool) or not 0 <= group < expected:
        raise RequestError(400, f"'group' must be an integer in 0..{expected - 1}")
    return group


def check_result(result: Any) -> Optional[dict]:
    """``result`` if it is a trainer result (None or a dict of known keys and types), else RequestError."""
    if result is None:
        return None
    if not isinstance(result, dict):
        raise RequestError(400, "'result' must be an object or null")
    for key, value in result.items():
        types = RESULT_FIELDS.get(key)
        if types is None:
            raise RequestError(400, f"'result.{key}' is not a result field (allowed: {', '.join(sorted(RESULT_FIELDS))})")
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            raise RequestError(400, f"'result.{key}' has the wrong type ({type(value).__name__})")
    return result


def _check_finished(body: dict) -> dict:
    code = body.get("exit_code")
    if not isinstance(code, int) or isinstance(code, bool):
        raise RequestError(400, "'exit_code' must be an integer")
    return {"group": body["group"], "exit_code": code, "result": check_result(body.get("result"))}


def _check_event(body: dict, faults: Dict[int, str]) -> dict:
    kind = body.get("kind")
    if kind not in EVENT_KINDS:
        raise RequestError(400, f"'kind' must be one of {', '.join(sorted(EVENT_KINDS))}")
    if kind == "fault":
        fid = body.get("fault_id")
        if not isinstance(fid, int) or faults.get(fid) != body.get("fault"):
            raise RequestError(403, "no such failure in this run's plan (faults are injected only when "
                                    "faults.enabled is true, and only as planned)")
    return body


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
            if self.path == "/heartbeat":
                self.state.heartbeat(group)
                self._reply(200, self.state.status())
            elif self.path == "/started":
                self.state.mark_started(group)
                self._reply(200, {"ok": True})
            elif self.path == "/event":
                self._reply(200, {"first": self.state.add_event(_check_event(body, self.state.faults))})
            elif self.path == "/completed":
                if not isinstance(body.get("global_sync"), int) or not isinstance(body.get("params_sha256"), str):
                    raise RequestError(400, "'global_sync' (integer) and 'params_sha256' (string) are required")
                self.state.mark_completed(body)
                self._reply(200, {"ok": True})
            elif self.path == "/finished":
                self.state.mark_finished(group, _check_finished(body))
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


class Refused(RuntimeError):
    """The completion service answered with an error (4xx): retrying will not help."""

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
        req = urllib.request.Request(self.url + path, data=data,
                                     headers={"Content-Type": "application/json", TOKEN_HEADER: self.token})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s or self.timeout_s) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            if e.code == 503:
                raise ConnectionError("the lighthouse role is starting") from None
            try:
                message = json.loads(e.read()).get("error", str(e))
            except (ValueError, OSError):
                message = str(e)
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

    def heartbeat(self, group: int, deadline_s: float = 5.0) -> dict:
        return self._call_retrying("/heartbeat", {"group": group}, deadline_s)

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

    def report(self, group: int, kind: str, **fields: Any) -> None:
        """Report an event from training: a failure to report is a warning, never a stopped trainer."""
        try:
            self.event(group, kind, **fields)
        except Exception as e:
            log.warning("could not report %s: %s", kind, e)

    def completed(self, group: int, global_sync: int, params_sha256: str, deadline_s: float = 10.0) -> None:
        self._call_retrying("/completed", {"group": group, "global_sync": global_sync,
                                           "params_sha256": params_sha256}, deadline_s)

    def finished(self, group: int, exit_code: int, result: Optional[dict], deadline_s: float = 60.0) -> None:
        self._call_retrying("/finished", {"group": group, "exit_code": exit_code, "result": result}, deadline_s)
