"""Weight broadcast learner -> vLLM engines: checksums and wire format (pure), then real engines in Ray actors fed
by a transformers model (ModelSource) and by a real 2-rank ZeRO-3 learner group after an optimizer step.

Two engines (tiny Llama, fp32) are shared by every engine test; each test syncs the weights it needs first. fp32 is
pinned: greedy ids are compared exactly with transformers' fp32 ones and the probe at 1e-3. bf16 syncs (precision
auto on a CPU with bf16) are verified in every PPO test (tests/test_ppo.py).
"""
from __future__ import annotations

import sys
from dataclasses import replace

import numpy as np
import pytest
import ray.cloudpickle
import torch

from rlhf_ray.config import load_config
from rlhf_ray.weight_sync import (CHECKSUM_CHUNK, CHECKSUM_MASK, BucketSender, ModelSource, WeightSyncError,
                                  checksum_slice, combine_pieces, compare_checksums, from_numpy, iter_buckets,
                                  lora_merged_parameters, resolve_transport, tensor_checksum, to_numpy)

from helpers import perturbed

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import test modules

PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [40, 41, 42, 43, 44, 45]]
LONG_PROMPT = [(7 * i) % 500 + 3 for i in range(140)]  # > one 128-token KV block: exercises the prefix cache


# ---------------------------------------------------------------------------------------------- pure logic
def reference_checksum(t: torch.Tensor) -> int:
    """The definition, in Python integers: sum word_k * (k * G + 1) mod 2^32 over the 32-bit little-endian words of
    the raw bytes (zero-padded)."""
    g = 0x9E3779B97F4A7C15
    raw = t.contiguous().view(torch.uint8).flatten().tolist()
    raw += [0] * (-len(raw) % 4)
    words = [int.from_bytes(bytes(raw[i:i + 4]), "little") for i in range(0, len(raw), 4)]
    return sum(w * (k * g + 1) for k, w in enumerate(words)) % (1 << 32)


