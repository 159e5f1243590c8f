"""Non-finite values (NaN/inf) never train the model, and the KL term in the loss really moves the gradient.

Pure pieces: the probe comparison after a weight sync, dropping samples with a non-finite score, the counter of
skipped steps, and the config rule against `kl_penalty: loss` with k1. One real learner (2 ranks, ZeRO-2, auto,
tiny Llama) shows a step with a NaN loss on one rank skipped on both, and the KL-in-loss gradient.
"""
from __future__ import annotations

import dataclasses
import math
import sys

import pytest
import ray.cloudpickle
import torch

from rlhf_ray.config import ConfigError, load_config, ppo_learner
from rlhf_ray.learner import NonfiniteStepError, NonfiniteSteps, PolicyGroup, PolicyLearner
from rlhf_ray.experience import compute_advantages, drop_nonfinite_samples
from rlhf_ray.weight_sync import WeightSyncError, compare_probe

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import test modules

ROWS, T, PROMPT = 4, 12, 4  # 2 rows per rank: one micro-batch, one optimizer step per train() call


# ------------------------------------------------------------------------------------------------ pure
def test_kl_in_the_loss_with_k1_is_rejected_at_load():
    with pytest.raises(ConfigError, match=r"ppo\.kl_penalty 'loss' with ppo\.kl_estimator 'k1'.*k3.*k2"):
        load_config(None, {"ppo.kl_penalty": "loss", "ppo.kl_estimator": "k1"})
    with pytest.raises(ConfigError, match="ppo.kl_estimator"):
        load_config(None, {"ppo.kl_penalty": "loss"})  # k1 is the default estimator
    for estimator in ("k2", "k3"):
        cfg = load_config(None, {"ppo.kl_penalty": "loss", "ppo.kl_estimator": estimator})
        assert cfg.ppo.kl_estimator == estimator
    assert load_config(None, {"ppo.kl_penalty": "reward", "ppo.kl_estimator": "k1"})  # k1 as a reward penalty is fine


def test_probe_with_nan_is_a_mismatch():
    reference = [-1.0, -2.0, -3.0]
    assert compare_probe([-1.0, -2.0005, -3.0], reference, 1e-3, "engine 0") == pytest.approx(5e-4)
    with pytest.raises(WeightSyncError, match="differ from the learner's by 0.1 at position 2"):
        compare_probe([-1.0, -2.1, -3.0], reference, 1e-3, "engine 0")
    nan, inf = float("nan"), float("inf")
    for mine, ref in (([-1.0, nan, -3.0], reference), (reference, [-1.0, -2.0, nan]), ([-inf, -2.0, -3.0], reference),
                      ([nan] * 3, [nan] * 3)):
        with pytest.raises(WeightSyncError, match="not finite"):
            compare_probe(mine, ref, 1e-3, "engine 0")
    with pytest.raises(WeightSyncError, match="2 probe log-probs from the engine, 3 from the learner"):
        compare_probe([-1.0, -2.0], reference, 1e-3, "engine 0")


def test_nonfinite_scores_and_logprobs_drop_their_samples_not_their_rows():
    """GRPO, 2 groups of 3: a NaN score (row 1) and a NaN reference log-prob on a response token (row 4) drop those
    samples; a NaN on a prompt column (row 5, masked) does not. Rows stay, advantages are finite, the dropped rows
    carry no advantage and no mask, and group 0's finite samples keep their own mean as baseline."""
    p = load_config(None, {"ppo.advantage_estimator": "grpo", "generation.n_samples_per_prompt": 3}).ppo
    mask = torch.zeros(6, 5)
    mask[:, 2:] = 1  # columns 0-1: prompt
    scores = torch.tensor([1.0, float("nan"), 3.0, 0.0, 1.0, 2.0])
    ref = torch.full((6, 5), -1.0)
    ref[4, 3] = float("nan")
    ref[5, 0] = float("inf")  # not a response token: ignored
    old = torch.full((6, 5), -1.0)
    scores, act, per_token, dropped = drop_nonfinite_samples(scores, mask, {"ref": ref, "old": old}, group_size=3)
    assert dropped.tolist() == [False, True, False, False, True, False] and int(dropped.sum()) == 2
    assert act.shape == mask.shape and act[1].sum() == 0 and act[4].sum() == 0 and act[0].sum() == 3
    assert scores[1] == 2.0 and scores[4] == 1.0  # the mean of the group's finite scores
    assert torch.isfinite(per_token["ref"][act.bool()]).all() and torch.isfinite(per_token["ref"][4]).all()
    adv = compute_advantages(p, 0.0, scores, per_token["old"], per_token["ref"], act, 3)
    assert torch.isfinite(adv.advantages).all()
    assert (adv.advantages[1] == 0).all() and (adv.advantages[4] == 0).all()
    assert adv.advantages[0, 2] < 0 < adv.advantages[2, 2]  # 1 and 3 around their mean 2
    # Nothing to drop: the inputs come back as they were.
    clean, clean_mask = torch.tensor([1.0, 2.0, 3.0]), mask[:3]
    same = drop_nonfinite_samples(clean, clean_mask, {"old": old[:3]}, group_size=3)
    assert same[0] is clean and same[1] is clean_mask and not same[3].any()


