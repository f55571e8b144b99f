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
# A rate that makes the test model's sync last a second or more (its parameters: about 0.1 MB).
MID_SYNC_MBIT = 1.0
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
            bed.reshape(0, mbit=80, burst_kb=20)  # in place, as a benchmark changes a link mid-run
            faster = fetch()
            bed.limit(0, mbit=None)
            again = fetch()
        finally:
            server.kill()
        expected = size * 8 / 40e6  # 0.84 s at 40 Mbit/s
        assert slow > 0.8 * expected, (fast, slow)
        assert slow > 4 * max(fast, again), (fast, slow, again)
        assert 0.35 < faster / slow < 0.7, (slow, faster)  # twice the rate, half the time


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
    other = TestBed(1, tag="keep").__enter__()  # another bed (the CI's Slurm cluster's) is left alone
    try:
        assert hosts.cleanup("kill")  # something went
        assert other.ns(0) in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    finally:
        other.close()
    assert bed.ns(0) not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert subprocess.run(["ip", "link", "show", bed.bridge], capture_output=True).returncode != 0


def _link_state(bed: TestBed, i: int) -> str:
    out = subprocess.run(["ip", "-o", "link", "show", bed.port_link(i)], capture_output=True, text=True).stdout
    return "up" if ",UP" in out or "<UP" in out else "down"


def _poll(predicate, deadline_s: float, what: str) -> None:
    deadline = time.monotonic() + deadline_s
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


FAULTS = "from localsgd_ft.training import host_faults as h\n"


def test_only_a_bed_host_names_its_link_and_a_host_failure_is_refused_elsewhere(tmp_path):
    from localsgd_ft.config import ConfigError
    from localsgd_ft.contract import TESTBED_MARK
    from localsgd_ft.training import host_faults

    forged = tmp_path / "hosts"
    with TestBed(2) as bed:
        for i in range(2):
            said = bed.check_output(i, [sys.executable, "-c", FAULTS + "print(h.bed_link())"]).strip()
            assert said == f"BedLink(port='{bed.port_link(i)}', root='{bed.root_ns}')"
        # Here, the root namespace: no host, even with a hosts file that names the bed's own root handle.
        forged.write_text(f"127.0.0.1 localhost\n{TESTBED_MARK} link={bed.port_link(0)} root={bed.root_ns}\n")
        assert host_faults.MARK_LINE.fullmatch(forged.read_text().splitlines()[1])
        assert host_faults.bed_link(forged) is None and host_faults.bed_link() is None
    with pytest.raises(ConfigError, match=r"failure #3 is a 'host_down'.*test bed.*'kill' or 'hang'"):
        host_faults.require_bed("host_down", 3)


def test_host_down_from_outside_or_inside_kills_everything_on_the_host_and_leaves_it_dark():
    with TestBed(3) as bed:
        # From outside (a test's script): the bed itself.
        server = _serve(bed, 1, 7002)
        bystander = bed.run(2, ["sleep", "600"])
        assert server.pid in bed.host_down(1)
        assert server.wait(10) == -9 and _link_state(bed, 1) == "down" and bystander.poll() is None
        # From inside (what the YAML's host_down does): the trainer cuts its own link and kills its host.
        sibling = bed.run(2, ["sleep", "600"])
        killer = bed.run(2, [sys.executable, "-c", FAULTS + "h.host_down(h.bed_link())"])
        assert killer.wait(30) == -9 and sibling.wait(10) == -9 and bystander.wait(10) == -9
        assert _link_state(bed, 2) == "down"
        other = bed.run(0, ["sleep", "600"])  # another host is untouched
        assert other.poll() is None
        other.kill()


def test_a_partition_from_inside_cuts_the_link_and_restores_it_after_its_duration_even_if_its_process_is_gone():
    with TestBed(1) as bed:
        started = time.monotonic()
        bed.check_output(0, [sys.executable, "-c", FAULTS + "h.partition(h.bed_link(), 2.0)"])  # then it exits
        assert _link_state(bed, 0) == "down"
        _poll(lambda: _link_state(bed, 0) == "up", 30, "the partition's link never came back")
        assert time.monotonic() - started >= 2.0


# ---------------------------------------------------------------------------- a real run across the hosts

