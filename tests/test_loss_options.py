"""The policy-loss options of issue 19 reach the learner: loss aggregation over the whole mini-batch, clip-higher,
GSPO, Dr. GRPO's seq-mean-token-sum-norm, and the config rules that keep them consistent.

One real PolicyGroup (2 ranks, ZeRO-0, fp32, tiny Llama, micro-batches of 1 row: 2 per rank per step) trains on one
fixed experience batch whose rows have very different response lengths. A worker-side hook reads the gradient that
DeepSpeed has averaged over micro-batches and ranks right before the optimizer step, then drops the step, so every
call starts from the same weights. That gradient must equal a single-process plain-torch gradient of the same loss
over the concatenated mini-batch.
"""
from __future__ import annotations

import dataclasses
import sys

import pytest
import ray.cloudpickle
import torch

from rlhf_ray import rl
from rlhf_ray.config import ConfigError, load_config

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import test modules

ROWS, T, PROMPT, MAX_NEW_TOKENS = 4, 14, 3, 12
RESPONSE_LENGTHS = (10, 1, 2, 7)  # rank 0: micro-batches of 10 and 1 tokens; rank 1: 2 and 7


# ------------------------------------------------------------------------------------------------ pure
def test_gspo_and_dr_grpo_need_their_aggregations():
    with pytest.raises(ConfigError, match=r"ppo\.policy_loss gspo needs ppo\.loss_aggregation seq-mean-token-mean, "
                                          r"got 'token-mean'"):
        load_config(None, {"ppo.policy_loss": "gspo"})
    for mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
        with pytest.raises(ConfigError, match="ppo.policy_loss gspo"):
            load_config(None, {"ppo.policy_loss": "gspo", "ppo.loss_aggregation": mode})
    assert load_config(None, {"ppo.policy_loss": "gspo", "ppo.loss_aggregation": "seq-mean-token-mean"})
    dr = {"ppo.advantage_estimator": "dr_grpo", "generation.n_samples_per_prompt": 4}
    with pytest.raises(ConfigError, match=r"ppo\.advantage_estimator dr_grpo with ppo\.loss_aggregation "
                                          r"seq-mean-token-mean puts back the 1/\|o_i\|"):
        load_config(None, {**dr, "ppo.loss_aggregation": "seq-mean-token-mean"})
    for mode in ("token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):  # no per-sequence length division
        assert load_config(None, {**dr, "ppo.loss_aggregation": mode}).ppo.loss_aggregation == mode
    with pytest.raises(ConfigError, match="ppo.advantage_estimator=dr_grpo needs generation.n_samples_per_prompt"):
        load_config(None, {"ppo.advantage_estimator": "dr_grpo"})
    with pytest.raises(ConfigError, match=r"ppo\.clip_ratio_low must be in \(0, 1\)"):
        load_config(None, {"ppo.clip_ratio_low": 1.0})
    with pytest.raises(ConfigError, match="ppo.clip_ratio_high must be > 0"):
        load_config(None, {"ppo.clip_ratio_high": 0.0})
    with pytest.raises(ConfigError, match=r"ppo\.clip_ratio must be in \(0, 1\)"):
        load_config(None, {"ppo.clip_ratio": 1.5})


# ------------------------------------------------------------------------------------------------ real learner
def learner_config(tiny_llama: str, **ppo):
    return load_config(None, {
        "ray.address": "local", "run.seed": 0, "models.actor.path": tiny_llama,
        "placement.actor": {"num_workers": 2, "cpus_per_worker": 0.25}, "ppo.mini_batch_size": ROWS,
        "ppo.rollout_batch_size": ROWS, "generation.max_new_tokens": MAX_NEW_TOKENS,
        "ppo.actor.deepspeed.zero_stage": 0, "ppo.actor.deepspeed.micro_batch_size": 1,
        "ppo.actor.deepspeed.precision": "fp32", "ppo.actor.optim.grad_clip": 0.0,
        "ppo.max_nonfinite_steps": 10 ** 6,  # every step is dropped on purpose (grab_gradient)
        **{f"ppo.{k}": v for k, v in ppo.items()}})


def make_experience(model, pad_id: int, vocab: int) -> dict:
    """Prompts of PROMPT tokens, responses of RESPONSE_LENGTHS tokens, right-padded; old log-probs near the model's
    own (ratios around 1, some outside the clip range) and per-token advantages of both signs."""
    from rlhf_ray.learner import causal_logprobs

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (ROWS, T), generator=g)
    mask = torch.zeros(ROWS, T, dtype=torch.long)
    for row, length in enumerate(RESPONSE_LENGTHS):
        mask[row, :PROMPT + length] = 1
    ids[mask == 0] = pad_id
    action = torch.zeros(ROWS, T - 1)
    for row, length in enumerate(RESPONSE_LENGTHS):
        action[row, PROMPT - 1:PROMPT - 1 + length] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "action_mask": action}
    with torch.no_grad():
        logprobs, _ = causal_logprobs(model, batch, position_ids=True)
    old = logprobs + 0.3 * torch.randn(ROWS, T - 1, generator=g) * action
    advantages = torch.randn(ROWS, T - 1, generator=g) * action
    return {**batch, "old_logprobs": old, "advantages": advantages}