def test_max_nonfinite_steps_in_a_row_stop_with_a_clear_error(tiny_llama):
    """The counter a learner rank builds from ppo.max_nonfinite_steps (no Ray: the worker object in-process)."""
    cfg = load_config(None, {"models.actor.path": tiny_llama, "ppo.max_nonfinite_steps": 4})
    worker = PolicyLearner("actor", 0, 1, model=cfg.models.actor, stage=ppo_learner(cfg, "actor"), ppo=cfg.ppo)
    counter = worker.nonfinite
    assert isinstance(counter, NonfiniteSteps)
    for skipped in (True, True, True, False, True, True, True):  # a good step resets the run of skips
        counter.record(skipped)
    assert counter.in_a_row == 3 and counter.total == 6
    with pytest.raises(NonfiniteStepError, match=r"actor: 4 optimizer steps in a row .*ppo\.max_nonfinite_steps: 4"):
        counter.record(True)


def test_gradient_check_catches_nan_inf_and_an_overflowing_norm(tiny_llama):
    """PolicyLearner._grads_finite, the check a plain optimizer's step takes (ZeRO-0): finite gradients pass; one NaN
    or inf element anywhere, or a norm that overflows float32, fails it (no Ray: the worker object in-process)."""
    cfg = load_config(None, {"models.actor.path": tiny_llama})
    worker = PolicyLearner("actor", 0, 1, model=cfg.models.actor, stage=ppo_learner(cfg, "actor"), ppo=cfg.ppo)
    params = [torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.zeros(5))]
    worker._trainable = lambda: [(str(i), p) for i, p in enumerate(params)]
    for bad in (None, float("nan"), float("inf"), -float("inf"), 3e38):
        for p in params:
            p.grad = torch.ones_like(p)
        if bad is not None:
            params[1].grad[2] = bad
        assert worker._grads_finite() == (bad is None), bad


# ------------------------------------------------------------------------------------------ real learner
def make_experience(pad_id: int, vocab: int, nan_rows: tuple[int, ...] = (), seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (ROWS, T), generator=g)
    mask = torch.ones(ROWS, T, dtype=torch.long)
    mask[0, :2] = 0  # one left-padded row
    ids[mask == 0] = pad_id
    act = ((mask.cumsum(1) - 1 >= PROMPT) & (mask == 1))[:, 1:].float()
    advantages = act * torch.linspace(-1.0, 1.0, ROWS)[:, None]
    for row in nan_rows:
        advantages[row] = float("nan")
    return {"input_ids": ids, "attention_mask": mask, "action_mask": act, "advantages": advantages}


def rank_state(worker) -> dict:
    """What a skipped step must leave alone on this rank: weights, optimizer (Adam) state, step and LR counters."""
    return {"weights": {n: worker._local(p).detach().clone() for n, p in worker._trainable()},
            "optimizer": worker.optimizer_state(), "global_steps": worker.engine.global_steps,
            "lr_steps": worker.scheduler.last_epoch}


def assert_same_state(before: dict, after: dict) -> None:
    assert after["global_steps"] == before["global_steps"] and after["lr_steps"] == before["lr_steps"]
    for part in ("weights", "optimizer"):
        assert before[part].keys() == after[part].keys()
        changed = [k for k in before[part] if not torch.equal(before[part][k], after[part][k])]  # NaN != NaN
        assert not changed, (part, changed[:3])


