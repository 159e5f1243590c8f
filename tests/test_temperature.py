"""Sampling temperature: everything PPO scores is of the distribution the engines sampled from, softmax(logits / T).

Pure: rl.scoring_temperature (greedy T = 0 scores at 1, by hand) and the PPO-only top_p / top_k rule. Real: one
1-rank actor, one 1-rank reference and one vLLM engine on the tiny Llama at T = 0.7 (fp32), checked against an
independent transformers forward, against vLLM's sample log-probs, and through a verified weight sync.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import ray.cloudpickle
import torch

from rlhf_ray import rl
from rlhf_ray.config import ConfigError, load_config, validate_ppo

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import test modules

T = 0.7
FP32_PROBE_ATOL = 1e-3  # the weight-sync probe's tolerance for fp32 engines and learners (default_probe_atol)
DEMO = Path(__file__).resolve().parents[1] / "launchers" / "cpu_demo.yaml"
PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [40, 41, 42, 43, 44, 45], [100, 200, 300]]


# ------------------------------------------------------------------------------------------------ pure
def test_scoring_temperature_by_hand_and_greedy_scores_at_one():
    # z = [0, ln 3]: at T = 1 p = [1/4, 3/4]; at T = 0.5 z / T = [0, 2 ln 3], p = [1/10, 9/10].
    logits, tokens = torch.tensor([[[0.0, math.log(3.0)]]]), torch.tensor([[1]])
    at_one = (math.log(0.75), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))  # -0.287682, 0.562335
    at_half = (math.log(0.9), -(0.1 * math.log(0.1) + 0.9 * math.log(0.9)))  # -0.105361, 0.325083
    for temperature, (logprob, entropy) in ((1.0, at_one), (0.5, at_half), (0.0, at_one)):  # 0: greedy -> 1
        assert rl.logprobs_from_logits(logits, tokens, temperature).item() == pytest.approx(logprob, abs=1e-6)
        assert rl.entropy_from_logits(logits, temperature).item() == pytest.approx(entropy, abs=1e-6)
    assert rl.scoring_temperature(0.0) == 1.0 and rl.scoring_temperature(0.7) == 0.7
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        rl.logprobs_from_logits(logits, tokens, -1.0)


def test_top_p_and_top_k_are_rejected_for_ppo_only(tmp_path, capsys):
    from rlhf_ray.cli import main

    assert load_config(None, {"generation.top_p": 0.9, "generation.top_k": 5})  # `rlhf-ray generate` may truncate
    for key, value in (("top_p", 0.9), ("top_k", 5)):
        with pytest.raises(ConfigError, match=rf"generation\.{key} is {value}: PPO needs .*do not reproduce the "
                                              r"engines' truncation"):
            validate_ppo(load_config(None, {f"generation.{key}": value}))
    for off in (-1, 0):
        validate_ppo(load_config(None, {"generation.top_k": off, "generation.temperature": 0.0}))
    # `ppo` and `pipeline` stop at once, in one line, before any model, data or Ray (the model path does not exist).
    for command in ("ppo", "pipeline"):
        argv = [command, str(DEMO), "--generation.top_p", "0.5",
                "--models.actor.path", str(tmp_path / "missing"), "--run.output_dir", str(tmp_path / "run")]
        assert main(argv) == 2 and "config error: generation.top_p is 0.5: PPO needs 1.0" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ real
@pytest.fixture(scope="module")
def cfg(tiny_llama):
    """1 actor rank (whole batch in one micro-batch), 1 reference rank, 1 engine; fp32; T = 0.7."""
    return load_config(None, {
        "ray.address": "local", "run.seed": 0, "models.actor.path": tiny_llama, "generation.temperature": T,
        "generation.sync_transport": "gloo",
        "placement.actor": {"num_workers": 1, "cpus_per_worker": 0.25},
        "placement.reference": {"num_workers": 1, "cpus_per_worker": 0.25},
        "placement.generator": {"num_workers": 1, "cpus_per_worker": 0.25},
        "ppo.rollout_batch_size": 8, "ppo.mini_batch_size": 8,
        "ppo.actor.deepspeed.micro_batch_size": 8, "ppo.actor.deepspeed.precision": "fp32",
        "ppo.critic.deepspeed.precision": "fp32", "ppo.actor.optim.lr_schedule": "constant"})


@pytest.fixture(scope="module")
def groups(ray_cluster, cfg, tiny_llama, request):
    from rlhf_ray.generator import GeneratorGroup
    from rlhf_ray.learner import PolicyGroup
    from rlhf_ray.scorer import ReferenceGroup

    started = []
    request.addfinalizer(lambda: [g.shutdown() for g in started])
    for make in (lambda: PolicyGroup(cfg), lambda: ReferenceGroup(cfg), lambda: GeneratorGroup(cfg, tiny_llama)):
        started.append(make())
    return started


@pytest.fixture(scope="module")
def rollout(groups, cfg, tiny_llama):
    """4 prompts x 2 samples of 8 tokens at T = 0.7 as a PPO batch, vLLM's sample log-probs in (B, T-1) columns."""
    from transformers import AutoTokenizer

    from rlhf_ray.generator import Sampling
    from rlhf_ray.experience import build_batch, full_width

    generators = groups[2]
    sampling = Sampling.from_config(cfg.generation, n=2, max_new_tokens=8, ignore_eos=True, seed=0)
    samples = generators.generate(PROMPTS, sampling).samples
    batch = build_batch([PROMPTS[s.prompt_index] for s in samples], [s.token_ids for s in samples],
                        AutoTokenizer.from_pretrained(tiny_llama).pad_token_id)
    vllm = full_width(torch.tensor([s.logprobs for s in samples]), batch.pop("prompt_width"))
    return batch, vllm


