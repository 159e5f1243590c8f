"""Cluster definitions: the `ray up` YAML against the schema shipped inside ray, the KubeRay manifests against the
ray.io/v1 field structure written down below, the scripts with `bash -n`, and what they must never do (open the
dashboard / job API beyond the cluster network, or run without Ray's token auth)."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
RAY_UP = CLUSTER / "ray-up-aws.yaml"
KUBERAY = {"RayCluster": CLUSTER / "kuberay/raycluster.yaml", "RayJob": CLUSTER / "kuberay/rayjob.yaml"}
SCRIPTS = [REPO / "launchers/submit.sh", CLUSTER / "slurm.sbatch"]


# ------------------------------------------------------------------------------------------------ ray up
def _ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_ray_up_yaml_validates_against_rays_schema():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(RAY_UP.read_text())
    jsonschema.validate(config, _ray_schema())
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` itself runs after filling defaults
    bad = copy.deepcopy(config)
    bad["available_node_types"]["gpu_worker"]["min_worker"] = 2  # misspelt min_workers
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        jsonschema.validate(bad, _ray_schema())


def test_ray_up_keeps_the_dashboard_private_and_auth_on():
    config = yaml.safe_load(RAY_UP.read_text())
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "RAY_AUTH_MODE=token ray start --head" in head
    assert "RAY_AUTH_MODE=token ray start --address" in " ".join(config["worker_start_ray_commands"])
    assert config["provider"]["security_group"]["IpPermissions"] == []  # no port opened beyond ray up's SSH
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # one token on every node
    assert "HF_HUB_OFFLINE=1" in " ".join(config["docker"]["run_options"])


# ------------------------------------------------------------------------------------------------ KubeRay
# The ray.io/v1 field structure (KubeRay v1.5: raycluster_types.go, rayjob_types.go) and the core/v1 pod fields
# the manifests use. A dict is an object with exactly these keys (those under REQ must be present); [x] a list of
# x; MAP a string-keyed map of scalars; ANY anything; a tuple of strings an enum.
MAP, ANY, REQ = "map", "any", "(required)"
CONTAINER = {
    REQ: ["name", "image"],
    "name": str, "image": str, "imagePullPolicy": ("Always", "IfNotPresent", "Never"), "command": [str],
    "args": [str], "workingDir": str, "env": [{"name": str, "value": str, "valueFrom": ANY}], "envFrom": ANY,
    "resources": {"limits": MAP, "requests": MAP}, "securityContext": ANY, "lifecycle": ANY, "livenessProbe": ANY,
    "readinessProbe": ANY,
    "ports": [{"containerPort": int, "name": str, "protocol": ("TCP", "UDP", "SCTP")}],
    "volumeMounts": [{"name": str, "mountPath": str, "readOnly": bool, "subPath": str}],
}
POD_TEMPLATE = {
    "metadata": {"name": str, "labels": MAP, "annotations": MAP},
    "spec": {"containers": [CONTAINER], "initContainers": [CONTAINER], "nodeSelector": MAP, "affinity": ANY,
             "tolerations": [{"key": str, "operator": ("Exists", "Equal"), "value": str, "effect": str}],
             "volumes": [{"name": str, "emptyDir": {"medium": str, "sizeLimit": str},
                          "persistentVolumeClaim": {"claimName": str, "readOnly": bool}, "configMap": ANY,
                          "secret": ANY, "hostPath": ANY}],
             "serviceAccountName": str, "restartPolicy": str, "securityContext": ANY, "imagePullSecrets": ANY,
             "priorityClassName": str, "schedulerName": str},
}
HEAD_GROUP = {REQ: ["template"], "template": POD_TEMPLATE, "headService": ANY, "enableIngress": bool, "rayStartParams": MAP,
              "serviceType": ("ClusterIP", "NodePort", "LoadBalancer")}
WORKER_GROUP = {REQ: ["groupName", "template"], "suspend": bool, "groupName": str, "replicas": int, "minReplicas": int, "maxReplicas": int,
                "idleTimeoutSeconds": int, "rayStartParams": MAP, "template": POD_TEMPLATE,
                "scaleStrategy": {"workersToDelete": [str]}, "numOfHosts": int}
CLUSTER_SPEC = {REQ: ["headGroupSpec"], "suspend": bool, "managedBy": str, "autoscalerOptions": ANY, "headServiceAnnotations": MAP,
                "enableInTreeAutoscaling": bool, "gcsFaultToleranceOptions": ANY, "headGroupSpec": HEAD_GROUP,
                "rayVersion": str, "workerGroupSpecs": [WORKER_GROUP],
                "authOptions": {"mode": ("disabled", "token"), "secretName": str, "enableK8sTokenAuth": bool}}
JOB_SPEC = {"activeDeadlineSeconds": int, "backoffLimit": int, "rayClusterSpec": CLUSTER_SPEC,
            "submitterPodTemplate": POD_TEMPLATE, "metadata": MAP, "clusterSelector": MAP,
            "submitterConfig": {"backoffLimit": int}, "managedBy": str,
            "deletionPolicy": ("DeleteCluster", "DeleteWorkers", "DeleteSelf", "DeleteNone"), "entrypoint": str,
            "runtimeEnvYAML": str, "jobId": str, "submissionMode": ("K8sJobMode", "HTTPMode", "InteractiveMode"),
            "entrypointResources": str, "entrypointNumCpus": float, "entrypointNumGpus": float,
            "ttlSecondsAfterFinished": int, "shutdownAfterJobFinishes": bool, "suspend": bool}
KINDS = {"RayCluster": CLUSTER_SPEC, "RayJob": JOB_SPEC}


def structure_errors(value, schema, path: str = "") -> list[str]:
    """Every place where `value` leaves `schema` (unknown or misspelt keys, wrong types, values off an enum)."""
    if schema == ANY:
        return []
    if schema == MAP:
        ok = isinstance(value, dict) and all(isinstance(v, (str, int, float, bool)) for v in value.values())
        return [] if ok else [f"{path}: expected a map of scalars"]
    if isinstance(schema, tuple):
        return [] if value in schema else [f"{path}: {value!r} is not one of {', '.join(schema)}"]
    if isinstance(schema, list):
        if not isinstance(value, list):
            return [f"{path}: expected a list"]
        return [e for i, v in enumerate(value) for e in structure_errors(v, schema[0], f"{path}[{i}]")]
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            return [f"{path}: expected an object"]
        errors = [f"{path}.{k}: unknown field" for k in value if k not in schema or k == REQ]
        errors += [f"{path}.{k}: required field missing" for k in schema.get(REQ, []) if k not in value]
        return errors + [e for k, v in value.items() if k in schema and k != REQ
                         for e in structure_errors(v, schema[k], f"{path}.{k}")]
    if schema is float:
        return [] if isinstance(value, (int, float)) and not isinstance(value, bool) else [f"{path}: expected a number"]
    return [] if isinstance(value, schema) and not (schema is int and isinstance(value, bool)) else \
        [f"{path}: expected {schema.__name__}, got {value!r}"]


def manifest_errors(doc: dict) -> list[str]:
    top = {"apiVersion": ("ray.io/v1",), "kind": tuple(KINDS), "metadata": {"name": str, "namespace": str,
                                                                          "labels": MAP, "annotations": MAP},
           "spec": KINDS.get(doc.get("kind"), ANY)}
    return structure_errors(doc, top, doc.get("kind", "?"))


@pytest.mark.parametrize("kind", list(KUBERAY))
def test_kuberay_manifest_matches_ray_io_v1(kind):
    doc = yaml.safe_load(KUBERAY[kind].read_text())
    assert doc["kind"] == kind and manifest_errors(doc) == []


def test_kuberay_checker_rejects_misspelt_and_wrong_fields():
    cluster = yaml.safe_load(KUBERAY["RayCluster"].read_text())
    bad = copy.deepcopy(cluster)
    bad["spec"]["headGroupSpec"]["rayStartParam"] = bad["spec"]["headGroupSpec"].pop("rayStartParams")
    assert manifest_errors(bad) == ["RayCluster.spec.headGroupSpec.rayStartParam: unknown field"]
    bad = copy.deepcopy(cluster)
    bad["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["imagePullPolicy"] = "Sometimes"
    assert "imagePullPolicy: 'Sometimes' is not one of" in manifest_errors(bad)[0]
    bad = copy.deepcopy(cluster)
    del bad["spec"]["headGroupSpec"]
    assert manifest_errors(bad) == ["RayCluster.spec.headGroupSpec: required field missing"]
    bad = copy.deepcopy(cluster)
    bad["spec"]["workerGroupSpecs"][0]["replicas"] = "2"
    assert manifest_errors(bad) == ["RayCluster.spec.workerGroupSpecs[0].replicas: expected int, got '2'"]
    job = yaml.safe_load(KUBERAY["RayJob"].read_text())
    job["spec"]["shutdownAfterJobFinish"] = True
    job["apiVersion"] = "ray.io/v1alpha1"
    assert sorted(manifest_errors(job)) == ["RayJob.apiVersion: 'ray.io/v1alpha1' is not one of ray.io/v1",
                                            "RayJob.spec.shutdownAfterJobFinish: unknown field"]


def _cluster_specs():
    for kind, path in KUBERAY.items():
        doc = yaml.safe_load(path.read_text())
        yield kind, doc["spec"] if kind == "RayCluster" else doc["spec"]["rayClusterSpec"]


def test_kuberay_keeps_the_dashboard_on_the_cluster_network_with_token_auth():
    for kind, spec in _cluster_specs():
        head = spec["headGroupSpec"]
        assert head["serviceType"] == "ClusterIP" and not head.get("enableIngress"), kind
        assert spec["authOptions"]["mode"] == "token", kind
        assert spec["rayVersion"] >= "2.52"  # the first Ray with token auth
        for group in [head] + spec["workerGroupSpecs"]:
            env = {e["name"]: e.get("value") for c in group["template"]["spec"]["containers"] for e in c["env"]}
            assert env["HF_HUB_OFFLINE"] == "1" and env["HF_HOME"] == "/mnt/hf", kind
        for worker in spec["workerGroupSpecs"]:
            shm = [v for v in worker["template"]["spec"]["volumes"] if v["name"] == "dshm"]
            assert shm and shm[0]["emptyDir"]["medium"] == "Memory", kind
    for path in list(KUBERAY.values()) + [RAY_UP]:
        text = path.read_text()
        assert "NodePort" not in text.replace("no NodePort", "") and "LoadBalancer" not in text.replace(
            "LoadBalancer or Ingress", ""), path


def test_rayjob_runs_a_launcher_that_plans_and_fits():
    from rlhf_ray.config import load_config
    from rlhf_ray.plan import plan

    job = yaml.safe_load(KUBERAY["RayJob"].read_text())
    config = next(w for w in job["spec"]["entrypoint"].split() if w.startswith("launchers/"))
    cfg = load_config(REPO / config)
    gpus = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert int(gpus["resources"]["limits"]["nvidia.com/gpu"]) == cfg.cluster.gpus_per_node
    assert job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == cfg.cluster.nodes
    assert plan(cfg).fits


# ------------------------------------------------------------------------------------------------ scripts
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse_and_keep_auth_on(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "RAY_AUTH_MODE" in text and "0.0.0.0" not in text


def test_slurm_script_sizes_shm_goes_offline_and_binds_the_dashboard_locally():
    text = (CLUSTER / "slurm.sbatch").read_text()
    assert "--dashboard-host=127.0.0.1" in text and "export RAY_AUTH_MODE=token" in text
    assert "df -k --output=size /dev/shm" in text and "--object-store-memory=" in text
    assert "HF_HUB_OFFLINE=1" in text and "HF_DATASETS_OFFLINE=1" in text and "umask 077" in text
    assert "launchers/submit.sh --address http://127.0.0.1:8265 --wait" in text


def _submit(*args, env_extra=None):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **(env_extra or {})}
    return subprocess.run(["bash", str(REPO / "launchers/submit.sh"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_submit_builds_the_ray_job_submit_command_and_runtime_env():
    proc = _submit("--dry-run", "--address", "http://127.0.0.1:9999", "launchers/opt13b_1node.yaml", "ppo",
                   "--ppo.kl_coef", "0.05", env_extra={"NCCL_SOCKET_IFNAME": "ib0", "UNRELATED": "x"})
    assert proc.returncode == 0, proc.stderr
    command, runtime = proc.stdout.splitlines()[:2]
    assert command.startswith("ray job submit --address http://127.0.0.1:9999 --submission-id rlhf-opt13b_1node-")
    assert command.rstrip().endswith("--no-wait -- python -m rlhf_ray.cli ppo launchers/opt13b_1node.yaml "
                                     "--ppo.kl_coef 0.05")
    env = json.loads(runtime.removeprefix("runtime_env: "))
    assert env["working_dir"] == str(REPO) and ".venv" in env["excludes"] and "runs" in env["excludes"]
    assert env["env_vars"]["NCCL_SOCKET_IFNAME"] == "ib0" and "UNRELATED" not in env["env_vars"]
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1" and env["env_vars"]["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert "pipeline launchers/cpu_demo.yaml" in _submit("--dry-run", "launchers/cpu_demo.yaml").stdout
    # after a driver death: the same submission again with --resume (the CLI takes it after CONFIG)
    resumed = _submit("--dry-run", "--resume", "launchers/cpu_demo.yaml", "ppo", "--ppo.kl_coef", "0.05")
    assert resumed.stdout.splitlines()[0].rstrip().endswith("ppo launchers/cpu_demo.yaml --ppo.kl_coef 0.05 --resume")


def test_submit_refuses_runs_that_do_not_fit_and_configs_outside_the_repo(tmp_path):
    proc = _submit("--address", "http://127.0.0.1:9", "launchers/opt13b_1node.yaml", "--cluster.gpu_memory_gib", "40")
    assert proc.returncode == 1 and "DOES NOT FIT" in proc.stdout and "--skip-plan" in proc.stderr
    outside = tmp_path / "x.yaml"
    outside.write_text("run: {name: x}\n")
    proc = _submit("--dry-run", str(outside))
    assert proc.returncode == 2 and "outside" in proc.stderr