def test_checksum_is_exact_position_sensitive_and_additive_over_shards():
    torch.manual_seed(0)
    w = torch.randn(6, 10)
    assert tensor_checksum(w) == reference_checksum(w)
    assert checksum_slice(w, w.shape, chunk_elems=7) == reference_checksum(w)  # chunking changes nothing
    swapped = w.clone()
    swapped[0, 1], swapped[0, 2] = w[0, 2], w[0, 1]
    assert tensor_checksum(swapped) != tensor_checksum(w)
    nudged = w.clone()
    nudged[5, 9] = torch.nextafter(w[5, 9], torch.tensor(10.0))  # one ulp
    assert tensor_checksum(nudged) != tensor_checksum(w)
    # Column-parallel rows and row-parallel columns (TP shards) add up to the whole.
    rows = (checksum_slice(w[:2], w.shape, 0, 0) + checksum_slice(w[2:], w.shape, 0, 2)) & CHECKSUM_MASK
    cols = (checksum_slice(w[:, :3], w.shape, 1, 0) + checksum_slice(w[:, 3:], w.shape, 1, 3)) & CHECKSUM_MASK
    assert rows == cols == tensor_checksum(w)
    v = torch.randn(9)
    assert (checksum_slice(v[:4], v.shape, 0, 0) + checksum_slice(v[4:], v.shape, 0, 4)) & CHECKSUM_MASK \
        == tensor_checksum(v)
    d = torch.randn(5, 3, dtype=torch.float64)  # 8-byte elements: two 32-bit words each
    assert (checksum_slice(d[:2], d.shape, 0, 0) + checksum_slice(d[2:], d.shape, 0, 2)) & CHECKSUM_MASK \
        == tensor_checksum(d) == checksum_slice(d, d.shape, chunk_elems=4)
    # The engine's dtype decides the bits; 16-bit elements pair up into words, at any slice boundary.
    h = w.to(torch.bfloat16)
    assert tensor_checksum(w, torch.bfloat16) == reference_checksum(h) != tensor_checksum(w)
    assert all((checksum_slice(h[:, :k], h.shape, 1, 0) + checksum_slice(h[:, k:], h.shape, 1, k)) & CHECKSUM_MASK
               == reference_checksum(h) for k in (1, 3, 4))
    odd = torch.randn(7).to(torch.bfloat16)
    assert (checksum_slice(odd[:3], odd.shape, 0, 0) + checksum_slice(odd[3:], odd.shape, 0, 3)) & CHECKSUM_MASK \
        == tensor_checksum(odd) == reference_checksum(odd)
    paired = h.clone()
    paired[0, 0], paired[0, 1] = h[0, 1], h[0, 0]  # a swap inside one word
    assert tensor_checksum(paired) != tensor_checksum(h)
    # Several default-size chunks (CPU: one int32 dot per chunk against weights shifted by the chunk's offset, the
    # shifted weights wrapping): the definition, in numpy's wrapping uint64 (exact mod 2^32).
    big = torch.randn(2 * CHECKSUM_CHUNK + 5)
    words = big.view(torch.int32).numpy().view(np.uint32).astype(np.uint64)
    weights = np.arange(words.size, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(1)
    assert tensor_checksum(big) == int((words * weights).sum()) & CHECKSUM_MASK


def test_combine_pieces_counts_replicas_once_and_rejects_gaps():
    w = torch.randn(4, 3)
    piece = lambda t, start, dim=0: {"name": "w", "dim": dim, "start": start, "length": t.shape[dim],  # noqa: E731
                                     "full_shape": (4, 3), "checksum": checksum_slice(t, (4, 3), dim, start)}
    combined = combine_pieces([piece(w[:2], 0), piece(w[2:], 2), piece(w[2:], 2)])  # a replicated KV shard
    assert combined == {"w": ((4, 3), tensor_checksum(w))}
    with pytest.raises(WeightSyncError, match="cover 2 of 4"):
        combine_pieces([piece(w[:2], 0)])
    with pytest.raises(WeightSyncError, match="engine 3, version 1: checksum mismatch in b "):
        compare_checksums({"a": ((2,), 1), "b": ((2,), 2)}, {"a": ((2,), 1), "b": ((2,), 5)}, "engine 3, version 1")
    with pytest.raises(WeightSyncError, match="no learner tensor: \\['c'\\]"):
        compare_checksums({"a": ((2,), 1)}, {"a": ((2,), 1), "c": ((1,), 0)}, "engine 0")


def test_buckets_numpy_wire_and_transport_choice():
    named = [(f"t{i}", torch.zeros(256)) for i in range(10)]  # 1 KiB each
    sizes = [sum(t.numel() * 4 for _, t in b) for b in iter_buckets(named, 3000)]
    assert sizes == [2048] * 5
    assert [len(b) for b in iter_buckets([("big", torch.zeros(4096))] + named[:1], 100)] == [1, 1]
    x = torch.randn(3, 5).to(torch.bfloat16)
    arr, name = to_numpy(x)
    assert name == "bfloat16" and torch.equal(from_numpy(arr, name), x)
    assert resolve_transport("auto", cuda=False) == "gloo" and resolve_transport("auto", cuda=True) == "nccl"
    assert resolve_transport("object_store", cuda=False) == "object_store"
    with pytest.raises(ValueError, match="needs CUDA"):
        resolve_transport("nccl", cuda=False)


class CodeRunningPayload:
    """What anything reaching the (unauthenticated) sync store could write: unpickling it runs code."""

    def __reduce__(self):
        return exec, ("import builtins; builtins.rlhf_ray_payload_ran = True",)


def test_gloo_bucket_metadata_is_json_and_a_pickle_payload_is_refused_not_run():
    """The gloo receiver reads each bucket's metadata from the driver's TCPStore: it parses JSON only. A pickle that
    would run code, put where the receiver reads, is refused with an error naming it and never executed."""
    import builtins
    import pickle
    import threading
    from datetime import timedelta

    import torch.distributed as dist

    from rlhf_ray.weight_sync import SyncPlan, bucket_meta, gloo_group, gloo_receive, meta_key, parse_bucket_meta

    bucket = [("a.weight", torch.zeros(2, 3)), ("b.bias", torch.zeros(4, dtype=torch.bfloat16))]
    assert parse_bucket_meta(bucket_meta(bucket), "here") == [("a.weight", [2, 3], torch.float32),
                                                              ("b.bias", [4], torch.bfloat16)]
    assert parse_bucket_meta(bucket_meta(None), "here") is None  # the end of a sync
    with pytest.raises(WeightSyncError, match="here: malformed"):  # data, but not a dtype: refused too
        parse_bucket_meta(b'{"tensors": [["a", [1], "load"]]}', "here")

    store = dist.TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False, timeout=timedelta(seconds=30))
    plan = SyncPlan(1, "gloo", "float32", 1 << 20, world_size=2, host="127.0.0.1", port=store.port, timeout_s=30,
                    channel="test-channel")

    def attacker_as_sender():  # rank 0 of the group writes the payload where bucket 0's metadata goes
        _, sender_store = gloo_group(plan.host, plan.port, 0, 2, plan.channel, plan.timeout_s)
        sender_store.set(meta_key(plan.sync_id, 0), pickle.dumps([CodeRunningPayload()]))

    thread = threading.Thread(target=attacker_as_sender)
    thread.start()
    try:
        with pytest.raises(WeightSyncError, match=r"receiver rank 1 .*bucket metadata is not JSON .*refused"):
            gloo_receive(plan, 1, lambda b: pytest.fail("a bucket was loaded"))
    finally:
        thread.join()
    assert not hasattr(builtins, "rlhf_ray_payload_ran")


def test_lora_layers_are_merged_into_hf_names(tiny_llama):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)  # peft starts B at zero: make the adapters matter
    merged = dict(lora_merged_parameters(model))
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    assert list(merged) == [n for n, _ in plain.named_parameters()]
    reference = model.merge_and_unload()
    for name, t in reference.named_parameters():
        torch.testing.assert_close(merged[name], t, rtol=0, atol=1e-6)
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"],
                           plain.state_dict()["model.layers.0.self_attn.q_proj.weight"])


