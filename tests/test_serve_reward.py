"""`rlhf-ray serve-reward`: the tiny reward model behind real HTTP on loopback. Concurrent clients share forward
passes, refusals (401, 400, 413) leave the server serving, and one PPO iteration scores through the command."""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import threading
import time

import pytest
import requests

from rlhf_ray.scorer import HttpRewardFunction, RewardFunctionError
from rlhf_ray.serve_reward import RewardModel, make_reward_server

TOKEN_ENV = "RLHF_RAY_TEST_SERVE_REWARD_TOKEN"
TOKEN = "serve-reward-test-token"
# Set at import, i.e. at collection, before the session's Ray cluster starts: its workers (the PPO reward actor)
# inherit it, as a real cluster's nodes would hold the token.
os.environ[TOKEN_ENV] = TOKEN
MAX_BODY = 4096
MAX_ROWS = 8

PROMPTS = ["What is 2 plus 2?", "Name a red fruit.", "Say hello.", "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Bye"]
RESPONSES = ["4", "An apple.", "Hello world.", "Goodbye!"]


@pytest.fixture(scope="module")
def reward_model(tiny_value_model, tiny_llama):
    return RewardModel(tiny_value_model, tokenizer=tiny_llama)  # the fixture folder carries no tokenizer


@pytest.fixture(scope="module")
def server(reward_model):
    # a long window so two clients started together always land in one batch
    srv = make_reward_server(reward_model.score, token=TOKEN, max_body_bytes=MAX_BODY, batch_window_s=0.3,
                             max_batch_rows=MAX_ROWS)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.close()


def health(server) -> dict:
    return requests.get(server.url.replace("/score", "/health"), timeout=5).json()


def alone(reward_model, prompts, responses) -> list[float]:
    """Each row scored in a forward pass of its own (no padding, no batching)."""
    return [reward_model.score([p], [r])[0] for p, r in zip(prompts, responses)]


def test_two_concurrent_clients_share_one_forward_pass(server, reward_model):
    clients = [(PROMPTS, RESPONSES), (PROMPTS[:3], ["four", "A cherry.", "Hi."])]
    results: list = [None, None]
    start = threading.Barrier(len(clients))

    def call(i):
        start.wait()
        time.sleep(0.1 * i)  # the second client comes 0.1 s later: within the 0.3 s window, so it joins the first
        results[i] = HttpRewardFunction(server.url, timeout_s=30, retries=0, token=TOKEN)(*clients[i])

    before = health(server)
    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(clients))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = health(server)
    for (prompts, responses), got in zip(clients, results):
        assert got == pytest.approx(alone(reward_model, prompts, responses), abs=1e-4)
    assert after["requests"] - before["requests"] == 2 and after["rows"] - before["rows"] == 7
    assert after["batches"] - before["batches"] == 1  # merged: one batch, one forward pass for both
    assert after["forward_passes"] - before["forward_passes"] == 1
    assert len(set(results[0])) > 1  # rows really differ (the scores are not one constant)

    # one request over max_batch_rows is scored in bounded forward passes
    big = HttpRewardFunction(server.url, timeout_s=30, retries=0, token=TOKEN)(PROMPTS * 3, RESPONSES * 3)
    assert big == pytest.approx(results[0] * 3, abs=1e-4)
    assert health(server)["forward_passes"] - after["forward_passes"] == 2  # 12 rows, at most 8 per pass


