"""A run's files are its own: one run per directory, set-aside only ever renames our own files, durable pruning.

Real processes hold and lose claims, real mount points (a tmpfs in a private mount namespace) stand
where --fresh would once have copied, and real runs share a directory.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import REPO, TORCHX, read_summary, small_config, wait_gone, write_config

from localsgd_ft.config import ConfigError, parse_config
from localsgd_ft.contract.names import RUN_ID_ENV, RUN_TOKEN_ENV
from localsgd_ft.storage import checkpoints, ownership, set_aside
from localsgd_ft.storage.ownership import OWNER_FILE, DirectoryBusy
from localsgd_ft.storage.set_aside import SetAsideError

HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from localsgd_ft.storage import ownership
    claim, _ = ownership.claim([(Path(sys.argv[1]), "output_dir")], sys.argv[2])
    print("held", flush=True)
    time.sleep(600)
""")


def _hold(directory: Path, run_id: str) -> subprocess.Popen:
    """Another run's process holding ``directory`` (its run id in its environment, as every role's is)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory), run_id], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, RUN_ID_ENV: run_id})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_live_holder_refuses_a_second_run_and_a_dead_one_is_taken_over(tmp_path):
    holder = _hold(tmp_path, "first-1234")
    try:
        with pytest.raises(DirectoryBusy) as e:
            ownership.claim([(tmp_path, "output_dir")], "second-5678")
        message = str(e.value)
        assert f"run first-1234 (pid {holder.pid} on host" in message and "set output_dir" in message, message
        assert "\n" not in message
        with pytest.raises(DirectoryBusy):
            ownership.check_free(tmp_path, "output_dir")
    finally:
        holder.kill()
        holder.wait()
    # SIGKILLed: its claim file stays, and is recognised as stale.
    assert (tmp_path / OWNER_FILE).exists()
    claim, notes = ownership.claim([(tmp_path, "output_dir")], "second-5678")
    assert len(notes) == 1 and f"its process {holder.pid} is gone" in notes[0], notes
    assert json.loads((tmp_path / OWNER_FILE).read_text())["run_id"] == "second-5678"
    claim.release()
    assert not (tmp_path / OWNER_FILE).exists()


def _claim_file(directory: Path, **fields) -> Path:
    holder = {"run_id": "far-1", "host": "another-host", "boot_id": "x", "pid": 1, "started_at": time.time(), **fields}
    path = directory / OWNER_FILE
    path.write_text(json.dumps(holder))
    return path


def test_a_holder_on_another_host_is_live_while_it_renews_and_stale_after(tmp_path):
    path = _claim_file(tmp_path)
    with pytest.raises(DirectoryBusy) as e:
        ownership.claim([(tmp_path, "checkpoint.dir")], "mine-1")
    assert "checkpoint.dir" in str(e.value) and "another-host" in str(e.value)
    old = time.time() - ownership.STALE_S - 5
    os.utime(path, (old, old))
    claim, notes = ownership.claim([(tmp_path, "checkpoint.dir")], "mine-1")
    assert "last renewed" in notes[0], notes
    claim.release()


def test_the_same_run_takes_its_own_claim_back(tmp_path):
    """A scheduler's restart of this very run (same run id, another host) owns the directory."""
    _claim_file(tmp_path, run_id="mine-1")
    claim, notes = ownership.claim([(tmp_path, "output_dir")], "mine-1")
    assert "this run's own" in notes[0]
    claim.release()


def test_release_leaves_a_claim_that_is_not_ours(tmp_path):
    claim, _ = ownership.claim([(tmp_path, "output_dir")], "mine-1")
    _claim_file(tmp_path)  # someone took it over meanwhile
    claim.release()
    assert json.loads((tmp_path / OWNER_FILE).read_text())["run_id"] == "far-1"


def _race(directory: str, run_id: str, barrier, results, done) -> None:
    barrier.wait()
    try:
        ownership.claim([(Path(directory), "output_dir")], run_id)
        results.put(run_id)
        done.wait(60)  # hold it until every racer has looked
    except DirectoryBusy:
        results.put("")