# ---------------------------------------------------------------------------------------------- engines
def greedy_hf(model, prompt: list[int], n_tokens: int) -> list[int]:
    ids = torch.tensor([prompt], device=next(model.parameters()).device)
    with torch.no_grad():
        for _ in range(n_tokens):
            ids = torch.cat([ids, model(input_ids=ids).logits[0, -1].argmax().view(1, 1)], dim=1)
    return ids[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def group(ray_cluster, tiny_llama):
    from rlhf_ray.generator import GeneratorGroup

    cfg = load_config(None, {"ray.address": "local", "generation.num_engines": 2, "generation.max_model_len": 256,
                             "generation.sync_timeout_s": 60,
                             "generation.sync_bucket_mb": 0.15, "generation.max_restarts": 0,
                             "generation.verify_probe_len": 12})
    g = GeneratorGroup(cfg, tiny_llama, precision="fp32")  # bit-exact checks: greedy ids = transformers' fp32 ones
    yield g
    g.shutdown()


def with_generation(group, **changes):
    """Run the group with some generation.* options changed (restored by the caller through the return value)."""
    before = group.gen
    group.gen = replace(before, **changes)
    return before


def greedy_outputs(group, prompts, n_tokens: int = 10) -> list[list[int]]:
    from rlhf_ray.generator import Sampling

    rollout = group.generate(prompts, Sampling(temperature=0.0, max_new_tokens=n_tokens, ignore_eos=True))
    assert {s.weight_version for s in rollout.samples} == {group.weight_version}
    return [s.token_ids for s in rollout.samples]


def engine_greedy(group, engine: int, prompts, n_tokens: int = 10) -> list[list[int]]:
    """Greedy ids from one engine, called directly (the group would balance across engines)."""
    import ray

    from rlhf_ray.generator import Sampling

    samples = ray.get(group.engines[engine].generate.remote(
        prompts, Sampling(temperature=0.0, max_new_tokens=n_tokens, ignore_eos=True)))
    return [s.token_ids for s in samples]


def test_tied_output_head_follows_the_embedding(ray_cluster, tmp_path):
    """lm_head = embed_tokens (SmolLM2): an update carries only the embedding, and vLLM's CPU kernel for the head was
    packed from the old values at load. The engine must compute with the new ones, and the check must notice if not."""
    import ray

    from rlhf_ray.generator import GeneratorGroup
    from rlhf_ray.models.tiny import build_tiny_model
    from rlhf_ray.vllm_worker_ext import stale_head_kernel

    path = str(build_tiny_model("llama", tmp_path / "tied", seed=3, tie_embeddings=True))
    cfg = load_config(None, {"ray.address": "local", "generation.max_model_len": 256, "generation.max_restarts": 0})
    group = GeneratorGroup(cfg, path, precision="fp32")
    try:
        model = perturbed(path, seed=4)
        assert model.lm_head.weight is model.model.embed_tokens.weight
        group.sync_weights(ModelSource(model))
        assert group.last_sync.verified and group.last_sync.engines[0]["probe_max_diff"] < 1e-3
        assert engine_greedy(group, 0, PROMPTS) == [greedy_hf(model, p, 10) for p in PROMPTS]

        def corrupt_head_kernel(worker):  # what a head left out of the update computes with: other values
            head = worker.model_runner.model.lm_head
            stale = head.weight.detach().clone() * 1.5
            head.cpu_linear = lambda x, weight, bias: torch.nn.functional.linear(x, stale, bias)
            return stale_head_kernel(head)

        assert ray.get(group.engines[0].collective_rpc.remote(corrupt_head_kernel)) == [True]
        with pytest.raises(WeightSyncError, match=r"lm_head\.weight \(CPU kernel out of date\)"):
            group.verify()
    finally:
        group.shutdown()


@pytest.mark.parametrize("transport", ["object_store", "gloo"])
def test_sync_from_model_reaches_every_engine_verified_and_bucketed(group, tiny_llama, transport):
    model = perturbed(tiny_llama, seed={"object_store": 1, "gloo": 2}[transport])
    before = with_generation(group, sync_transport=transport)
    try:
        version = group.sync_weights(ModelSource(model))
    finally:
        group.gen = before
    report = group.last_sync
    assert version == report.version == group.weight_version and report.transport == transport
    assert report.verified and all(e["probe_max_diff"] < 1e-3 for e in report.engines)
    assert len(group.probe_ids) == 12 == len(report.probe[0])  # generation.verify_probe_len
    assert group.engine_versions() == [version, version]
    # Bucketed: several transfers, none above generation.sync_bucket_mb (0.15 MB here; the largest tensor is 128 KiB).
    assert report.buckets >= 4 and report.max_bucket_bytes <= 0.15 * (1 << 20)
    expected = [greedy_hf(model, p, 10) for p in PROMPTS]
    for engine in (0, 1):
        assert engine_greedy(group, engine, PROMPTS) == expected


def test_bucket_size_option_sets_the_number_of_transfers(group, tiny_llama):
    model = perturbed(tiny_llama, seed=3)
    counts = {}
    for mb in (0.15, 1.0):
        before = with_generation(group, sync_bucket_mb=mb, sync_transport="object_store")
        try:
            group.sync_weights(ModelSource(model))
        finally:
            group.gen = before
        counts[mb] = group.last_sync.buckets
    assert counts[1.0] == 1 < counts[0.15]  # the 0.6 MB model fits one 1 MB bucket


def test_prefix_cache_is_invalidated_after_a_sync(group, tiny_llama):
    """A 140-token prompt fills a 128-token KV block that vLLM caches; after a sync the cached block must not be
    reused (it was computed with the old weights)."""
    first = perturbed(tiny_llama, seed=4)
    group.sync_weights(ModelSource(first))
    assert greedy_outputs(group, [LONG_PROMPT]) == [greedy_hf(first, LONG_PROMPT, 10)]  # now cached
    second = perturbed(tiny_llama, seed=5)
    group.sync_weights(ModelSource(second))
    assert greedy_outputs(group, [LONG_PROMPT]) == [greedy_hf(second, LONG_PROMPT, 10)]


def test_corrupted_live_parameter_fails_verification_naming_it(group, tiny_llama):
    import ray

    group.sync_weights(ModelSource(perturbed(tiny_llama, seed=6)))
    assert len(group.verify()) == 2

    def corrupt(worker):  # runs inside engine 1's vLLM worker
        with torch.no_grad():
            worker.model_runner.model.model.layers[1].input_layernorm.weight[5] += 1e-3

    ray.get(group.engines[1].collective_rpc.remote(corrupt))
    with pytest.raises(WeightSyncError, match=rf"engine 1 .*weight version {group.weight_version}: checksum mismatch "
                                              r"in model\.layers\.1\.input_layernorm\.weight"):
        group.verify()
    # The engine no longer claims the version: the group will not send it work until it is re-synced.
    assert group.engine_versions()[1] == -1
    group.sync_weights(ModelSource(perturbed(tiny_llama, seed=6)))
    assert group.engine_versions() == [group.weight_version] * 2


def test_corrupted_packed_linear_weight_is_caught_too(group, tiny_llama):
    """On CPU vLLM packs linear weights into oneDNN kernels; the checksum reads them back through the kernel."""
    import ray

    group.sync_weights(ModelSource(perturbed(tiny_llama, seed=7)))

    def reload_one_changed_qkv(worker, version_model_q):
        # A real (not hand-poked) change of one fused weight through vLLM's own reload path.
        worker.rlhf_begin_update()
        worker.rlhf_load_bucket([("model.layers.0.self_attn.q_proj.weight", version_model_q)])
        worker.rlhf_finish_update()

    q = perturbed(tiny_llama, seed=7).model.layers[0].self_attn.q_proj.weight.detach().clone()
    q[0, 0] += 0.5
    ray.get(group.engines[0].collective_rpc.remote(reload_one_changed_qkv, (q,)))
    with pytest.raises(WeightSyncError, match=r"engine 0 .*checksum mismatch in model\.layers\.0\.self_attn\.q_proj"):
        group.verify()


class SlowSource(ModelSource):
    """A source that takes `delay` seconds before its first bucket (a learner still busy, or stuck)."""

    def __init__(self, model, delay: float):
        super().__init__(model)
        self.delay = delay

    def push(self, sender, bucket_bytes):
        import time

        time.sleep(self.delay)
        return super().push(sender, bucket_bytes)


def test_sync_timeout_bounds_a_stalled_sync(group, tiny_llama):
    import time

    before = with_generation(group, sync_transport="gloo", sync_timeout_s=2.0)
    started = time.perf_counter()
    try:
        with pytest.raises(Exception, match="(?i)time"):  # the receivers gave up; the late sender finds no peers
            group.sync_weights(SlowSource(perturbed(tiny_llama, seed=11), delay=4.0))
    finally:
        group.gen = before
    assert time.perf_counter() - started < 30
    assert group.engine_versions() == [-1, -1]  # neither engine claims a version it did not finish loading
    group.sync_weights(ModelSource(perturbed(tiny_llama, seed=11)))  # and the next sync works
    assert group.engine_versions() == [group.weight_version] * 2


class ShiftedProbe(ModelSource):
    """A source whose probe log-probs are off by `shift` (what a learner/engine disagreement looks like)."""

    def __init__(self, model, shift: float):
        super().__init__(model)
        self.shift = shift

    def probe_logprobs(self, token_ids):
        return [x + self.shift for x in super().probe_logprobs(token_ids)]


def test_probe_logprobs_are_checked_against_the_tolerance(group, tiny_llama):
    model = perturbed(tiny_llama, seed=8)
    with pytest.raises(WeightSyncError, match=r"probe log-probs differ from the learner's by 0\.01.*tolerance 0\.001"):
        group.sync_weights(ShiftedProbe(model, 0.01))
    before = with_generation(group, verify_probe_atol=0.05)
    try:
        group.sync_weights(ShiftedProbe(model, 0.01))
    finally:
        group.gen = before
    assert group.last_sync.verified and all(0.009 < e["probe_max_diff"] < 0.011 for e in group.last_sync.engines)


def test_probe_every_n_syncs_checksums_every_sync(group, tiny_llama):
    group.sync_weights(ModelSource(perturbed(tiny_llama, seed=20)))  # probed: the count starts here
    before = with_generation(group, verify_probe_every=3)
    try:
        for seed in (21, 22):  # a wrong probe passes unseen on the two syncs between probes; the checksums do not
            group.sync_weights(ShiftedProbe(perturbed(tiny_llama, seed=seed), 1.0))
            report = group.last_sync
            assert report.verified and report.probe is None and report.checksums
            assert all("verify_s" in e and "probe_max_diff" not in e for e in report.engines)
        assert group.verify()  # on demand: the live checksums (this version had no probe)
        with pytest.raises(WeightSyncError, match="probe log-probs differ"):  # the third sync probes
            group.sync_weights(ShiftedProbe(perturbed(tiny_llama, seed=23), 1.0))
    finally:
        group.gen = before
    group.sync_weights(ModelSource(perturbed(tiny_llama, seed=24)))  # every engine verified again
    assert group.last_sync.probe is not None


def test_verification_off_skips_checksums_and_probe(group, tiny_llama):
    model = perturbed(tiny_llama, seed=9)
    before = with_generation(group, verify_weights=False)
    try:
        group.sync_weights(ShiftedProbe(model, 1.0))  # a wrong probe is not even looked at
    finally:
        group.gen = before
    assert not group.last_sync.verified
    assert all("verify_s" not in e and "receive_checksum_s" not in e for e in group.last_sync.engines)
    with pytest.raises(RuntimeError, match="no verified sync"):
        group.verify()
    assert greedy_outputs(group, PROMPTS[:1]) == [greedy_hf(model, PROMPTS[0], 10)]


def _no_live_readback(worker):  # runs inside an engine's vLLM worker: reading the live weights back now fails
    def refuse():
        raise RuntimeError("live-parameter readback during a sync")

    worker.rlhf_checksum_pieces = refuse


def _live_readback_again(worker):
    del worker.rlhf_checksum_pieces


@pytest.mark.parametrize("transport", ["gloo", "object_store"])
def test_sync_checks_what_the_engines_received_not_a_second_pass_over_their_weights(group, tiny_llama, transport):
    """Checksums are computed while the buckets arrive: after an engine's first (full) check, a sync never reads the
    engine's live weights back (that pass cost 1.4 s of a 2.3 s sync on SmolLM2), yet every tensor is compared."""
    import ray

    group.sync_weights(ModelSource(perturbed(tiny_llama, seed=14)))  # the engines' first check has run by now
    ray.get([e.collective_rpc.remote(_no_live_readback) for e in group.engines])
    before = with_generation(group, sync_transport=transport)
    try:
        model = perturbed(tiny_llama, seed=15)
        group.sync_weights(ModelSource(model))
        report = group.last_sync
        assert report.verified and all(e["probe_max_diff"] < 1e-3 for e in report.engines)
        assert all(e["receive_checksum_s"] > 0 for e in report.engines)  # reported: the share of the load it took
        received = ray.get(group.engines[0].collective_rpc.remote("rlhf_received_checksums"))[0]
        assert received == report.checksums and len(received) == len(dict(lora_merged_parameters(model)))
        with pytest.raises(RuntimeError, match="live-parameter readback"):  # group.verify() still reads them back
            group.verify()
    finally:
        group.gen = before
        ray.get([e.collective_rpc.remote(_live_readback_again) for e in group.engines])
    assert engine_greedy(group, 1, PROMPTS) == [greedy_hf(model, p, 10) for p in PROMPTS]


def _corrupt_in_transit(worker):  # engine 1's process: the object store hands it one wrong value
    import rlhf_ray.weight_sync as ws

    original = ws.from_numpy

    def from_numpy(arr, dtype_name):
        t = original(arr, dtype_name)
        if t.dim() == 1:  # a norm weight
            t = t.clone()
            t[0] += 1e-3
        return t

    ws.from_numpy, ws._from_numpy = from_numpy, original


def _repair_transit(worker):
    import rlhf_ray.weight_sync as ws

    ws.from_numpy = ws._from_numpy


class LeavesOneOut(ModelSource):
    """A source that never sends one tensor (a learner whose export skips a parameter)."""

    def __init__(self, model, skip: str):
        super().__init__(model)
        self.skip = skip

    def push(self, sender, bucket_bytes):
        from rlhf_ray.weight_sync import close_sender

        named = [(n, t) for n, t in lora_merged_parameters(self.model) if n != self.skip]
        for bucket in iter_buckets(named, bucket_bytes):
            sender(bucket)
        return close_sender(sender.plan.sync_id)


def test_a_tensor_corrupted_in_transit_or_never_sent_fails_the_sync(group, tiny_llama):
    import ray

    model = perturbed(tiny_llama, seed=16)
    group.sync_weights(ModelSource(model))
    before = with_generation(group, sync_transport="object_store")
    try:
        ray.get(group.engines[1].collective_rpc.remote(_corrupt_in_transit))
        try:
            with pytest.raises(WeightSyncError, match=r"engine 1 .*checksum mismatch in model\.\S*norm\.weight"):
                group.sync_weights(ModelSource(model))
        finally:
            ray.get(group.engines[1].collective_rpc.remote(_repair_transit))
        skip = "model.layers.1.post_attention_layernorm.weight"
        with pytest.raises(WeightSyncError, match=rf"engine parameters with no learner tensor: \['{skip}'\]"):
            group.sync_weights(LeavesOneOut(model, skip))
        assert -1 in group.engine_versions()  # no engine claims a version it failed
        group.sync_weights(ModelSource(model))
    finally:
        group.gen = before
    assert group.engine_versions() == [group.weight_version] * 2


def test_lora_model_syncs_merged(group, tiny_llama):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(perturbed(tiny_llama, seed=10), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    group.sync_weights(ModelSource(model))
    assert group.last_sync.verified
    merged = model.merge_and_unload().eval()
    assert greedy_outputs(group, PROMPTS) == [greedy_hf(merged, p, 10) for p in PROMPTS]


# ---------------------------------------------------------------------------------------------- architectures
@pytest.fixture(scope="module")
def tiny_bloom(tmp_path_factory) -> str:
    """A tiny BLOOM with tied embeddings, as bigscience/bloom (the BLOOM-176B launcher's model)."""
    from rlhf_ray.models.tiny import build_tiny_model

    return str(build_tiny_model("bloom", tmp_path_factory.mktemp("tiny_bloom") / "bloom", seed=0, tie_embeddings=True))


def stale_k_bucket(family: str, old, new) -> tuple[str, list]:
    """Every tensor of layer 0's QKV layer (vLLM reloads a layer once all of them arrive) with the new values, except
    K, left at the old ones; and the name of the HF tensor that holds K (fused with Q and V where the checkpoint
    fuses them)."""
    name = {"llama": "model.layers.0.self_attn.k_proj.weight", "opt": "model.decoder.layers.0.self_attn.k_proj.weight",
            "gpt2": "transformer.h.0.attn.c_attn.weight",  # Conv1D (in, out): columns [q | k | v]
            "bloom": "transformer.h.0.self_attention.query_key_value.weight"}[family]  # rows (head, q|k|v, head_dim)
    module = name.rsplit(".", 1)[0]
    layer = {module.replace("k_proj", part) for part in ("q_proj", "k_proj", "v_proj")}
    old_t, stale = old.state_dict()[name], new.state_dict()[name].clone()
    if family == "gpt2":
        h = stale.shape[0]
        stale[:, h:2 * h] = old_t[:, h:2 * h]
    elif family == "bloom":
        heads = new.config.n_head
        stale.view(heads, 3, -1)[:, 1] = old_t.view(heads, 3, -1)[:, 1]
    else:
        stale = old_t.clone()
    bucket = [(n, stale if n == name else t.detach().clone()) for n, t in new.state_dict().items()
              if n.rsplit(".", 1)[0] in layer]
    assert len(bucket) == {"llama": 3, "opt": 6, "gpt2": 2, "bloom": 2}[family]  # with the biases
    return name, bucket


@pytest.mark.parametrize("layout", ["concat", "per_head"])
def test_fused_qkv_layouts_map_tp_shards_back_to_the_hf_tensor(layout):
    """GPT-2's c_attn (Conv1D, [q|k|v]) and BLOOM's query_key_value (per head) as vLLM's own load_weights rewrites
    them (gpt2.py `_transpose_conv1d`, bloom.py `_repack_qkv`), cut into the rows each of 2 TP ranks holds: the
    pieces tile the HF tensor and add up to its checksum; a K slice changed on one rank changes it."""
    from types import SimpleNamespace

    from vllm.model_executor.models.bloom import BloomModel
    from vllm.model_executor.models.gpt2 import GPT2Model

    from rlhf_ray.vllm_worker_ext import _fused_qkv

    heads, hs, hidden, tp = 4, 8, 32, 2
    torch.manual_seed(0)
    if layout == "concat":
        name, hf = "h.0.attn.c_attn.weight", torch.randn(hidden, 3 * heads * hs)  # (in, out)
        (_, vllm_full), = GPT2Model._transpose_conv1d(None, [(name, hf)])
    else:
        name, hf = "h.0.self_attention.query_key_value.weight", torch.randn(3 * heads * hs, hidden)
        fake = SimpleNamespace(config=SimpleNamespace(num_attention_heads=heads))
        (_, vllm_full), = BloomModel._repack_qkv(fake, [(name, hf)])
    block, local = heads * hs, heads * hs // tp

    def shard(full, rank):  # QKVParallelLinear: rank r holds its heads of q, then of k, then of v
        return torch.cat([full[j * block + rank * local:j * block + (rank + 1) * local] for j in range(3)])

    def checksum(full):
        parts = lambda rank: [(local, rank * local, block)] * 3  # noqa: E731  (rows, global start, full rows)
        pieces = [p for r in range(tp) for p in _fused_qkv(shard(full, r), name, parts(r), layout, hs,
                                                             transposed=layout == "concat")]
        return combine_pieces(pieces)[name]

    assert checksum(vllm_full) == (tuple(hf.shape), tensor_checksum(hf))
    stale = vllm_full.clone()
    stale[block + local + 3, 5] += 1.0  # one element of K on rank 1
    assert checksum(stale)[1] != tensor_checksum(hf)


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2", "bloom"])
def test_verified_sync_for_every_architecture(request, ray_cluster, tiny_models, tiny_bloom, family):
    """Each architecture the launchers name (Llama, OPT, BLOOM) and the built-in GPT-2 syncs verified into a real vLLM
    engine (BLOOM's ALiBi attention runs on vLLM's CPU backend): the checksums cover exactly the learner's state dict
    (a tied head counted once, under the embedding's name), fused layers are mapped back to HF layout (GPT-2's
    transposed [q|k|v] c_attn, BLOOM's per-head query_key_value), and a K slice left stale inside a fused tensor,
    everything else new, fails verification naming that tensor."""
    import ray
    from transformers import AutoModelForCausalLM

    from rlhf_ray.generator import GeneratorGroup

    path = tiny_bloom if family == "bloom" else tiny_models[family]
    if family == "llama":
        group = request.getfixturevalue("group")  # this module's engines (tiny Llama): no extra start-up
        before = with_generation(group, sync_transport="object_store")
    else:
        cfg = load_config(None, {"ray.address": "local", "generation.max_model_len": 256,
                                 "generation.max_restarts": 0, "generation.sync_transport": "object_store"})
        group = GeneratorGroup(cfg, path, precision="fp32")
    try:
        model = perturbed(path, seed=40)
        group.sync_weights(ModelSource(model))
        assert group.last_sync.verified and all(e["probe_max_diff"] < 1e-3 for e in group.last_sync.engines)
        assert engine_greedy(group, 0, PROMPTS) == [greedy_hf(model, p, 10) for p in PROMPTS]
        state = model.state_dict(keep_vars=True)
        first = {}  # a tied tensor counts once, under the first name (lm_head.weight = word_embeddings.weight)
        for name, t in state.items():
            first.setdefault(id(t), name)
        live = ray.get(group.engines[0].checksums.remote())
        assert set(live) == set(first.values()) == set(group.last_sync.checksums)
        assert (family == "bloom") == (len(first) < len(state))

        original = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        name, bucket = stale_k_bucket(family, original, model)

        def reload_layer(worker, bucket):  # through vLLM's own reload path, as a sync that missed K would leave it
            worker.rlhf_begin_update()
            worker.rlhf_load_bucket(bucket)
            worker.rlhf_finish_update()

        ray.get(group.engines[0].collective_rpc.remote(reload_layer, (bucket,)))
        with pytest.raises(WeightSyncError) as caught:
            group.verify()
        assert f"checksum mismatch in {name} " in str(caught.value), str(caught.value)
        if family == "llama":  # leave the shared engines on a verified version for the next tests
            group.sync_weights(ModelSource(model))
    finally:
        if family == "llama":
            group.gen = before
        else:
            group.shutdown()


# ---------------------------------------------------------------------------------------------- channels
def test_consecutive_syncs_reuse_one_transfer_group(group, tiny_llama):
    """The learner -> engines group is built once and kept: a second sync from the same sender to the same engine
    processes reuses it (driver, sender and every engine say so) and still verifies. (An engine restart rebuilds it:
    tests/test_generator.py::test_killed_engine_is_restarted_resynced_and_its_prompts_redispatched.)"""
    reports = []
    for seed in (12, 13):
        model = perturbed(tiny_llama, seed=seed)
        group.sync_weights(ModelSource(model))
        reports.append(group.last_sync)
    first, second = reports
    assert first.transport == second.transport == "gloo" and first.channel
    assert second.verified and second.channel == first.channel and not second.new_channel
    assert second.sender["new_group"] is False  # the sender's end was kept ...
    assert [e["transfer_groups"] for e in second.engines] == [e["transfer_groups"] for e in first.engines]  # ... theirs
    assert greedy_outputs(group, PROMPTS) == [greedy_hf(model, p, 10) for p in PROMPTS]


def test_learner_source_sends_gpu_transports_from_the_device(ray_cluster):
    """The CPU-side decision behind the GPU path: a learner exports host copies only for the host transports; for
    nccl / ipc its gathered buckets stay where they are (export_params(to_cpu=False)). A stand-in group records it."""
    import ray

    from rlhf_ray.weight_sync import BucketSender, LearnerSource, SyncPlan

    class Rank0:
        class apply:  # noqa: N801 (an actor method's .remote)
            @staticmethod
            def remote(fn, sync_id):
                return ray.put({"buckets": 0})

    class Group:
        workers = [Rank0()]

        def run(self, method, *args, **kwargs):
            self.call = (method, kwargs)

    for transport, to_cpu in (("object_store", True), ("gloo", True), ("nccl", False), ("ipc", False)):
        g = Group()
        LearnerSource(g).push(BucketSender(SyncPlan(1, transport, "float32", 1 << 20)), 1 << 20)
        assert g.call == ("export_params", {"to_cpu": to_cpu}), transport


# ---------------------------------------------------------------------------------------------- learner
def test_sync_from_zero3_learner_after_an_optimizer_step(group, tiny_llama, tmp_path):
    """The sender is a real 2-rank ZeRO-3 learner group (DeepSpeed, gloo) after one optimizer step; rank 0 streams
    buckets to both engines over a standalone gloo group while rank 1 gathers alongside."""
    from transformers import AutoModelForCausalLM

    from rlhf_ray.learner import PolicyGroup

    cfg = load_config(None, {
        "ray.address": "local", "run.seed": 0, "models.actor.path": tiny_llama,
        "placement.actor": {"num_workers": 2, "cpus_per_worker": 0.25}, "ppo.mini_batch_size": 4,
        "ppo.actor.deepspeed.zero_stage": 3, "ppo.actor.deepspeed.micro_batch_size": 2,
        "ppo.actor.deepspeed.precision": "fp32", "ppo.actor.optim.lr": 1e-2, "ppo.actor.optim.lr_schedule": "constant"})
    learner = PolicyGroup(cfg)
    try:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, 500, (4, 12), generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                 "action_mask": torch.ones(4, 11, dtype=torch.long)}
        old = learner.logprobs(batch)
        stats = learner.train({**batch, "old_logprobs": old, "advantages": torch.ones(4, 11)})
        assert stats["optimizer_steps"] == 1
        version_before = group.weight_version
        before = with_generation(group, sync_transport="gloo", sync_bucket_mb=0.1)
        try:
            version = group.sync_weights(learner)  # a learner group is wrapped in a LearnerSource
        finally:
            group.gen = before
        report = group.last_sync
        assert version == version_before + 1 and report.verified and report.buckets > 3
        assert group.engine_versions() == [version, version]
        exported = AutoModelForCausalLM.from_pretrained(learner.save_pretrained(str(tmp_path / "hf")),
                                                        dtype=torch.float32).eval()
        original = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
        expected = [greedy_hf(exported, p, 10) for p in PROMPTS]
        assert expected != [greedy_hf(original, p, 10) for p in PROMPTS]  # the step moved the weights
        for engine in (0, 1):
            assert engine_greedy(group, engine, PROMPTS) == expected
        # The probe was scored by the learner group itself (its logprobs) and matched every engine.
        assert all(e["probe_max_diff"] < 1e-3 for e in report.engines)
    finally:
        learner.shutdown()


def test_engine_without_restarts_left_is_dropped_and_its_prompts_served_elsewhere(group, tiny_llama):
    """generation.max_restarts 0 (this module's group): a killed engine stays dead; the group notices, counts its
    prompts as re-dispatched and serves them on the other engine, and the next weight sync builds a new transfer
    group of the engine left. (Restarts: tests/test_generator.py.)"""
    import ray

    from rlhf_ray.generator import Sampling

    group.sync_weights(ModelSource(perturbed(tiny_llama, seed=14)))
    both = group.last_sync.channel
    # 48 tokens: engine 1 is still generating when the kill lands (a few tokens may finish first)
    pending = group.generate_async(PROMPTS * 2, Sampling(temperature=0.0, max_new_tokens=48, ignore_eos=True))
    ray.kill(group.engines[1], no_restart=False)  # a crash: Ray would restart it if max_restarts allowed
    rollout = pending.result()
    assert [s.prompt_index for s in rollout.samples] == list(range(6))
    assert rollout.redispatched == 3 and rollout.engine_prompts == {0: 6}
    assert group.alive == [True, False] and group.restarts == [0, 0]
    assert group.generate(PROMPTS, Sampling(temperature=0.0, max_new_tokens=4)).engine_prompts == {0: 3}
    group.sync_weights(ModelSource(perturbed(tiny_llama, seed=15)))
    report = group.last_sync
    assert report.new_channel and report.channel != both and [e["engine"] for e in report.engines] == [0]
    assert report.verified


# ---------------------------------------------------------------------------------------------- GPU paths
@pytest.mark.gpu
def test_cuda_ipc_sync_into_an_engine_on_the_same_gpu(ray_cluster, tiny_llama):
    """Sender (this process) and engine share the GPU: CUDA IPC handles through vLLM's IPC weight-transfer engine, set
    up once and reused by the next sync."""
    from rlhf_ray.generator import GeneratorGroup

    cfg = load_config(None, {"ray.address": "local", "generation.sync_transport": "ipc",
                             "models.actor.dtype": "float32",
                             "generation.gpu_memory_utilization": 0.3, "placement.generator.gpus_per_worker": 1,
                             "generation.max_model_len": 256})
    g = GeneratorGroup(cfg, tiny_llama)
    try:
        model = perturbed(tiny_llama, seed=30).cuda()
        g.sync_weights(ModelSource(model))
        first = g.last_sync
        assert first.transport == "ipc" and first.verified and first.new_channel
        assert greedy_outputs(g, PROMPTS) == [greedy_hf(model, p, 10) for p in PROMPTS]
        model = perturbed(tiny_llama, seed=31).cuda()
        g.sync_weights(ModelSource(model))
        second = g.last_sync
        assert second.verified and second.channel == first.channel and not second.new_channel
        assert [e["transfer_groups"] for e in second.engines] == [1]  # the transfer engine was not set up again
        assert greedy_outputs(g, PROMPTS) == [greedy_hf(model, p, 10) for p in PROMPTS]
    finally:
        g.shutdown()


@pytest.mark.gpu
def test_nccl_sync_from_a_learner_on_another_gpu(ray_cluster, tiny_llama):
    """A 1-rank ZeRO-3 learner on one GPU broadcasts over NCCL (vLLM's NCCL weight-transfer engine) to an engine on
    another GPU; the NCCL group is created by the first sync and reused by the next."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs: NCCL does not connect two ranks on one device")
    from transformers import AutoModelForCausalLM

    from rlhf_ray.generator import GeneratorGroup
    from rlhf_ray.learner import PolicyGroup

    cfg = load_config(None, {
        "ray.address": "local", "models.actor.path": tiny_llama, "models.actor.dtype": "bfloat16",
        "generation.sync_transport": "nccl", "generation.gpu_memory_utilization": 0.3,
        "generation.max_model_len": 256, "placement.generator.gpus_per_worker": 1,
        "placement.actor": {"num_workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 1}, "ppo.mini_batch_size": 2,
        "placement.critic.num_workers": 1, "ppo.actor.deepspeed.zero_stage": 3,
        "ppo.actor.deepspeed.micro_batch_size": 2})
    learner = PolicyGroup(cfg)
    g = GeneratorGroup(cfg, tiny_llama)
    try:
        g.sync_weights(learner)
        first = g.last_sync
        assert first.transport == "nccl" and first.verified and first.new_channel and first.sender["new_group"]
        g.sync_weights(learner)
        second = g.last_sync
        assert second.verified and second.channel == first.channel and not second.new_channel
        assert second.sender["new_group"] is False and [e["transfer_groups"] for e in second.engines] == [1]
        exported = AutoModelForCausalLM.from_pretrained(learner.save_pretrained("/tmp/rlhf_ray_nccl_test"),
                                                        dtype=torch.bfloat16).cuda().eval()
        assert greedy_outputs(g, PROMPTS[:1], 4) == [greedy_hf(exported, PROMPTS[0], 4)]
    finally:
        g.shutdown()
        learner.shutdown()


class DeviceRecorder(BucketSender):
    """A sender that notes, in the learner's process, on which device each bucket arrives."""

    def __call__(self, bucket):
        import builtins

        builtins.rlhf_ray_bucket_devices = getattr(builtins, "rlhf_ray_bucket_devices", []) + \
            [t.device.type for _, t in bucket]
        super().__call__(bucket)


@pytest.mark.gpu
def test_gpu_sync_keeps_buckets_and_checksums_on_the_device(ray_cluster, tiny_llama):
    """A GPU transport sends from the device: LearnerSource has the learner's gathered buckets stay on its GPU (no
    copy to the host and back) and the sender checksums them there, equal to the host definition."""
    from transformers import AutoModelForCausalLM

    from rlhf_ray.learner import PolicyGroup
    from rlhf_ray.weight_sync import LearnerSource, SyncPlan, checksum_on_device

    t = torch.randn(300, 70)
    on_device = checksum_on_device(t.cuda(), t.shape)
    assert on_device.device.type == "cuda" and int(on_device) & CHECKSUM_MASK == tensor_checksum(t)

    cfg = load_config(None, {
        "ray.address": "local", "models.actor.path": tiny_llama,
        "placement.actor": {"num_workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 1}, "ppo.mini_batch_size": 2,
        "placement.critic.num_workers": 1, "ppo.actor.deepspeed.zero_stage": 3, "ppo.actor.deepspeed.micro_batch_size": 2,
        "ppo.actor.deepspeed.precision": "fp32"})
    learner = PolicyGroup(cfg)
    try:  # ipc with no engines: the sender's whole path on the learner's GPU, nothing to receive
        plan = SyncPlan(1, "ipc", "float32", 1 << 20, engines=[])
        stats = LearnerSource(learner).push(DeviceRecorder(plan), plan.bucket_bytes)
        [devices] = learner.apply(lambda worker: __import__("builtins").rlhf_ray_bucket_devices)
        assert len(devices) > 0 and set(devices) == {"cuda"}
        original = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
        assert stats["checksums"] == {n: (tuple(p.shape), tensor_checksum(p.detach()))
                                      for n, p in original.named_parameters()}  # read back once, as host integers
    finally:
        learner.shutdown()

