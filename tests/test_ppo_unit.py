"""The PPO controller's pure pieces: batch layout, advantage dispatch, seeds, prompt order (no Ray)."""
import dataclasses
import json

import pytest
import torch

from rlhf_ray import rl
from rlhf_ray.config import load_config, reuses_train_logprobs
from rlhf_ray.experience import (PromptStream, build_batch, compute_advantages, full_width, request_seed,
                                 response_slice)


def test_build_batch_left_pads_prompts_right_pads_responses():
    b = build_batch([[5, 6], [7, 8, 9]], [[1, 2, 3], [4]], pad_id=0)
    assert b["prompt_width"] == 3
    assert b["input_ids"].tolist() == [[0, 5, 6, 1, 2, 3], [7, 8, 9, 4, 0, 0]]
    assert b["attention_mask"].tolist() == [[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]
    # column t scores token t+1: response tokens are columns 2..4
    assert b["action_mask"].tolist() == [[0, 0, 1, 1, 1], [0, 0, 1, 0, 0]]
    per_token = torch.arange(10.0).view(2, 5)
    resp = response_slice(per_token, 3)
    assert resp.tolist() == [[2, 3, 4], [7, 8, 9]]
    assert full_width(resp, 3).tolist() == [[0, 0, 2, 3, 4], [0, 0, 7, 8, 9]]


def test_empty_response_keeps_a_column_and_no_action():
    b = build_batch([[5]], [[]], pad_id=0)
    assert b["input_ids"].shape == (1, 2) and b["action_mask"].sum() == 0


def _inputs():
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.float32)
    lp, ref = torch.randn(4, 4) * mask, torch.randn(4, 4) * mask
    values = torch.randn(4, 4) * mask
    scores = torch.tensor([1.0, -2.0, 7.0, 0.5])
    return scores, lp, ref, mask, values


def test_gae_estimator_matches_the_rl_module_and_uses_kl_coef():
    p = load_config().ppo
    scores, lp, ref, mask, values = _inputs()
    out = compute_advantages(p, 0.1, scores, lp, ref, mask, 1, values)
    rewards, _ = rl.shape_rewards(scores, lp, ref, mask, kl_coef=0.1, reward_clip=p.reward_clip)
    adv, ret = rl.gae_advantages(rewards, values, mask, gamma=p.gamma, lam=p.lam)
    assert torch.allclose(out.advantages, rl.masked_whiten(adv, mask) * mask)
    assert torch.allclose(out.returns, ret)
    other = compute_advantages(p, 0.5, scores, lp, ref, mask, 1, values)
    assert not torch.allclose(other.returns, out.returns)  # kl_coef reaches the rewards
    unwhitened = compute_advantages(load_config(None, {"ppo.whiten_advantages": False}).ppo, 0.1, scores, lp, ref,
                                    mask, 1, values)
    assert torch.allclose(unwhitened.advantages, adv * mask)


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_group_estimators_center_each_group_and_penalise_kl_per_token(estimator):
    p = load_config(None, {"ppo.advantage_estimator": estimator, "generation.n_samples_per_prompt": 2}).ppo
    scores, lp, ref, mask, _ = _inputs()
    no_kl = compute_advantages(p, 0.0, scores, lp, ref, mask, 2)
    per_seq = torch.stack([no_kl.advantages[i][mask[i].bool()][0] for i in range(4)])
    assert per_seq[0] + per_seq[1] == pytest.approx(0, abs=1e-5) and per_seq[2] + per_seq[3] == pytest.approx(0, abs=1e-5)
    assert no_kl.returns is None
    # the KL penalty is added per token after the group normalisation (not normalised with the scores)
    with_kl = compute_advantages(p, 0.5, scores, lp, ref, mask, 2)
    kl = rl.kl_estimate(lp, ref, kind=p.kl_estimator, mask=mask)
    assert torch.allclose(with_kl.advantages, (no_kl.advantages - 0.5 * kl) * mask, atol=1e-6)
    assert not torch.allclose(with_kl.advantages, no_kl.advantages)


def test_reinforce_pp_uses_group_baseline_only_with_groups():
    p = load_config(None, {"ppo.advantage_estimator": "reinforce_pp"}).ppo
    scores, lp, ref, mask, _ = _inputs()
    single = compute_advantages(p, 0.1, scores, lp, ref, mask, 1)
    grouped = compute_advantages(p, 0.1, scores, lp, ref, mask, 2)
    assert not torch.allclose(single.advantages, grouped.advantages)