def test_of_many_runs_taking_over_one_stale_claim_exactly_one_wins(tmp_path):
    path = _claim_file(tmp_path)
    old = time.time() - ownership.STALE_S - 5
    os.utime(path, (old, old))
    ctx = multiprocessing.get_context("spawn")
    barrier, results, done = ctx.Barrier(6), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_race, args=(str(tmp_path), f"racer-{i}", barrier, results, done))
             for i in range(6)]
    for i, p in enumerate(procs):  # each with its run id in its environment from the start, as a role has
        with pytest.MonkeyPatch.context() as env:
            env.setenv(RUN_ID_ENV, f"racer-{i}")
            p.start()
    got = [results.get(timeout=60) for _ in procs]
    done.set()
    for p in procs:
        p.join(30)
    assert len([g for g in got if g]) == 1, got


def _checkpoint_files(directory: Path, steps=(100, 200)) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for s in steps:
        (directory / f"step_{s:09d}.pt").write_bytes(b"x" * s)
        (directory / f"step_{s:09d}.json").write_text("{}")


def test_fresh_moves_only_our_checkpoint_files_by_rename(tmp_path):
    ckpt = tmp_path / "ckpt"
    _checkpoint_files(ckpt)
    (ckpt / OWNER_FILE).write_text("{}")
    inode = (ckpt / "step_000000100.pt").stat().st_ino
    moved = set_aside.set_aside_checkpoints(ckpt)
    assert moved.parent == ckpt and moved.name.startswith("set-aside-")
    assert sorted(p.name for p in moved.iterdir()) == [
        "step_000000100.json", "step_000000100.pt", "step_000000200.json", "step_000000200.pt"]
    assert (moved / "step_000000100.pt").stat().st_ino == inode  # renamed, not copied
    assert sorted(p.name for p in ckpt.iterdir()) == [OWNER_FILE, moved.name]
    assert set_aside.set_aside_checkpoints(ckpt) is None  # nothing left to move; an earlier folder is ours


def test_fresh_refuses_a_directory_that_holds_other_files_and_moves_nothing(tmp_path):
    ckpt = tmp_path / "outputs"  # checkpoint.dir: outputs would hold every experiment
    _checkpoint_files(ckpt)
    for name in ("smoke", "cifar_localsgd", "notes.txt", "zz"):
        (ckpt / name).mkdir()
    before = sorted(os.listdir(ckpt))
    with pytest.raises(SetAsideError) as e:
        set_aside.set_aside_checkpoints(ckpt)
    message = str(e.value)
    assert "cifar_localsgd, notes.txt, smoke and 1 more" in message and "nothing was moved" in message, message
    assert sorted(os.listdir(ckpt)) == before


IN_NAMESPACE = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from localsgd_ft.storage import set_aside
    ckpt, what = Path(sys.argv[1]), sys.argv[2]
    if what == "checkpoints":
        for s in (100, 200):
            (ckpt / f"step_{s:09d}.pt").write_bytes(b"x" * 1000)
            (ckpt / f"step_{s:09d}.json").write_text("{}")
        moved = set_aside.set_aside_checkpoints(ckpt)
        print("MOVED", moved, os.stat(moved).st_dev == os.stat(ckpt).st_dev,
              sorted(p.name for p in moved.iterdir()), sorted(os.listdir(ckpt.parent)), flush=True)
    else:  # the run directory's metrics/ is a mount point: setting aside must undo and refuse
        run = ckpt.parent
        (run / "summary.json").write_text("{}")
        try:
            set_aside.set_aside_outputs(run, ["summary.json", "metrics"])
        except set_aside.SetAsideError as e:
            print("REFUSED", e, sorted(os.listdir(run)), flush=True)
