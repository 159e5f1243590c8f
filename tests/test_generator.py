"""The generator group on real vLLM engines in Ray actors (tiny Llama, CPU): agreement with transformers (in fp32,
pinned: greedy ids and log-probs are compared exactly with transformers' fp32 ones, which bf16 rounding would not meet),
sampling options, long prompts, load balancing, core binding, engine death, tensor parallelism.

Two TP=1 engines are shared by the module; the engine-killing test runs last among them. A TP=2 engine is started
for its own test.
"""
from __future__ import annotations

import sys
from dataclasses import replace

import pytest
import ray
import ray.cloudpickle
import torch

from rlhf_ray.config import GenerationConfig, load_config
from rlhf_ray.generator import GeneratorGroup, PromptTooLongError, Sampling, engine_cores
from rlhf_ray.weight_sync import ModelSource

from helpers import perturbed

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [40, 41, 42, 43, 44, 45], [100, 7, 300]]
GREEDY = Sampling(temperature=0.0, max_new_tokens=12, ignore_eos=True)


def hf_greedy_with_logprobs(model, prompt: list[int], n_tokens: int) -> tuple[list[int], list[float]]:
    ids, logprobs = torch.tensor([prompt]), []
    with torch.no_grad():
        for _ in range(n_tokens):
            lp = torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), -1)
            next_id = lp.argmax()
            logprobs.append(float(lp[next_id]))
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    return ids[0, len(prompt):].tolist(), logprobs


