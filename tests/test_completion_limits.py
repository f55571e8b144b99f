"""The completion service cannot be broken by a request (issue 20, items 6 and 7): real servers, real sockets.

Each test sends what a broken or hostile client sends (a slow drip of headers, too many connections, a
bad Content-Length, a deep body, a number JSON has not, a result too large) and checks the answer, what
was stored, and that the service still serves. The last test is a real ``torchx run`` whose result would
not have fitted the body cap. The fuzzing is in test_completion_fuzz.py.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import pytest
from conftest import finish, read_summary, small_config, write_config

from localsgd_ft.contract import FinishedRequest, Route, TrainerResult
from localsgd_ft.contract.records import MAX_CHECKPOINTS_LISTED, MAX_EVALS, MAX_TEXT, MAX_WORKERS
from localsgd_ft.launch.completion.client import CompletionClient, Refused
from localsgd_ft.launch.completion.server import MAX_BODY, serve
from localsgd_ft.launch.completion.state import CompletionState
from localsgd_ft.storage.fixture import write_fixture

TOKEN = "limits-token"


@pytest.fixture
def service():
    """Start real completion services on free ports: (state, port, client); each is shut down at the end."""
    servers = []

    def start(expected: int = 2, **options) -> Tuple[CompletionState, int, CompletionClient]:
        state = CompletionState(expected, "t-limits")
        state.open()
        server = serve("127.0.0.1", 0, state, TOKEN, **options)
        servers.append(server)
        port = server.server_address[1]
        return state, port, CompletionClient(f"http://127.0.0.1:{port}", TOKEN, timeout_s=5.0)

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _head(method: str, path: str, headers: Dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.0", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _answer(sock: socket.socket, timeout: float = 5.0) -> Tuple[int, dict]:
    """Read the reply to the end (HTTP/1.0: the server closes); its status and JSON body."""
    sock.settimeout(timeout)
    data = b""
    while True:
        chunk = sock.recv(1 << 16)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def _post_raw(port: int, path: str, body: bytes, headers: Optional[Dict[str, str]] = None) -> Tuple[int, dict]:
    """POST ``body`` with exactly ``headers`` (the token added), keeping our side open until the reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(_head("POST", path, {"X-LocalSGD-Run-Token": TOKEN, **(headers or {})}) + body)
        return _answer(sock)


def test_a_client_dripping_its_headers_is_cut_off_at_the_deadline(service):
    """A byte every 0.2 s never trips a per-read timeout; the whole-request deadline (1 s here) cuts it off."""
    state, port, client = service(request_deadline_s=1.0)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"POST /heartbeat HTTP/1.0\r\nX-Pad: ")
        t0 = time.monotonic()
        closed_after = None
        while time.monotonic() - t0 < 8.0:
            readable, _, _ = select.select([sock], [], [], 0.2)
            if readable:
                assert sock.recv(1024) == b""  # closed without an answer: it never finished its request
                closed_after = time.monotonic() - t0
                break
            sock.sendall(b"x")
            assert client.status(deadline_s=2.0)["expected"] == 2  # the others are served meanwhile
    assert closed_after is not None, "the dripping client held its connection for 8 s"
    assert 0.8 <= closed_after < 2.5, closed_after


def test_connections_beyond_the_bound_are_answered_503_and_clients_retry(service):
    state, port, client = service(max_connections=3)
    holders = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
    try:
        for sock in holders:
            sock.sendall(b"POST /heart")  # a request that never ends holds its slot until its deadline
        # The server accepts in order: by the time it takes this one, the three hold every slot.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as extra:
            extra.sendall(_head("GET", "/status", {"X-LocalSGD-Run-Token": TOKEN}))
            code, body = _answer(extra)
        assert code == 503 and "too many connections" in body["error"], body
        with pytest.raises(ConnectionError):  # busy is not a refusal: the client retries it
            client._call(Route.STATUS)
    finally:
        for sock in holders:
            sock.close()
    assert client.status(deadline_s=10.0)["expected"] == 2  # the slots come back as the holders go


@pytest.mark.parametrize("headers, code, words", [
    ({"Content-Length": "-1"}, 400, "Content-Length"),  # read to EOF before: held until the idle timeout
    ({"Content-Length": "+13"}, 400, "Content-Length"),
    ({"Content-Length": "1_3"}, 400, "Content-Length"),
    ({"Content-Length": "13, 13"}, 400, "Content-Length"),
    ({"Transfer-Encoding": "chunked"}, 411, "Content-Length"),
])
def test_a_bad_content_length_is_refused_at_once(service, headers, code, words):
    state, port, _ = service()
    t0 = time.monotonic()
    got, body = _post_raw(port, "/heartbeat", b'{"group": 0}', headers)
    assert (got, time.monotonic() - t0 < 3.0) == (code, True) and words in body["error"], body
    assert state.last_seen == {}


