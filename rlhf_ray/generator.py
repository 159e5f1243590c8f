"""Rollout generation: a vLLM engine hosted by a Ray actor in its own placement group.

The engine runs in-process inside the actor (VLLM_ENABLE_V1_MULTIPROCESSING=0, set by rlhf_ray.env): it starts
faster, uses less memory, and tensors handed to `collective_rpc` reach the worker by reference. On CPU each
engine is bound to its own cores through VLLM_CPU_OMP_THREADS_BIND (vLLM otherwise pins every engine to core 0)
and its KV cache is sized by VLLM_CPU_KVCACHE_SPACE; on GPU the bundle's GPU and gpu_memory_utilization do it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

from rlhf_ray.config import GenerationConfig


@dataclass
class Sample:
    """One generated continuation of one prompt."""

    prompt_index: int
    token_ids: list[int]
    logprobs: list[float]  # vLLM's log-prob of each sampled token (raw, before temperature)
    finish_reason: Optional[str]
    weight_version: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def sampling_params(gen: GenerationConfig, *, greedy: bool = False, seed: Optional[int] = None,
                    n: Optional[int] = None, ignore_eos: bool = False):
    from vllm import SamplingParams

    return SamplingParams(
        n=n or gen.n_samples_per_prompt,
        temperature=0.0 if greedy else gen.temperature,
        top_p=1.0 if greedy else gen.top_p,
        top_k=-1 if greedy else gen.top_k,
        max_tokens=gen.max_new_tokens,
        stop=gen.stop or None,
        logprobs=0,  # the sampled token's own log-prob
        seed=seed,
        ignore_eos=ignore_eos,  # exactly max_new_tokens: fixed-length comparisons and benchmarks
    )


class VLLMEngine:
    """Body of the generator actor: one vLLM engine (tensor_parallel_size workers)."""

    def __init__(self, model_path: str, gen: GenerationConfig, dtype: str = "float32", seed: int = 0,
                 tokenizer: Optional[str] = None):
        from vllm import LLM

        self.gen = gen
        self.weight_version = 0
        self.llm = LLM(model=model_path, tokenizer=tokenizer or model_path, dtype=dtype,
                       tensor_parallel_size=gen.tensor_parallel_size, max_model_len=gen.max_model_len,
                       enforce_eager=gen.enforce_eager, seed=seed,
                       gpu_memory_utilization=gen.gpu_memory_utilization,
                       enable_sleep_mode=gen.enable_sleep_mode and _cuda())

    def ready(self) -> dict:
        return {"pid": os.getpid(), "weight_version": self.weight_version,
                "omp_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND")}

    def generate(self, prompt_token_ids: list[list[int]], greedy: bool = False,
                 seeds: Optional[list[Optional[int]]] = None, n: Optional[int] = None,
                 ignore_eos: bool = False) -> list[Sample]:
        """Generate for token-id prompts; one Sample per (prompt, sample), in prompt order."""
        seeds = seeds or [None] * len(prompt_token_ids)
        params = [sampling_params(self.gen, greedy=greedy, seed=s, n=n, ignore_eos=ignore_eos) for s in seeds]
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_token_ids], params, use_tqdm=False)
        samples = []
        for index, out in enumerate(outputs):
            for completion in out.outputs:
                logprobs = [entry[tok].logprob for tok, entry in zip(completion.token_ids, completion.logprobs or [])]
                samples.append(Sample(index, list(completion.token_ids), logprobs, completion.finish_reason,
                                      self.weight_version))
        return samples


def _cuda() -> bool:
    from rlhf_ray.env import has_cuda

    return has_cuda()


def engine_env(gen: GenerationConfig, cpu_cores: Optional[str] = None) -> dict[str, str]:
    """Per-engine environment: KV cache size and, on CPU, which cores its OpenMP threads are bound to."""
    env = {"VLLM_CPU_KVCACHE_SPACE": str(max(1, round(gen.kv_cache_gib)))}
    if gen.tensor_parallel_size > 1 and cpu_cores is None:
        cpu_cores = "|".join(str(i % (os.cpu_count() or 1)) for i in range(gen.tensor_parallel_size))
    env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_cores or "nobind"
    return env


def start_engine(model_path: str, gen: GenerationConfig, *, placement_group, bundle_index: int = 0,
                 cpus: float = 1.0, gpus: float = 0.0, dtype: str = "float32", seed: int = 0,
                 cpu_cores: Optional[str] = None, max_restarts: int = 0):
    """Start one engine actor in `placement_group` and wait until its engine is up."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from rlhf_ray.env import worker_env_vars

    actor_cls = ray.remote(VLLMEngine)
    actor = actor_cls.options(
        num_cpus=cpus, num_gpus=gpus, max_restarts=max_restarts,
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group, placement_group_bundle_index=bundle_index),
        runtime_env={"env_vars": {**worker_env_vars(), **engine_env(gen, cpu_cores)}},
    ).remote(model_path, gen, dtype=dtype, seed=seed)
    ray.get(actor.ready.remote())
    return actor
