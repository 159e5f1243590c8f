"""Issue 13, point 1: the driver decides nothing for the workers.

Every device, dtype, backend and weight-sync transport is chosen inside the process that uses it (env.choose_device,
env.resolve_precision); each worker reports its choice (describe()) and the driver only checks agreement
(env.check_agreement). One key, ppo.actor.deepspeed.precision, decides the precision of every PPO model.
"""
from __future__ import annotations

import sys

import pytest
import ray
import torch

from rlhf_ray.config import ConfigError, load_config, ppo_precision
from rlhf_ray import env
from rlhf_ray.env import (DeviceMismatchError, auto_precision, check_agreement, choose_device, parse_cpu_flags,
                          precision_dtype, resolve_precision, worker_env_vars)
from rlhf_ray.weight_sync import default_probe_atol

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import test modules


# ------------------------------------------------------------------------------------------- pure logic
SAPPHIRE_RAPIDS = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw amx_bf16 amx_tile amx_int8\n"
ZEN4 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_bf16\n"
SKYLAKE = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni\n"  # AVX-512, bf16 only emulated
GRAVITON = "processor\t: 0\nFeatures\t: fp asimd bf16\n"  # aarch64: no 'flags' line, not detected


def test_precision_auto_is_bf16_where_the_hardware_has_it():
    """auto: bf16 on GPU and on a CPU with native bf16 matmul (AMX or AVX-512 BF16), fp32 on a CPU without."""
    assert parse_cpu_flags(ZEN4) == {"fpu", "sse2", "avx2", "avx512f", "avx512bw", "avx512_bf16"}
    assert auto_precision("cpu", parse_cpu_flags(SAPPHIRE_RAPIDS)) == auto_precision("cpu", parse_cpu_flags(ZEN4)) \
        == "bf16"
    for cpu in (SKYLAKE, GRAVITON, ""):
        assert auto_precision("cpu", parse_cpu_flags(cpu)) == "fp32", cpu
    assert auto_precision("cuda", frozenset()) == "bf16"


def test_precision_auto_is_resolved_with_this_workers_own_cpu_flags(monkeypatch):
    for cpu, expected in ((ZEN4, "bf16"), (SKYLAKE, "fp32")):
        monkeypatch.setattr(env, "cpu_flags", lambda: parse_cpu_flags(cpu))
        assert resolve_precision("auto", "cpu") == expected and resolve_precision("auto", "cuda") == "bf16"
        assert precision_dtype("auto", "cpu") == {"bf16": "bfloat16", "fp32": "float32"}[expected]
        assert resolve_precision("bf16", "cpu") == "bf16" and resolve_precision("fp32", "cuda") == "fp32"  # explicit


def test_amx_is_requested_where_the_cpu_lists_it():
    """vLLM's bf16 CPU attention runs AMX instructions without asking Linux for the AMX tile state; unless the
    process asked (env.request_amx, done by every engine before vLLM starts), its first forward dies of SIGILL
    (seen 2026-12-03, kernel 6.18). Asked only where the CPU lists amx_tile."""
    assert env.request_amx(parse_cpu_flags(ZEN4)) is False and env.request_amx(frozenset()) is False  # no syscall
    if "amx_tile" in env.cpu_flags():
        assert env.request_amx() is True and env.request_amx(parse_cpu_flags(SAPPHIRE_RAPIDS)) is True


def test_vllm_cpu_attention_never_uses_its_amx_kernel():
    """vLLM's AMX attention kernel answered garbage on this project's AMX machines (vllm_worker_ext.
    use_vector_cpu_attention; end to end: test_chat's greedy SmolLM2 bf16 says "Paris" only without it). The wrapper
    turns its choice into the vector kernel and leaves every other choice alone."""
    from vllm.v1.attention.backends import cpu_attn

    from rlhf_ray.vllm_worker_ext import use_vector_cpu_attention

    use_vector_cpu_attention()
    wrapped = cpu_attn._get_attn_isa
    use_vector_cpu_attention()  # idempotent: wraps once
    assert cpu_attn._get_attn_isa is wrapped and wrapped.avoids_amx
    assert cpu_attn._get_attn_isa(torch.bfloat16, 128, 64) != "amx"
    assert cpu_attn._get_attn_isa(torch.float32, 128, 64) == "vec"
    assert cpu_attn._get_attn_isa(torch.bfloat16, 128, 16) == "vec16"