def grab_gradient(worker):
    """Replace this rank's optimizer step by: keep the averaged gradient (ZeRO-0 leaves it in .grad), drop the step
    (the same path a skipped non-finite step takes), so the weights never move."""
    def boundary_step(skip: bool) -> bool:
        worker.grabbed = {name: p.grad.detach().clone() for name, p in worker._trainable()}
        worker.engine.zero_grad()
        worker.engine.micro_steps += 1
        return False

    worker._boundary_step = boundary_step


def reference_gradient(model, experience: dict, p, kl_coef: float = 0.0) -> tuple[dict, float]:
    """Single process, plain torch: the loss of the whole mini-batch at once (the rows concatenated), its gradient,
    and the policy-loss part of it."""
    from rlhf_ray.learner import causal_logprobs

    model.zero_grad()
    logprobs, entropy = causal_logprobs(model, experience, position_ids=True, entropy=True)
    mask, old, adv = experience["action_mask"], experience["old_logprobs"], experience["advantages"]
    agg = rl.Aggregation(p.loss_aggregation, max_len=MAX_NEW_TOKENS)
    if p.policy_loss == "gspo":
        loss, _ = rl.gspo_loss(logprobs, old, adv, mask, p.clip_ratio_low or rl.DEFAULTS.gspo_clip_ratio_low,
                               p.clip_ratio_high or rl.DEFAULTS.gspo_clip_ratio_high, aggregation=agg)
    else:
        loss, _ = rl.policy_loss(logprobs, old, adv, mask, p.clip_ratio, aggregation=agg,
                                 clip_ratio_low=p.clip_ratio_low, clip_ratio_high=p.clip_ratio_high)
    policy_part = float(loss.detach())
    if "ref_logprobs" in experience:
        loss = loss + rl.kl_loss(logprobs, experience["ref_logprobs"], mask, kl_coef, p.kl_estimator, agg)[0]
    loss = loss + rl.entropy_bonus(entropy, mask, p.entropy_coef, agg)
    loss.backward()
    return {n: q.grad.detach().clone() for n, q in model.named_parameters()}, policy_part


@pytest.fixture(scope="module")
def learner(ray_cluster, tiny_llama, request):
    from rlhf_ray.learner import PolicyGroup

    group = PolicyGroup(learner_config(tiny_llama))
    request.addfinalizer(group.shutdown)
    group.apply(grab_gradient)
    return group


@pytest.fixture(scope="module")
def hf_model(tiny_llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)  # train mode: no dropout in Llama


