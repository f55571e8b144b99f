"""Fuzzing the completion service for real: hypothesis drives requests at a running server over real sockets.

The requests are near misses of every route's record (a key dropped, a value swapped for any JSON value,
an unknown key), any JSON at all, bytes that are no JSON, bodies nested past the bound, lying or bogus
Content-Lengths, wrong tokens and unknown paths. Every one must get an HTTP answer that is not a 500, and
whose body is the route's reply or an error; afterwards the service still serves, everything it stored
reads back as its record, and summary.json can be built from it and written as strict JSON.
Derandomized: the same requests every run. Run with ``-s`` to see how many were sent.
"""

from __future__ import annotations

import json
import socket
from typing import Any, Dict, List, Tuple

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from localsgd_ft.config import parse_config
from localsgd_ft.contract import (ErrorReply, EventReply, GroupReport, OkReply, Route, StartedReply, Status, Summary,
                                  read_event)
from localsgd_ft.launch.completion.client import CompletionClient
from localsgd_ft.launch.completion.server import MAX_BODY, serve
from localsgd_ft.launch.completion.state import CompletionState
from localsgd_ft.results.summary import summarize

TOKEN = "fuzz-token"
GROUPS, NODES = 2, 2
PLAN = {0: "kill", 1: "lighthouse", 2: "hang"}
EXAMPLES = 1000
REPLIES = {Route.HEARTBEAT: Status, Route.STATUS: Status, Route.STARTED: StartedReply, Route.EVENT: EventReply,
           Route.COMPLETED: OkReply, Route.FINISHED: OkReply}
ANSWERS = {200, 400, 403, 404, 411, 413}  # never 500 (a failure in the service), never a dropped connection

# ---------------------------------------------------------------------------- what is sent

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10)
ints = st.one_of(st.integers(0, 300), st.integers(0, 300), st.integers(), st.sampled_from([-1, 2 ** 63, 10 ** 30]))
# Mostly a group and node of this run, so that many requests are stored; now and then one that is not.
groups = st.sampled_from([0, 1] * 4 + [-1, GROUPS, True, "0", 1.0, None])
digests = st.one_of(st.text("0123456789abcdef", min_size=1, max_size=66))
numbers = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(0, 10 ** 6))
evaluations = st.fixed_dictionaries({"step": ints, "test_accuracy": numbers})
results = st.none() | st.fixed_dictionaries({}, optional={
    "algorithm": st.sampled_from(["localsgd", "diloco", "sgd"]), "steps": ints, "restarts": ints,
    "params_sha256": digests, "worker_params_sha256": st.lists(digests, max_size=3),
    "final_test_accuracy": numbers, "evals": st.lists(evaluations, max_size=5), "evals_count": ints,
    "checkpoints_written": st.lists(ints, max_size=5), "error": st.text(max_size=50), "permanent": st.booleans(),
    "samples_per_s": st.none() | numbers, "succeeded": st.booleans()})
events = st.one_of(
    st.fixed_dictionaries({"kind": st.just("fault"), "fault": st.sampled_from(["kill", "lighthouse", "hang", "x"]),
                           "fault_id": st.integers(-1, 3), "target": st.integers(-1, GROUPS), "step": ints},
                          optional={"duration_s": numbers, "worker": ints, "moment": st.sampled_from(["step", "no"])}),
    st.fixed_dictionaries({"kind": st.just("resumed")}, optional={"step": ints}),
    st.fixed_dictionaries({"kind": st.just("recovered"), "step": ints}, optional={
        "local_step": ints, "participants": ints, "global_sync": ints, "params_sha256": digests,
        "healed_from": st.none() | ints, "disrupted_s": numbers}),
    st.fixed_dictionaries({"kind": st.just("sync_stall"), "duration_s": numbers},
                          optional={"step": ints, "committed": st.booleans(), "participants": ints}),
    st.fixed_dictionaries({"kind": st.just("checkpoint")}, optional={"step": ints, "sync": ints}),
    st.fixed_dictionaries({"kind": json_values}))