""")


def _in_mount_namespace(mount: Path, what: str, bind: bool = False) -> str:
    """Run the script above in a private mount namespace with a tmpfs (or ``mount`` bound onto itself: the same
    filesystem, but a mount point all the same) mounted at ``mount``."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) to mount a tmpfs in a private mount namespace")
    mount.mkdir(parents=True)
    how = f"--bind {mount}" if bind else "-t tmpfs -o size=4m tmpfs"
    script = f"mount {how} {mount} && exec {sys.executable} -c \"$0\" {mount} {what}"
    res = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script, IN_NAMESPACE],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_fresh_on_a_mount_point_renames_inside_it_and_copies_nothing(tmp_path):
    """shutil.move would hit EBUSY on the mount point, copy its files to the parent and empty the volume."""
    out = _in_mount_namespace(tmp_path / "run" / "checkpoints", "checkpoints")
    assert "MOVED" in out and " True " in out, out
    assert "['step_000000100.json', 'step_000000100.pt', 'step_000000200.json', 'step_000000200.pt']" in out, out
    assert out.rstrip().endswith("['checkpoints']"), out  # nothing landed beside the mount point


@pytest.mark.parametrize("bind", [False, True], ids=["another-filesystem", "a-bind-mount"])
def test_a_rename_that_cannot_be_made_undoes_the_others_and_refuses(tmp_path, bind):
    out = _in_mount_namespace(tmp_path / "run" / "metrics", "outputs", bind=bind)
    assert ("REFUSED cannot rename" if bind else "is on another filesystem") in out, out
    assert "nothing was moved" in out and "['metrics', 'summary.json']" in out, out  # summary.json is back


def test_pruning_removes_what_failed_writes_left_and_keeps_invalid_checkpoints(tmp_path):
    ckpt = tmp_path
    _checkpoint_files(ckpt, steps=(300,))
    (ckpt / "step_000000100.pt").write_bytes(b"orphan: its .json never landed")
    (ckpt / ".step_000000200.pt.abc123").write_bytes(b"a killed writer's temporary file")
    (ckpt / "step_000000150.pt").write_bytes(b"corrupt")
    (ckpt / "step_000000150.json").write_text(json.dumps({"step": 150, "sha256": "0" * 64}))
    (ckpt / ".step_000000400.pt.def456").write_bytes(b"a write in progress (newer): left alone")
    checkpoints.prune(ckpt, keep=2, newest=300)
    assert sorted(os.listdir(ckpt)) == [".step_000000400.pt.def456", "step_000000150.json", "step_000000150.pt",
                                        "step_000000300.json", "step_000000300.pt"]


