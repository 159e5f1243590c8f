"""PPO end to end on tiny models: real vLLM engines, DeepSpeed learner groups, scorers and weight sync on Ray.

The built-in task ("... say the word dog") with its rule reward: a tiny random model says "dog" rarely, so the
starting reward is low and PPO must find and reinforce it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import ray

from rlhf_ray.config import load_config
from rlhf_ray.metrics import read_metrics
from rlhf_ray.ppo import PPOTrainer

RULE_REWARD = "rlhf_ray.data.builtin.rule_reward"


def ppo_config(tmp_path, actor: str, critic: str, **overrides):
    base = {
        "ray.address": "local", "run.output_dir": str(tmp_path / "run"), "run.seed": 7,
        "data.cache_dir": str(tmp_path / "data_cache"), "data.max_prompt_len": 48,
        "models.actor.path": actor, "models.reward.path": critic,
        "ppo.reward_functions": [RULE_REWARD], "ppo.reward_function_mode": "replace",
        "ppo.rollout_batch_size": 16, "generation.n_samples_per_prompt": 4, "ppo.mini_batch_size": 32,
        "generation.max_new_tokens": 16, "generation.temperature": 1.0, "generation.kv_cache_gib": 1,
        "ppo.actor.optim.lr": 3e-3, "ppo.actor.optim.warmup_steps": 0, "ppo.actor.optim.lr_schedule": "constant",
        "ppo.critic.optim.lr": 3e-3, "ppo.critic.optim.lr_schedule": "constant",
        "ppo.actor.deepspeed.micro_batch_size": 16, "ppo.critic.deepspeed.micro_batch_size": 16,
        "ppo.actor.deepspeed.zero_stage": 2, "ppo.critic.deepspeed.zero_stage": 2,
        "ppo.kl_coef": 0.01, "ppo.num_iterations": 30, "logging.tensorboard": False,
    }
    if overrides.get("ppo.kl_penalty") == "loss":
        base["ppo.kl_estimator"] = "k3"  # KL in the loss needs k2 or k3 (k1 is rejected at load)
    base.update(overrides)
    return load_config(None, base)


def learn(cfg, max_iterations: int = 30) -> list[dict]:
    """Iterate until the mean reward of the last 3 iterations reaches 0.6 (or max_iterations)."""
    trainer = PPOTrainer(cfg)
    history = []
    try:
        for _ in range(max_iterations):
            stats = trainer.step()
            trainer.iteration += 1
            history.append(stats)
            last3 = [h["reward/mean"] for h in history[-3:]]
            if len(last3) == 3 and sum(last3) / 3 >= 0.6:
                break
    finally:
        trainer.shutdown()
    return history


def assert_learned(history: list[dict]) -> None:
    rewards = [round(h["reward/mean"], 3) for h in history]
    assert history[0]["reward/mean"] < 0.2, rewards  # the rule is rare for the untrained model
    assert len(history) <= 30 and sum(rewards[-3:]) / 3 >= 0.6, rewards
    versions = [h["weight_version"] for h in history]
    assert versions == list(range(1, len(history) + 1))  # a sync after every iteration
    assert [h["rollout/weight_version"] for h in history] == list(range(len(history)))  # rollouts used the newest


def test_ppo_with_critic_reference_and_sync_learns_the_rule(ray_cluster, tiny_llama, tiny_value_model, tmp_path):
    history = learn(ppo_config(tmp_path, tiny_llama, tiny_value_model))
    assert_learned(history)
    assert all(math.isfinite(h["loss/value"]) for h in history)  # the critic trained
    assert all(h["kl/mean"] > 0 for h in history[1:])  # the reference is live and the policy moved


@pytest.mark.parametrize("kl_penalty", ["reward", "loss"])
def test_grpo_learns_the_rule_without_a_critic(ray_cluster, tiny_llama, tiny_value_model, tmp_path, kl_penalty):
    cfg = ppo_config(tmp_path, tiny_llama, tiny_value_model,
                     **{"ppo.advantage_estimator": "grpo", "ppo.kl_penalty": kl_penalty})
    history = learn(cfg)
    assert_learned(history)
    assert "loss/value" not in history[0]  # no critic group was started
    assert all(h["kl/mean"] > 0 for h in history[1:])
    if kl_penalty == "reward":
        assert "loss/kl" not in history[0] and history[0]["experience/old_logprobs_from_training"] == 0
        return
    # KL in the actor's loss, not in the rewards. Two mini-batches per iteration: the old log-probs are still
    # computed before training (the on-policy shortcut is tested in test_generation_scales_independently...).
    assert all(h["experience/old_logprobs_from_training"] == 0 for h in history)
    assert all(h["loss/kl"] > 0 and math.isfinite(h["loss/kl"]) for h in history[1:])
    assert all(h["reward/shaped_mean"] == pytest.approx(h["reward/mean"]) for h in history)


def test_a_lora_actor_scores_the_reference_itself_with_its_adapters_disabled(ray_cluster, tiny_llama,
                                                                            tiny_value_model, tmp_path):
    """placement.reference_in_actor: no reference placement group or process (the two actor ranks score it); the KL
    to the reference is 0 before the adapters train (LoRA starts as the identity) and > 0 after: the reference is the
    base model, not the trained actor (which would give 0 throughout)."""
    cfg = ppo_config(tmp_path, tiny_llama, tiny_value_model, **{
        "ppo.advantage_estimator": "grpo", "ppo.actor.lora.dim": 8, "placement.reference_in_actor": True})
    trainer = PPOTrainer(cfg)
    history = []
    try:
        assert "reference" not in trainer.plan
        assert sorted(r["role"] for r in trainer.worker_reports()) == ["actor", "actor", "generator", "reward"]
        for _ in range(3):
            history.append(trainer.step())
            trainer.iteration += 1
    finally:
        trainer.shutdown()
    kl = [h["kl/mean"] for h in history]
    assert abs(kl[0]) < 1e-6 and all(k > 1e-6 for k in kl[1:]), kl


TIMING = ("time/", "throughput/")


def copy_checkpoint(run: Path, to: Path, iteration: int = 2) -> None:
    """`to` as a run that stopped after `run`'s checkpoint of `iteration`: that checkpoint and the metrics file with
    every row `run` logged (resuming cuts it back)."""
    import shutil

    name = f"iter_{iteration:06d}"
    shutil.copytree(run / "checkpoints" / name, to / "checkpoints" / name)
    shutil.copy(run / "metrics.jsonl", to / "metrics.jsonl")


def assert_metrics_agree(expected: list[dict], got: list[dict], skip: tuple = TIMING) -> None:
    """Every numeric metric of `expected`'s rows (keys starting with `skip` aside) in `got`'s, to 1e-4."""
    for a, b in zip(expected, got, strict=True):
        for key, value in a.items():
            if key.startswith(skip) or not isinstance(value, (int, float)):
                continue
            assert b[key] == pytest.approx(value, abs=1e-4), (a["iteration"], key)


def test_resume_continues_exactly_like_an_uninterrupted_run(ray_cluster, tiny_llama, tiny_value_model, tmp_path):
    cfg = ppo_config(tmp_path / "a", tiny_llama, tiny_value_model, **{
        "ppo.num_iterations": 4, "checkpoint.every": 2, "checkpoint.keep_last": 2,
        "ppo.rollout_batch_size": 8, "ppo.mini_batch_size": 32})
    trainer = PPOTrainer(cfg)
    try:
        trainer.run()
    finally:
        trainer.shutdown()
    run_a = Path(cfg.run.output_dir) / "ppo"
    uninterrupted = read_metrics(run_a / "metrics.jsonl")
    assert [r["iteration"] for r in uninterrupted] == [1, 2, 3, 4]
    assert sorted(p.name for p in (run_a / "checkpoints").iterdir()) == ["iter_000002", "iter_000004"]

    # a run that crashed before its iteration-4 checkpoint: its folder holds the iteration-2 checkpoint and the
    # real metrics file with every row it logged (1-4); resuming cuts the file back to iteration 2, never duplicates
    cfg_b = ppo_config(tmp_path / "b", tiny_llama, tiny_value_model, **{
        "ppo.num_iterations": 4, "checkpoint.every": 2, "checkpoint.resume": True,
        "ppo.rollout_batch_size": 8, "ppo.mini_batch_size": 32})
    run_b = Path(cfg_b.run.output_dir) / "ppo"
    copy_checkpoint(run_a, run_b)
    resumed = PPOTrainer(cfg_b)
    try:
        assert resumed.iteration == 2 and resumed.generators.weight_version == 2
        resumed.run()
    finally:
        resumed.shutdown()
    rows = read_metrics(run_b / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4]  # appended after the cut: no iteration twice
    assert_metrics_agree(uninterrupted[2:], rows[2:])
    assert (run_b / "reward_kl.png").stat().st_size > 0


@pytest.mark.parametrize("engines, learner_ranks, kl_penalty", [(2, 1, "reward"), (1, 2, "loss")])
def test_generation_scales_independently_of_training(ray_cluster, tiny_llama, tiny_value_model, tmp_path,
                                                     engines, learner_ranks, kl_penalty):
    cfg = ppo_config(tmp_path, tiny_llama, tiny_value_model, **{
        "generation.num_engines": engines, "placement.actor.num_workers": learner_ranks,
        "placement.critic.num_workers": learner_ranks, "ppo.rollout_batch_size": 8, "ppo.mini_batch_size": 32,
        "ppo.kl_penalty": kl_penalty, "ppo.off_policy_correction": "tis"})
    trainer = PPOTrainer(cfg)
    try:
        assert trainer.generators.num_engines == engines and len(trainer.actor.workers) == learner_ranks
        dtype = trainer.generators.dtype  # precision auto: what this machine's workers chose
        stats = trainer.step()
    finally:
        trainer.shutdown()
    assert stats["weight_version"] == 1
    assert stats["rollout/engines_used"] == engines  # both engines generated when there are two
    # 8 prompts x 4 samples = one mini-batch of 32, one epoch: with the KL in the loss, the training pass (on both
    # ranks) supplies the old log-probs, so the ratio is exactly 1, and measures KL and the engine-vs-learner gap.
    reuse = kl_penalty == "loss"
    print(dtype, {k: stats[k] for k in ("kl/mean", "logprob_gap/vllm_vs_learner", "loss/kl") if k in stats})
    # One set of weights everywhere: what differs is rounding, ~1e-5 in fp32; bf16 logits keep 8 mantissa bits, and
    # actor, reference and engine batch (and so round) differently.
    tol = 1e-3 if dtype == "float32" else 5e-2
    assert stats["experience/old_logprobs_from_training"] == float(reuse)
    assert ("loss/kl" in stats) == reuse and abs(stats["kl/mean"]) < tol  # the policy is still the reference
    assert 0 <= stats["logprob_gap/vllm_vs_learner"] < tol
    # ppo.off_policy_correction tis: the engines' log-probs reached the actor's loss as its behaviour policy; with one
    # set of weights the ratios stay at 1 up to rounding
    assert abs(stats["off_policy/is_ratio_mean"] - 1) < tol and 1 - tol < stats["off_policy/is_ratio_max"] < 1 + 10 * tol
    assert 0 <= stats["off_policy/mismatch_kl"] < tol and stats["off_policy/corrected_fraction"] == 0
    if reuse:
        assert stats["policy/clip_fraction"] == 0 and stats["policy/approx_kl"] == 0
        assert abs(stats["loss/kl"]) < tol / 10


def test_killing_a_generator_actor_does_not_stop_the_run(ray_cluster, tiny_llama, tiny_value_model, tmp_path):
    """Here while generating ahead (rollout.mode bounded): the learners have moved past the engines' version, so the
    restarted engine cannot be re-synced from them; its prompts go to the other engine, and it takes work again after
    the next sync. (Restart with a re-sync from the source, in rollout.mode off: tests/test_generator.py.)"""
    cfg = ppo_config(tmp_path, tiny_llama, tiny_value_model, **{
        "generation.num_engines": 2, "ppo.rollout_batch_size": 8, "ppo.mini_batch_size": 32,
        "rollout.mode": "bounded", "ppo.off_policy_correction": "tis"})
    trainer = PPOTrainer(cfg)
    try:
        first = trainer.step()
        trainer.iteration += 1
        ray.kill(trainer.generators.engines[0], no_restart=False)  # Ray restarts it
        after = []
        for _ in range(3):
            after.append(trainer.step())
            trainer.iteration += 1
            if len(after) == 1:
                batch3_engines = sorted(trainer.rollouts.in_flight[3].engines)
        restarts, waiting = list(trainer.generators.restarts), set(trainer.generators.awaiting_sync)
    finally:
        trainer.shutdown()
    assert [s["weight_version"] for s in (first, *after)] == [1, 2, 3, 4]
    assert restarts[0] >= 1 and not waiting  # the death was noticed, the engine came back and was synced ...
    assert batch3_engines == [1]  # ... batch 3 was admitted by engine 1 alone while engine 0 waited for the sync
    assert after[-1]["rollout/engines_used"] == 2  # ... and engine 0 took batch 3's second chunks after it
    assert all(s["response/length_mean"] > 0 and s["rollout/staleness_max"] <= 2 for s in after)


def test_dapo_options_change_the_rollout_and_the_experience(ray_cluster, tiny_llama, tiny_value_model, tmp_path):
    """Dynamic sampling, overlong mask and penalty, and the KL as a return-to-go, from the config through the controller
    (one training step), then on one fixed rollout the experience with each option on and off."""
    import dataclasses

    import torch

    from rlhf_ray import rl
    from rlhf_ray.experience import full_width

    cfg = ppo_config(tmp_path, tiny_llama, tiny_value_model, **{
        "ppo.advantage_estimator": "grpo", "ppo.rollout_batch_size": 8, "ppo.mini_batch_size": 32,
        "generation.stop_token_ids": list(range(100, 130)),  # some samples stop early, the others hit the limit
        "ppo.dynamic_sampling": True, "ppo.dynamic_sampling_max_rounds": 1, "ppo.overlong_mask": True,
        "ppo.overlong_buffer": 4, "ppo.overlong_penalty": 0.5, "ppo.kl_reward_shape": "return_to_go"})
    trainer = PPOTrainer(cfg)
    try:
        stats = trainer.step()  # trains once, so the policy moves off the reference (KL > 0 below)
        trainer.iteration += 1
        position = trainer.prompts.position
        batch, info = trainer.generate(8)
        on = trainer.make_experience(batch, info)
        variants = {}
        for name, change in {"per_token": {"kl_reward_shape": "per_token"},
                             "off": {"kl_reward_shape": "per_token", "overlong_mask": False, "overlong_buffer": 0,
                                     "dynamic_sampling": False},
                             "corrected": {"off_policy_correction": "tis"}, "behaviour": {}}.items():
            trainer.cfg = dataclasses.replace(cfg, ppo=dataclasses.replace(cfg.ppo, **change))
            if name == "behaviour":
                trainer.cfg = dataclasses.replace(trainer.cfg, rollout=dataclasses.replace(cfg.rollout, mode="one_step"))
            unscored = {k: v for k, v in info.items() if k != "scores"}  # the reward scores it again, no penalty
            variants[name] = trainer.make_experience(batch, unscored if name == "off" else info)
    finally:
        trainer.shutdown()
    # dynamic sampling: at most one extra round; every prompt consumed is trained on, dropped or skipped
    counts = info["dynamic_sampling"]
    assert stats["dynamic_sampling/extra_rounds"] <= 1 and counts["extra_rounds"] <= 1
    assert info["prompts_consumed"] == trainer.prompts.position - position
    assert info["prompts_consumed"] == 8 + counts["groups_dropped"] + info["skipped_prompts"]
    unused = info["unused_prompts"]  # and by id: each prompt taken is trained on, filtered or skipped, once
    assert len(unused["filtered"]) == counts["groups_dropped"] and len(unused["skipped"]) == info["skipped_prompts"]
    assert sorted([r["prompt_id"] for r in info["rows"]] + unused["filtered"] + unused["skipped"]) == \
        list(range(position, trainer.prompts.position))
    assert stats["rollout/prompts_consumed"] == 8 + stats["dynamic_sampling/groups_dropped"] + stats[
        "rollout/skipped_prompts"]
    tied = (~rl.groups_with_signal(info["scores"], 4)).sum().item()
    assert tied == counts["groups_filled"]  # a tied group is trained on only when the bound was hit
    # overlong mask: exactly the truncated samples leave the loss
    truncated = info["truncated"]
    assert 0 < truncated.sum() < 32, truncated  # the stop tokens make both kinds
    (exp_on, st_on), (exp_off, st_off) = on, variants["off"]
    assert st_on["response/truncated_fraction"] == pytest.approx(truncated.float().mean().item())
    assert (exp_on["action_mask"][truncated] == 0).all() and exp_on["action_mask"][~truncated].sum() > 0
    assert (exp_off["action_mask"] == batch["action_mask"]).all()
    # overlong penalty: 0 to -0.5 over the last 4 of 16 tokens, added to the scores
    penalty = rl.overlong_penalty(info["response_lengths"], 16, 4, 0.5)
    assert penalty[truncated].tolist() == [-0.5] * int(truncated.sum())
    assert st_on["reward/overlong_penalty_mean"] == pytest.approx(penalty.mean().item())
    assert st_on["reward/mean"] == pytest.approx(st_off["reward/mean"] + penalty.mean().item(), abs=1e-5)
    # KL as a return-to-go vs per token: other advantages on the same samples
    kept = ~truncated
    exp_per_token = variants["per_token"][0]
    assert not torch.allclose(exp_on["advantages"][kept], exp_per_token["advantages"][kept])
    # ppo.off_policy_correction: the learner gets both pi_old (the actor's) and mu (the engines') log-probs
    assert "vllm_logprobs" not in exp_on and {"old_logprobs", "vllm_logprobs"} <= set(variants["corrected"][0])
    # rollout.mode one_step without a correction: pi_old is the engines' own log-probs (no actor forward)
    exp_async, st_async = variants["behaviour"]
    assert st_async["experience/old_logprobs_from_engines"] == 1 and st_on["experience/old_logprobs_from_engines"] == 0
    assert torch.equal(exp_async["old_logprobs"], full_width(info["vllm_logprobs"], batch["prompt_width"]))


def run_steps(cfg, n: int, at_start=None) -> list[dict]:
    """A trainer's first `n` steps' metrics; `at_start(trainer)` must hold before them (e.g. where a resume began)."""
    trainer = PPOTrainer(cfg)
    try:
        assert at_start is None or at_start(trainer)
        history = []
        for _ in range(n):
            history.append(trainer.step())
            trainer.iteration += 1
    finally:
        trainer.shutdown()
    return history


def learn_with_lineage(trainer, min_iterations: int, watch=None) -> tuple[list[dict], list[list[dict]]]:
    """Iterate (at most 30) until, after `min_iterations`, the mean reward of the last 3 reaches 0.6; a checkpoint
    after iteration 2; `watch(trainer)` after each iteration. Returns the metrics and each iteration's lineage."""
    history, lineages = [], []
    try:
        for _ in range(30):
            history.append(trainer.step())
            lineages.append(trainer.last_lineage)
            trainer.iteration += 1
            if watch is not None:
                watch(trainer)
            if trainer.iteration == 2:
                trainer.save_checkpoint()
            last3 = [h["reward/mean"] for h in history[-3:]]
            if len(history) >= min_iterations and sum(last3) / 3 >= 0.6:
                break
    finally:
        trainer.shutdown()
    return history, lineages


