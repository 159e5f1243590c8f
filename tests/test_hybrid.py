"""placement.layout hybrid: the vLLM engine inside the actor learner's rank (rlhf_ray/hybrid.py), real DeepSpeed and
vLLM in one Ray actor on tiny models: the in-process hand-off verified, a stale engine caught, the refusals at config
load, and one GRPO learning run."""
from __future__ import annotations

from dataclasses import replace

import pytest
import ray
import torch

from rlhf_ray.config import ConfigError, load_config

HYBRID = {"placement.layout": "hybrid", "placement.actor.num_workers": 1, "generation.max_restarts": 0}


@pytest.mark.parametrize("override, key", [
    ({}, None),
    ({"placement.actor.num_workers": 2}, "placement.actor.num_workers"),
    ({"generation.num_engines": 2}, "generation.num_engines"),
    ({"generation.tensor_parallel_size": 2}, "generation.tensor_parallel_size"),
    ({"generation.max_restarts": 3}, "generation.max_restarts"),
    ({"generation.sync_transport": "gloo"}, "generation.sync_transport"),
    ({"placement.layout": "fused"}, "placement.layout"),
])
def test_hybrid_layout_refuses_what_it_does_not_do_at_load(override, key):
    settings = {**HYBRID, **override}
    if key is None:
        assert load_config(None, settings).placement.layout == "hybrid"
        assert load_config(None, {}).placement.layout == "separate"  # the default stays the separate groups
        return
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, settings)


def test_hybrid_places_no_generator_group(ray_cluster):
    from rlhf_ray.groups import placement_plan, remove_placement

    cfg = load_config(None, {**HYBRID, "ppo.advantage_estimator": "grpo", "generation.n_samples_per_prompt": 2})
    plan = placement_plan(cfg)
    try:
        assert sorted(plan) == ["actor", "reference", "reward"]
    finally:
        remove_placement(plan)


