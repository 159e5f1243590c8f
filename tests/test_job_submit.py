"""The whole pipeline (SFT -> RM -> PPO) submitted with `ray job submit` to a Ray head this test starts.

The head runs on loopback with its own temp dir and free ports, so it does not disturb the session's cluster;
only its own processes are stopped at the end (`ray stop` would end every Ray process on the machine).
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml

from rlhf_ray.ppo import METRIC_KEYS

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    """n distinct free ports: every socket stays bound until all are picked (one at a time, the OS may hand the
    same port out twice, and `ray start` refuses two components on one port)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@pytest.fixture
def ray_head():
    """A throwaway head (token auth off: it listens on loopback only and lives for this test)."""
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's unix socket paths have a length limit
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    flags = ["--port", "--node-manager-port", "--object-manager-port", "--ray-client-server-port", "--dashboard-port",
             "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
             "--runtime-env-agent-port"]
    ports = dict(zip(flags, free_ports(len(flags))))
    dashboard = ports["--dashboard-port"]
    start = [str(BIN / "ray"), "start", "--head", "--num-cpus", "12", "--dashboard-host", "127.0.0.1",
             "--node-ip-address", "127.0.0.1", "--temp-dir", temp_dir, "--disable-usage-stats",
             "--min-worker-port", "20000", "--max-worker-port", "20999"]
    for flag, port in ports.items():
        start += [flag, str(port)]
    proc = subprocess.run(start, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    try:
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any(temp_dir in arg for arg in (p.info["cmdline"] or [])):
                    p.kill()
            except psutil.Error:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_pipeline_runs_under_ray_job_submit(ray_head, tiny_llama, tmp_path):
    url, env = ray_head
    out = tmp_path / "run"
    config = {
        "run": {"name": "job", "output_dir": str(out), "seed": 3},
        "models": {"actor": {"path": tiny_llama}, "reward": {"path": tiny_llama}},
        "data": {"cache_dir": str(tmp_path / "data_cache"), "max_prompt_len": 48, "max_answer_len": 16},
        "sft": {"max_steps": 3, "deepspeed": {"micro_batch_size": 2, "global_batch_size": 4}},
        "rm": {"max_steps": 3, "deepspeed": {"micro_batch_size": 2, "global_batch_size": 4}},
        "generation": {"max_new_tokens": 8, "kv_cache_gib": 1},
        "ppo": {"num_iterations": 2, "rollout_batch_size": 4, "mini_batch_size": 4, "kl_estimator": "k3",
                "reward_functions": ["rlhf_ray.data.builtin.rule_reward"], "reward_function_mode": "add",
                "actor": {"deepspeed": {"micro_batch_size": 2}}, "critic": {"deepspeed": {"micro_batch_size": 2}}},
        "logging": {"tensorboard": True},
    }
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    submit = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", url, "--working-dir", str(REPO), "--no-wait", "--",
         str(BIN / "rlhf-ray"), "pipeline", str(cfg_path)],
        env=env, capture_output=True, text=True, timeout=300)
    assert submit.returncode == 0, submit.stdout[-2000:] + submit.stderr[-2000:]
    job_id = re.search(r"raysubmit_[A-Za-z0-9]+", submit.stdout).group(0)  # the CLI colours its output

    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(url)
    deadline = time.time() + 1200
    while client.get_job_status(job_id) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.time() < deadline, "pipeline job did not finish in 20 minutes"
        time.sleep(5)
    logs = client.get_job_logs(job_id)
    assert client.get_job_status(job_id) == JobStatus.SUCCEEDED, logs[-6000:]

    rows = [json.loads(line) for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) >= 2
    for row in rows:
        missing = [k for k in METRIC_KEYS if k not in row]
        assert not missing, missing
    assert all(math.isfinite(r["kl/mean"]) for r in rows) and rows[-1]["kl/mean"] > 0
    assert (out / "ppo" / "reward_kl.png").stat().st_size > 0
    transcript = (out / "ppo" / "chat_transcript.txt").read_text()  # the SFT model and the PPO actor side by side
    assert transcript.count("User: ") == 4 and transcript.count("  SFT: ") == 4 and transcript.count("  PPO: ") == 4
    assert any((out / "ppo" / "tensorboard").iterdir())

    from safetensors.torch import load_file

    sft = load_file(str(out / "sft" / "model.safetensors"))
    ppo = load_file(str(out / "ppo" / "actor" / "model.safetensors"))
    assert sft.keys() == ppo.keys()
    assert any(not (sft[k] == ppo[k]).all() for k in sft)  # PPO changed the SFT weights