@pytest.fixture(scope="module")
def experience(hf_model, tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    return make_experience(hf_model, tok.pad_token_id, len(tok))


def learner_gradient(learner, tiny_llama, experience, kl_coef: float = 0.0, **ppo) -> tuple[dict, dict, object]:
    """The learner's averaged gradient (both ranks agree) and stats, with ppo.<key> options set through the config."""
    p = learner_config(tiny_llama, **ppo).ppo
    learner.apply(lambda w: setattr(w, "ppo", dataclasses.replace(p)))
    stats = learner.train(experience, kl_coef=kl_coef)
    grads = learner.apply(lambda w: w.grabbed)
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=0, atol=0)
    return grads[0], stats, p


def max_difference(a: dict, b: dict) -> float:
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def test_token_mean_gradient_is_the_whole_mini_batch_token_mean(learner, hf_model, tiny_llama, experience):
    """Micro-batches of 10, 1, 2 and 7 response tokens on 2 ranks: the step's gradient is the token-mean over all 20
    tokens at once (1e-5, fp32), not the mean of the four micro-batches' own token-means, and the reported
    policy_loss is that mini-batch loss."""
    grads, stats, p = learner_gradient(learner, tiny_llama, experience)
    expected, expected_loss = reference_gradient(hf_model, experience, p)
    assert grads.keys() == expected.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], expected[name], rtol=0, atol=1e-5, msg=name)
    assert stats["policy_loss"] == pytest.approx(expected_loss, abs=1e-6)
    assert stats["optimizer_steps"] == 0  # the hook dropped the step: the weights stay put for the next test
    # What token-mean meant before: every micro-batch's own mean, averaged. Far from the mini-batch's gradient.
    per_micro = {n: torch.zeros_like(g) for n, g in expected.items()}
    for row in range(ROWS):
        one = {k: v[row:row + 1] for k, v in experience.items()}
        for n, g in reference_gradient(hf_model, one, p)[0].items():
            per_micro[n] += g / ROWS
    assert max_difference(per_micro, expected) > 100 * max(max_difference(grads, expected), 1e-6)


def test_loss_options_reach_the_learners_gradient(learner, hf_model, tiny_llama, experience):
    """Each option, set through the config: the learner's gradient equals the plain-torch gradient of that loss over
    the whole mini-batch, and differs from the default's (token-mean PPO, clip 0.2)."""
    default, _, _ = learner_gradient(learner, tiny_llama, experience)
    options = [
        {"clip_ratio_high": 0.28},  # DAPO clip-higher
        {"clip_ratio_low": 0.1},
        {"policy_loss": "gspo", "loss_aggregation": "seq-mean-token-mean"},  # the paper's 3e-4 / 4e-4
        {"policy_loss": "gspo", "loss_aggregation": "seq-mean-token-mean", "clip_ratio_low": 0.2,
         "clip_ratio_high": 0.3},
        {"loss_aggregation": "seq-mean-token-mean"},
        {"loss_aggregation": "seq-mean-token-sum"},
        {"loss_aggregation": "seq-mean-token-sum-norm"},  # Dr. GRPO: / (sequences x generation.max_new_tokens)
        {"entropy_coef": 0.05, "kl_estimator": "k3", "kl_coef": 0.5},  # the KL and entropy terms aggregate alike
        {"entropy_coef": 0.05, "kl_estimator": "k3", "kl_coef": 0.5, "loss_aggregation": "seq-mean-token-sum-norm"},
    ]
    with_reference = {**experience, "ref_logprobs": experience["old_logprobs"] - 0.2 * experience["action_mask"]}
    for option in options:
        option = dict(option)
        kl_coef = option.pop("kl_coef", 0.0)
        batch = with_reference if kl_coef else experience
        grads, stats, p = learner_gradient(learner, tiny_llama, batch, kl_coef, **option)
        expected, expected_loss = reference_gradient(hf_model, batch, p, kl_coef)
        for name in grads:
            torch.testing.assert_close(grads[name], expected[name], rtol=0, atol=1e-5, msg=f"{option} {name}")
        assert stats["policy_loss"] == pytest.approx(expected_loss, abs=1e-6), option
        assert max_difference(grads, default) > 1e-4, option
