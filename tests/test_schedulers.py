"""One component, three schedulers: the dry-run of local_cwd, Slurm and Kubernetes, checked field by field.

No cluster is needed: ``torchx run --dryrun`` prints the exact request each
scheduler would submit (the sbatch script, the Volcano job). Also covered
here: the embedded config every role receives, GPU assignment from the
YAML (explicit lists, a count per group, and refusing GPUs where none exist),
that no dry run shows a run token, and where Slurm writes its files.
"""

from __future__ import annotations

import ast
import base64
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest
import yaml
from conftest import REPO, TORCHX, small_config, write_config

from localsgd_ft.config import ConfigError, embed_config, load_config
from localsgd_ft.contract import RUN_TOKEN_ENV
from localsgd_ft.launch import gpus
from localsgd_ft.launch.lifecycle import DRY_RUN_TOKEN

COMPONENT = str(REPO / "components/localsgd.py") + ":localsgd"
IMAGE = "registry.example.com/localsgd-ft:1.0"


def dryrun(scheduler: str, config: Path, *extra: str, cfg: str = "", workspace: bool = False,
           whole: bool = False) -> str:
    """The scheduler request ``torchx run --dryrun`` prints (the part after its header; ``whole``: everything
    it printed, stderr then stdout, the AppDef too)."""
    cmd = [TORCHX, "run", "--dryrun", "-s", scheduler]
    if cfg:
        cmd += ["-cfg", cfg]
    if (scheduler == "kubernetes" and not workspace) or "job_dir=" in cfg:
        cmd += ["--workspace", ""]  # no image build (no copy into job_dir): use the image, the files, given
    cmd += [COMPONENT, "--config", str(config), *extra]
    env = {k: v for k, v in os.environ.items() if k != RUN_TOKEN_ENV and not k.startswith("SBATCH_")}
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    return res.stderr + res.stdout if whole else res.stdout.split("=== SCHEDULER REQUEST ===", 1)[1]


def refused(scheduler: str, config: Path, *extra: str, cfg: str = "") -> str:
    cmd = [TORCHX, "run", "--dryrun", "-s", scheduler] + (["-cfg", cfg] if cfg else [])
    cmd += ["--workspace", ""] if scheduler == "kubernetes" else []
    res = subprocess.run(cmd + [COMPONENT, "--config", str(config), *extra], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr
    return res.stderr


def embedded_arg(args: List[str]) -> str:
    return args[args.index("--config-b64") + 1]


# ---------------------------------------------------------------------------
# Config: the embedded copy and GPU fields


def test_embedded_config_is_the_file(tmp_path, cifar_root):
    path = write_config(tmp_path, small_config(tmp_path, cifar_root, name="emb"))
    b64 = embed_config(path)
    assert "," not in b64 and " " not in b64  # survives Slurm's comma-split --export and shells
    assert base64.b64decode(b64).decode() == path.read_text()
    moved = tmp_path / "gone.yaml"  # a pod has no such file: the embedded text is enough
    assert load_config(moved, b64) == load_config(path)


def test_bad_embedded_config_names_the_flag(tmp_path):
    with pytest.raises(ConfigError, match=r"x.yaml: the embedded config \(--config-b64\)"):
        load_config("x.yaml", "not base64!")
    with pytest.raises(ConfigError, match="x.yaml: train.max_steps: got 15"):
        load_config("x.yaml", base64.b64encode(b"train: {max_steps: 15}\n").decode())


@pytest.mark.parametrize(
    "groups, words",
    [
        ({"gpus": [0, 1], "gpus_per_group": 1}, "use one: explicit device lists"),
        ({"gpus_per_group": 2}, "replica_groups.gpus_per_group: got 2, expected 0 (CPU) or replica_groups.workers (1)"),
        ({"gpus_per_group": -1}, "replica_groups.gpus_per_group: got -1"),
    ],
)
def test_gpu_fields_are_checked(tmp_path, groups, words):
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({"replica_groups": {"count": 2, **groups}}))
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        load_config(path)