def test_a_20s_partition_costs_the_survivor_a_heartbeat_and_the_group_heals_when_its_link_returns(tmp_path,
                                                                                                 cifar_root):
    """Lighthouse role on host 0, groups 0 and 1 on hosts 1 and 2; group 1's link is cut for 20 s by the YAML's
    `partition`, its processes left running. The survivor stalls about the heartbeat timeout; group 1 heals as
    soon as its link is back, without a restart, and every group ends bit-identical."""
    from bed_run import BedRun
    from conftest import small_config, write_config

    hb_s, cut_s = 2.0, 20.0
    # The survivor must still be training when the link returns, or group 1 has nothing to heal into (it
    # finishes late, from the final checkpoint): 4400 steps after the cut last 30 s at 7 ms a step.
    cfg = small_config(tmp_path, cifar_root, train={"max_steps": 4500},
                       lighthouse={"role_timeout_s": 90, "heartbeat_timeout_ms": int(hb_s * 1000)},
                       localsgd={"timeout_s": 60, "quorum_timeout_s": 60, "quorum_retries": 3},
                       faults={"enabled": True, "schedule": [
                           {"kind": "partition", "group": 1, "at_step": 100, "duration_s": cut_s}]})
    path = write_config(tmp_path, cfg)
    with TestBed(3) as bed:
        run = BedRun(bed, path, hosts.REPO)
        try:
            assert run.wait(600) == 0, run.text("lighthouse")[-3000:]
        finally:
            left = run.kill()
        assert left == []  # every process of the run ended by itself
    summary = json.loads((Path(cfg["output_dir"]) / "summary.json").read_text())
    assert summary["succeeded"] and summary["params_identical"], summary["failure_reason"]
    groups = summary["replica_groups"]
    assert groups["1"]["restarts"] == 0 and not groups["1"].get("finished_late"), groups["1"]
    cut = next(e for e in summary["events"] if e["kind"] == "fault")
    # The survivor while the link is dark: a heartbeat, not the partition. (The sync in which the group heals
    # afterwards may cost it more, for TCP's retransmission backoff: that is the heal, not silence.)
    dark = [e["duration_s"] for e in summary["events"] if e["kind"] == "sync_stall" and e["group"] == 0
            and cut["time"] <= e["time"] <= cut["time"] + cut_s]
    assert dark and max(dark) <= hb_s + 2, summary["events"]
    assert cut["fault"] == "partition" and summary["faults"]["by_kind"] == {"partition": 1}
    healed = [e for e in summary["events"] if e["kind"] == "recovered" and e["group"] == 1]
    assert healed and healed[0]["time"] - (cut["time"] + cut_s) < 10, (healed, cut)
    recovery = summary["recoveries"][0]
    assert recovery["kind"] == "partition" and recovery["recovered"]
    print(f"\npartition {cut_s} s: recovery {recovery}; healed {healed[0]['time'] - cut['time'] - cut_s:.2f} s "
          f"after the link returned; survivor's longest stall while dark {max(dark)} s, longest sync "
          f"{groups['0']['max_sync_s']} s")


@pytest.mark.parametrize("moment", ["allreduce", "step"])
def test_a_replica_host_gone_dark_costs_the_survivors_a_heartbeat_and_its_group_is_named_lost(tmp_path, cifar_root,
                                                                                               moment):
    """Three groups on hosts 1-3; group 2's host goes dark for good (the YAML's `host_down`): inside a sync
    whose allreduce the rate-limited links make last seconds, or between syncs. The survivors stall about the
    heartbeat timeout, group 2 is declared lost with the reason, and the run succeeds with min_replicas met."""
    from bed_run import BedRun
    from conftest import small_config, write_config

    hb_s, role_timeout_s = 2.0, 10.0
    cfg = small_config(tmp_path, cifar_root, train={"max_steps": 600},
                       replica_groups={"count": 3},
                       lighthouse={"role_timeout_s": role_timeout_s, "heartbeat_timeout_ms": int(hb_s * 1000),
                                   "min_replicas": 2},
                       localsgd={"timeout_s": 60, "quorum_timeout_s": 60, "quorum_retries": 3},
                       faults={"enabled": True, "schedule": [
                           {"kind": "host_down", "group": 2, "at_step": 200, "moment": moment}]})
    path = write_config(tmp_path, cfg)
    with TestBed(4) as bed:
        if moment == "allreduce":
            for i in range(1, 4):
                bed.limit(i, mbit=MID_SYNC_MBIT)
        run = BedRun(bed, path, hosts.REPO)
        try:
            assert run.wait(600) == 0, run.text("lighthouse")[-3000:]
        finally:
            left = run.kill()
        assert left == []
    summary = json.loads((Path(cfg["output_dir"]) / "summary.json").read_text())
    assert summary["succeeded"] and summary["lost_groups"] == [2], summary["failure_reason"]
    assert summary["params_identical"]
    recovery = summary["recoveries"][0]
    assert recovery["kind"] == "host_down" and recovery["moment"] == moment and not recovery["recovered"]
    assert recovery["survivor_stall_s"] <= hb_s + 2, recovery
    for g in ("0", "1"):
        assert summary["replica_groups"][g]["max_sync_s"] <= hb_s + 2, summary["replica_groups"][g]
    assert "lost replica groups: [2]" in run.text("lighthouse")
    print(f"\nhost_down at {moment}: recovery {recovery}; group 2: {summary['replica_groups']['2'].get('error')}; "
          f"survivors' longest sync {[summary['replica_groups'][g]['max_sync_s'] for g in ('0', '1')]}; "
          f"wall {summary['wall_time_s']} s")
    if moment == "allreduce":  # the link made the sync last: the host went dark inside it
        assert any(e["kind"] == "sync_abandoned" for e in summary["events"]), summary["events"]