def test_cleanup_lists_and_removes_all_but_the_newest(tmp_path):
    run = tmp_path / "run"
    for stamp in ("20260101-000000", "20260102-000000", "20260103-000000"):
        (run / f"set-aside-{stamp}").mkdir(parents=True)
        (run / f"set-aside-{stamp}" / "summary.json").write_text("{}")
    (run / "checkpoints" / "set-aside-20260101-000000").mkdir(parents=True)
    cmd = [sys.executable, "-m", "localsgd_ft.cleanup", str(run)]
    listed = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert listed.returncode == 0 and "4 set-aside folder(s)" in listed.stdout, listed.stdout
    assert len(list(run.glob("set-aside-*"))) == 3  # listing removes nothing
    gone = subprocess.run(cmd + ["--delete", "--keep", "1"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert gone.returncode == 0 and "removed 2 folder(s)" in gone.stdout, gone.stdout
    assert [p.name for p in run.glob("set-aside-*")] == ["set-aside-20260103-000000"]
    assert (run / "checkpoints" / "set-aside-20260101-000000").is_dir()  # the newest of its own directory


def test_a_launch_that_would_train_nothing_is_refused(tmp_path, cifar_root):
    raw = small_config(tmp_path, cifar_root, train={"max_steps": 100})
    cfg = parse_config(raw)
    checkpoints.save(cfg, {"x": 1}, 100, 10)
    res = subprocess.run([TORCHX, "run", "--", "--config", str(write_config(tmp_path, raw))], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "is at step 100, and train.max_steps is 100: this run would train nothing" \
        in res.stderr, res.stderr
    assert "raise train.max_steps above 100" in res.stderr and "--fresh True" in res.stderr
    assert "Traceback" not in res.stderr and not (cfg.run_dir / "config.yaml").exists()
    with pytest.raises(ConfigError):
        checkpoints.check_extends(cfg, checkpoints.latest(cfg.checkpoint_dir))


def test_fresh_with_foreign_files_is_refused_before_anything_starts(tmp_path, cifar_root):
    raw = small_config(tmp_path, cifar_root, checkpoint={"dir": str(tmp_path / "shared")})
    (tmp_path / "shared" / "other_experiment").mkdir(parents=True)
    _checkpoint_files(tmp_path / "shared")
    before = sorted(os.listdir(tmp_path / "shared"))
    res = subprocess.run([TORCHX, "run", "--", "--fresh", "True", "--config", str(write_config(tmp_path, raw))],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "other_experiment" in res.stderr and "nothing was moved" in res.stderr, res.stderr
    assert sorted(os.listdir(tmp_path / "shared")) == before


def _role_env(run_id: str, token: str) -> dict:
    return {**os.environ, RUN_ID_ENV: run_id, RUN_TOKEN_ENV: token, "LH_HOST": "localhost",
            "PYTHONUNBUFFERED": "1"}


@pytest.mark.integration
def test_the_lighthouse_role_refuses_a_held_directory_and_its_replicas_touch_nothing(tmp_path, cifar_root):
    """Past the client's check (a race, or another host's submission): the roles themselves refuse, at once."""
    raw = small_config(tmp_path, cifar_root, lighthouse={"role_timeout_s": 20})
    path = write_config(tmp_path, raw)
    run_dir = parse_config(raw).run_dir
    (run_dir / "groups").mkdir(parents=True)
    (run_dir / "groups" / "0.json").write_text('{"mine": "the first run\'s result"}')
    (run_dir / "summary.json").write_text('{"succeeded": true}')
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    holder = _hold(run_dir, "first-1234")
    env = _role_env("second-5678", "ab" * 16)
    procs = []
    try:
        start = time.monotonic()
        procs.append(subprocess.Popen([sys.executable, "-m", "localsgd_ft.lighthouse", "--config", str(path),
                                       "--host-env", "LH_HOST"], env=env, cwd=REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
        for g in range(2):
            procs.append(subprocess.Popen([sys.executable, "-m", "localsgd_ft.replica", "--config", str(path),
                                           "--group", str(g), "--host-env", "LH_HOST"], env=env, cwd=REPO,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        outs = [p.communicate(timeout=60)[0] for p in procs]
        took = time.monotonic() - start
    finally:
        for p in procs:
            p.kill()
        holder.kill()
        holder.wait()
    assert procs[0].returncode == 1, outs[0]
    assert "output_dir" in outs[0] and "in use by run first-1234" in outs[0], outs[0]
    for out in outs[1:]:
        assert "not started: the lighthouse role refused this run" in out and "torchrun" not in out, out
    assert took < 15, took  # told at their first contact, not after role_timeout_s
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != OWNER_FILE}
    assert after == before  # nothing moved, written or deleted


@pytest.mark.integration
def test_two_runs_on_one_directory_a_stale_verdict_and_a_killed_run(tmp_path, cifar_root, torchx_run):
    """A second launch on a live run's directory is refused at once; the previous verdict never stands beside
    a new run's files (SIGKILL leaves no summary.json, not the old one); a rerun takes the dead claim over."""
    raw = small_config(tmp_path, cifar_root, train={"max_steps": 2000, "eval_every": 0},
                       checkpoint={"every_syncs": 2, "keep": 1})
    run_dir = parse_config(raw).run_dir
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps({"succeeded": True, "run_id": "older"}))
    first = torchx_run(write_config(tmp_path, raw, "first.yaml"))
    first.wait_for_line(lambda s: "checkpoint written" in s, timeout=120)
    run_id = first.run_id
    assert not (run_dir / "summary.json").exists()  # the old verdict was set aside at the start
    [aside] = run_dir.glob("set-aside-*")
    assert json.loads((aside / "summary.json").read_text())["run_id"] == "older"

    second_raw = {**raw, "lighthouse": {**raw["lighthouse"], "port": raw["lighthouse"]["port"] + 10}}
    start = time.monotonic()
    second = subprocess.run([TORCHX, "run", "--", "--config", str(write_config(tmp_path, second_raw, "second.yaml"))],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert second.returncode != 0 and f"is in use by run {run_id} (pid" in second.stderr, second.stderr
    assert time.monotonic() - start < 30 and "Traceback" not in second.stderr
    assert list(run_dir.glob("set-aside-*")) == [aside]  # it moved nothing

    first.proc.send_signal(signal.SIGKILL)  # the client, then every process of the run
    first.kill()
    assert wait_gone(run_id, 20) == []
    assert not (run_dir / "summary.json").exists() and (run_dir / OWNER_FILE).exists()

    raw["train"]["max_steps"] = checkpoints.latest(parse_config(raw).checkpoint_dir).step + 20
    rerun = torchx_run(write_config(tmp_path, raw, "first.yaml"))
    assert rerun.wait(240) == 0, rerun.tail()
    assert any("took over" in line and f"run {run_id}" in line and "is gone" in line for line in rerun.lines), \
        rerun.tail()
    assert read_summary(raw)["succeeded"] and not (run_dir / OWNER_FILE).exists()


def _fill(directory: Path) -> Path:
    """Fill the filesystem of ``directory`` to the last byte; the filler file."""
    filler = directory / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
        except OSError:
            pass
    return filler


@pytest.mark.integration
def test_a_full_disk_at_checkpoint_time_is_reported_once_and_training_goes_on(tmp_path, cifar_root, torchx_run):
    """Before: OSError from the checkpoint crashed the trainer at every checkpoint until its restarts ran out."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) to mount a small tmpfs in a private mount namespace")
    ckpt = tmp_path / "ckpt"  # a small volume of its own: the output directory stays readable afterwards
    ckpt.mkdir()
    raw = small_config(tmp_path, cifar_root, train={"max_steps": 160, "eval_every": 0},
                       checkpoint={"every_syncs": 2, "keep": 1, "dir": str(ckpt)})
    script = f"mount -t tmpfs -o size=24m tmpfs {ckpt} && exec \"$@\""
    run = torchx_run(write_config(tmp_path, raw), prefix=["unshare", "-m", "--propagation", "private", "sh", "-c",
                                                          script, "sh"])
    run.wait_for_line(lambda s: "checkpoint written" in s, timeout=120)
    inside = Path(f"/proc/{run.proc.pid}/root") / str(ckpt).lstrip("/")  # the tmpfs, seen from outside
    filler = _fill(inside)
    run.wait_for_line(lambda s: "could not be written" in s, timeout=120)
    filler.unlink()
    assert run.wait(240) == 0, run.tail()
    warnings = [line for line in run.lines if "could not be written" in line]
    assert 1 <= len(warnings) <= 2 and "No space left on device" in warnings[0], warnings  # once per writer
    assert all("Traceback" not in line for line in run.lines), run.tail()
    summary = read_summary(raw)
    assert summary["succeeded"] and summary["params_identical"], summary.get("failure_reason")
    assert "No space left on device" in summary["checkpoints_stopped"], summary["checkpoints_stopped"]
    assert all(g["steps"] == 160 for g in summary["replica_groups"].values())
    assert all(g["restarts"] == 0 for g in summary["replica_groups"].values())  # no crash loop


WRITE_FAILS = textwrap.dedent("""
    import resource, signal, sys
    from localsgd_ft.config import parse_config
    from localsgd_ft.contract import Summary
    from localsgd_ft.launch import lighthouse_role
    cfg = parse_config({"name": "t", "output_dir": sys.argv[1]})
    summary = Summary(name="t", succeeded=True, final_test_accuracy=0.9, params_identical=True)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write fails with EFBIG, as on a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    sys.exit(lighthouse_role._conclude(cfg, summary, stopped=False, print_summary=False))
""")


def test_the_verdict_is_told_even_when_the_summary_cannot_be_written(tmp_path):
    res = subprocess.run([sys.executable, "-c", WRITE_FAILS, str(tmp_path / "run")], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert res.returncode == 0, res.stdout + res.stderr  # the verdict (SUCCEEDED), not a traceback
    assert "could not write" in res.stdout and "SUMMARY_JSON" in res.stdout, res.stdout
    assert "lighthouse: training SUCCEEDED" in res.stdout and "summary: not written" in res.stdout, res.stdout
    assert "Traceback" not in res.stderr, res.stderr