def test_visible_gpus_follow_cuda_semantics():
    assert gpus.visible_gpus({}, present=4) == 4
    assert gpus.visible_gpus({"CUDA_VISIBLE_DEVICES": ""}, present=4) == 0
    assert gpus.visible_gpus({"CUDA_VISIBLE_DEVICES": "3"}, present=4) == 1
    assert gpus.visible_gpus({"CUDA_VISIBLE_DEVICES": "1,7,2"}, present=4) == 1  # stops at the invalid 7
    assert gpus.visible_gpus({"CUDA_VISIBLE_DEVICES": "GPU-abc"}, present=1) == 1
    assert gpus.visible_gpus({"CUDA_VISIBLE_DEVICES": "0"}, present=0) == 0


def test_physical_gpus_without_and_with_nvidia_smi(fake_gpus, monkeypatch):
    # This machine has no NVIDIA GPU and no nvidia-smi: counted from /dev and /proc, no error.
    monkeypatch.setenv("PATH", "/nonexistent")
    assert gpus.physical_gpus() == len([p for p in Path("/dev").glob("nvidia[0-9]*")])
    fake_gpus(3)
    assert gpus.physical_gpus() == 3


def test_role_refuses_missing_gpus(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({"replica_groups": {"count": 2, "gpus_per_group": 1}}))
    cfg = load_config(path)
    why = gpus.check_role(cfg, 1, {}, present=0)
    assert why and "replica group 1 needs 1 GPU(s) but sees 0" in why and "gpus_per_group: 0" in why
    assert gpus.check_role(cfg, 1, {"CUDA_VISIBLE_DEVICES": "0"}, present=1) is None
    cpu = load_config(write_config(tmp_path, {"replica_groups": {"count": 2}}, "cpu.yaml"))
    assert gpus.check_role(cpu, 0, {}, present=0) is None


# ---------------------------------------------------------------------------
# local_cwd


def local_roles(request: str) -> Dict[str, Dict[str, Any]]:
    """local_cwd's dry-run (a pretty-printed dict): role name -> its one replica's {args, env, ...}."""
    params = ast.literal_eval(request.strip())["role_params"]
    return {role: replicas[0] for role, replicas in params.items()}


def test_local_gpu_lists_pin_each_group(tmp_path, cifar_root, fake_gpus):
    fake_gpus(4)
    path = write_config(tmp_path, small_config(tmp_path, cifar_root, replica_groups={"count": 3, "gpus": [3, 1, 0]}))
    roles = local_roles(dryrun("local_cwd", path))
    assert [roles[f"replica_{i}"]["env"]["CUDA_VISIBLE_DEVICES"] for i in range(3)] == ["3", "1", "0"]
    assert "CUDA_VISIBLE_DEVICES" not in roles["lighthouse"]["env"]
    assert embedded_arg(roles["replica_2"]["args"]) == embed_config(path)


def test_local_cpu_run_hides_gpus(tmp_path, cifar_root):
    path = write_config(tmp_path, small_config(tmp_path, cifar_root))
    roles = local_roles(dryrun("local_cwd", path))
    assert {roles[f"replica_{i}"]["env"]["CUDA_VISIBLE_DEVICES"] for i in range(2)} == {""}
    assert roles["lighthouse"]["args"][-2:] == ["--host-env", "TORCHX_RANK0_HOST"]  # no --print-summary


@pytest.mark.parametrize("present", [None, 0, 1])
def test_gpus_asked_on_a_machine_without_them_fail_early(tmp_path, cifar_root, fake_gpus, monkeypatch, present):
    if present is None:
        monkeypatch.setenv("PATH", str(Path(TORCHX).parent) + ":/usr/bin:/bin")  # no nvidia-smi at all
    else:
        fake_gpus(present)
    out = tmp_path / "out"
    path = write_config(tmp_path, small_config(tmp_path, cifar_root, replica_groups={"gpus": [0, 1]}))
    err = refused("local_cwd", path)
    if present is None or present == 0:
        assert "replica_groups.gpus asks for GPU(s) [0, 1], but this machine has no NVIDIA GPU" in err
    else:
        assert "asks for GPU(s) [1], but this machine has 1 GPU(s) (indices 0..0)" in err
    assert "gpus_per_group" in err and not out.exists()


