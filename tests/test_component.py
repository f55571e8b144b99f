"""The torchx component: YAML -> AppDef, and the real torchx CLI's handling of it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torchx.specs as specs
from conftest import REPO, TORCHX, small_config, write_config
from torchx.specs.finder import ComponentValidationException, get_component

from localsgd_ft.config import ConfigError, load_config
from localsgd_ft.contract import RUN_ID_ENV, RUN_TOKEN_ENV
from localsgd_ft.launch import lifecycle
from localsgd_ft.training.manager import cross_group_process_group

COMPONENT = "components/localsgd.py:localsgd"


@pytest.fixture(autouse=True)
def _client_env(monkeypatch):
    """The component hands the token (and on Slurm, SBATCH_OUTPUT) to its children through os.environ:
    start each test without them and take them away afterwards."""
    for name in (RUN_TOKEN_ENV, "SBATCH_OUTPUT", "SBATCH_EXPORT"):
        monkeypatch.setenv(name, "")  # recorded, so the test's end restores the variable's absence
        monkeypatch.delenv(name)


def appdef(config: Path, **kw) -> specs.AppDef:
    return get_component(str(REPO / "components/localsgd.py") + ":localsgd").fn(config=str(config), **kw)


def test_roles_args_env_and_ports(tmp_path, cifar_root):
    cfg = small_config(tmp_path, cifar_root, replica_groups={"count": 3}, lighthouse={"min_replicas": 2})
    path = write_config(tmp_path, cfg)
    app = appdef(path)
    assert app.name == "t"
    assert [r.name for r in app.roles] == ["lighthouse", "replica_0", "replica_1", "replica_2"]
    lh = app.roles[0]
    assert lh.args[:2] == ["-m", "localsgd_ft.lighthouse"] and str(path) in lh.args
    assert lh.args[-2:] == ["--host-env", specs.macros.rank0_env]
    port = cfg["lighthouse"]["port"]
    assert lh.port_map == {"lighthouse": port, "completion": port + 1}
    for i, role in enumerate(app.roles[1:]):
        assert role.args[:2] == ["-m", "localsgd_ft.replica"]
        assert role.args[role.args.index("--group") + 1] == str(i)
        assert role.env["REPLICA_GROUP_ID"] == str(i) and role.env["NUM_REPLICA_GROUPS"] == "3"
        assert role.env["CUDA_VISIBLE_DEVICES"] == ""
        assert role.resource.gpu == 0 and role.resource.memMB == 1024
        assert role.max_retries == 0
    assert app.roles[1].entrypoint == sys.executable  # local: the current environment's python


def test_gpu_assignment_per_group(tmp_path, cifar_root, fake_gpus):
    fake_gpus(8)
    cfg = small_config(tmp_path, cifar_root, replica_groups={"count": 2, "gpus": [2, [5]]})
    app = appdef(write_config(tmp_path, cfg))
    assert [r.env["CUDA_VISIBLE_DEVICES"] for r in app.roles[1:]] == ["2", "5"]
    assert [r.resource.gpu for r in app.roles[1:]] == [1, 1]
    assert app.roles[0].resource.gpu == 0 and "CUDA_VISIBLE_DEVICES" not in app.roles[0].env


def test_groups_sharing_one_gpu_each_see_it_and_sync_through_gloo(tmp_path, fake_gpus, monkeypatch):
    """The one-GPU path up to the trainer: every group's role sees GPU 0, and the groups' Manager is built on
    gloo (NCCL would fail every sync with 'Duplicate GPU detected')."""
    fake_gpus(1)
    monkeypatch.setattr(sys, "argv", ["torchx", "run", "--dryrun"])  # plan only: no download
    app = appdef(REPO / "configs/one_gpu.yaml")
    assert [r.env["CUDA_VISIBLE_DEVICES"] for r in app.roles[1:]] == ["0", "0"]
    assert [r.resource.gpu for r in app.roles[1:]] == [1, 1]
    cfg = load_config(REPO / "configs/one_gpu.yaml")
    assert cfg.cross_group_backend == "gloo" and cfg.localsgd.sync_precision == "bfloat16"
    assert type(cross_group_process_group(cfg)).__name__ == "ProcessGroupGloo"
    two = load_config(REPO / "configs/one_gpu.yaml", overrides=["replica_groups.gpus=[0,1]"])
    assert type(cross_group_process_group(two)).__name__ == "ProcessGroupNCCL"
    with pytest.raises(ConfigError, match="localsgd.transport: 'nccl', but replica_groups.gpus gives GPU 0"):
        load_config(REPO / "configs/one_gpu.yaml", overrides=["localsgd.transport=nccl"])


def test_image_uses_the_image_python(tmp_path, cifar_root):
    app = appdef(write_config(tmp_path, small_config(tmp_path, cifar_root)), image="ghcr.io/x/y:1")
    assert {r.entrypoint for r in app.roles} == {"python"} and {r.image for r in app.roles} == {"ghcr.io/x/y:1"}


def test_shipped_gpu_configs(tmp_path, fake_gpus, monkeypatch):
    fake_gpus(2)
    monkeypatch.setattr(sys, "argv", ["torchx", "run", "--dryrun"])  # plan only: no download
    app = appdef(REPO / "configs/gpu.yaml")  # download: true, so no local data is needed
    assert [r.env["CUDA_VISIBLE_DEVICES"] for r in app.roles[1:]] == ["0", "1"]
    app = appdef(REPO / "configs/cluster.yaml", image="img")  # a count: the scheduler picks devices
    assert [r.resource.gpu for r in app.roles[1:]] == [1] * 4
    assert all("CUDA_VISIBLE_DEVICES" not in r.env for r in app.roles)


def test_bad_config_is_a_validation_error(tmp_path, cifar_root):
    path = write_config(tmp_path, small_config(tmp_path, cifar_root, localsgd={"sync_every": 0}))
    with pytest.raises(ComponentValidationException, match="localsgd.sync_every: got 0"):
        appdef(path)


def test_missing_data_is_caught_before_launch(tmp_path):
    path = write_config(tmp_path, {"data": {"root": str(tmp_path / "none")}})
    with pytest.raises(ComponentValidationException, match="CIFAR-10 not found.*data.download: true"):
        appdef(path)


def test_unofficial_data_needs_verify_false(tmp_path, cifar_root):
    path = write_config(tmp_path, small_config(tmp_path, cifar_root, data={"verify": True}))
    with pytest.raises(ComponentValidationException, match="data.verify: false"):
        appdef(path)


@pytest.mark.parametrize(
    "content, words",
    [
        ("localsgd:\n  sync_every: 0\n", "localsgd.sync_every: got 0"),
        ("train: {max_steps: 15}\n", "train.max_steps: got 15"),
        ("replica_groups: {count: 2, gpus: [0]}\n", "replica_groups.gpus"),
        ("foo: 1\n", "foo: unknown key"),
        ("a: [\n", "malformed YAML"),
    ],
)
def test_cli_refuses_bad_input_cleanly(tmp_path, content, words):
    out_dir = tmp_path / "out"
    path = tmp_path / "bad.yaml"
    path.write_text(f"output_dir: {out_dir}\n" + content)
    res = subprocess.run([TORCHX, "run", "--", "--config", str(path)], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode != 0
    assert words in res.stderr, res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    assert not out_dir.exists()  # nothing written


def test_cli_missing_config_file(tmp_path):
    res = subprocess.run([TORCHX, "run", "--", "--config", str(tmp_path / "x.yaml")], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "config file not found" in res.stderr and "Traceback" not in res.stderr


def test_cli_dryrun_substitutes_rank0_host(tmp_path, cifar_root):
    path = write_config(tmp_path, small_config(tmp_path, cifar_root))
    res = subprocess.run([TORCHX, "run", "--dryrun", "--", "--config", str(path)], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "TORCHX_RANK0_HOST" in res.stdout and "${rank0_env}" not in res.stdout.split("SCHEDULER REQUEST")[1]


def test_torchxconfig_defaults_to_the_default_experiment():
    text = (REPO / ".torchxconfig").read_text()
    assert COMPONENT in text and "configs/default.yaml" in text and "local_cwd" in text


def test_fresh_is_passed_to_every_role_and_skips_the_resume_check(tmp_path, cifar_root):
    raw = small_config(tmp_path, cifar_root)
    app = appdef(write_config(tmp_path, raw))
    assert {r.env["LOCALSGD_FT_FRESH"] for r in app.roles} == {"0"}
    app = appdef(write_config(tmp_path, raw), fresh=True)
    assert {r.env["LOCALSGD_FT_FRESH"] for r in app.roles} == {"1"}


def test_cli_overrides_reach_every_role_and_bad_ones_are_refused(tmp_path, cifar_root):
    import base64

    path = write_config(tmp_path, small_config(tmp_path, cifar_root))
    res = subprocess.run([TORCHX, "run", "--dryrun", "--", "--config", str(path), "localsgd.sync_every=20",
                          "train.max_steps=400", "localsgd.quorum_retries=1"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    # Valid, but costly after every failed quorum: the launch says so, with the fix.
    assert "localsgd: warning: localsgd.quorum_retries 1 with localsgd.quorum_timeout_s 30" in res.stderr, res.stderr
    # What the real CLI handed every role (the dry run prints each role's arguments).
    request = res.stdout.split("SCHEDULER REQUEST")[0]
    texts = [base64.b64decode(b).decode() for b in re.findall(r"--config-b64\W+([A-Za-z0-9+/=]{20,})", request)]
    assert len(texts) == 3, request  # the lighthouse and both replica groups
    for text in texts:
        assert "sync_every: 20" in text and "max_steps: 400" in text
    res = subprocess.run([TORCHX, "run", "--", "--config", str(path), "localsgd.sync_evry=20"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "localsgd.sync_evry: unknown key; allowed keys here:" in res.stderr and "sync_every" in res.stderr


@pytest.mark.parametrize("scheduler", ["local_cwd", "slurm"])
def test_where_roles_inherit_the_clients_env_the_token_goes_there_not_in_the_appdef(tmp_path, cifar_root,
                                                                                     monkeypatch, scheduler):
    monkeypatch.setattr(sys, "argv", ["torchx", "run", "--dryrun", "-s", scheduler, COMPONENT])
    app = appdef(write_config(tmp_path, small_config(tmp_path, cifar_root)))
    token = os.environ[RUN_TOKEN_ENV]
    assert re.fullmatch(r"[0-9a-f]{32}", token)
    assert all(RUN_TOKEN_ENV not in r.env and token not in " ".join([r.entrypoint, *r.args]) for r in app.roles)
    assert len({r.env[RUN_ID_ENV] for r in app.roles}) == 1
    again = appdef(write_config(tmp_path, small_config(tmp_path, cifar_root)))
    assert os.environ[RUN_TOKEN_ENV] != token and again.roles[0].env[RUN_ID_ENV] != app.roles[0].env[RUN_ID_ENV]


def test_with_an_image_the_token_is_in_every_roles_env_and_a_dry_run_shows_a_placeholder(tmp_path, cifar_root,
                                                                                        monkeypatch):
    path = write_config(tmp_path, small_config(tmp_path, cifar_root))
    monkeypatch.setattr(sys, "argv", ["torchx", "run", "-s", "kubernetes", COMPONENT])
    app = appdef(path, image="img")
    (token,) = {r.env[RUN_TOKEN_ENV] for r in app.roles}
    assert re.fullmatch(r"[0-9a-f]{32}", token) and RUN_TOKEN_ENV not in os.environ
    assert all(token not in " ".join(r.args) for r in app.roles)  # the env of a pod spec, no command line
    monkeypatch.setattr(sys, "argv", ["torchx", "run", "--dryrun", "-s", "kubernetes", COMPONENT])
    app = appdef(path, image="img")
    assert {r.env[RUN_TOKEN_ENV] for r in app.roles} == {lifecycle.DRY_RUN_TOKEN}


def test_a_role_refuses_a_missing_token_and_a_dry_runs_placeholder(monkeypatch):
    with pytest.raises(RuntimeError, match=rf"\${RUN_TOKEN_ENV} is not set"):
        lifecycle.run_token()
    monkeypatch.setenv(RUN_TOKEN_ENV, lifecycle.DRY_RUN_TOKEN)
    with pytest.raises(RuntimeError, match=r"is not a run token .*without --dryrun"):
        lifecycle.run_token()
    token = lifecycle.new_run_token()
    monkeypatch.setenv(RUN_TOKEN_ENV, token)
    assert lifecycle.run_token() == token


def test_a_slurm_launch_makes_its_log_dir_and_says_where(tmp_path, cifar_root, monkeypatch, capsys):
    path = write_config(tmp_path, small_config(tmp_path, cifar_root))
    monkeypatch.setattr(sys, "argv", ["torchx", "run", "-s", "slurm", COMPONENT])
    appdef(path)
    logs = tmp_path / "out" / "slurm"
    assert logs.is_dir()
    assert os.environ["SBATCH_OUTPUT"] == f"{logs}/slurm-%j.out"  # the batch script's own output
    said = capsys.readouterr().err
    assert f"localsgd: Slurm writes each role's output to {logs}/slurm-<job id>-<role>-<node>.out" in said
    assert f"the batch script's to {logs}/slurm-<job id>.out" in said
    monkeypatch.setenv("SBATCH_OUTPUT", "mine-%j.out")  # the user's choice stands
    appdef(path)
    assert os.environ["SBATCH_OUTPUT"] == "mine-%j.out" and "to mine-%j.out" in capsys.readouterr().err


def test_slurm_refuses_an_sbatch_export_that_would_drop_the_token(tmp_path, cifar_root):
    path = write_config(tmp_path, small_config(tmp_path, cifar_root))
    cmd = [TORCHX, "run", "--dryrun", "-s", "slurm", COMPONENT, "--config", str(path)]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "SBATCH_EXPORT": "NONE"})
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr
    assert "SBATCH_EXPORT=NONE keeps the run token from reaching the Slurm job" in res.stderr
    assert "unset SBATCH_EXPORT, or start it with ALL" in res.stderr
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "SBATCH_EXPORT": "ALL,EXTRA=1"})
    assert res.returncode == 0, res.stderr