def test_the_lighthouse_host_gone_dark_stops_every_replica_within_the_role_timeout(tmp_path, cifar_root):
    """The lighthouse role's host goes dark for good (from outside: its link cut, everything on it killed),
    mid-run. Nothing will ever answer the replicas again: each replica role stops its trainers and ends,
    with that reason, within lighthouse.role_timeout_s + 5 s; nothing of the run is left."""
    from bed_run import BedRun
    from conftest import small_config, write_config

    role_timeout_s = 10.0
    cfg = small_config(tmp_path, cifar_root, train={"max_steps": 100000},
                       lighthouse={"role_timeout_s": role_timeout_s, "heartbeat_timeout_ms": 2000})
    path = write_config(tmp_path, cfg)
    with TestBed(3) as bed:
        run = BedRun(bed, path, hosts.REPO)
        try:
            _poll(lambda: all(f"group {g} step 100 " in run.text(f"replica_{g}") for g in (0, 1)), 240,
                  "the groups never reached step 100")
            bed.host_down(0)
            dark = time.monotonic()
            ended = {}
            for g in (0, 1):
                code = run.procs[f"replica_{g}"].wait(role_timeout_s + 30)
                ended[g] = (round(time.monotonic() - dark, 2), code)
        finally:
            left = run.kill()
        assert left == [], left
    print(f"\nlighthouse host dark: replica roles ended after {ended} (s, exit code); role_timeout_s {role_timeout_s}")
    for g, (after_s, code) in ended.items():
        assert code != 0 and after_s <= role_timeout_s + 5, ended
        assert "the lighthouse role has been unreachable for" in run.text(f"replica_{g}"), run.text(f"replica_{g}")


def test_a_host_that_reboots_gets_its_group_back_and_nothing_is_lost(tmp_path, cifar_root):
    """Group 1's host goes dark (link cut, everything on it SIGKILLed, from outside); 3 s later it is back and
    group 1's replica role is started on it again, as a cluster reschedules a lost task. The new incarnation
    resumes and heals from group 0, which trained on meanwhile: the run SUCCEEDS, no group lost, every group
    bit-identical, the restart counted (what the silent storm does 30 times: benchmarks/silent_storm.py)."""
    from bed_run import BedRun
    from conftest import small_config, write_config

    cfg = small_config(tmp_path, cifar_root, train={"max_steps": 900, "eval_every": 0, "log_every": 100},
                       lighthouse={"role_timeout_s": 30, "heartbeat_timeout_ms": 2000},
                       localsgd={"timeout_s": 60, "quorum_timeout_s": 60})
    path = write_config(tmp_path, cfg)
    with TestBed(3) as bed:
        run = BedRun(bed, path, hosts.REPO)
        try:
            _poll(lambda: "group 1 step 200 " in run.text("replica_1"), 240, "group 1 never reached step 200")
            bed.host_down(2)
            assert run.procs["replica_1"].wait(30) == -9  # its role died with the host
            bed.restore(2)  # the reboot
            run.start("replica_1")
            assert run.wait(600) == 0, run.text("lighthouse")[-3000:]
        finally:
            left = run.kill()
        assert left == []
    summary = json.loads((Path(cfg["output_dir"]) / "summary.json").read_text())
    assert summary["succeeded"] and summary["lost_groups"] == [], summary["failure_reason"]
    assert summary["params_identical"] and summary["replica_groups"]["1"]["restarts"] == 1, summary["replica_groups"]
    assert "(restart 1) ready" in run.text("replica_1")