def _train_once(actor, seed: int, rows: int = 4, width: int = 12) -> None:
    """One real optimizer step on random rows (ratio 1, random advantages): the learner's weights move."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 200, (rows, width), generator=g)
    action = torch.zeros(rows, width - 1)
    action[:, width // 2:] = 1
    actor.train({"input_ids": ids, "attention_mask": torch.ones_like(ids), "action_mask": action,
                 "advantages": torch.randn(rows, width - 1, generator=g) * action})


@pytest.mark.parametrize("learner", [
    {"ppo.actor.deepspeed.zero_stage": 3},  # gathered a bucket at a time, loaded while the gather is held
    {"ppo.actor.deepspeed.zero_stage": 2, "ppo.actor.lora.dim": 4},  # adapters merged into the base weights
], ids=["zero3", "lora"])
def test_hybrid_handoff_is_verified_and_a_stale_engine_is_caught(ray_cluster, tiny_llama, learner):
    from rlhf_ray.generator import Sampling, StaleWeightsError
    from rlhf_ray.hybrid import HybridGeneratorGroup, HybridPolicyGroup
    from rlhf_ray.weight_sync import WeightSyncError, tensor_checksum

    cfg = load_config(None, {**HYBRID, "ray.address": "local", "models.actor.path": tiny_llama,
                             "ppo.advantage_estimator": "grpo", "generation.n_samples_per_prompt": 2,
                             "ppo.rollout_batch_size": 2, "ppo.mini_batch_size": 4,
                             "ppo.actor.deepspeed.micro_batch_size": 4, **learner,
                             "ppo.actor.optim.lr": 0.05, "ppo.actor.optim.warmup_steps": 0,
                             "generation.max_new_tokens": 8, "generation.kv_cache_gib": 1})
    actor = HybridPolicyGroup(cfg)
    try:
        generators = HybridGeneratorGroup(cfg, actor)
        assert generators.reports[0]["transport"] == "in_process"
        assert generators.info[0]["pid"] == actor.reports[0]["pid"]  # one process: learner and engine
        prompts = [[5, 17, 33, 9], [40, 41, 42]]
        greedy = Sampling(max_new_tokens=8, temperature=0.0, ignore_eos=True)
        before = [s.token_ids for s in generators.generate(prompts, greedy).samples]
        lora = "ppo.actor.lora.dim" in learner
        if lora:  # placement.reference_in_actor: the actor's base model (adapters disabled) is the reference
            ids = torch.randint(3, 200, (2, 10), generator=torch.Generator().manual_seed(7))
            scored = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            reference = lambda: actor.run_sharded("reference_logprobs", scored)  # noqa: E731
            reference_before, actor_before = reference(), actor.logprobs(scored)

        _train_once(actor, seed=0)
        if lora:  # the reference never moves while the actor does
            assert torch.equal(reference_before, actor_before)  # LoRA starts as the identity
            assert torch.equal(reference(), reference_before)
            assert (actor.logprobs(scored) - actor_before).abs().max() > 1e-3  # while the actor did move
        assert generators.sync_weights(actor) == 1
        report = generators.last_sync
        assert report.transport == "in_process" and report.verified and report.engines[0]["probe_max_diff"] >= 0
        assert 0 < report.engines[0]["receive_checksum_s"] < report.engines[0]["load_s"]  # the loader's checksums
        # the sender's checksums are those of the learner's own export (the separate layout's path), every tensor
        exported = {name: (tuple(t.shape), tensor_checksum(t, getattr(torch, generators.dtype)))
                    for ref in actor.export_params() for name, t in ray.get(ref)}
        assert report.checksums == exported
        assert ray.get(actor.workers[0].checksums.remote()) == exported  # the engine's live parameters
        rollout = generators.generate(prompts, greedy)
        after = [s.token_ids for s in rollout.samples]
        assert after != before and rollout.weight_version == 1
        # the engine's log-probs of what it generated equal the learner's
        seq = prompts[0] + after[0]
        engine_lp = ray.get(actor.workers[0].probe_logprobs.remote(seq))
        ids = torch.tensor([seq])
        learner_lp = actor.logprobs({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, temperature=1.0)[0]
        assert torch.allclose(torch.tensor(engine_lp), learner_lp, atol=generators.probe_atol)

        # a stale engine: the learner trains, the load into the engine does nothing -> the sync fails verification
        _train_once(actor, seed=1)
        actor.apply(lambda w: setattr(w, "load_into_engine", lambda bucket, dtype: None))
        with pytest.raises(WeightSyncError, match="weight version 2: learner tensor .* never reached the engine's loader"):
            generators.sync_weights(actor)
        with pytest.raises(StaleWeightsError):  # and it refuses work until a sync succeeds
            ray.get(actor.workers[0].generate.remote(prompts, greedy, expected_version=generators.weight_version))
        actor.apply(lambda w: delattr(w, "load_into_engine"))
        assert generators.sync_weights(actor) == 2
        assert generators.verify()[0]["probe_max_diff"] <= generators.probe_atol
        # generation.verify_probe_every 2: the next sync checksums only (no learner probe), the one after probes
        generators.gen = replace(generators.gen, verify_probe_every=2)
        for version, probed in ((3, False), (4, True)):
            _train_once(actor, seed=version)
            assert generators.sync_weights(actor) == version
            assert (generators.last_sync.probe is not None) == probed
            assert (generators.last_sync.sender["probe_s"] > 0) == probed and generators.last_sync.checksums
        # weights changed in place behind the group's back: caught by the check of the live parameters
        def corrupt_a_live_norm(worker) -> None:  # runs in the vLLM worker (pickled by value: defined here)
            next(p for n, p in worker.model_runner.get_model().named_parameters() if "norm" in n).data.add_(0.5)

        ray.get(actor.workers[0].apply.remote(lambda w: w.vllm.llm.collective_rpc(corrupt_a_live_norm)))
        with pytest.raises(WeightSyncError, match="checksum mismatch"):
            generators.verify()
    finally:
        actor.shutdown()


def test_grpo_learns_the_rule_in_the_hybrid_layout(ray_cluster, tiny_llama, tiny_value_model, tmp_path):
    from test_ppo import assert_learned, learn, ppo_config

    # precision auto is bf16 on a CPU with AMX: after a dozen iterations the probe's random tokens get log-probs of
    # large magnitude, where bf16 kernels of learner and engine differ by up to ~0.2 (seen 0.199 at iteration 14,
    # above the default 0.1); the checksums, exact, still cover every tensor
    cfg = ppo_config(tmp_path, tiny_llama, tiny_value_model, **HYBRID, **{"ppo.advantage_estimator": "grpo",
                                                                          "generation.verify_probe_atol": 0.5})
    history = learn(cfg)
    assert_learned(history)
    assert all(h["time/sync_s"] > 0 for h in history)


@pytest.mark.gpu
def test_hybrid_engine_sleeps_while_the_learner_trains_and_wakes_for_the_sync(ray_cluster, tiny_llama):
    """GPU: generation.enable_sleep_mode in the hybrid layout frees the engine's KV cache and weights (level 2) in the
    learner's own process; after waking, the in-process sync reloads the weights and generation works again."""
    from rlhf_ray.generator import Sampling
    from rlhf_ray.hybrid import SLEEP_LEVEL, HybridGeneratorGroup, HybridPolicyGroup

    cfg = load_config(None, {**HYBRID, "ray.address": "local", "models.actor.path": tiny_llama,
                             "placement.actor.gpus_per_worker": 1, "generation.enable_sleep_mode": True,
                             "generation.gpu_memory_utilization": 0.3, "ppo.advantage_estimator": "grpo",
                             "generation.n_samples_per_prompt": 2, "ppo.rollout_batch_size": 2,
                             "ppo.mini_batch_size": 4, "ppo.actor.deepspeed.micro_batch_size": 4})
    actor = HybridPolicyGroup(cfg)
    try:
        generators = HybridGeneratorGroup(cfg, actor)
        free = lambda: ray.get(actor.workers[0].apply.remote(lambda w: torch.cuda.mem_get_info()[0]))  # noqa: E731
        awake = free()
        assert SLEEP_LEVEL == 2 and generators.sleep() == [True]
        assert free() > awake  # KV cache and weights released
        _train_once(actor, seed=0)
        assert generators.wake_up() == [True]
        assert generators.sync_weights(actor) == 1 and generators.last_sync.verified
        greedy = Sampling(max_new_tokens=4, temperature=0.0, ignore_eos=True)
        assert len(generators.generate([[5, 17, 33]], greedy).samples[0].token_ids) == 4
    finally:
        actor.shutdown()
