"""Reference and reward scorers (real Ray + DeepSpeed where a group is named), reward functions (dotted path and
HTTP on localhost). In-process checks use the same worker classes without Ray when no collective is involved."""
from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import ray.cloudpickle
import torch

from rlhf_ray.config import ConfigError, DeepSpeedConfig, ModelConfig, load_config
from rlhf_ray.models.value_head import ValueHeadModel, position_ids_from_mask
from rlhf_ray.scorer import (HttpRewardFunction, ReferenceGroup, ReferenceScorer, RewardFunctionError, RewardGroup,
                             RewardScorer, batch_texts, import_callable, load_reward_function)

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import test modules

PROMPTS = ["What is 2 plus 2?", "Name a red fruit.", "Say hello.", "What is the capital city?"]
RESPONSES = ["The answer is 4.", "An apple.", "Hello world, a good day.", "Paris is a capital city."]
REWARD_MODULE = '''
def count_a(prompts, responses, **fields):
    return [float(r.count("a")) for r in responses]

def label_in_response(prompts, responses, labels):
    return [1.0 if label in r else 0.0 for r, label in zip(responses, labels)]
'''


# ------------------------------------------------------------------------------------------------ fixtures
class _Handler(BaseHTTPRequestHandler):
    attempts: dict[str, int] = {}
    received: dict[str, list[str]] = {}  # every response text each path was sent
    authorization: dict[str, str] = {}  # the last Authorization header each path saw

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Handler.attempts[self.path] = _Handler.attempts.get(self.path, 0) + 1
        _Handler.received.setdefault(self.path, []).extend(body["responses"])
        _Handler.authorization[self.path] = self.headers.get("Authorization", "")
        if self.path.startswith("/status/"):  # /status/<code>: always answers that code
            return self._reply(int(self.path.rsplit("/", 1)[1]), b"nope")
        if self.path == "/slow":
            time.sleep(1.0)
        if self.path == "/broken":
            return self._reply(500, b"internal error")
        if self.path == "/garbage":
            return self._reply(200, b"<html>not json</html>")
        rewards = [float(len(r)) for r in body["responses"]]
        if self.path == "/short":
            rewards = rewards[:1]
        self._reply(200, json.dumps({"rewards": rewards}).encode())

    def _reply(self, code: int, payload: bytes):
        try:
            self.send_response(code)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except BrokenPipeError:  # the client gave up (the /slow endpoint's timeout)
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def reward_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def reward_module_dir(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("user_rewards")
    (folder / "my_rewards.py").write_text(REWARD_MODULE)
    return str(folder)


@pytest.fixture(scope="module")
def tok(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def chat_batch(tok, side: str) -> dict:
    """Prompt + response + EOS rows, padded on `side`; action_mask marks the response tokens (learner.py)."""
    rows = [(tok(p).input_ids, tok(r).input_ids + [tok.eos_token_id]) for p, r in zip(PROMPTS, RESPONSES)]
    width = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    response = torch.zeros_like(ids)
    for i, (p, r) in enumerate(rows):
        n = len(p) + len(r)
        start = 0 if side == "right" else width - n
        ids[i, start:start + n] = torch.tensor(p + r)
        mask[i, start:start + n] = 1
        response[i, start + len(p):start + n] = 1
    return {"input_ids": ids, "attention_mask": mask, "action_mask": response[:, 1:]}


def scorer_config(tiny_llama, tiny_value_model, **overrides):
    return load_config(None, {
        "ray.address": "local", "models.actor.path": tiny_llama, "models.reward.path": tiny_value_model,
        "placement.reference": {"num_workers": 2, "cpus_per_worker": 0.25},
        "placement.reward": {"num_workers": 1, "cpus_per_worker": 0.25},
        "ppo.actor.deepspeed.precision": "fp32", "ppo.critic.deepspeed.precision": "fp32", **overrides})


def unpadded_scores(tiny_value_model, batch) -> torch.Tensor:
    """Each row alone, no padding at all, scored at its last token."""
    rm = ValueHeadModel.from_pretrained(tiny_value_model).eval()
    out = []
    with torch.no_grad():
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
            real = ids[mask.bool()][None]
            out.append(rm(real, torch.ones_like(real))[0, -1])
    return torch.stack(out)


# ------------------------------------------------------------------------------------ reward functions
def test_http_reward_function_on_localhost(reward_server):
    fn = HttpRewardFunction(reward_server + "/score", timeout_s=5, retries=0)
    assert fn(["p", "q"], ["abc", "de"], labels=["x", "y"]) == [3.0, 2.0]


@pytest.mark.parametrize("path, message", [
    ("/slow", r"no answer within 0\.2s"),
    ("/broken", r"HTTP 500"),
    ("/garbage", r"not JSON"),
    ("/short", r"expected a list of 2 numbers, got 1 values"),
])
def test_bad_endpoint_fails_clearly_after_its_retries(reward_server, path, message):
    fn = HttpRewardFunction(reward_server + path, timeout_s=0.2, retries=2, backoff_s=0.01)
    _Handler.attempts.pop(path, None)
    with pytest.raises(RewardFunctionError, match=rf"{reward_server}{path} failed after 3 attempt\(s\): .*{message}"):
        fn(["p", "q"], ["abc", "de"])
    assert _Handler.attempts[path] == 3


@pytest.mark.parametrize("code, attempts", [(400, 1), (401, 1), (404, 1), (408, 3), (429, 3), (503, 3)])
def test_client_errors_are_not_retried_except_408_and_429(reward_server, code, attempts):
    path = f"/status/{code}"
    _Handler.attempts.pop(path, None)
    fn = HttpRewardFunction(reward_server + path, timeout_s=2, retries=2, backoff_s=0.01)
    with pytest.raises(RewardFunctionError, match=rf"failed after {attempts} attempt\(s\): HTTP {code}"):
        fn(["p"], ["r"])
    assert _Handler.attempts[path] == attempts


def test_bearer_token_comes_from_the_named_environment_variable(reward_server, monkeypatch):
    _Handler.authorization.pop("/score", None)
    HttpRewardFunction(reward_server + "/score", timeout_s=5, retries=0)(["p"], ["r"])
    assert _Handler.authorization["/score"] == ""  # no token configured: no header
    monkeypatch.setenv("TEST_REWARD_TOKEN", "s3cret-token")
    fn = load_reward_function(reward_server + "/score", 5, 0, token_env="TEST_REWARD_TOKEN")
    assert fn(["p"], ["r"]) == [1.0] and _Handler.authorization["/score"] == "Bearer s3cret-token"
    assert "s3cret" not in repr(fn)
    monkeypatch.delenv("TEST_REWARD_TOKEN")
    with pytest.raises(RewardFunctionError, match="reward_http_token_env names TEST_REWARD_TOKEN, which is not set"):
        load_reward_function(reward_server + "/score", token_env="TEST_REWARD_TOKEN")
    with pytest.raises(ConfigError, match="NAME of an environment variable"):
        load_config(None, {"ppo.reward_http_token_env": "Bearer abc.def"})


def test_unreachable_endpoint_and_bad_dotted_path_fail_clearly():
    with pytest.raises(RewardFunctionError, match=r"http://127\.0\.0\.1:9/x failed after 2 attempt\(s\): Connection"):
        HttpRewardFunction("http://127.0.0.1:9/x", timeout_s=1, retries=1, backoff_s=0.01)(["p"], ["r"])
    with pytest.raises(RewardFunctionError, match="cannot import module 'no_such_module'"):
        import_callable("no_such_module:fn")
    with pytest.raises(RewardFunctionError, match="has no callable 'nope'"):
        import_callable("json:nope")
    assert import_callable("json.dumps") is json.dumps


def test_batch_texts_split_prompt_and_response(tok):
    prompts, responses = batch_texts(chat_batch(tok, "left"), tok)
    assert prompts == PROMPTS and responses == RESPONSES  # EOS dropped as a special token


# ------------------------------------------------------------------------------------ in-process scorers
def test_replica_reference_equals_transformers_and_size_picks_zero_stage(tiny_llama, tok):
    from transformers import AutoModelForCausalLM

    ds = DeepSpeedConfig(precision="fp32", micro_batch_size=2)
    ref = ReferenceScorer("reference", 0, 1, model=ModelConfig(path=tiny_llama), deepspeed=ds)
    ref.setup()
    batch = chat_batch(tok, "left")
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=position_ids_from_mask(batch["attention_mask"])).logits[:, :-1]
    expected = torch.log_softmax(logits, -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    expected = expected * batch["attention_mask"][:, 1:]
    assert ref.zero_stage_used() == 0
    ours, act = ref.logprobs(batch), batch["action_mask"].bool()
    torch.testing.assert_close(ours[act], expected[act], rtol=0, atol=1e-5)
    # Columns before a micro-batch's first action are not scored (logits_to_keep: 0); the rest equal transformers.
    first = int(act.any(0).nonzero()[0])
    assert first > 0 and (ours[:, :first] == 0).all() and (expected[:, :first] != 0).any()
    torch.testing.assert_close(ours[ours != 0], expected[ours != 0], rtol=0, atol=1e-5)
    no_actions = {k: v for k, v in batch.items() if k != "action_mask"}
    torch.testing.assert_close(ref.logprobs(no_actions), expected, rtol=0, atol=1e-5)
    # By size: a 2-rank role partitions a model above scorer_replica_max_gib, replicates one below it.
    tiny_gib = 1e-6
    assert ReferenceScorer("reference", 0, 2, model=None, deepspeed=ds, replica_max_gib=tiny_gib) \
        .choose_zero_stage(tiny_llama) == 3
    assert ReferenceScorer("reference", 0, 2, model=None, deepspeed=ds).choose_zero_stage(tiny_llama) == 0
    assert ReferenceScorer("reference", 0, 1, model=None, deepspeed=ds, replica_max_gib=tiny_gib) \
        .choose_zero_stage(tiny_llama) == 0


def test_bf16_scorers_on_cpu_compute_in_bf16_over_fp32_weights(tiny_llama, tiny_value_model, monkeypatch):
    """On CPU a bf16 reference or reward scorer computes as the bf16 learners do (deepspeed_config.autocast_bf16):
    fp32 weights loaded as such, its matmuls in bf16 under autocast, its attention models/attention.py's, so
    that the reference and the actor start from identical log-probs. fp32 scorers stay fp32 throughout."""
    import rlhf_ray.models.attention as attention
    import rlhf_ray.models.loading as loading

    asked = []
    for owner, name in ((loading, "load_causal_lm"), (ValueHeadModel, "from_pretrained")):
        real = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, _real=real, **kw: asked.append(kw["dtype"]) or _real(*a, **kw))
    for precision, weights, compute in (("bf16", torch.float32, torch.bfloat16), ("fp32", torch.float32, torch.float32)):
        ds = DeepSpeedConfig(precision=precision, micro_batch_size=2)
        for scorer in (ReferenceScorer("reference", 0, 1, model=ModelConfig(path=tiny_llama), deepspeed=ds),
                       RewardScorer("reward", 0, 1, model=ModelConfig(path=tiny_value_model), deepspeed=ds)):
            scorer.setup()
            assert {p.dtype for p in scorer.model.parameters()} == {weights}
            assert getattr(scorer.model, "backbone", scorer.model).config._attn_implementation == attention.NAME
            assert scorer.autocast == (precision == "bf16") and scorer.dtype_name == str(compute).removeprefix("torch.")
            q_proj = next(m for n, m in scorer.model.named_modules() if n.endswith("layers.0.self_attn.q_proj"))
            seen = []
            hook = q_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
            ids = torch.tensor([[3, 4, 5, 6]])
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            if isinstance(scorer, ReferenceScorer):
                scorer.logprobs(batch)
            else:
                scorer.scores(batch)
            hook.remove()
            assert seen == [compute], (precision, type(scorer).__name__)
    assert asked == [torch.float32] * 4


def test_replace_mode_skips_the_reward_model(tiny_value_model, tiny_llama, tok, reward_server):
    ds = DeepSpeedConfig(precision="fp32")
    scorer = RewardScorer("reward", 0, 1, model=ModelConfig(path=tiny_value_model), tokenizer=ModelConfig(path=tiny_llama),
                          functions=[reward_server + "/score"], mode="replace", deepspeed=ds)
    scorer.setup()
    assert scorer.model is None
    scores = scorer.scores(chat_batch(tok, "right"))
    assert scores.tolist() == [float(len(r)) for r in RESPONSES]


# ------------------------------------------------------------------------------------ scorer groups on Ray
def test_reference_group_zero3_equals_replica(ray_cluster, tiny_llama, tiny_value_model, tok):
    cfg = scorer_config(tiny_llama, tiny_value_model, **{"ppo.scorer_zero_stage": 3})
    group = ReferenceGroup(cfg)
    try:
        assert group.run("zero_stage_used") == [3, 3]
        # Partitioned for real: each rank owns half of every weight.
        shapes = group.apply(lambda w: [(p.ds_tensor.numel(), p.ds_numel) for p in w.model.module.parameters()])
        assert all(part == -(-full_n // 2) for rank in shapes for part, full_n in rank)
        replica = ReferenceScorer("reference", 0, 1, model=ModelConfig(path=tiny_llama),
                                  deepspeed=cfg.ppo.actor.deepspeed, zero_stage=0)
        replica.setup()
        for side in ("left", "right"):
            batch = chat_batch(tok, side)
            torch.testing.assert_close(group.logprobs(batch), replica.logprobs(batch), rtol=0, atol=1e-5)
    finally:
        group.shutdown()


@pytest.fixture(scope="module")
def reward_group(ray_cluster, tiny_llama, tiny_value_model, reward_server, reward_module_dir):
    cfg = scorer_config(tiny_llama, tiny_value_model, **{
        "ppo.reward_functions": ["my_rewards:count_a", "my_rewards.label_in_response", reward_server + "/score"]})
    group = RewardGroup(cfg, env_vars={"PYTHONPATH": reward_module_dir})  # the user's module, importable by actors
    yield group
    group.shutdown()


def test_reward_scores_at_last_real_token_left_and_right_padding(reward_group, tok, tiny_value_model):
    labels = ["4", "pear", "Hello", "Paris"]
    right, left = chat_batch(tok, "right"), chat_batch(tok, "left")
    expected = unpadded_scores(tiny_value_model, right)
    for batch in (right, left):
        parts = reward_group.scores({**batch, "labels": labels}, details=True)
        torch.testing.assert_close(parts["model"], expected, rtol=0, atol=1e-5)
    # The right-padded rows end in padding: the last position is not the last real token.
    assert (right["attention_mask"][:, -1] == 0).any() and (left["attention_mask"][:, 0] == 0).any()


def test_reward_functions_add_to_the_model_score(reward_group, tok, tiny_value_model, reward_server):
    labels = ["4", "pear", "Hello", "Paris"]
    batch = {**chat_batch(tok, "left"), "labels": labels}
    parts = reward_group.scores(batch, details=True)
    assert parts["my_rewards:count_a"].tolist() == [float(r.count("a")) for r in RESPONSES]
    assert parts["my_rewards.label_in_response"].tolist() == [1.0, 0.0, 1.0, 1.0]
    assert parts[reward_server + "/score"].tolist() == [float(len(r)) for r in RESPONSES]
    total = parts["model"] + parts["my_rewards:count_a"] + parts["my_rewards.label_in_response"] \
        + parts[reward_server + "/score"]
    torch.testing.assert_close(parts["score"], total)
    torch.testing.assert_close(reward_group.scores(batch), total)  # plain call: the total


def test_broken_endpoint_error_reaches_the_driver(reward_group, reward_server):
    from ray.exceptions import RayTaskError

    url = reward_server + "/broken"
    with pytest.raises(RayTaskError, match=rf"{url} failed after 2 attempt\(s\): HTTP 500"):
        reward_group.apply(lambda w: HttpRewardFunction(url, timeout_s=1, retries=1, backoff_s=0.01)(["p"], ["r"]))


def test_sharded_reward_group_sends_each_row_once_with_the_bearer_token(ray_cluster, tiny_llama, tiny_value_model,
                                                                         reward_server):
    """2 reward ranks, 3 rows: rank 1's shard is row 2 plus a padding copy of it (run_sharded). The service gets
    every row exactly once, with the token from the variable that ppo.reward_http_token_env names."""
    url = reward_server + "/sharded"
    cfg = scorer_config(tiny_llama, tiny_value_model, **{
        "placement.reward": {"num_workers": 2, "cpus_per_worker": 0.25}, "ppo.reward_functions": [url],
        "ppo.reward_function_mode": "replace", "ppo.reward_http_token_env": "TEST_REWARD_TOKEN"})
    group = RewardGroup(cfg, env_vars={"TEST_REWARD_TOKEN": "s3cret-token"})  # the cluster's environment
    try:
        rows = 3
        batch = {"input_ids": torch.ones(rows, 4, dtype=torch.long), "prompts": PROMPTS[:rows],
                 "responses": RESPONSES[:rows]}
        _Handler.received.pop("/sharded", None)
        assert group.scores(batch).tolist() == [float(len(r)) for r in RESPONSES[:rows]]
        assert sorted(_Handler.received["/sharded"]) == sorted(RESPONSES[:rows])  # no duplicate, none missing
        assert _Handler.authorization["/sharded"] == "Bearer s3cret-token"
    finally:
        group.shutdown()