def transformers_scores(path: str, batch: dict, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T-1) log-probs and entropies of log_softmax(logits / temperature): a plain transformers forward."""
    from transformers import AutoModelForCausalLM

    from rlhf_ray.models.value_head import position_ids_from_mask

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    mask = batch["attention_mask"]
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=mask,
                       position_ids=position_ids_from_mask(mask)).logits[:, :-1]
    logp = torch.log_softmax(logits / temperature, -1)
    return logp.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


def test_actor_reference_and_entropy_score_the_sampling_distribution(groups, rollout, tiny_llama):
    actor, reference, _ = groups
    batch, vllm = rollout
    act = batch["action_mask"].bool()
    expected, expected_entropy = transformers_scores(tiny_llama, batch, T)
    at_one, entropy_at_one = transformers_scores(tiny_llama, batch, 1.0)
    assert (expected - at_one)[act].abs().max() > 1e-3  # the check below can tell the two temperatures apart

    old = actor.logprobs(batch)
    ref = reference.logprobs(batch)
    for ours in (old, ref):
        assert (ours - expected)[act].abs().max() < 1e-4
    # The engine-vs-learner gap (what logprob_gap/vllm_vs_learner measures) is within the probe tolerance; the
    # T = 1 scores would not be.
    assert (vllm - old)[act].abs().max() < FP32_PROBE_ATOL < (vllm - at_one)[act].abs().max()

    # The training pass: its log-probs (gap to the independent ones), its ratio to the old ones, its entropy.
    stats = actor.train({**batch, "old_logprobs": old, "advantages": torch.zeros_like(old),
                         "vllm_logprobs": expected})
    assert stats["logprob_gap"] < 1e-4 and abs(stats["ratio_mean"] - 1) < 1e-5
    entropy = rl.masked_mean(expected_entropy, act).item()
    assert abs(stats["entropy"] - entropy) < 1e-4
    assert abs(entropy - rl.masked_mean(entropy_at_one, act).item()) > 1e-3


def test_verified_sync_probes_both_sides_at_temperature_one(groups):
    """vLLM's prompt log-probs (the probe) are raw whatever the mode; the learner's probe scores at T = 1 too."""
    actor, _, generators = groups
    generators.sync_weights(actor)
    report = generators.last_sync
    assert report.verified and all(e["probe_max_diff"] < FP32_PROBE_ATOL for e in report.engines)