BODIES = {
    Route.HEARTBEAT: st.fixed_dictionaries({"group": groups}, optional={"node": groups}),
    Route.STARTED: st.fixed_dictionaries({"group": groups}, optional={"incarnation": st.text(max_size=70)}),
    Route.EVENT: st.tuples(st.fixed_dictionaries({"group": groups}, optional={"node": groups, "time": numbers}),
                           events).map(lambda t: {**t[0], **t[1]}),
    Route.COMPLETED: st.fixed_dictionaries({"group": groups, "global_sync": ints, "params_sha256": digests}),
    Route.FINISHED: st.fixed_dictionaries({"group": groups, "exit_code": ints, "result": results},
                                          optional={"node": groups}),
}


@st.composite
def near_misses(draw: Any, route: Route) -> Any:
    """A body for ``route`` as its sender builds it, then perhaps broken: a key dropped, a value replaced, a key
    added."""
    body = draw(BODIES[route])
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        how = draw(st.sampled_from(["drop", "replace", "add"]))
        if how == "drop" and body:
            del body[draw(st.sampled_from(sorted(body)))]
        elif how == "replace" and body:
            body[draw(st.sampled_from(sorted(body)))] = draw(json_values)
        else:
            body[draw(st.text(max_size=10))] = draw(json_values)
    return body


HUGE = b"<a body just over the cap>"


def _nested(depth: int) -> bytes:
    return b'{"group": 0, "kind": "resumed", "step": ' + b"[" * depth + b"]" * depth + b"}"


@st.composite
def requests(draw: Any) -> Tuple[str, str, Dict[str, str], bytes, bool]:
    """(method, path, headers, body, whether to close our side after sending)."""
    route = draw(st.sampled_from(list(Route)))
    method = "GET" if route is Route.STATUS and draw(st.booleans()) else "POST"
    path = draw(st.sampled_from([route.value] * 12 + ["/", "/nope", route.value + "/x", "/status?x=1"]))
    kind = draw(st.sampled_from(["record"] * 30 + ["json"] * 3 + ["bytes"] * 3 + ["nested"] * 3 + ["huge"]))
    if kind == "record" and route is not Route.STATUS:
        body = json.dumps(draw(near_misses(route))).encode()  # floats() may write NaN and Infinity: refused
    elif kind == "nested":
        body = _nested(draw(st.sampled_from([1, 6, 7, 8, 50, 20_000])))
    elif kind == "bytes":
        body = draw(st.binary(max_size=40))
    elif kind == "huge":
        body = HUGE  # written out only when sent: a failing example stays readable
    else:
        body = json.dumps(draw(json_values)).encode()
    headers: Dict[str, str] = {}
    token = draw(st.sampled_from(["right"] * 18 + ["wrong", "missing"]))
    if token != "missing":
        headers["X-LocalSGD-Run-Token"] = TOKEN if token == "right" else draw(st.text("abc", max_size=12))
    length = draw(st.sampled_from(["true"] * 15 + ["none", "short", "long", "negative", "junk"]))
    if length == "true":
        headers["Content-Length"] = str(len(body))
    elif length == "short":
        headers["Content-Length"] = str(max(0, len(body) - draw(st.integers(1, 5))))
    elif length == "long":
        headers["Content-Length"] = str(len(body) + draw(st.integers(1, 5)))  # the rest never comes: we close
    elif length == "negative":
        headers["Content-Length"] = str(-draw(st.integers(1, 10)))
    elif length == "junk":
        headers["Content-Length"] = draw(st.sampled_from(["abc", "1e3", " ", "0x10", "١٢"]))
    return method, path, headers, body, length == "long" or draw(st.booleans())


# ---------------------------------------------------------------------------- what must come back