def test_grpo_learns_generating_one_step_ahead_and_resumes_exactly(ray_cluster, tiny_llama, tiny_value_model,
                                                                    tmp_path):
    """rollout.mode one_step: batch k+1 is generated (weights k) while batch k trains, with truncated importance
    sampling against the learner's recomputed log-probs (without a correction the ratio is taken against the
    engines' one-version-old log-probs, and the clip holds back lr 3e-3: reward 0.52 after 30 iterations, measured).
    The rule is learnt with the same thresholds; from the lineage, every trained sample is at most one version old, each prompt id is trained
    once, and the next batch's generation starts before this batch's training ends. A run resumed from the checkpoint
    after iteration 2 (which holds the batch generated ahead) repeats iterations 3 and 4 exactly."""
    import shutil

    overrides = {"ppo.advantage_estimator": "grpo", "rollout.mode": "one_step", "rollout.samples_every": 5,
                 "checkpoint.every": 2, "ppo.off_policy_correction": "tis"}
    cfg = ppo_config(tmp_path / "a", tiny_llama, tiny_value_model, **overrides)
    trainer = PPOTrainer(cfg)
    history, lineages = learn_with_lineage(trainer, min_iterations=4)
    rewards = [round(h["reward/mean"], 3) for h in history]
    assert history[0]["reward/mean"] < 0.2 and sum(rewards[-3:]) / 3 >= 0.6, rewards
    assert [h["weight_version"] for h in history] == list(range(1, len(history) + 1))
    assert [h["rollout/weight_version"] for h in history] == [0] + list(range(len(history) - 1))
    staleness = [{r["staleness"] for r in records} for records in lineages]
    assert staleness == [{0}] + [{1}] * (len(history) - 1), staleness  # never more than one version old
    assert history[1]["rollout/staleness_1"] == 64 and history[1]["rollout/staleness_max"] == 1
    for k in range(len(lineages) - 1):  # the overlap is real
        assert lineages[k + 1][0]["generation_start"] < lineages[k][0]["train_end"], k
    ids = [r["prompt_id"] for records in lineages for r in records]
    assert sorted(set(ids)) == list(range(16 * len(history))) and all(ids.count(i) == 4 for i in set(ids))
    assert all(h["experience/old_logprobs_from_engines"] == 0 for h in history)  # tis: a proximal policy's
    assert history[1]["off_policy/mismatch_kl"] > 10 * history[0]["off_policy/mismatch_kl"]  # one version apart
    lines = (tmp_path / "a" / "run" / "ppo" / "samples.jsonl").read_text().splitlines()
    assert len(lines) == math.ceil(64 * len(history) / 5)
    first = json.loads(lines[1])
    assert first["prompt_id"] == lineages[0][5]["prompt_id"] and first["response"] and "reward" in first
    # Resume from the checkpoint after iteration 2: its pending batch (generated during iteration 2) is trained next.
    b = tmp_path / "b"
    name = "iter_000002"
    shutil.copytree(tmp_path / "a" / "run" / "ppo" / "checkpoints" / name, b / "run" / "ppo" / "checkpoints" / name)
    again = run_steps(ppo_config(b, tiny_llama, tiny_value_model, **overrides, **{"checkpoint.resume": True}), 2,
                      at_start=lambda t: (t.iteration, sorted(t.rollouts.in_flight)) == (2, [2]))
    assert_metrics_agree([{**h, "iteration": i + 3} for i, h in enumerate(history[2:4])],
                         [{**h, "iteration": i + 3} for i, h in enumerate(again)])
    assert again[0]["rollout/staleness_1"] == 64