def test_refusals_answer_with_a_message_and_the_server_keeps_serving(server):
    good = {"prompts": PROMPTS[:2], "responses": RESPONSES[:2]}
    auth = {"Authorization": f"Bearer {TOKEN}"}

    def post(headers=auth, **kwargs):
        return requests.post(server.url, headers=headers, timeout=30, **kwargs)

    def still_serving():
        reply = post(json=good)
        assert reply.status_code == 200 and len(reply.json()["rewards"]) == 2

    cases = [  # (status, message part, request)
        (401, "Bearer", dict(json=good, headers={"Authorization": "Bearer wrong"})),
        (401, "Bearer", dict(json=good, headers={})),
        (400, "not valid JSON", dict(data=b'{"prompts": ["a"], "responses": [', headers=auth)),
        (400, "'responses'[1] is int", dict(json={"prompts": ["a", "b"], "responses": ["x", 2]})),
        (400, "2 prompts but 1 responses", dict(json={"prompts": ["a", "b"], "responses": ["x"]})),
        (413, f"over the limit of {MAX_BODY} bytes", dict(json={"prompts": ["x" * MAX_BODY], "responses": ["y"]})),
        (404, "POST /score", dict(json=good, url=server.url.replace("/score", "/other"))),
    ]
    for status, message, kwargs in cases:
        url = kwargs.pop("url", server.url)
        reply = requests.post(url, timeout=30, **{"headers": auth, **kwargs})
        assert reply.status_code == status, (status, reply.text)
        assert message in reply.json()["error"], reply.text
        still_serving()
    # the PPO client fails at once on a 401, naming the URL and the answer
    with pytest.raises(RewardFunctionError, match=r"after 1 attempt\(s\): HTTP 401"):
        HttpRewardFunction(server.url, timeout_s=30, retries=2, backoff_s=0.01, token="wrong")(["p"], ["r"])
    still_serving()


def test_a_ppo_iteration_scores_through_the_served_reward_model(ray_cluster, tiny_llama, tiny_value_model, tmp_path):
    """The command itself, in its own process on a free port, serving PPO's reward actor (ppo.reward_functions:
    [URL], the token from ppo.reward_http_token_env) for one GRPO iteration."""
    from test_ppo import ppo_config

    from rlhf_ray.ppo import PPOTrainer

    proc = subprocess.Popen([sys.executable, "-m", "rlhf_ray.cli", "serve-reward", "--path", tiny_value_model,
                             "--tokenizer", tiny_llama, "--port", "0", "--token-env", TOKEN_ENV],
                            stdout=subprocess.PIPE, text=True)
    try:
        banner = proc.stdout.readline()
        match = re.search(r"at (http://127\.0\.0\.1:\d+/score)", banner)
        assert match, f"no URL in {banner!r} (exit code {proc.poll()})"
        url = match.group(1)
        cfg = ppo_config(tmp_path, tiny_llama, tiny_value_model, **{
            "ppo.reward_functions": [url], "ppo.reward_function_mode": "replace",
            "ppo.reward_http_token_env": TOKEN_ENV, "ppo.advantage_estimator": "grpo",
            "ppo.rollout_batch_size": 4, "generation.n_samples_per_prompt": 2, "ppo.mini_batch_size": 8,
            "ppo.actor.deepspeed.micro_batch_size": 4, "ppo.critic.deepspeed.micro_batch_size": 4,
            "generation.max_new_tokens": 8})
        trainer = PPOTrainer(cfg)
        try:
            stats = trainer.step()
        finally:
            trainer.shutdown()
        counters = requests.get(url.replace("/score", "/health"), timeout=5).json()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert counters["rows"] == 8 and counters["requests"] >= 1  # 4 prompts x 2 samples, each scored once
    assert stats["weight_version"] == 1 and math.isfinite(stats["reward/mean"]) and stats["reward/mean"] != 0


def test_help_names_the_token_variable_and_no_token_refuses_to_start(capsys, monkeypatch):
    from rlhf_ray.cli import main

    with pytest.raises(SystemExit):
        main(["serve-reward", "--help"])
    out = capsys.readouterr().out
    assert "$RLHF_RAY_REWARD_TOKEN" in out and "127.0.0.1" in out and "413" in out
    monkeypatch.delenv("RLHF_RAY_TEST_UNSET_TOKEN", raising=False)
    assert main(["serve-reward", "--path", "unused", "--token-env", "RLHF_RAY_TEST_UNSET_TOKEN"]) == 2
    assert "set the bearer token in $RLHF_RAY_TEST_UNSET_TOKEN" in capsys.readouterr().err
