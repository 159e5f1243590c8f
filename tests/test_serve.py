"""`rlhf-ray serve`: vLLM's OpenAI-compatible server for a checkpoint, run by a Ray actor; real HTTP on loopback."""
import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).parent / "rlhf-ray")
KEY = "test-key-123"


def post(url: str, body: dict, key: str | None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def read_until(proc: subprocess.Popen, pattern: str, timeout_s: float) -> re.Match:
    deadline, seen = time.monotonic() + timeout_s, []
    while time.monotonic() < deadline and proc.poll() is None:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            line = proc.stdout.readline()
            seen.append(line)
            if match := re.search(pattern, line):
                return match
    proc.kill()
    raise AssertionError(f"no line matching {pattern!r}; output:\n{''.join(seen)[-8000:]}")


def test_serve_answers_chat_completions_with_the_key_refuses_others_and_stops_clean(tiny_llama):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RLHF_RAY_SERVE_API_KEY": KEY}
    proc = subprocess.Popen([CLI, "--log-level", "WARNING", "serve", "--path", tiny_llama, "--port", "0",
                             "--name", "tiny"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        match = read_until(proc, r"(http://127\.0\.0\.1:\d+/v1) .*server pid (\d+)", timeout_s=600)
        url, server_pid = match.group(1), int(match.group(2))
        # Keep reading its output: a pipe nobody reads fills up (64 KiB) and blocks the command's writes, shutdown
        # included (seen in CI: the command never exited after SIGINT).
        rest: list[str] = []
        threading.Thread(target=lambda: rest.extend(proc.stdout), daemon=True).start()
        # vLLM's server runs under a Ray actor, not in the command's process
        server = psutil.Process(server_pid)
        assert server.ppid() != proc.pid and "ray::" in " ".join(psutil.Process(server.ppid()).cmdline())
        ask = {"model": "tiny", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 6,
               "temperature": 0.0}
        status, answer = post(f"{url}/chat/completions", ask, KEY)
        assert status == 200, answer
        assert answer["model"] == "tiny" and answer["choices"][0]["message"]["role"] == "assistant"
        assert isinstance(answer["choices"][0]["message"]["content"], str)
        assert 1 <= answer["usage"]["completion_tokens"] <= 6
        assert post(f"{url}/chat/completions", ask, "wrong-key")[0] == 401
        assert post(f"{url}/chat/completions", ask, None)[0] == 401
        assert post(f"{url}/chat/completions", ask, KEY)[0] == 200  # still serving after the refusals
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0, "".join(rest)[-8000:]
        time.sleep(1.0)
        assert not psutil.pid_exists(server_pid) or psutil.Process(server_pid).status() == psutil.STATUS_ZOMBIE
    finally:
        if proc.poll() is None:
            proc.kill()


def test_serve_refuses_to_start_without_a_key_unless_told():
    env = {k: v for k, v in os.environ.items() if k != "RLHF_RAY_SERVE_API_KEY"}
    proc = subprocess.run([CLI, "serve", "--path", "builtin:smollm2"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "RLHF_RAY_SERVE_API_KEY is not set" in proc.stderr and "--no-auth" in proc.stderr


@pytest.mark.gpu
def test_serve_takes_a_gpu_bundle_when_the_cluster_has_gpus(tiny_llama):
    """On a GPU machine the server actor's placement group holds a GPU and vLLM's server picks CUDA there."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RLHF_RAY_SERVE_API_KEY": KEY}
    proc = subprocess.Popen([CLI, "--log-level", "WARNING", "serve", "--path", tiny_llama, "--port", "0",
                             "--name", "tiny"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        match = read_until(proc, r"on (cpu|cuda): (http://127\.0\.0\.1:\d+/v1)", timeout_s=600)
        assert match.group(1) == "cuda"
        ask = {"model": "tiny", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 6}
        assert post(f"{match.group(2)}/chat/completions", ask, KEY)[0] == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