def test_two_different_content_lengths_are_refused(service):
    state, port, _ = service()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        head = _head("POST", "/heartbeat", {"X-LocalSGD-Run-Token": TOKEN, "Content-Length": "12"})
        sock.sendall(head[:-2] + b"Content-Length: 2\r\n\r\n" + b'{"group": 0}')
        code, body = _answer(sock)
    assert code == 400 and "several" in body["error"] and state.last_seen == {}


def test_a_deeply_nested_body_is_refused_not_dropped(service):
    """Before, the JSON parser's RecursionError escaped the handler and the connection dropped unanswered."""
    state, port, client = service()
    deep = "[" * 100_000 + "]" * 100_000
    code, body = _post_raw(port, "/event", deep.encode(), {"Content-Length": str(len(deep))})
    assert code == 400 and "nests deeper than" in body["error"], body
    nested: dict = {}
    for _ in range(20):  # deep inside an otherwise good event
        nested = {"a": nested}
    with pytest.raises(Refused, match="nests deeper than") as e:
        client._call(Route.EVENT, {"group": 0, "kind": "resumed", "step": nested})
    assert e.value.code == 400
    assert state.events == [] and client.status()["expected"] == 2


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_a_number_json_has_not_is_refused(service, number):
    """Stored, it made summary.json invalid JSON for every strict reader."""
    state, port, _ = service()
    body = ('{"group": 0, "kind": "sync_stall", "step": 5, "duration_s": %s}' % number).encode()
    code, reply = _post_raw(port, "/event", body, {"Content-Length": str(len(body))})
    assert code == 400 and "not JSON" in reply["error"], reply
    assert state.events == []


def test_an_event_is_checked_before_it_is_stored(service):
    """A checkpoint or resumed event without its step once broke summary.json at the end of the run."""
    state, _, client = service()
    for kind in ("checkpoint", "resumed"):
        with pytest.raises(Refused, match="step: missing") as e:
            client.event(0, kind)
        assert e.value.code == 400
    assert client.event(0, "checkpoint", step=10, sync=1) and state.events[0]["step"] == 10


# ---------------------------------------------------------------------------- results fit by construction

def test_the_largest_result_there_can_be_fits_the_cap():
    """Every list at its bound, every number at 64 bits, every text at its longest: still far under the cap."""
    n = 2 ** 63
    longest_float = -2.2250738585072014e-308
    result = TrainerResult(
        algorithm="localsgd", sync_bytes=n, steps=n, syncs_attempted=n, syncs_committed=n,
        sync_time_s=longest_float, max_sync_s=longest_float, global_syncs=n, restarts=n, resumed_from_step=n,
        checkpoints_written=[n] * MAX_CHECKPOINTS_LISTED, checkpoints_count=n, params_sha256="f" * 64,
        worker_params_sha256=["f" * 64] * MAX_WORKERS, final_test_accuracy=longest_float,
        evals=[{"step": n, "test_accuracy": longest_float}] * MAX_EVALS, evals_count=n,
        train_time_s=longest_float, samples_per_s=longest_float, peak_rss_mb=longest_float,
        error="\U0001F600" * (10 * MAX_TEXT),  # the widest character JSON escapes: 12 bytes each
        permanent=True, finished_late=True)
    report = FinishedRequest(group=n, node=n, exit_code=n, result=result).wire()
    size = len(json.dumps(report).encode())  # as the client sends it
    assert size < MAX_BODY // 2, size


def test_a_result_too_long_to_list_is_thinned_with_its_counts():
    evals = [{"step": s, "test_accuracy": 0.5} for s in range(1, 100_001)]
    cause = "RuntimeError: " + "x" * 100_000 + " (the innermost cause)"
    result = TrainerResult(evals=evals, checkpoints_written=list(range(5000)), error=cause)
    steps = [e.step for e in result.evals]
    assert len(steps) <= MAX_EVALS and steps[0] == 1 and steps[-1] == 100_000 and steps == sorted(set(steps))
    assert result.evals_count == 100_000
    assert result.checkpoints_written == list(range(5000 - MAX_CHECKPOINTS_LISTED, 5000))
    assert result.checkpoints_count == 5000
    assert len(result.error) <= MAX_TEXT and result.error.startswith("RuntimeError: ")
    assert result.error.endswith("(the innermost cause)") and "characters cut" in result.error
    assert len(TrainerResult.failed(None, cause).error) <= MAX_TEXT