# ---------------------------------------------------------------------------
# Slurm


def sbatch_groups(request: str) -> List[str]:
    """The #SBATCH option lines, one per het-job group."""
    return [line[len("#SBATCH "):] for line in request.splitlines()
            if line.startswith("#SBATCH ") and line != "#SBATCH hetjob"]


def srun_groups(request: str) -> List[List[str]]:
    """srun's per-group argument lists (groups are separated by ':')."""
    text = request.split("\nsrun ", 1)[1].split("\nexitcode=", 1)[0].replace(":\\\n", " : ")
    groups: List[List[str]] = [[]]
    for token in shlex.split(text):
        if token == ":":
            groups.append([])
        else:
            groups[-1].append(token)
    return groups


def srun_option(group: List[str], name: str) -> str:
    """The value srun takes for option ``--name`` in one group: it reads options up to the first operand
    (the program) and the last of a repeated option wins, in either spelling (``--name=v``, ``--name v``)."""
    value, i = "", 0
    while i < len(group) and group[i].startswith("-"):
        arg = group[i]
        if arg == f"--{name}":
            value, i = group[i + 1], i + 1
        elif arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
        elif arg in ("--output", "--error"):  # the only options given as two words
            i += 1
        i += 1
    return value


def srun_program(group: List[str]) -> List[str]:
    """What srun runs in one group: its first operand on."""
    i = 0
    while group[i].startswith("-"):
        i += 2 if group[i] in ("--output", "--error") else 1
    return group[i:]


def exports(group: List[str]) -> Dict[str, str]:
    (export,) = [a for a in group if a.startswith("--export=")]
    items = export[len("--export="):].split(",")  # exactly how srun splits it
    assert items[0] == "ALL" and all("=" in i for i in items[1:]), f"a value with a comma broke --export: {export}"
    return dict(i.split("=", 1) for i in items[1:])


@pytest.mark.parametrize("count, gpu_cfg", [(2, {}), (3, {"gpus_per_group": 1}),
                                             (2, {"workers": 3, "gpus_per_group": 3})])
def test_slurm_hetjob_per_role(tmp_path, cifar_root, count, gpu_cfg):
    cfg = small_config(tmp_path, cifar_root, replica_groups={"count": count, "cpus": 3, "memory_mb": 3000, **gpu_cfg},
                       lighthouse={"memory_mb": 700})
    per_group_gpus = gpu_cfg.get("gpus_per_group", 0)
    path = write_config(tmp_path, cfg)
    request = dryrun("slurm", path, cfg="partition=batch,time=00:30:00")
    sbatch = sbatch_groups(request)
    assert [shlex.split(g)[0] for g in sbatch] == ["--job-name=lighthouse-0"] + [
        f"--job-name=replica_{i}-0" for i in range(count)]
    assert all("--partition=batch" in g and "--time=00:30:00" in g for g in sbatch)
    assert "--cpus-per-task=1" in sbatch[0] and "--gpus-per-task" not in sbatch[0]
    for g in sbatch[1:]:
        assert "--cpus-per-task=3" in g
        assert (f"--gpus-per-task={per_group_gpus}" in g) == bool(per_group_gpus)  # one GPU per worker
    # --mem unless the partition has under 1 GB (then torchx leaves memory out)
    assert all("--mem=" in g for g in sbatch) or all("--mem=" not in g for g in sbatch)

    groups = srun_groups(request)
    assert len(groups) == count + 1
    lh = groups[0]
    assert lh[lh.index("-m") + 1] == "localsgd_ft.lighthouse"
    assert lh[-2:] == ["--host-env", "SLURM_JOB_NODELIST_HET_GROUP_0"]  # no image: no --print-summary
    for i, g in enumerate(groups[1:]):
        env = exports(g)
        assert env["REPLICA_GROUP_ID"] == str(i) and env["NUM_REPLICA_GROUPS"] == str(count)
        # CPU groups are kept off GPUs; with a count Slurm sets what each group sees
        assert ("CUDA_VISIBLE_DEVICES" in env) == (not gpu_cfg)
        assert g[g.index("--group") + 1] == str(i)
        assert g[-2:] == ["--host-env", "SLURM_JOB_NODELIST_HET_GROUP_0"]
        assert load_config("whatever.yaml", embedded_arg(g)) == load_config(path)
        assert "--kill-on-bad-exit=1" in g
        # The role's output goes to the run's output directory (not the directory it was submitted from).
        assert srun_option(g, "output") == f"{tmp_path}/out/slurm/slurm-$SLURM_JOB_ID-replica_{i}-0.out"
        assert srun_option(g, "error") == f"{tmp_path}/out/slurm/slurm-$SLURM_JOB_ID-replica_{i}-0.err"
        assert srun_program(g)[:3] == [sys.executable, "-m", "localsgd_ft.replica"]
    assert srun_option(lh, "output") == f"{tmp_path}/out/slurm/slurm-$SLURM_JOB_ID-lighthouse-0.out"
    assert not (tmp_path / "out").exists()  # a dry run makes nothing