@pytest.fixture(scope="module")
def hf_model(tiny_llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def group(ray_cluster, tiny_llama):
    cfg = load_config(None, {"ray.address": "local", "generation.num_engines": 2, "generation.max_model_len": 256,
                             "generation.sync_timeout_s": 60, "generation.kv_cache_gib": 0.5,
                             "generation.max_restarts": 2})
    g = GeneratorGroup(cfg, tiny_llama, precision="fp32")  # the agreement with transformers is checked to 1e-4
    yield g
    g.shutdown()


# ---------------------------------------------------------------------------------------------- pure logic
def test_sampling_from_config_and_core_assignment():
    gen = GenerationConfig(n_samples_per_prompt=3, max_new_tokens=9, temperature=0.7, top_p=0.9, top_k=5,
                           stop=["\n"], stop_token_ids=[4], ignore_eos=True)
    s = Sampling.from_config(gen, seed=11)
    assert (s.n, s.max_new_tokens, s.temperature, s.top_p, s.top_k, s.stop, s.stop_token_ids, s.ignore_eos, s.seed) \
        == (3, 9, 0.7, 0.9, 5, ["\n"], [4], True, 11)
    params = s.to_vllm(seed=12)
    assert (params.n, params.max_tokens, params.seed, params.stop_token_ids, params.logprobs, params.ignore_eos) == \
        (3, 9, 12, [4], 0, True)
    assert not Sampling.from_config(GenerationConfig()).to_vllm().ignore_eos
    # Engine i's TP workers get cores i*tp.., unless generation.cpu_cores says otherwise.
    assert [engine_cores(GenerationConfig(num_engines=2), i, ncpu=2) for i in (0, 1)] == ["0", "1"]
    assert engine_cores(GenerationConfig(tensor_parallel_size=2), 0, ncpu=2) == "0|1"
    assert engine_cores(GenerationConfig(tensor_parallel_size=2), 1, ncpu=8) == "2|3"
    assert engine_cores(GenerationConfig(num_engines=2, cpu_cores=["1", "0"]), 0) == "1"
    with pytest.raises(ValueError, match="cpu_cores lists 1 bindings for 2 engine"):
        load_config(None, {"generation.num_engines": 2, "generation.cpu_cores": ["0"]})


# ---------------------------------------------------------------------------------------------- engines
def test_two_engines_greedy_ids_and_logprobs_equal_transformers(group, hf_model):
    rollout = group.generate(PROMPTS, GREEDY)
    assert rollout.engine_prompts == {0: 2, 1: 2}  # both engines answered
    assert [info["kv_cache_bytes"] for info in group.info] == [2**29] * 2  # generation.kv_cache_gib 0.5
    assert [s.prompt_index for s in rollout.samples] == [0, 1, 2, 3]
    for prompt, sample in zip(PROMPTS, rollout.samples):
        ids, logprobs = hf_greedy_with_logprobs(hf_model, prompt, 12)
        assert sample.token_ids == ids and sample.finish_reason == "length"
        torch.testing.assert_close(torch.tensor(sample.logprobs), torch.tensor(logprobs), rtol=0, atol=1e-4)
        assert sample.weight_version == group.weight_version == rollout.weight_version


def test_n_samples_max_tokens_and_per_prompt_seeds(group):
    s = Sampling(n=3, temperature=1.0, max_new_tokens=7, ignore_eos=True)
    rollout = group.generate(PROMPTS[:2], s, seeds=[3, 4])
    assert [(x.prompt_index, x.sample_index) for x in rollout.samples] == [(p, j) for p in (0, 1) for j in range(3)]
    assert all(len(x.token_ids) == 7 == len(x.logprobs) for x in rollout.samples)
    assert len({tuple(x.token_ids) for x in rollout.samples[:3]}) == 3  # n distinct samples of one prompt
    # A prompt's samples depend on its seed only, not on its position in the batch or the engine serving it.
    swapped = group.generate(PROMPTS[1::-1], s, seeds=[4, 3])
    ids = lambda r, prompt: [x.token_ids for x in r.samples if x.prompt_index == prompt]  # noqa: E731
    assert ids(rollout, 0) == ids(swapped, 1) and ids(rollout, 1) == ids(swapped, 0)
    assert ids(group.generate(PROMPTS[:1], s, seeds=[5]), 0) != ids(rollout, 0)
    # Sampling.seed: seed + prompt index, the same across calls.
    seeded = replace(s, seed=100)
    assert [x.token_ids for x in group.generate(PROMPTS, seeded).samples] == \
        [x.token_ids for x in group.generate(PROMPTS, seeded).samples]


def test_stop_token_ids_and_stop_strings_end_generation(group, tiny_llama):
    from transformers import AutoTokenizer

    [greedy] = group.generate(PROMPTS[:1], GREEDY).samples
    ids = greedy.token_ids
    k = next(i for i in range(2, len(ids)) if ids[i] not in ids[:i])
    [stopped] = group.generate(PROMPTS[:1], replace(GREEDY, stop_token_ids=[ids[k]], ignore_eos=False)).samples
    assert stopped.finish_reason == "stop" and stopped.token_ids == ids[:k + 1]
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    text = tok.decode(ids)
    stop = tok.decode(ids[k:k + 1]).strip() or tok.decode(ids[k:k + 2]).strip()
    [by_string] = group.generate(PROMPTS[:1], replace(GREEDY, stop=[stop], ignore_eos=False)).samples
    assert by_string.finish_reason == "stop" and len(by_string.token_ids) < len(ids) and stop in text


def test_long_prompt_is_an_error_naming_it_or_a_counted_skip(group):
    too_long = [7] * group.max_model_len  # no room for one new token
    with pytest.raises(PromptTooLongError, match=r"prompt 1 has 256 tokens.*generation.long_prompt: skip"):
        group.generate([PROMPTS[0], too_long, PROMPTS[1]], GREEDY)
    before = group.gen
    group.gen = replace(before, long_prompt="skip")
    try:
        rollout = group.generate([PROMPTS[0], too_long, PROMPTS[1]], GREEDY)
    finally:
        group.gen = before
    assert rollout.skipped == [1] and sorted({s.prompt_index for s in rollout.samples}) == [0, 2]
    # The engines are unharmed; the longest prompt that fits still generates (cut at max_model_len).
    [edge] = group.generate([[7] * (group.max_model_len - 1)], GREEDY).samples
    assert edge.finish_reason == "length" and len(edge.token_ids) == 1


def test_new_prompts_go_to_the_idle_engine(group):
    """Dispatch follows outstanding work, not turns: while engine 0 works through a long request, two new calls'
    prompts all go to engine 1."""
    busy = group.generate_async([PROMPTS[0]], Sampling(n=64, temperature=1.0, max_new_tokens=200, ignore_eos=True,
                                                       seed=0))
    first = group.generate(PROMPTS, GREEDY)
    second = group.generate(PROMPTS, GREEDY)
    long_run = busy.result()
    assert {s.engine for s in long_run.samples} == {0}
    assert first.engine_prompts == {1: 4} and second.engine_prompts == {1: 4}
    assert group.generate(PROMPTS, GREEDY).engine_prompts == {0: 2, 1: 2}  # idle again: both take work


def test_engines_sit_in_their_own_placement_groups_bound_to_their_own_cores(group):
    infos = [ray.get(e.ready.remote()) for e in group.engines]
    assert [i["placement_group"] for i in infos] == [pg.id.hex() for pg in group.placements]
    assert len({i["placement_group"] for i in infos}) == 2
    assert [i["omp_bind"] for i in infos] == ["0", "1"]
    assert [i["pinned_cores"] for i in infos] == [[0], [1]]  # the engines' compute threads, as the OS reports them


def test_sleep_and_wake_are_gpu_only(group):
    before = group.gen
    assert not before.enable_sleep_mode
    assert group.sleep() == [False, False] and group.wake_up() == [False, False]  # nothing to free on CPU
    assert len(group.generate(PROMPTS[:1], GREEDY).samples) == 1


@pytest.mark.gpu
def test_sleep_frees_gpu_memory_and_wake_restores_generation(ray_cluster, tiny_llama):
    cfg = load_config(None, {"ray.address": "local", "generation.enable_sleep_mode": True,
                             "generation.gpu_memory_utilization": 0.3, "placement.generator.gpus_per_worker": 1})
    g = GeneratorGroup(cfg, tiny_llama)
    try:
        before = g.generate(PROMPTS, GREEDY)
        assert g.sleep() == [True]
        assert g.wake_up() == [True]
        assert [s.token_ids for s in g.generate(PROMPTS, GREEDY).samples] == [s.token_ids for s in before.samples]
    finally:
        g.shutdown()


def test_killed_engine_is_restarted_resynced_and_its_prompts_redispatched(group, tiny_llama):
    model = perturbed(tiny_llama, seed=21)
    version = group.sync_weights(ModelSource(model))
    old_pid = group.info[0]["pid"]
    prompts = PROMPTS * 2
    pending = group.generate_async(prompts, GREEDY)
    ray.kill(group.engines[0], no_restart=False)  # engine 0 dies with its chunk in flight; Ray restarts it
    rollout = pending.result()
    assert [s.prompt_index for s in rollout.samples] == list(range(8))  # every requested sample is there
    assert rollout.redispatched == 4  # engine 0's chunk, counted
    assert group.restarts[0] == 1 and ray.get(group.engines[0].ready.remote())["pid"] != old_pid
    assert {s.weight_version for s in rollout.samples} == {version}
    expected = [hf_greedy_with_logprobs(model, p, 12)[0] for p in prompts]
    assert [s.token_ids for s in rollout.samples] == expected  # the restarted engine runs the synced weights
    assert group.engine_versions() == [version, version]
    direct = [ray.get(e.generate.remote(PROMPTS, GREEDY)) for e in group.engines]
    assert [s.token_ids for s in direct[0]] == [s.token_ids for s in direct[1]]
    # The weight-sync group of the sync before the kill held engine 0's old process: it is rebuilt (not reused, which
    # would hang), the restarted engine joins, and the next sync verifies on every engine.
    before = group.last_sync.channel
    group.sync_weights(ModelSource(perturbed(tiny_llama, seed=23)))
    assert group.last_sync.new_channel and group.last_sync.channel != before and group.last_sync.verified
    assert group.engine_versions() == [version + 1] * 2


def kill_self_on_call(worker, method: str, call: int) -> None:
    """Make this vLLM worker's process (the engine actor's own, CPU) die by SIGKILL on its `call`-th `method` call."""
    import os
    import signal

    worker = getattr(worker, "worker", worker)  # vLLM hands collective_rpc functions its wrapper of the worker
    original, calls = getattr(worker, method), [0]

    def dying(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(worker, method, dying)


def test_engine_killed_mid_sync_is_restarted_and_resynced_within_seconds(group, tiny_llama):
    """With generation.sync_timeout_s 600, engines die during a weight sync; none may make the others wait for it.
    Engine 1 dies at its second bucket (the transfer group is up: its peers see its sockets close); the retry opens
    a new group, and engine 0 dies before joining it (the sender and engine 1 wait in the rendezvous: the group drops
    the rendezvous store). Each is restarted by Ray, and the third attempt syncs and verifies both."""
    import time

    model = perturbed(tiny_llama, seed=24)
    restarts = list(group.restarts)
    ray.get(group.engines[1].collective_rpc.remote(kill_self_on_call, ("_rlhf_load", 2)))
    ray.get(group.engines[0].collective_rpc.remote(kill_self_on_call, ("rlhf_begin_update", 2)))
    before = group.gen
    group.gen = replace(before, sync_timeout_s=600.0, sync_bucket_mb=0.15)  # several buckets
    started = time.perf_counter()
    try:
        version = group.sync_weights(ModelSource(model))
    finally:
        group.gen = before
    report = group.last_sync
    assert [(f["engine"], f["outcome"]) for f in report.engine_failures] == [(1, "restarted"), (0, "restarted")]
    assert all(f["seconds"] < 20 for f in report.engine_failures), report.engine_failures  # not the 600 s timeout
    assert time.perf_counter() - started < 180  # two engine restarts included
    assert group.restarts == [restarts[0] + 1, restarts[1] + 1] and group.alive == [True, True]
    assert report.verified and [e["engine"] for e in report.engines] == [0, 1]
    assert group.engine_versions() == [version, version]
    assert [s.token_ids for s in group.generate(PROMPTS, GREEDY).samples] == \
        [hf_greedy_with_logprobs(model, p, 12)[0] for p in PROMPTS]


def test_tp2_engine_matches_tp1_and_syncs_its_shards(ray_cluster, tiny_llama, hf_model):
    """One engine over two CPU workers (bound "0|1"): the same greedy ids as TP=1, and a verified weight sync whose
    checksums reassemble the q/k/v heads, gate/up halves, row-parallel columns and vocab shards of both workers."""
    cfg = load_config(None, {"ray.address": "local", "generation.tensor_parallel_size": 2,
                             "generation.cpu_cores": ["0|1"], "generation.max_model_len": 256})
    g = GeneratorGroup(cfg, tiny_llama, precision="fp32")  # greedy ids equal transformers' fp32 ones
    try:
        assert ray.get(g.engines[0].ready.remote())["omp_bind"] == "0|1"
        tp2 = [s.token_ids for s in g.generate(PROMPTS, GREEDY).samples]
        assert tp2 == [hf_greedy_with_logprobs(hf_model, p, 12)[0] for p in PROMPTS]  # == TP=1 (test above)
        pieces = [p for worker in ray.get(g.engines[0].collective_rpc.remote("rlhf_checksum_pieces")) for p in worker]
        q = [p for p in pieces if p["name"] == "model.layers.0.self_attn.q_proj.weight"]
        assert sorted((p["start"], p["length"]) for p in q) == [(0, 32), (32, 32)]  # one head per worker
        model = perturbed(tiny_llama, seed=22)
        g.sync_weights(ModelSource(model))
        assert g.last_sync.verified and g.last_sync.transport == "gloo"
        assert [s.token_ids for s in g.generate(PROMPTS, GREEDY).samples] == \
            [hf_greedy_with_logprobs(model, p, 12)[0] for p in PROMPTS]
    finally:
        g.shutdown()


def test_unset_max_model_len_fits_the_kv_cache_instead_of_failing_at_start(ray_cluster, tiny_llama):
    """generation.max_model_len unset and a KV cache smaller than the model's own 512 tokens need (fp32: 1 KiB a
    token): the engine starts with the longest context the cache holds (vLLM's auto-fit), refuses a longer prompt by
    name and generates a shorter one. It used to fail at start, as the built-in demo did on a CPU without bf16."""
    cfg = load_config(None, {"ray.address": "local", "generation.kv_cache_gib": 300 * 1024 / 2**30})
    g = GeneratorGroup(cfg, tiny_llama, precision="fp32")
    try:
        assert 0 < g.max_model_len < 512
        with pytest.raises(PromptTooLongError, match="max_model_len"):
            g.generate([[7] * g.max_model_len], GREEDY)
        assert len(g.generate([PROMPTS[0]], GREEDY).samples[0].token_ids) == 12
    finally:
        g.shutdown()