@pytest.mark.parametrize("overrides, keys", [
    ({"models.actor.dtype": "bfloat16", "ppo.actor.deepspeed.precision": "fp32"},
     ("models.actor.dtype", "ppo.actor.deepspeed.precision")),
    ({"models.reward.dtype": "float16", "ppo.actor.deepspeed.precision": "bf16"},
     ("models.reward.dtype", "ppo.actor.deepspeed.precision")),
    ({"ppo.critic.deepspeed.precision": "bf16", "ppo.actor.deepspeed.precision": "fp32"},
     ("ppo.critic.deepspeed.precision", "ppo.actor.deepspeed.precision")),
])
def test_an_explicit_dtype_that_differs_from_the_precision_is_a_config_error(overrides, keys):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert all(k in str(err.value) for k in keys), str(err.value)


def test_one_key_decides_the_precision_of_every_ppo_model():
    assert ppo_precision(load_config(None, {})) == "auto"
    assert ppo_precision(load_config(None, {"ppo.actor.deepspeed.precision": "bf16"})) == "bf16"
    # restating the same precision is fine; 'auto' dtypes and the critic's 'auto' follow the actor's key
    cfg = load_config(None, {"ppo.actor.deepspeed.precision": "fp32", "models.actor.dtype": "float32"})
    assert ppo_precision(cfg) == "fp32"
    from rlhf_ray.config import ppo_learner

    assert ppo_learner(cfg, "critic").deepspeed.precision == "fp32" and cfg.ppo.critic.deepspeed.precision == "auto"


def _report(role, rank=0, device="cpu", backend="gloo", dtype="float32", transport=None):
    return {"role": role, "rank": rank, "device": device, "backend": backend, "dtype": dtype, "transport": transport}


def test_agreement_check_names_the_roles_that_disagree():
    ok = [_report("actor", 0), _report("actor", 1), _report("reward", dtype=None),
          _report("generator", backend=None, transport="gloo")]
    assert "actor x2 cpu/gloo/float32" in check_agreement(ok)
    with pytest.raises(DeviceMismatchError, match=r"bfloat16: generator\[0\].*ppo.actor.deepspeed.precision"):
        check_agreement([_report("actor"), _report("generator", backend=None, dtype="bfloat16", transport="gloo")])
    with pytest.raises(DeviceMismatchError, match=r"ranks of critic disagree on device"):
        check_agreement([_report("critic", 0), _report("critic", 1, device="cuda", backend="nccl")])
    with pytest.raises(DeviceMismatchError, match=r"transport nccl.*sender actor\[0\] is on cpu"):
        check_agreement([_report("actor"), _report("generator", device="cuda", backend=None, transport="nccl")])
    with pytest.raises(DeviceMismatchError, match=r"different weight-sync transports"):
        check_agreement([_report("generator", 0, transport="gloo"), _report("generator", 1, transport="object_store")])


def test_probe_tolerance_follows_the_dtypes_in_use_on_both_ends():
    assert default_probe_atol("float32", "float32") == 1e-3
    assert default_probe_atol("float32", "float16") == 0.1 == default_probe_atol("float16", "float16")
    # bf16 rounds logits to 8 significant bits: SmolLM2's probe differs by ~0.3 with right weights, > 1.6 with stale
    assert default_probe_atol("bfloat16", "bfloat16") == 1.0 == default_probe_atol("float32", "bfloat16")
    assert default_probe_atol("float32", None) == 1.0  # unknown: the loosest