def test_no_dry_run_shows_a_run_token(tmp_path, cifar_root):
    """Where the roles inherit the client's environment the AppDef holds no token; elsewhere a placeholder."""
    path = write_config(tmp_path, small_config(tmp_path, cifar_root))
    for scheduler, cfg in (("local_cwd", ""), ("slurm", "partition=batch")):
        out = dryrun(scheduler, path, cfg=cfg, whole=True)
        assert "=== SCHEDULER REQUEST ===" in out and RUN_TOKEN_ENV not in out, out
        assert not re.search(r"\b[0-9a-f]{32}\b", out)  # nor anything shaped like one
    out = dryrun("kubernetes", path, "--image", IMAGE, cfg="queue=research", whole=True)
    job = yaml.safe_load(out.split("=== SCHEDULER REQUEST ===", 1)[1])
    for task in job["spec"]["tasks"]:
        (c,) = task["template"]["spec"]["containers"]
        assert {e["name"]: e["value"] for e in c["env"]}[RUN_TOKEN_ENV] == DRY_RUN_TOKEN
    assert not re.search(r"\b[0-9a-f]{32}\b", out)


def test_slurm_with_a_job_dir_keeps_torchx_own_file_places(tmp_path, cifar_root):
    """With -cfg job_dir the job runs in that directory (a copy of the workspace): its files stay there."""
    path = write_config(tmp_path, small_config(tmp_path, cifar_root))
    job_dir = tmp_path / "job"
    request = dryrun("slurm", path, cfg=f"job_dir={job_dir}")
    assert RUN_TOKEN_ENV not in request  # torchx keeps this script in job_dir, readable by all (0644)
    for i, g in enumerate(srun_groups(request)):
        role = "lighthouse-0" if i == 0 else f"replica_{i - 1}-0"
        assert srun_option(g, "output") == f"slurm-$SLURM_JOB_ID-{role}.out"
        assert srun_program(g)[0] == sys.executable


# ---------------------------------------------------------------------------
# Kubernetes (Volcano)

K8S_CONFIGS = {
    "cpu-2": {"replica_groups": {"count": 2, "cpus": 2, "memory_mb": 3072}},
    "gpu-4": {"replica_groups": {"count": 4, "gpus_per_group": 1, "cpus": 8, "memory_mb": 16384}},
    "gpu-2x8": {"replica_groups": {"count": 2, "workers": 8, "gpus_per_group": 8, "cpus": 64,
                                   "memory_mb": 262144}},
    "cpu-3-faults": {"replica_groups": {"count": 3}, "lighthouse": {"min_replicas": 2},
                     "faults": {"enabled": True, "schedule": [{"kind": "kill", "group": 1, "at_step": 50}]}},
}