@pytest.fixture(scope="module")
def tok(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def learner_group(request, tiny_llama: str, tiny_value_model: str, zero_stage: int,
                  precision: str = "auto") -> PolicyGroup:
    cfg = load_config(None, {
        "ray.address": "local", "run.seed": 0, "models.actor.path": tiny_llama, "models.reward.path": tiny_value_model,
        "placement.actor": {"num_workers": 2, "cpus_per_worker": 0.25}, "ppo.mini_batch_size": ROWS,
        "ppo.actor.deepspeed.zero_stage": zero_stage, "ppo.actor.deepspeed.micro_batch_size": 2,
        "ppo.actor.deepspeed.precision": precision, "ppo.actor.optim.lr": 1e-3,
        "ppo.actor.optim.lr_schedule": "constant", "ppo.kl_estimator": "k3", "ppo.max_nonfinite_steps": 2})
    group = PolicyGroup(cfg)
    request.addfinalizer(group.shutdown)
    return group


@pytest.fixture(scope="module")
def learner(ray_cluster, tiny_llama, tiny_value_model, request):
    """ZeRO-2 (the default), precision auto (bf16 on a CPU with it): DeepSpeed's ZeRO optimizer discards a step whose
    gradient is NaN (its bf16 mode checks too: check_grad_overflow)."""
    return learner_group(request, tiny_llama, tiny_value_model, zero_stage=2)


@pytest.fixture(scope="module")
def zero0_learner(ray_cluster, tiny_llama, tiny_value_model, request):
    """ZeRO-0 with the plain torch AdamW (fp32): nothing in DeepSpeed checks its gradients, learner.py does."""
    return learner_group(request, tiny_llama, tiny_value_model, zero_stage=0, precision="fp32")  # that path is fp32


def test_kl_in_the_loss_changes_the_actor_gradient(learner, tok, tmp_path):
    """One fixed batch, the same weights and optimizer state each time (a checkpoint restored in between): the
    gradient norm of the step with kl_coef > 0 and ref_logprobs (k3, then k2) differs from kl_coef = 0."""
    exp = make_experience(tok.pad_token_id, len(tok))
    exp["old_logprobs"] = learner.logprobs(exp)
    exp["ref_logprobs"] = exp["old_logprobs"] - 0.5 * exp["action_mask"]  # the reference sits apart from the policy
    learner.save_checkpoint(str(tmp_path), tag="start")

    def grad_norm(kl_coef: float, estimator: str) -> float:
        learner.apply(lambda w: setattr(w, "ppo", dataclasses.replace(w.ppo, kl_estimator=estimator)))
        stats = learner.train(exp, kl_coef=kl_coef)
        learner.load_checkpoint(str(tmp_path), tag="start")
        assert stats["optimizer_steps"] == 1 and math.isfinite(stats["grad_norm"])
        return stats["grad_norm"]

    plain = grad_norm(0.0, "k3")
    assert grad_norm(0.0, "k3") == pytest.approx(plain, rel=1e-6)  # the restore is exact: same start every time
    for estimator in ("k3", "k2"):
        with_kl = grad_norm(1.0, estimator)
        assert abs(with_kl - plain) > 1e-3 * plain, (estimator, with_kl, plain)
    learner.apply(lambda w: setattr(w, "ppo", dataclasses.replace(w.ppo, kl_estimator="k3")))


@pytest.mark.parametrize("group", ["learner", "zero0_learner"])
def test_step_with_a_nan_loss_on_one_rank_is_skipped_on_every_rank(group, tok, request):
    """Rows 2-3 (rank 1's micro-batch) carry NaN advantages: rank 1's loss is NaN, rank 0's is finite. Both ranks
    skip the step (weights, Adam state, step and LR counters unchanged on each), count it, and train on after."""
    learner = request.getfixturevalue(group)
    good, bad = make_experience(tok.pad_token_id, len(tok)), make_experience(tok.pad_token_id, len(tok), (2, 3))
    assert learner.train(good)["optimizer_steps"] == 1  # Adam state exists: a skip must leave it alone
    before = learner.apply(rank_state)
    stats = learner.train(bad)
    assert stats["nonfinite_steps"] == 1 and stats["optimizer_steps"] == 0
    after = learner.apply(rank_state)
    for rank_before, rank_after in zip(before, after):
        assert_same_state(rank_before, rank_after)
    # The engines are consistent after the skip: the next finite step is applied on both ranks.
    stats = learner.train(good)
    assert stats["nonfinite_steps"] == 0 and stats["optimizer_steps"] == 1 and math.isfinite(stats["policy_loss"])
    assert learner.run("global_steps") == [before[0]["global_steps"] + 1] * 2
    # ppo.max_nonfinite_steps (2) skipped steps in a row stop the learner on every rank with a clear error.
    learner.train(bad)
    with pytest.raises(ray.exceptions.RayTaskError, match=r"2 optimizer steps in a row .*ppo\.max_nonfinite_steps"):
        learner.train(bad)