def test_grpo_learns_with_bounded_staleness_interrupting_samples_and_resumes_exactly(ray_cluster, tiny_llama,
                                                                                     tiny_value_model, tmp_path):
    """rollout.mode bounded, max_staleness 2: batches k+1 and k+2 are in flight while batch k trains, each sample
    generated in two chunks of 8 tokens, the second after a weight sync, from its kept prefix, under the new weights
    (truncated importance sampling against the learner's recomputed log-probs). The rule is learnt with the same
    thresholds; from the lineage no trained sample is more than 2 steps old, interrupted samples carry two versions,
    and generation of the next batch starts before this one's training ends. A second uninterrupted run agrees to
    1e-4; a run resumed from the checkpoint after iteration 2 (two batches in flight) repeats iterations 3 and 4."""
    import shutil

    overrides = {"ppo.advantage_estimator": "grpo", "rollout.mode": "bounded", "rollout.max_staleness": 2,
                 "rollout.samples_every": 5, "ppo.off_policy_correction": "tis", "checkpoint.every": 2}
    cfg = ppo_config(tmp_path / "a", tiny_llama, tiny_value_model, **overrides)
    trainer = PPOTrainer(cfg)
    in_flight = {}

    def watch(t):
        if t.iteration in (2, 3):
            in_flight[t.iteration] = {b: g.samples for b, g in t.rollouts.in_flight.items()}

    history, lineages = learn_with_lineage(trainer, min_iterations=5, watch=watch)
    rewards = [round(h["reward/mean"], 3) for h in history]
    assert history[0]["reward/mean"] < 0.2 and sum(rewards[-3:]) / 3 >= 0.6, rewards
    staleness = [{r["staleness"] for r in records} for records in lineages]
    assert staleness == [{0}, {1}] + [{2}] * (len(history) - 2), staleness  # never more than max_staleness
    assert all(h["rollout/staleness_max"] <= 2 and h["rollout/dropped_stale"] == 0 for h in history)
    for k in range(len(lineages) - 1):  # the overlap is real
        assert lineages[k + 1][0]["generation_start"] < lineages[k][0]["train_end"], k
    ids = [r["prompt_id"] for records in lineages for r in records]
    assert sorted(set(ids)) == list(range(16 * len(history))) and all(ids.count(i) == 4 for i in set(ids))
    # Interrupted: after two iterations batch 3 had its first chunk (weights of step 1); during the third, the samples
    # that had not ended continued that prefix under the weights of step 2.
    assert sorted(in_flight[2]) == [2, 3] and sorted(in_flight[3]) == [3, 4]
    interrupted = 0
    for before, after in zip(in_flight[2][3], in_flight[3][3], strict=True):
        assert after.token_ids[:len(before.token_ids)] == before.token_ids  # the prefix kept
        assert before.token_versions == [1] * len(before.token_ids)
        if len(after.token_ids) > len(before.token_ids):
            interrupted += 1
            assert after.token_versions == [1] * 8 + [2] * (len(after.token_ids) - 8)
    assert interrupted > 0
    trained = [r for r in lineages[3] if len(r["weight_versions"]) == 2]
    assert len(trained) == interrupted and all(r["weight_versions"] == [1, 2] for r in trained)
    # Deterministic: a second uninterrupted run generates and trains the same.
    again = run_steps(ppo_config(tmp_path / "b", tiny_llama, tiny_value_model, **overrides), 4)
    assert_metrics_agree([{**h, "iteration": i + 1} for i, h in enumerate(history[:4])],
                         [{**h, "iteration": i + 1} for i, h in enumerate(again)])
    # Resume from the checkpoint after iteration 2: batches 2 (complete) and 3 (one chunk) come back from it.
    c, name = tmp_path / "c", "iter_000002"
    shutil.copytree(tmp_path / "a" / "run" / "ppo" / "checkpoints" / name, c / "run" / "ppo" / "checkpoints" / name)
    after_resume = run_steps(ppo_config(c, tiny_llama, tiny_value_model, **overrides, **{"checkpoint.resume": True}),
                             2, at_start=lambda t: (t.iteration, sorted(t.rollouts.in_flight)) == (2, [2, 3]))
    assert_metrics_agree([{**h, "iteration": i + 3} for i, h in enumerate(history[2:4])],
                         [{**h, "iteration": i + 3} for i, h in enumerate(after_resume)])
    assert after_resume[0]["rollout/staleness_2"] == 64 and after_resume[1]["rollout/staleness_2"] == 64