def test_no_device_choice_is_shipped_to_the_workers(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert "DS_ACCELERATOR" not in worker_env_vars()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "DS_ACCELERATOR" not in worker_env_vars()


def test_workers_keep_their_heap_unless_the_user_set_the_allocator(monkeypatch):
    for key in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TOP_PAD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(key, raising=False)
    env = worker_env_vars()
    assert int(env["MALLOC_TRIM_THRESHOLD_"]) >= 1 << 30 and int(env["MALLOC_MMAP_THRESHOLD_"]) == 32 << 20
    assert env["MALLOC_MMAP_MAX_"] == "0"  # blocks above glibc's 32 MiB threshold cap stay in the heap too
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")  # the user's own choice is shipped as is
    assert worker_env_vars()["MALLOC_TRIM_THRESHOLD_"] == "131072"


# ------------------------------------------------------------------------------------------ real workers
def _choice_in_a_zero_gpu_actor():
    """In a Ray worker without a GPU whose node has CUDA (faked here) and an inherited DS_ACCELERATOR=cuda."""
    import os

    torch.cuda.is_available = lambda: True
    return choose_device(), os.environ["DS_ACCELERATOR"]


def test_a_ray_worker_without_a_gpu_of_its_own_uses_the_cpu(ray_cluster):
    # Ray 2.60 leaves CUDA_VISIBLE_DEVICES alone for zero-GPU actors: they would see every GPU of their node.
    fn = ray.remote(num_cpus=0, max_calls=1,  # the worker exits after: the patched torch leaves with it
                    runtime_env={"env_vars": {"DS_ACCELERATOR": "cuda"}})(_choice_in_a_zero_gpu_actor)
    assert ray.get(fn.remote(), timeout=120) == ("cpu", "cpu")


def test_a_gpu_driver_decides_nothing_for_cpu_workers(ray_cluster, tiny_llama, tiny_value_model, tmp_path,
                                                      monkeypatch):
    """The driver believes it has CUDA (a GPU head); every worker still chooses CPU / gloo and its CPU's own dtype
    (bfloat16 where the CPU has native bf16, else float32) for itself, and the weight sync runs over the transport
    the engines chose. Before: NCCL engines and an NCCL sync."""
    from rlhf_ray.ppo import PPOTrainer
    from rlhf_ray.weight_sync import default_probe_atol

    cpu_dtype = precision_dtype("auto", "cpu")  # this machine's CPU, as the local workers see it

    cfg = load_config(None, {
        "ray.address": "local", "run.output_dir": str(tmp_path / "run"), "data.cache_dir": str(tmp_path / "data"),
        "data.max_prompt_len": 32, "models.actor.path": tiny_llama, "models.reward.path": tiny_value_model,
        "placement.actor.num_workers": 1, "placement.critic.num_workers": 1,
        "ppo.rollout_batch_size": 4, "generation.n_samples_per_prompt": 1, "ppo.mini_batch_size": 4,
        "ppo.actor.deepspeed.micro_batch_size": 4, "ppo.critic.deepspeed.micro_batch_size": 4,
        "generation.max_new_tokens": 4, "generation.kv_cache_gib": 1, "logging.tensorboard": False})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # in this (driver) process only
    trainer = PPOTrainer(cfg)
    try:
        assert [i["dtype"] for i in trainer.generators.info] == [cpu_dtype]
        reports = trainer.worker_reports()
        assert sorted(r["role"] for r in reports) == ["actor", "critic", "generator", "reference", "reward"]
        for r in reports:
            assert (r["device"], r["dtype"]) == ("cpu", cpu_dtype), r
            assert (r["transport"] if r["role"] == "generator" else r["backend"]) == "gloo", r
        stats = trainer.step()  # the sync runs over the engines' transport, checked at the dtype's tolerance
        assert trainer.generators.last_sync.transport == "gloo" and trainer.generators.last_sync.verified
        assert trainer.generators.probe_atol == default_probe_atol(cpu_dtype, cpu_dtype)
        assert stats["weight_version"] == 1
    finally:
        trainer.shutdown()


@pytest.mark.gpu
def test_an_engine_with_a_gpu_reports_cuda_bf16_and_nccl(ray_cluster, tiny_llama):
    """On a GPU node an engine given a GPU picks cuda / bfloat16 / nccl itself (vLLM's platform)."""
    from rlhf_ray.config import GenerationConfig
    from rlhf_ray.generator import start_engine
    from rlhf_ray.resources import ready_placement_group

    pg = ready_placement_group("generator", [{"CPU": 1, "GPU": 1}], timeout_s=60)
    engine = start_engine(tiny_llama, GenerationConfig(gpu_memory_utilization=0.2), placement_group=pg, gpus=1)
    try:
        report = ray.get(engine.describe.remote())
        assert (report["device"], report["dtype"], report["transport"]) == ("cuda", "bfloat16", "nccl")
    finally:
        ray.kill(engine)
        ray.util.remove_placement_group(pg)


@pytest.mark.gpu
def test_a_rank_with_a_gpu_picks_cuda_and_one_without_the_cpu_on_a_gpu_node(ray_cluster):
    """A rank with a GPU picks cuda / nccl, a rank without one the CPU (gloo), although CUDA is visible to it (Ray
    2.60 leaves CUDA_VISIBLE_DEVICES alone)."""
    from rlhf_ray.config import RoleResources
    from rlhf_ray.groups import DistributedWorker, ModelGroup

    for gpus, expected in ((1, ("cuda", "nccl")), (0, ("cpu", "gloo"))):
        group = ModelGroup("probe", DistributedWorker, 1, resources=RoleResources(1, 1.0, gpus))
        try:
            assert [(r["device"], r["backend"]) for r in group.reports] == [expected]
        finally:
            group.shutdown()
