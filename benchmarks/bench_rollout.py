"""Benchmark rollout throughput: the generator group vs the same vLLM engine used bare, and 1 vs 2 engines.

    flock /tmp/rlhf_ray_heavy.lock .venv/bin/python benchmarks/bench_rollout.py [--model builtin:smollm2]
        [--prompts 32] [--prompt-len 32] [--new-tokens 32] [--repeats 2]

Not a test. Every run generates the same prompts (distinct random token ids, so no prefix-cache hits) with the
same sampling (temperature 1, fixed seeds, EOS ignored: exactly --new-tokens each) and counts generated tokens:
  bare       vllm.LLM in this process, no Ray, same engine arguments, this thread pinned to core 0 with one torch
             thread (what a one-core engine actor gets)
  group x1   GeneratorGroup, one engine actor bound to core 0
  group x2   GeneratorGroup, two engine actors bound to cores 0 and 1
The learner side is not involved: its size is fixed (none here) while the generator count changes, which is the
point — generation scales on its own. Best of --repeats after one warm-up call. Prints tokens/s and the ratios
group x1 / bare (goal >= 0.9) and group x2 / group x1.
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlhf_ray.config import load_config  # noqa: E402
from rlhf_ray.generator import GeneratorGroup, Sampling, bind_this_process, engine_env  # noqa: E402
from rlhf_ray.models.loading import resolve_model_path  # noqa: E402


def make_prompts(vocab: int, n: int, length: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(10, vocab, (n, length), generator=g).tolist()


def best_rate(run, repeats: int) -> float:
    run()  # warm-up
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = run()
        rates.append(tokens / (time.perf_counter() - start))
    return max(rates)


def bare_rate(cfg, path: str, prompts, sampling: Sampling, repeats: int) -> float:
    import os

    from vllm import LLM

    gen = cfg.generation
    os.environ.update(engine_env(gen, "0"))
    bind_this_process("0")
    llm = LLM(model=path, dtype="float32", max_model_len=gen.max_model_len, enforce_eager=gen.enforce_eager,
              seed=cfg.run.seed, gpu_memory_utilization=gen.gpu_memory_utilization)
    params = [sampling.to_vllm(seed=i) for i in range(len(prompts))]

    def run() -> int:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return sum(len(c.token_ids) for o in outs for c in o.outputs)

    rate = best_rate(run, repeats)
    del llm
    gc.collect()
    os.sched_setaffinity(0, range(os.cpu_count() or 1))  # the driver of the group runs below: unpin it
    return rate


def group_rate(cfg, path: str, prompts, sampling: Sampling, repeats: int, engines: int) -> float:
    cfg = load_config(None, {"ray.address": "local", "run.seed": cfg.run.seed, "generation.num_engines": engines,
                             "generation.max_model_len": cfg.generation.max_model_len,
                             "generation.cpu_cores": [str(i) for i in range(engines)]})
    group = GeneratorGroup(cfg, path, precision="fp32")
    seeds = list(range(len(prompts)))
    try:
        return best_rate(lambda: sum(len(s.token_ids) for s in group.generate(prompts, sampling, seeds).samples),
                         repeats)
    finally:
        group.shutdown()


def main() -> None:
    import ray

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="builtin:smollm2")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    path = resolve_model_path(args.model)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(path).vocab_size
    cfg = load_config(None, {"generation.max_model_len": args.prompt_len + args.new_tokens + 8})
    prompts = make_prompts(vocab, args.prompts, args.prompt_len)
    sampling = Sampling(temperature=1.0, max_new_tokens=args.new_tokens, ignore_eos=True)
    print(f"{args.model}: {args.prompts} prompts x {args.prompt_len} tokens, {args.new_tokens} new tokens each")
    bare = bare_rate(cfg, path, prompts, sampling, args.repeats)
    print(f"bare vLLM (this process, core 0):  {bare:8.1f} tokens/s")
    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    one = group_rate(cfg, path, prompts, sampling, args.repeats, engines=1)
    print(f"group, 1 engine (core 0):         {one:8.1f} tokens/s")
    two = group_rate(cfg, path, prompts, sampling, args.repeats, engines=2)
    print(f"group, 2 engines (cores 0, 1):    {two:8.1f} tokens/s")
    print(f"ratio group x1 / bare:   {one / bare:.2f}x  (goal >= 0.9)")
    print(f"ratio group x2 / group x1: {two / one:.2f}x  (2 engines, learner unchanged)")
    ray.shutdown()


if __name__ == "__main__":
    main()
