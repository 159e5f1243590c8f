"""Multi-node placement for real on one machine: a Ray cluster of simulated nodes (ray.cluster_utils.Cluster), each
declaring the GPUs of a DGX node (Ray schedules declared GPUs without any being present), gets exactly the
placement groups of a launcher's PPO layout (resources.ppo_layout, one group per role, STRICT_PACK per engine).
The cluster runs with token authentication on, and launchers/submit.sh submits a job to it through the job API.

The cluster lives in a child process (this file run as a script): the test process may already hold the
session's own Ray cluster, and a driver can only be connected to one.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = "launchers/llama2_70b_openrlhf.yaml"  # OpenRLHF's 70B layout: 4 nodes x 8 GPUs, 8 groups


def simulate(config: str, out: str, dashboard_port: int) -> None:
    """Start head + cfg.cluster.nodes simulated GPU nodes, place the layout, submit a job; write a JSON report."""
    import ray
    import requests
    from ray.cluster_utils import Cluster
    from ray.util.placement_group import placement_group_table

    from rlhf_ray.config import load_config
    from rlhf_ray.plan import plan
    from rlhf_ray.resources import ppo_layout, ready_placement_group

    cfg = load_config(REPO / config)
    c = cfg.cluster
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "num_gpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1",
        "dashboard_port": dashboard_port,
        # free ports instead of Ray's defaults (6379, 10001, 52365): another local Ray cluster may hold those
        "gcs_server_port": _free_port(), "ray_client_server_port": _free_port(),
        "dashboard_agent_listen_port": _free_port()})
    for _ in range(c.nodes):  # logical CPUs and GPUs of a DGX A100 node
        cluster.add_node(num_cpus=128, num_gpus=c.gpus_per_node, resources={"dgx": 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    report = {"gpus_per_node": {n["NodeID"]: n["Resources"].get("GPU", 0) for n in ray.nodes() if n["Alive"]},
              "groups": []}
    for layout in ppo_layout(cfg):
        pg = ready_placement_group(layout.role, layout.bundles, layout.strategy, timeout_s=60)
        table = placement_group_table(pg)
        report["groups"].append({"role": layout.role, "strategy": table["strategy"], "state": table["state"],
                                 "nodes": [table["bundles_to_node_id"][i] for i in range(len(layout.bundles))],
                                 "gpus": [b.get("GPU", 0) for b in layout.bundles]})
    report["planned_nodes"] = {g.role: len({p.node for p in plan(cfg).procs if p.group == i})
                               for i, g in enumerate(ppo_layout(cfg))}

    # The job API with token auth: refused without the token, and submit.sh (which sends it) runs a job.
    url = f"http://127.0.0.1:{dashboard_port}"
    report["no_token_status"] = requests.get(f"{url}/api/jobs/", timeout=30).status_code
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    proc = subprocess.run(["bash", str(REPO / "launchers/submit.sh"), "--address", url, "--wait", "--skip-plan",
                           "--python", sys.executable, config, "plan"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=180)
    report["submit"] = {"returncode": proc.returncode, "stdout": proc.stdout[-6000:], "stderr": proc.stderr[-3000:]}
    ray.shutdown()
    cluster.shutdown()
    Path(out).write_text(json.dumps(report))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    """Run `simulate` in a child process with its own Ray temp dir and a fresh auth token."""
    tmp = Path(tempfile.mkdtemp(prefix="rlhfmn"))  # short: Ray's socket paths must stay under 108 bytes
    out = tmp_path_factory.mktemp("multinode") / "report.json"
    port = _free_port()
    env = {**os.environ, "RAY_TMPDIR": str(tmp), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "RAY_ADDRESS": "", "RAY_prestart_worker_first_driver": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS")
    proc = subprocess.run([sys.executable, __file__, LAUNCHER, str(out), str(port)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"Ray logs under {tmp}\n" + proc.stderr[-5000:]
    shutil.rmtree(tmp, ignore_errors=True)
    return json.loads(out.read_text())


def test_every_role_gets_its_own_ready_group_and_engines_stay_on_one_node(simulated):
    from rlhf_ray.config import load_config
    from rlhf_ray.resources import ppo_layout

    roles = [g.role for g in ppo_layout(load_config(REPO / LAUNCHER))]
    groups = simulated["groups"]
    assert [g["role"] for g in groups] == roles
    assert {"actor", "critic", "reference", "reward"} <= set(roles) and sum(r.startswith("generator[") for r in roles) == 4
    assert all(g["state"] == "CREATED" for g in groups)
    for g in groups:
        if g["role"].startswith("generator["):
            assert g["strategy"] == "STRICT_PACK" and len(g["nodes"]) == 2 and len(set(g["nodes"])) == 1
    # Ray packed every group onto as many nodes as the planner predicted (one each here) ...
    assert {g["role"]: len(set(g["nodes"])) for g in groups} == simulated["planned_nodes"]
    # ... and no node holds more GPU bundles than it has GPUs; all 32 simulated GPUs are used.
    used: dict[str, float] = {}
    for g in groups:
        for node, gpus in zip(g["nodes"], g["gpus"]):
            used[node] = used.get(node, 0) + gpus
    assert all(used[n] <= simulated["gpus_per_node"][n] for n in used)
    assert sum(used.values()) == 32 and len(used) == 4


def test_job_api_needs_the_token_and_submit_sh_runs_a_job(simulated):
    assert simulated["no_token_status"] == 401
    submit = simulated["submit"]
    assert submit["returncode"] == 0, submit
    out = submit["stdout"]
    assert "FITS" in out and "plan for launchers/llama2_70b_openrlhf.yaml" in out  # the job's entrypoint ran
    assert "succeeded" in out.lower()
    assert "follow the logs:  RAY_AUTH_MODE=token ray job logs" in out and "--follow rlhf-llama2_70b_openrlhf-" in out


if __name__ == "__main__":
    simulate(sys.argv[1], sys.argv[2], int(sys.argv[3]))