def volcano_job(tmp_path: Path, cifar_root: Path, name: str) -> tuple:
    cfg = small_config(tmp_path, cifar_root, name=name, **K8S_CONFIGS[name])
    path = write_config(tmp_path, cfg)
    job = yaml.safe_load(dryrun("kubernetes", path, "--image", IMAGE, cfg="queue=research"))
    return job, cfg, path


@pytest.mark.parametrize("name", sorted(K8S_CONFIGS))
def test_kubernetes_volcano_job(tmp_path, cifar_root, name):
    job, cfg, path = volcano_job(tmp_path, cifar_root, name)
    count = cfg["replica_groups"]["count"]
    per_group_gpus = cfg["replica_groups"].get("gpus_per_group", 0)
    assert job["apiVersion"] == "batch.volcano.sh/v1alpha1" and job["kind"] == "Job"
    spec = job["spec"]
    assert spec["schedulerName"] == "volcano" and spec["queue"] == "research"
    assert "svc" in spec["plugins"]  # DNS names for the pods: how the replicas find the lighthouse
    # One group's crash never restarts the job: no job or task retries (torchrun restarts in the pod).
    assert spec["maxRetry"] == 0
    tasks = spec["tasks"]
    assert [t["name"] for t in tasks] == ["lighthouse-0"] + [f"replica{i}-0" for i in range(count)]
    for t in tasks:
        assert t["replicas"] == 1 and "maxRetry" not in t and "policies" not in t
        assert t["template"]["spec"]["restartPolicy"] == "Never"

    def container(task: Dict[str, Any]) -> Dict[str, Any]:
        (c,) = task["template"]["spec"]["containers"]
        return c

    lh = container(tasks[0])
    assert lh["image"] == IMAGE and lh["command"][:3] == ["python", "-m", "localsgd_ft.lighthouse"]
    assert "--print-summary" in lh["command"]  # the pod keeps no files: summary.json goes to the log
    assert {p["name"]: p["containerPort"] for p in lh["ports"]} == {
        "lighthouse": cfg["lighthouse"]["port"], "completion": cfg["lighthouse"]["port"] + 1}
    assert "nvidia.com/gpu" not in lh["resources"]["limits"]
    for i, task in enumerate(tasks[1:]):
        c = container(task)
        cmd = c["command"]
        assert c["image"] == IMAGE and cmd[:3] == ["python", "-m", "localsgd_ft.replica"]
        assert cmd[cmd.index("--group") + 1] == str(i)
        assert cmd[cmd.index("--host-env") + 1] == "VC_LIGHTHOUSE_0_HOSTS"  # the lighthouse pod's DNS name
        # No shared filesystem: the config travels in the command, byte for byte.
        assert base64.b64decode(embedded_arg(cmd)).decode() == path.read_text()
        env = {e["name"]: e["value"] for e in c["env"]}
        assert env["REPLICA_GROUP_ID"] == str(i) and env["NUM_REPLICA_GROUPS"] == str(count)
        assert ("CUDA_VISIBLE_DEVICES" in env) == (not per_group_gpus)
        res = c["resources"]
        if per_group_gpus:
            assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == str(per_group_gpus)
        else:
            assert "nvidia.com/gpu" not in res["limits"] and "nvidia.com/gpu" not in res["requests"]
        cpus = cfg["replica_groups"].get("cpus", 1)
        mem = cfg["replica_groups"]["memory_mb"]
        assert res["limits"] == {**res["limits"], "cpu": f"{cpus * 1000}m", "memory": f"{mem}M"}
        assert res["requests"]["cpu"] == f"{cpus * 1000 - 100}m"  # torchx keeps 100m for the node


@pytest.mark.parametrize("name", sorted(K8S_CONFIGS))
def test_kubernetes_pods_validate_with_the_official_client(tmp_path, cifar_root, name):
    k8s = pytest.importorskip("kubernetes")
    job, _, _ = volcano_job(tmp_path, cifar_root, name)
    client = k8s.client.ApiClient()

    class Response:  # ApiClient.deserialize reads a response's JSON body
        def __init__(self, obj: Any) -> None:
            self.data = json.dumps(obj)

    for task in job["spec"]["tasks"]:
        template = client.deserialize(Response(task["template"]), "V1PodTemplateSpec")
        # Unknown or misspelt fields would be dropped by the models: the round trip must be exact.
        assert client.sanitize_for_serialization(template) == task["template"]
        assert template.spec.containers[0].name == task["name"]


