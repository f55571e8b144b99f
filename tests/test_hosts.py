"""The multi-host test bed (tests/hosts.py) for real: hosts with their own names and addresses, links that go
dark without a reset and come back, links that are slow, and nothing left behind."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import hosts
import pytest
from hosts import TestBed

WHY_NOT = hosts.unavailable()
pytestmark = [pytest.mark.integration, pytest.mark.skipif(WHY_NOT is not None, reason=str(WHY_NOT))]

# A tiny TCP peer, run on a host: 'serve PORT' echoes each line and sends N bytes on 'bytes N';
# 'talk ADDR PORT' sends a line a second and prints what happened to each.
PEER = r'''
import socket, sys, time
mode = sys.argv[1]
if mode == "serve":
    srv = socket.create_server(("0.0.0.0", int(sys.argv[2])))
    print("listening", flush=True)
    while True:
        conn, _ = srv.accept()
        f = conn.makefile("rb")
        for line in f:
            if line.startswith(b"bytes "):
                conn.sendall(b"x" * int(line.split()[1]))
            else:
                conn.sendall(line)
else:
    addr, port, n = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    s = socket.create_connection((addr, port), timeout=10)
    start = time.monotonic()
    s.sendall(b"bytes %d\n" % n)
    got = 0
    while got < n:
        got += len(s.recv(1 << 20))
    print("received", got, round(time.monotonic() - start, 3), flush=True)
'''


def _serve(bed: TestBed, i: int, port: int) -> subprocess.Popen:
    server = bed.run(i, [sys.executable, "-c", PEER, "serve", str(port)], stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == "listening"
    return server


def test_every_host_has_its_own_name_address_and_no_way_out():
    with TestBed(3) as bed:
        for i in range(3):
            assert bed.check_output(i, ["hostname"]).strip() == bed.name(i)
            # every host resolves every other by name, to its own address on the bridge
            for j in range(3):
                assert bed.check_output(i, ["getent", "hosts", bed.name(j)]).split()[0] == bed.address(j)
            # no route leaves the bridge: the world is unreachable from a host
            out = subprocess.run(bed.command(i, ["ip", "route", "get", "192.0.2.1"]), capture_output=True,
                                 text=True)
            assert out.returncode != 0 and "unreachable" in out.stderr.lower()
            assert f"dev {bed.bridge}" in subprocess.run(["ip", "route", "get", bed.address(i)],
                                                         capture_output=True, text=True).stdout
        assert bed.subnet.subnet_of(hosts.RANGE)


def test_a_cut_link_is_silence_not_a_reset_and_a_restored_one_carries_on():
    with TestBed(2) as bed:
        server = _serve(bed, 0, 7000)
        talk = (f"import socket\ns = socket.create_connection(('{bed.name(0)}', 7000), timeout=10)\n"
                "for i in range(3):\n"
                "    s.settimeout(float(input())); s.sendall(b'ping %d\\n' % i)\n"
                "    try:\n        print('answer', s.recv(100).decode().split(), flush=True)\n"
                "    except socket.timeout:\n        print('silence', flush=True)\n"
                "    except OSError as e:\n        print('error', type(e).__name__, flush=True)\n")
        client = bed.run(1, [sys.executable, "-c", talk], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            def ask(timeout_s: float) -> str:
                client.stdin.write(f"{timeout_s}\n")
                client.stdin.flush()
                return client.stdout.readline().strip()

            assert ask(10) == "answer ['ping', '0']"
            bed.cut(0)
            assert ask(3) == "silence"  # neither a reset nor an error: nothing at all
            bed.restore(0)
            # TCP retransmits what the cut swallowed: the connection carries on where it stopped
            assert ask(30).startswith("answer ['ping', '1'")
        finally:
            client.kill()
            server.kill()


def test_a_rate_limited_link_is_slower_by_the_ratio_of_the_rates():
    with TestBed(2) as bed:
        server = _serve(bed, 0, 7001)
        size = 4 * 1024 * 1024

        def fetch() -> float:
            out = bed.check_output(1, [sys.executable, "-c", PEER, "talk", bed.address(0), "7001", str(size)],
                                   timeout=60).split()
            assert out[0] == "received" and int(out[1]) == size
            return float(out[2])

        try:
            fast = fetch()
            bed.limit(0, mbit=40)
            slow = fetch()
            bed.limit(0, mbit=None)
            again = fetch()
        finally:
            server.kill()
        expected = size * 8 / 40e6  # 0.84 s at 40 Mbit/s
        assert slow > 0.8 * expected, (fast, slow)
        assert slow > 4 * max(fast, again), (fast, slow, again)


def test_nothing_is_left_when_a_test_fails_inside_the_bed():
    with pytest.raises(RuntimeError, match="boom"):
        with TestBed(2, tag="fail") as bed:
            ns, port, etc = bed.ns(0), bed.port_link(1), hosts.NETNS_ETC / bed.ns(1)
            assert etc.is_dir()
            raise RuntimeError("boom")
    assert ns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert subprocess.run(["ip", "link", "show", port], capture_output=True).returncode != 0
    assert subprocess.run(["ip", "link", "show", bed.bridge], capture_output=True).returncode != 0
    assert not etc.exists()


def test_cleanup_removes_what_a_killed_test_left():
    bed = TestBed(1, tag="kill")
    bed.__enter__()  # then "killed": never closed
    assert hosts.cleanup()  # something went
    assert bed.ns(0) not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert subprocess.run(["ip", "link", "show", bed.bridge], capture_output=True).returncode != 0


# ---------------------------------------------------------------------------- a real run across the hosts

def test_a_20s_partition_costs_the_survivor_a_heartbeat_and_the_group_heals_when_its_link_returns(tmp_path,
                                                                                                 cifar_root):
    """Lighthouse role on host 0, groups 0 and 1 on hosts 1 and 2; group 1's link is cut for 20 s, its processes
    left running. The survivor stalls about the heartbeat timeout; group 1 heals as soon as its link is back,
    without a restart, and every group ends bit-identical."""
    from bed_run import BedRun
    from conftest import small_config, write_config

    hb_s, cut_s = 2.0, 20.0
    cfg = small_config(tmp_path, cifar_root, train={"max_steps": 1600},
                       lighthouse={"role_timeout_s": 90, "heartbeat_timeout_ms": int(hb_s * 1000)},
                       localsgd={"timeout_s": 60, "quorum_timeout_s": 60, "quorum_retries": 3})
    path = write_config(tmp_path, cfg)
    with TestBed(3) as bed:
        run = BedRun(bed, path, hosts.REPO)
        try:
            deadline = time.monotonic() + 240
            while "group 1 step 100 " not in run.text("replica_1"):
                assert time.monotonic() < deadline and run.procs["lighthouse"].poll() is None, run.text("replica_1")
                time.sleep(0.2)
            bed.cut(2)
            time.sleep(cut_s)  # the partition itself: what is measured is how the run rides it
            bed.restore(2)
            restored = time.time()
            assert run.wait(600) == 0, run.text("lighthouse")[-3000:]
        finally:
            left = run.kill()
        assert left == []  # every process of the run ended by itself
    summary = json.loads((Path(cfg["output_dir"]) / "summary.json").read_text())
    assert summary["succeeded"] and summary["params_identical"], summary["failure_reason"]
    groups = summary["replica_groups"]
    assert groups["1"]["restarts"] == 0 and not groups["1"].get("finished_late"), groups["1"]
    assert groups["0"]["max_sync_s"] <= hb_s + 2, groups["0"]  # the survivor: a heartbeat, not the partition
    healed = [e for e in summary["events"] if e["kind"] == "recovered" and e["group"] == 1]
    assert healed and healed[0]["time"] - restored < 10, (healed, restored)