def _exchange(port: int, method: str, path: str, headers: Dict[str, str], body: bytes, close: bool) -> bytes:
    if body == HUGE:
        body = b'{"group": 0, "pad": "' + b"x" * (MAX_BODY - 20) + b'"}'
        headers = {k: str(len(body)) if k == "Content-Length" and v == str(len(HUGE)) else v
                   for k, v in headers.items()}
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        try:
            sock.sendall(f"{method} {path} HTTP/1.0\r\n{head}\r\n".encode() + body)
            if close:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the service answered before it read everything (a refusal): its answer is still there to read
        data = b""
        while True:
            try:
                chunk = sock.recv(1 << 16)
            except ConnectionResetError:
                break
            if not chunk:
                return data
            data += chunk
    return data


def _check(reply: bytes, path: str) -> int:
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 "), f"no answer: {reply[:200]!r}"
    code = int(head.split()[1])
    assert code in ANSWERS, reply[:300]
    payload = json.loads(body)
    if code == 200:
        REPLIES[next(r for r in Route if r.value == path)].model_validate(payload)
    else:
        ErrorReply.model_validate(payload)
        assert "\n" not in payload["error"] and len(payload["error"]) <= 500, payload
    return code


def _stored(state: CompletionState) -> str:
    """Everything the service holds that a request could change.

    ``silent`` and ``silent_nodes`` are left out of the status: it is derived from the stored heartbeat times and the clock, so it
    changes with time alone; the times it is derived from are compared instead.
    """
    status = {**state.status(), "silent": None, "silent_nodes": None}
    return json.dumps([state.snapshot(), status, state.node_reports, sorted(state.last_seen.items()),
                       sorted(state.trainer_quiet.items())], default=str)


def _summary_is_written(state: CompletionState) -> None:
    """What the service stored reads back as records, and summary.json can be built and written as strict JSON."""
    snapshot = state.snapshot()
    for event in snapshot["events"]:
        read_event(event)
    for report in snapshot["finished"].values():
        GroupReport.model_validate(report)
    cfg = parse_config({"replica_groups": {"count": GROUPS, "nodes": NODES}})
    text = json.dumps(summarize(cfg, snapshot, 0.0, "fuzz.yaml", 0, 1.0).wire(), allow_nan=False)
    Summary.of(json.loads(text))


def test_fuzzing_the_running_service_never_breaks_it_or_the_verdict():
    state = CompletionState(GROUPS, "t-fuzz", PLAN, nodes=NODES)
    state.on_event = read_event  # as the lighthouse role does: it reads back every event it is handed
    state.open()
    server = serve("127.0.0.1", 0, state, TOKEN)
    port = server.server_address[1]
    sent: List[int] = []
    codes: Dict[int, int] = {}

    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.lists(requests(), min_size=1, max_size=3))
    def fuzz(batch: List[Tuple[str, str, Dict[str, str], bytes, bool]]) -> None:
        for method, path, headers, body, close in batch:
            sent.append(MAX_BODY if body == HUGE else len(body))
            before = _stored(state)
            code = _check(_exchange(port, method, path, headers, body, close), path.split("?")[0])
            codes[code] = codes.get(code, 0) + 1
            assert code == 200 or _stored(state) == before, "a refused request changed what the service holds"

    try:
        fuzz()
        client = CompletionClient(f"http://127.0.0.1:{port}", TOKEN)
        assert client.status(deadline_s=5.0)["expected"] == GROUPS  # still serving
        _summary_is_written(state)
    finally:
        server.shutdown()
        server.server_close()
    print(f"\nfuzz: {len(sent)} requests ({sum(sent)} body bytes) in {EXAMPLES} examples; answers "
          f"{sorted(codes.items())}; stored {len(state.events)} events, {len(state.finished)} finished groups")
    assert len(sent) >= EXAMPLES and codes.get(200, 0) > 0.1 * len(sent), codes  # a fair share got through