def test_kubernetes_refuses_gpu_indices(tmp_path, cifar_root):
    path = write_config(tmp_path, small_config(tmp_path, cifar_root, replica_groups={"gpus": [0, 1]}))
    err = refused("kubernetes", path, "--image", IMAGE, cfg="queue=default")
    assert "replica_groups.gpus lists device indices of one machine" in err
    assert "replica_groups.gpus_per_group: 1" in err


def test_shipped_cluster_config_on_every_scheduler():
    """configs/cluster.yaml as the README's commands submit it."""
    path = REPO / "configs/cluster.yaml"
    job = yaml.safe_load(dryrun("kubernetes", path, "--image", IMAGE, cfg="queue=default"))
    assert len(job["spec"]["tasks"]) == 5
    request = dryrun("slurm", path, cfg="partition=gpu,time=02:00:00")
    assert sum("--gpus-per-task=1" in g for g in sbatch_groups(request)) == 4


def test_a_group_without_its_gpus_fails_the_run_early_with_the_reason(tmp_path, cifar_root, torchx_run):
    """A real local run asking for a GPU count on this GPU-less machine: no torchrun starts, the run FAILS."""
    if gpus.physical_gpus():
        pytest.skip("this machine has GPUs")
    cfg = small_config(tmp_path, cifar_root, replica_groups={"gpus_per_group": 1})
    path = write_config(tmp_path, cfg)
    run = torchx_run(path)
    assert run.wait(90) != 0
    out = "\n".join(run.lines)
    assert "replica group 0 needs 1 GPU(s) but sees 0" in out and "LocalSGD: group" not in out  # no trainer started
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert not summary["succeeded"] and "needs 1 GPU(s) but sees 0" in summary["failure_reason"]
    assert sorted(summary["lost_groups"]) == [0, 1]


# ---------------------------------------------------------------------------
# Groups of several nodes


def test_slurm_multi_node_groups_get_a_het_group_per_node(tmp_path, cifar_root):
    cfg = small_config(tmp_path, cifar_root, replica_groups={"count": 2, "nodes": 2, "workers": 4, "cpus": 8,
                                                             "gpus_per_group": 4, "memory_mb": 8000})
    path = write_config(tmp_path, cfg)
    request = dryrun("slurm", path, cfg="partition=batch")
    sbatch = sbatch_groups(request)
    # Het group 1 + g*K is node 0 of group g: where localsgd_ft.launch.addresses.group_first_host looks.
    assert [shlex.split(g)[0] for g in sbatch] == ["--job-name=lighthouse-0"] + [
        f"--job-name=replica_{g}-{n}" for g in range(2) for n in range(2)]
    for g in sbatch[1:]:
        assert "--cpus-per-task=8" in g and "--gpus-per-task=4" in g  # per node: one GPU per worker
    port = cfg["lighthouse"]["port"]
    for i, args in enumerate(srun_groups(request)[1:]):
        group, node = divmod(i, 2)
        assert args[args.index("--group") + 1] == str(group)
        assert args[args.index("--node") + 1] == str(node)  # torchx's replica id, substituted
        assert args[args.index("--rdzv-port") + 1] == str(port + 2 + group)
        assert exports(args)["REPLICA_GROUP_ID"] == str(group)