def test_request_seeds_are_deterministic_and_distinct():
    assert request_seed(1, 3, 0) == request_seed(1, 3, 0)
    assert len({request_seed(1, it, row) for it in range(5) for row in range(8)}) == 40


def test_prompt_stream_resumes_at_its_position():
    rows = [{"i": i} for i in range(5)]
    full = PromptStream(rows, seed=3)
    first = [r["i"] for r in full.take(7)]  # crosses an epoch boundary
    assert sorted(first[:5]) == list(range(5))
    resumed = PromptStream(rows, seed=3, position=4)
    assert [r["i"] for r in resumed.take(3)] == first[4:7]
    assert [r["i"] for r in PromptStream(rows, seed=4).take(5)] != first[:5]  # the seed matters


def test_training_pass_supplies_old_logprobs_only_when_exactly_on_policy():
    on_policy = {"ppo.kl_penalty": "loss", "ppo.kl_estimator": "k3", "ppo.ppo_epochs": 1, "ppo.rollout_batch_size": 4,
                 "generation.n_samples_per_prompt": 4, "ppo.mini_batch_size": 16}
    assert reuses_train_logprobs(load_config(None, on_policy))
    # KL in the reward needs the actor's log-probs before training; so do a 2nd epoch and a 2nd mini-batch.
    for change in ({"ppo.kl_penalty": "reward"}, {"ppo.ppo_epochs": 2}, {"ppo.mini_batch_size": 8}):
        assert not reuses_train_logprobs(load_config(None, {**on_policy, **change})), change
    assert load_config().ppo.kl_penalty == "reward"  # InstructGPT / DeepSpeed-Chat by default


def test_controller_state_round_trips_as_json_without_pickle(tmp_path, monkeypatch):
    """The checkpoint's controller state is data (JSON): reading it back unpickles nothing and restores the KL
    controller and every RNG stream exactly."""
    import json
    import pickle
    import random

    import numpy as np

    from rlhf_ray.checkpoint import read_controller_state, rng_state, set_rng_state, write_controller_state

    kl = rl.AdaptiveKLController(0.1, 6.0, 10000)
    kl.update(3.0, 8)
    state = {"iteration": 4, "prompt_position": 32, "kl_controller": kl.state_dict(), "rng": rng_state(),
             "weight_version": 4}
    expected_draws = (random.random(), np.random.rand(), torch.rand(3).tolist())
    write_controller_state(tmp_path, state)
    assert json.loads((tmp_path / "controller.json").read_text())["iteration"] == 4  # plain JSON on disk

    def no_pickle(*args, **kwargs):
        raise AssertionError("the controller state must load without pickle")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, no_pickle)
    loaded = read_controller_state(tmp_path)
    assert {k: loaded[k] for k in ("iteration", "prompt_position", "weight_version")} == {
        "iteration": 4, "prompt_position": 32, "weight_version": 4}
    restored = rl.AdaptiveKLController(0.1, 6.0, 10000)
    restored.load_state_dict(loaded["kl_controller"])
    assert restored.value == kl.value != 0.1
    set_rng_state(loaded["rng"])
    assert (random.random(), np.random.rand(), torch.rand(3).tolist()) == expected_draws