def test_a_trainer_keeps_a_bounded_history_of_its_evaluations(capsys):
    from localsgd_ft.config import parse_config
    from localsgd_ft.training.position import Position
    from localsgd_ft.training.progress import Progress

    cfg = parse_config({"train": {"max_steps": 3000, "eval_every": 1}})
    progress = Progress(cfg, 0, Position(10, 300, 0), None, None, lambda: 0.25, None, "cpu")
    for step in range(1, 3001):
        progress._evaluate(step)
        assert len(progress.evals) <= MAX_EVALS and progress.evals[-1]["step"] == step
    steps = [e["step"] for e in progress.evals]
    assert progress.evals_count == 3000 and steps[0] == 1 and steps == sorted(set(steps))
    # Thinned from the old end: the latest hundred are all there, the oldest are sparse.
    assert steps[-100:] == list(range(2901, 3001)) and steps[1] - steps[0] > 1
    capsys.readouterr()


def test_a_result_refused_as_too_large_still_reports_the_end(service):
    """A result built by hand may still be too large: the group's end is recorded with why, not lost for silence."""
    state, _, client = service()
    client.heartbeat(0)
    client.finished(0, 0, {"params_sha256": "ab", "error": "x" * (MAX_BODY + 1)})
    (report,) = state.finished.values()
    assert report["exit_code"] == 0 and not report.get("declared_lost")
    assert "refused its result" in report["result"]["error"] and "too large" in report["result"]["error"]


def test_a_refused_report_is_not_mistaken_for_a_lost_role(service):
    state, _, client = service()
    client.heartbeat(1)
    with pytest.raises(Refused, match="result.succeeded") as e:
        client.finished(1, 0, {"params_sha256": "ab", "succeeded": True})  # a result may not claim that
    assert e.value.code == 400 and state.finished == {}  # nothing of it was stored
    state.declare_silent_lost(0.0)  # then the role fell silent (it exits after a refusal)
    error = state.finished[1]["result"]["error"]
    assert "was refused by the completion service" in error and "result.succeeded" in error, error
    assert not error.startswith("role lost"), error


def test_the_service_answers_while_a_report_is_being_refused(service):
    """A big body that is refused is read while other clients are served on their own threads."""
    state, port, client = service()
    huge = b'{"group": 0, "pad": "' + b"x" * (2 * MAX_BODY) + b'"}'
    replies = []
    sender = threading.Thread(target=lambda: replies.append(_post_raw(port, "/event", huge,
                                                                      {"Content-Length": str(len(huge))})))
    sender.start()
    assert client.status()["expected"] == 2
    sender.join(20)
    assert replies and replies[0][0] == 413


# ---------------------------------------------------------------------------- a real run

@pytest.mark.integration
@pytest.mark.slow  # about 2 minutes: 21,000 steps, each evaluated (the unit tests bound the worst case)
def test_a_run_whose_result_outgrew_the_cap_succeeds(tmp_path, torchx_run):
    """An evaluation every step for 21000 steps: the full list is over 1 MiB, so before the bounds the group's
    /finished was refused (413) and the group, which trained to the end, was "role lost: no heartbeat".

    One group, a one-channel model, batch 1 and a 13-image test split keep it to two or three minutes here.
    """
    data = tmp_path / "data"
    write_fixture(data, train_per_batch=20, test_size=13)
    steps = 21_000
    cfg = small_config(tmp_path, data, replica_groups={"count": 1, "max_restarts": 0},
                       localsgd={"sync_every": 1000}, data={"batch_size": 1, "augment": False},
                       model={"width": 1}, train={"max_steps": steps, "eval_every": 1, "log_every": 1000},
                       checkpoint={"enabled": False})
    path = write_config(tmp_path, cfg)
    run = torchx_run(path)
    code = finish(run, path, timeout=420)
    summary = read_summary(cfg)
    assert code == 0 and summary["succeeded"], (summary.get("failure_reason"), run.tail())
    group = summary["replica_groups"]["0"]
    assert group["steps"] == steps and group["evals_count"] == steps and summary["lost_groups"] == []
    listed = [e["step"] for e in group["evals"]]
    assert len(listed) <= MAX_EVALS and listed[0] == 1 and listed[-1] == steps
    # Every evaluation is in the metrics file: all of them in the result would not have fitted the cap.
    events = [json.loads(line) for line in (Path(cfg["output_dir"]) / "metrics" / "group_0.jsonl").open()]
    every = [{"step": e["local_step"], "test_accuracy": e["test_accuracy"]} for e in events if e["kind"] == "eval"]
    assert len(every) == steps
    unbounded = FinishedRequest(group=0, exit_code=0, result=None).wire()
    unbounded["result"] = {**{k: v for k, v in group.items() if k in TrainerResult.model_fields}, "evals": every}
    assert len(json.dumps(unbounded).encode()) > MAX_BODY