def test_kubernetes_multi_node_groups_get_a_task_per_node(tmp_path, cifar_root):
    cfg = small_config(tmp_path, cifar_root, replica_groups={"count": 2, "nodes": 3, "workers": 2, "cpus": 4,
                                                             "gpus_per_group": 2, "memory_mb": 8000})
    path = write_config(tmp_path, cfg)
    job = yaml.safe_load(dryrun("kubernetes", path, "--image", IMAGE, cfg="queue=research"))
    tasks = job["spec"]["tasks"]
    # Task replica<g>-0's pods are named by $VC_REPLICA<g>_0_HOSTS: where group g's nodes meet.
    assert [t["name"] for t in tasks] == ["lighthouse-0"] + [f"replica{g}-{n}" for g in range(2) for n in range(3)]
    port = cfg["lighthouse"]["port"]
    for i, task in enumerate(tasks[1:]):
        group, node = divmod(i, 3)
        (c,) = task["template"]["spec"]["containers"]
        cmd = c["command"]
        assert cmd[cmd.index("--node") + 1] == str(node) and cmd[cmd.index("--group") + 1] == str(group)
        assert cmd[cmd.index("--rdzv-port") + 1] == str(port + 2 + group)
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "2"  # one GPU per worker, on every node


def test_multi_node_groups_are_refused_where_nodes_cannot_meet(tmp_path, cifar_root):
    cfg = small_config(tmp_path, cifar_root, replica_groups={"nodes": 2})
    path = write_config(tmp_path, cfg)
    res = subprocess.run([TORCHX, "run", "--dryrun", "-s", "local_docker", COMPONENT, "--config", str(path)],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "replica_groups.nodes: got 2, but the local_docker scheduler cannot place" in res.stderr, res.stderr


def test_group_first_host_per_scheduler(monkeypatch):
    from localsgd_ft.launch import addresses as roles

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    slurm = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST_HET_GROUP_5": "node17"}
    assert roles.group_first_host(2, 2, "node1", slurm) == "node17"  # het group 1 + 2 * 2
    with pytest.raises(RuntimeError, match=r"\$SLURM_JOB_NODELIST_HET_GROUP_3 is not set"):
        roles.group_first_host(1, 2, "node1", slurm)
    assert roles.group_first_host(1, 2, "localhost", {}) == "127.0.0.1"
    with pytest.raises(RuntimeError, match="runs on local_cwd, slurm or kubernetes"):
        roles.group_first_host(1, 2, "elsewhere.example", {})
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    k8s = {"VC_REPLICA1_0_HOSTS": "job-replica1-0-0.job,job-replica1-0-1.job"}
    assert roles.group_first_host(1, 3, "job-lighthouse-0-0.job", k8s) == "job-replica1-0-0.job"


def test_torchrun_command_for_one_and_several_nodes(tmp_path):
    from localsgd_ft.config import parse_config
    from localsgd_ft.launch.replica_role import torchrun_command

    one = torchrun_command(parse_config({"replica_groups": {"workers": 2, "cpus": 2}}), "c.yaml", "t.py")
    assert "--standalone" in one and "--nnodes=1" in one and "--nproc_per_node=2" in one
    cfg = parse_config({"replica_groups": {"nodes": 3, "workers": 2, "cpus": 2}})
    many = torchrun_command(cfg, "c.yaml", "t.py", rendezvous=("node4", 29600, "run-1", 300.0))
    assert "--standalone" not in many
    assert {"--nnodes=3", "--nproc_per_node=2", "--rdzv-backend=c10d", "--rdzv-endpoint=node4:29600",
            "--rdzv-id=run-1", "--rdzv-conf=join_timeout=300,read_timeout=300"} <= set(many)


def test_drawn_ports_avoid_the_ephemeral_range_and_are_free():
    """A port from the kernel's ephemeral range can be handed to a connection (or srun) before the role binds it."""
    import socket

    from localsgd_ft.launch import addresses as roles

    low, high = roles._ephemeral_range()
    for _ in range(50):
        pair = roles.free_port_pair()
        one = roles.free_port()
        for port in (pair, pair + 1, one):
            assert not low <= port <= high, (port, low, high)
            assert port >= roles._LOWEST_DRAWN_PORT
        with socket.socket() as a, socket.socket() as b:  # both of the pair bind now
            a.bind(("127.0.0.1", pair))
            b.bind(("127.0.0.1", pair + 1))