def test_resumed_metrics_are_cut_back_to_the_checkpoint_in_jsonl_and_tensorboard(tmp_path):
    """A run logged iterations 1-3, then resumed from its iteration-2 checkpoint: iteration 3 is logged again and
    must replace the old row (JSONL) and the old point (TensorBoard), not follow it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rlhf_ray.metrics import MetricsLogger, read_metrics

    first = MetricsLogger(tmp_path, tensorboard=True)
    for step in (1, 2, 3):
        first.log(step, {"reward/mean": float(step)})
    first.close()
    resumed = MetricsLogger(tmp_path, tensorboard=True, initial_step=2, append=True)
    resumed.log(3, {"reward/mean": 30.0})
    resumed.close()
    expected = [(1, 1.0), (2, 2.0), (3, 30.0)]
    assert [(r["iteration"], r["reward/mean"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == expected
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("reward/mean")] == expected


# ------------------------------------------------------------------- issue 19: REINFORCE++-baseline, KL shape
def test_reinforce_pp_baseline_is_the_group_mean_of_the_score():
    p = load_config(None, {"ppo.advantage_estimator": "reinforce_pp", "generation.n_samples_per_prompt": 2}).ppo
    scores, lp, ref, mask, _ = _inputs()
    got = compute_advantages(p, 0.1, scores, lp, ref, mask, 2).advantages
    rewards, _ = rl.shape_rewards(rl.group_mean_baseline(scores, 2), lp, ref, mask, 0.1, p.reward_clip)
    assert torch.allclose(got, rl.reinforce_pp_advantages(rewards, mask, p.gamma), atol=1e-6)
    # shifting one group's scores by a constant changes nothing: the baseline is the group's mean score
    shifted = compute_advantages(p, 0.1, scores + torch.tensor([3.0, 3.0, 0.0, 0.0]), lp, ref, mask, 2).advantages
    assert torch.allclose(got, shifted, atol=1e-6)


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_kl_reward_shape_return_to_go_sums_the_kl_to_the_end(estimator):
    overrides = {"ppo.advantage_estimator": estimator, "generation.n_samples_per_prompt": 2}
    per_token = load_config(None, overrides).ppo
    to_go = load_config(None, {**overrides, "ppo.kl_reward_shape": "return_to_go"}).ppo
    assert per_token.kl_reward_shape == "per_token"  # the default
    scores, lp, ref, mask, _ = _inputs()
    no_kl = compute_advantages(to_go, 0.0, scores, lp, ref, mask, 2).advantages
    got = compute_advantages(to_go, 0.5, scores, lp, ref, mask, 2)
    kl = (lp - ref) * mask  # k1
    kl_to_go = torch.stack([torch.stack([kl[i, t:].sum() for t in range(4)]) for i in range(4)]) * mask
    assert torch.allclose(got.advantages, no_kl - 0.5 * kl_to_go, atol=1e-6)
    assert not torch.allclose(got.advantages, compute_advantages(per_token, 0.5, scores, lp, ref, mask, 2).advantages)


# ------------------------------------------------------------------------- issue 19: DAPO dynamic sampling
def _dynamic_sampling_world(n_rows=40, n=2, too_long=(), signal=lambda i: i % 3 == 0):
    """A prompt stream and a fake engine + reward: prompt i (row id) is too long when i in too_long, and its n scores
    differ when signal(i). Returns (stream, scored_round, log of each round's row ids)."""
    from rlhf_ray.generator import Rollout, Sample
    from rlhf_ray.experience import answered_rollout

    stream = PromptStream([{"id": i} for i in range(n_rows)], seed=5, position=3)
    rounds: list[list[int]] = []

    def generate(rows, offset):
        skipped = [j for j, r in enumerate(rows) if r["id"] in too_long]
        samples = [Sample(j, [r["id"], k], [0.0, 0.0], "stop", sample_index=k)
                   for j, r in enumerate(rows) if j not in skipped for k in reversed(range(n))]
        return Rollout(samples, weight_version=0, skipped=skipped)

    def scored_round(k):
        rows, samples, _ = answered_rollout(stream.take, generate, k, max_prompts=n_rows)
        rounds.append([r["id"] for r in rows])
        scores = torch.tensor([float(s.sample_index) if signal(rows[s.prompt_index]["id"]) else 1.0 for s in samples])
        return rows, samples, scores

    return stream, scored_round, rounds


def test_dynamic_sampling_keeps_only_groups_with_signal_and_accounts_for_every_prompt():
    from rlhf_ray.experience import rollout_with_signal

    too_long = {4, 9, 17}
    stream, scored_round, rounds = _dynamic_sampling_world(too_long=too_long)
    rows, samples, scores, counts = rollout_with_signal(scored_round, want=5, group_size=2, max_rounds=20)
    trained = [r["id"] for r in rows]
    assert len(trained) == 5 and all(i % 3 == 0 for i in trained)  # only groups whose scores differ
    assert [s.prompt_index for s in samples] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert all(s.token_ids[0] == trained[s.prompt_index] for s in samples)  # samples follow their prompt
    assert scores.view(5, 2).tolist() == [[0.0, 1.0]] * 5  # and so do the scores
    assert [len(r) for r in rounds][0] == 5 and counts["extra_rounds"] == len(rounds) - 1 >= 1
    assert counts["groups_filled"] == 0
    # every prompt taken from the stream is trained on, dropped (tied scores) or skipped (too long), exactly once
    consumed = stream.position - 3
    taken = [r["id"] for r in PromptStream([{"id": i} for i in range(40)], seed=5, position=3).take(consumed)]
    dropped = [i for ids in rounds for i in ids if i not in trained]
    skipped = [i for i in taken if i in too_long]
    assert sorted(trained + dropped + skipped) == sorted(taken) and len(set(taken)) == len(taken)
    assert counts["groups_dropped"] == len(dropped) and consumed == 5 + len(dropped) + len(skipped)


def test_dynamic_sampling_bound_fills_the_batch_with_the_last_rounds_tied_groups():
    from rlhf_ray.experience import rollout_with_signal

    stream, scored_round, rounds = _dynamic_sampling_world(signal=lambda i: i % 10 == 0)
    rows, samples, scores, counts = rollout_with_signal(scored_round, want=6, group_size=2, max_rounds=1)
    assert len(rounds) == 2 and counts["extra_rounds"] == 1  # the bound: one round after the first
    trained = [r["id"] for r in rows]
    with_signal = [i for ids in rounds for i in ids if i % 10 == 0]
    assert len(trained) == 6 and len(samples) == 12 and trained[:len(with_signal)] == with_signal
    filled = trained[len(with_signal):]
    assert counts["groups_filled"] == len(filled) > 0 and set(filled) <= set(rounds[-1])  # from the last round
    assert counts["groups_dropped"] == len(rounds[0]) + len(rounds[1]) - 6
    assert stream.position - 3 == len(rounds[0]) + len(rounds[1])
    with pytest.raises(ValueError, match="dynamic sampling: 3 samples for 2 prompts x 2"):
        rollout_with_signal(lambda k: ([{}, {}], [None] * 3, torch.zeros(3)), want=2, group_size=2, max_rounds=0)


def test_run_summary_and_png_give_first_3_and_last_3_iteration_means(tmp_path):
    """The console's closing line and the PNG's titles: each curve's first-3 and last-3 iteration means."""
    from rlhf_ray.metrics import MetricsLogger, first_last_means, plot_curves, read_metrics, run_summary

    logger = MetricsLogger(tmp_path)
    for step, reward in enumerate([0.1, 0.2, 0.3, 0.5, 0.6, 0.7, 0.8], start=1):
        logger.log(step, {"reward/mean": reward, "kl/mean": 0.01 * step})
    logger.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert first_last_means(rows, "reward/mean") == pytest.approx((0.2, 0.7))
    assert first_last_means(rows, "missing") is None
    assert first_last_means(rows[:2], "reward/mean") == pytest.approx((0.15, 0.15))  # fewer than 3: all of them
    line = run_summary(rows)
    assert line.startswith("7 iterations; reward/mean first-3 0.2 -> last-3 0.7 (+0.5); kl/mean first-3 0.02")
    import matplotlib

    matplotlib.use("Agg")
    from unittest import mock

    import matplotlib.axes

    with mock.patch.object(matplotlib.axes.Axes, "set_title", autospec=True) as set_title:
        png = plot_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
    titles = [call.args[1] for call in set_title.call_args_list]
    assert titles[0] == "reward/mean\nfirst-3 0.2, last-3 0.7" and titles[1].startswith("kl/mean\nfirst-3 0.02")
    assert png.stat().st_size > 0


# ------------------------------------------------------------------------------------ rollout.mode one_step
def test_async_modes_refuse_what_cannot_overlap_and_never_reuse_train_logprobs():
    from rlhf_ray.config import ConfigError, validate_ppo

    on_policy = {"ppo.kl_penalty": "loss", "ppo.kl_estimator": "k3", "ppo.rollout_batch_size": 32,
                 "ppo.mini_batch_size": 32}
    assert reuses_train_logprobs(load_config(None, on_policy))
    assert not reuses_train_logprobs(load_config(None, {**on_policy, "rollout.mode": "one_step"}))  # stale samples
    for key, value, message in (("placement.layout", "hybrid", "placement.layout hybrid generates and trains in one"),
                                ("generation.enable_sleep_mode", True, "enable_sleep_mode puts the engines to sleep"),
                                ("ppo.dynamic_sampling", True, "ppo.dynamic_sampling")):
        extra = {"placement.actor.num_workers": 1, "generation.max_restarts": 0} if key == "placement.layout" else \
            {"generation.n_samples_per_prompt": 4, "ppo.advantage_estimator": "grpo"} if key == "ppo.dynamic_sampling" \
            else {}
        for mode in ("one_step", "bounded"):
            cfg = load_config(None, {"rollout.mode": mode, key: value, **extra})
            with pytest.raises(ConfigError, match=message):
                validate_ppo(cfg)
        validate_ppo(load_config(None, {key: value, **extra}))  # fine without the overlap
    with pytest.raises(Exception, match="rollout.samples_every must be >= 0"):
        load_config(None, {"rollout.samples_every": -1})
    # bounded: interrupted samples continue in a new request, where vLLM would miss a stop string across the cut
    with pytest.raises(ConfigError, match="generation.stop strings within one request"):
        validate_ppo(load_config(None, {"rollout.mode": "bounded", "generation.stop": ["###"]}))
    validate_ppo(load_config(None, {"rollout.mode": "one_step", "generation.stop": ["###"]}))
    assert not reuses_train_logprobs(load_config(None, {**on_policy, "rollout.mode": "bounded"}))
    with pytest.raises(Exception, match="rollout.max_staleness must be >= 1"):
        load_config(None, {"rollout.mode": "bounded", "rollout.max_staleness": 0})
    with pytest.raises(Exception, match="only bounded reads it"):
        load_config(None, {"rollout.mode": "one_step", "rollout.max_staleness": 3})


def _toy_pipeline(depth: int, num_iterations: int = 100, fail_at=None):
    """A RolloutPipeline over one-sample batches whose every chunk is one token: its id the batch, its version the
    engines' at the time."""
    import threading

    from rlhf_ray.generator import Sample
    from rlhf_ray.rollout.pipeline import Generated, RolloutPipeline, continued

    version, calls = [0], []

    def token(b):
        return Sample(0, [b], [-1.0], "length", version[0], token_versions=[version[0]])

    def admit(b):
        calls.append(("admit", b, version[0], threading.current_thread().name))
        return Generated(b, [{"prompt_id": b}], [token(b)], 1, {})

    def extend(g):
        if fail_at == (g.iteration, g.chunks):
            raise RuntimeError("engine gone")
        calls.append(("extend", g.iteration, version[0]))
        return dataclasses.replace(g, samples=[continued(g.samples[0], token(g.iteration))], chunks=g.chunks + 1)

    return RolloutPipeline(depth, num_iterations, admit, extend), version, calls


def test_pipeline_schedule_bounds_staleness_and_interrupts_every_sample_at_each_sync():
    """rollout.mode bounded's schedule (pure logic): during iteration k the engines (weights of step k) bring batch b
    to min(S, S + 1 - (b - k)) chunks, so batch b is admitted at iteration b - S, its chunk j sampled by step
    b - S + j - 1, and every batch trained at step b has tokens of steps b - S .. b - 1: never more than S old."""
    import dataclasses

    from rlhf_ray.rollout.pipeline import chunk_tokens, scheduled_chunks

    assert [scheduled_chunks(b, 5, 3) for b in (5, 6, 7, 8)] == [3, 3, 2, 1]
    assert chunk_tokens(16, 3) == 6 and chunk_tokens(16, 1) == 16 and chunk_tokens(16, 2) == 8
    S = 3
    pipe, version, calls = _toy_pipeline(S)
    trained = []
    for k in range(8):
        g = pipe.take(k)
        pipe.start(k)
        assert pipe.finish() >= 0
        version[0] += 1  # the sync
        pipe.commit()
        trained.append(g)
        assert sorted(pipe.in_flight) == list(range(k + 1, k + S + 1))  # S batches in flight
    assert trained[0].samples[0].token_versions == [0, 0, 0]  # the first batch: generated now, whole
    for k in range(S, 8):  # steady state: one chunk per sync, oldest token exactly S steps old
        assert trained[k].samples[0].token_versions == [k - 3, k - 2, k - 1], (k, trained[k].samples)
        assert trained[k].samples[0].token_ids == [k] * 3
    admitted = [c for c in calls if c[0] == "admit"]
    assert [c[1] for c in admitted] == list(range(8 + S))  # admission in sequence order
    assert all(c[3].startswith("rollout-") for c in admitted[1:])  # in the background
    # depth 1 is one-step-off: batch k+1 generated whole by the weights of step k
    pipe, version, calls = _toy_pipeline(1, num_iterations=4)
    for k in range(4):
        g = pipe.take(k)
        pipe.start(k)
        pipe.finish()
        version[0] += 1
        pipe.commit()
        assert g.samples[0].token_versions == [max(0, k - 1)]
    assert pipe.in_flight == {} and [c[1] for c in calls] == [0, 1, 2, 3]  # nothing past the last iteration


def test_pipeline_keeps_what_was_in_flight_when_an_iteration_fails_and_resumes_from_its_state():
    pipe, version, calls = _toy_pipeline(2, fail_at=(3, 1))
    for k in range(2):
        pipe.take(k)
        pipe.start(k)
        pipe.finish()
        version[0] += 1
        pipe.commit()
    before = pipe.state()
    assert [g["iteration"] for g in before] == [2, 3]
    pipe.take(2)
    pipe.start(2)  # extends batch 3's first chunk: fails
    with pytest.raises(RuntimeError, match="engine gone"):
        pipe.finish()
    pipe.abandon()
    assert pipe.state() == before  # nothing changed in place: the retry starts from the same batches
    rows = {2: {"prompt_id": 2}, 3: {"prompt_id": 3}}
    other, *_ = _toy_pipeline(2)
    other.load_state(json.loads(json.dumps(before)), rows.get)  # a checkpoint's JSON
    assert sorted(other.in_flight) == [2, 3] and other.in_flight[3].rows == [{"prompt_id": 3}]
    assert other.state() == before and other.in_flight[2].samples[0].token_versions == [0, 1]


def test_lineage_counts_staleness_in_learner_steps_and_leaves_out_stale_samples():
    import torch

    from rlhf_ray.generator import Sample
    from rlhf_ray.rollout.lineage import lineage, sample_staleness, staleness_metrics
    from rlhf_ray.rollout.pipeline import continued

    first = Sample(0, [5, 6], [-1.0, -2.0], "length", weight_version=3, engine=0, token_versions=[3, 3])
    chunk = Sample(0, [7], [-0.5], "stop", weight_version=4, engine=1, token_versions=[4])
    whole = continued(first, chunk)
    assert whole.token_ids == [5, 6, 7] and whole.token_versions == [3, 3, 4] and whole.weight_version == 3
    assert whole.extra["engines"] == [0, 1] and whole.finish_reason == "stop"
    # recovery gave the restored weights of step 3 the new version 9: staleness counts steps, not versions
    steps = {3: 3, 4: 4, 9: 3, 10: 4}
    other = Sample(1, [1], [-1.0], "stop", weight_version=9, token_versions=[9])
    old = Sample(2, [1], [-1.0], "stop", weight_version=3, token_versions=[3])
    staleness = sample_staleness([whole, other, old], steps, 5)
    assert staleness == [2, 2, 2]
    info = {"rows": [{"prompt_id": 11}, {"prompt_id": 12}, {"prompt_id": 13}], "times": (0.0, 1.0),
            "samples": [whole, other, old], "staleness": [2, 2, 3], "stale": torch.tensor([False, False, True])}
    records = lineage(info, 5, (1.0, 2.0))
    assert records[0]["weight_versions"] == [3, 4] and records[0]["engines"] == [0, 1]
    assert [r["outcome"] for r in records] == ["trained", "trained", "stale"]
    assert staleness_metrics(records) == {"rollout/staleness_mean": 2.0, "rollout/staleness_max": 2,
                                          "rollout/staleness_2": 2, "rollout/dropped_stale": 1}


def test_prompt_stream_gives_each_row_its_position_as_prompt_id():
    stream = PromptStream([{"i": i} for i in range(5)], seed=3)
    taken = stream.take(7)  # crosses an epoch
    assert [r["prompt_id"] for r in taken] == list(range(7))
    assert [stream.row_at(i) for i in range(7)] == taken


def test_next_chunk_continues_only_samples_cut_by_their_chunk_from_their_prefix():
    """Which samples an interruption continues (rollout.pipeline.next_chunk): those cut at the chunk boundary, not
    those that ended (EOS / stop token) or reached max_model_len; each resubmitted as prompt + prefix with a seed of
    its own, and the continuation appended with its version. (The engines are a stand-in: this is the bookkeeping.)"""
    from rlhf_ray.config import GenerationConfig
    from rlhf_ray.generator import Rollout, Sample
    from rlhf_ray.rollout.pipeline import Generated, next_chunk

    calls = []

    class Engines:
        def __init__(self, max_model_len):
            self.max_model_len = max_model_len

        def generate(self, prompts, sampling, seeds):
            calls.append((prompts, sampling.max_new_tokens, sampling.n, seeds))
            return Rollout([Sample(i, [50 + i, 60 + i, 70 + i], [-0.5] * 3, "length", 3, engine=1,
                                   token_versions=[3] * 3)
                            for i in range(len(prompts))], 3, redispatched=1, engine_prompts={1: len(prompts)})

    rows = [{"prompt_id": 40, "prompt_input_ids": [1, 2]}, {"prompt_id": 41, "prompt_input_ids": [1, 2, 3, 4, 5]}]
    cut = Sample(0, [7, 8, 9], [-1.0] * 3, "length", 2, sample_index=1, engine=0, token_versions=[2] * 3)
    ended = Sample(0, [7, 2], [-1.0] * 2, "stop", 2, engine=0, token_versions=[2] * 2)
    too_long = Sample(1, [7, 8, 9], [-1.0] * 3, "length", 2, engine=0, token_versions=[2] * 3)  # 5 + 3 = max_model_len
    g = Generated(6, rows, [ended, cut, too_long], 1, {"redispatched": 0, "generated_tokens": 8}, [0], [1.0, 2.0])
    out = next_chunk(g, Engines(8), GenerationConfig(max_new_tokens=8), 3, run_seed=7)
    [(prompts, max_new, n, seeds)] = calls
    assert prompts == [[1, 2, 7, 8, 9]] and max_new == 3 and n == 1 and len(seeds) == 1
    assert out.samples[0] is ended and out.samples[2] is too_long  # not continued
    assert out.samples[1].token_ids == [7, 8, 9, 50, 60, 70] and out.samples[1].token_versions == [2] * 3 + [3] * 3
    assert out.samples[1].sample_index == 1 and out.samples[1].extra["engines"] == [0, 1]
    assert (out.chunks, out.engines, out.counts) == (2, [0, 1], {"redispatched": 1, "generated_tokens": 11})
    assert g.chunks == 1 and g.samples[1] is cut  # the batch in flight is not changed in place
    next_chunk(out, Engines(64), GenerationConfig(max_new_tokens=8), 3, 7)
    assert len(calls) == 2 and calls[-1][1] == 2  # the last chunk asks only for what is left of max_new_tokens (8 - 6)


@pytest.mark.parametrize("layout", ["separate", "hybrid"])
def test_start_groups_starts_roles_side_by_side_and_a_hybrid_engine_after_its_actor(layout):
    """PPOTrainer.start_groups, as start-up and recovery call it, on a stand-in start_group: the roles start at the
    same time (a barrier only passes if they overlap); a hybrid generator group waits for its actor's ranks."""
    import threading
    import types

    from rlhf_ray.ppo import PPOTrainer

    hybrid = layout == "hybrid"
    together = threading.Barrier(2 if hybrid else 3, timeout=10)
    events = []

    def start_group(role):
        events.append(f"start {role}")
        if not (hybrid and role == "generators"):
            together.wait()  # actor and reference (and separate engines) all starting before any goes on
        events.append(f"up {role}")
        return f"{role} group"

    cfg = types.SimpleNamespace(placement=types.SimpleNamespace(layout=layout))  # all start_groups reads of it
    trainer = types.SimpleNamespace(cfg=cfg, start_group=start_group,
                                    actor=None, reference=None, generators=None)
    PPOTrainer.start_groups(trainer, ["actor", "reference", "generators"])  # recovery's replaced list, e.g.
    assert (trainer.actor, trainer.reference, trainer.generators) == ("actor group", "reference group",
                                                                     "generators group")
    if hybrid:  # the engine is the actor's ranks: started only once the actor is up
        assert events.index("start generators") > events.index("up actor")
