"""Attention in CPU training: torch's sdpa vs rlhf_ray's CPU attention (models/attention.py), on SmolLM2's shapes.

    flock /tmp/rlhf_ray_heavy.lock .venv/bin/python benchmarks/bench_attention.py [--pairs 3] [--threads 2]
        [--keys 76 128 160] [--precision bf16]

Not a test. Each training step is timed in wall seconds and in this process's CPU seconds (time.process_time, all
threads): on a shared host the hypervisor's stolen time inflates the first, not the second. Side by side in one
process, the variants interleaved (A B C A B C ...) so that a machine whose speed drifts slows them alike; medians:
  1. the op alone, per key length (--keys; 76 is the GRPO bench's 40 + 32 tokens + padding): 16 rows x 9 query heads
     over 3 key-value heads x 64, causal + left padding mask, forward + backward and forward only (no_grad), for
     sdpa in the compute dtype ("sdpa"), sdpa on q, k, v upcast to fp32 ("sdpa fp32", models/attention.py's path for
     long keys in bf16) and models/attention.py's matmul path ("matmul", its path up to MATH_MAX_KEYS);
  2. one PPO training step of bench_ppo_learner.py's bare loop (SmolLM2, 16 x (40 + 32) tokens, k3 KL in the loss,
     autocast bf16 over fp32 weights or fp32, fused AdamW), the model switched before each step between
     attn_implementation "sdpa", rlhf_ray's attention with the matmul path off (MATH_MAX_KEYS 0: sdpa, in fp32 under
     bf16) and rlhf_ray's attention as shipped.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rlhf_ray.models.attention as attention  # noqa: E402
from rlhf_ray.models.attention import NAME, use_cpu_attention  # noqa: E402


def op_times(keys: int, dtype: torch.dtype, reps: int = 6, calls: int = 3) -> dict[str, float]:
    from rlhf_ray.models.attention import matmul_attention

    b, h, kv, t, d = 16, 9, 3, keys, 64
    q = torch.randn(b, h, t, d, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(b, kv, t, d, dtype=dtype, requires_grad=True) for _ in range(2))
    mask = torch.ones(t, t, dtype=torch.bool).tril()[None, None] & (torch.arange(t) >= 4)[None, None, None, :]
    mask[..., 0] |= ~mask.any(-1)  # no row without a key
    module = torch.nn.Module()
    module.is_causal = True
    repeat = lambda x: x.repeat_interleave(h // kv, dim=1)  # noqa: E731 -- transformers' repeat_kv before sdpa

    variants = {
        "sdpa": lambda: F.scaled_dot_product_attention(q, repeat(k), repeat(v), attn_mask=mask),
        "sdpa fp32": lambda: F.scaled_dot_product_attention(q.float(), repeat(k).float(), repeat(v).float(),
                                                            attn_mask=mask).to(dtype),
        "matmul": lambda: matmul_attention(module, q, k, v, mask),
    }
    out: dict[str, list[float]] = {}
    for _ in range(reps):
        for name, f in variants.items():
            for train in (True, False):
                start = time.perf_counter()
                for _ in range(calls):
                    if train:
                        f().float().sum().backward()
                    else:
                        with torch.no_grad():
                            f()
                key = f"{name} {'forward+backward' if train else 'forward'}"
                out.setdefault(key, []).append((time.perf_counter() - start) / calls * 1e3)
    return {key: statistics.median(v) for key, v in out.items()}


def step_times(pairs: int, precision: str) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, dict]]:
    import bench_ppo_learner as bench
    from rlhf_ray import rl
    from rlhf_ray.learner import causal_logprobs, forward_accepts, policy_objective
    from rlhf_ray.models.loading import load_causal_lm, load_tokenizer

    args = argparse.Namespace(model="builtin:smollm2", precision=precision, steps=pairs, sequences=16, group=4,
                              prompt_tokens=40, completion_tokens=32, workers=1, cpus=2, zero_stage=2,
                              layout="separate")
    cfg = bench.make_config(args, tempfile.mkdtemp(prefix="bench_attention_"))
    batch = bench.experience_batch(args, *(lambda tok: (len(tok), tok.pad_token_id))(load_tokenizer(cfg.models.actor)))
    torch.manual_seed(cfg.run.seed)
    model = load_causal_lm(cfg.models.actor, dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.ppo.actor.optim.lr, fused=True)
    position_ids, keep = forward_accepts(model, "position_ids"), forward_accepts(model, "logits_to_keep")
    p = cfg.ppo
    aggregation = rl.Aggregation(p.loss_aggregation, units=float(rl.aggregation_units(batch["action_mask"],
                                                                                   p.loss_aggregation)),
                                 max_len=args.completion_tokens)

    def one_step() -> dict:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logprobs, entropy = causal_logprobs(model, batch, position_ids, "detached", keep, 1.0)
        loss, stats = policy_objective(p, logprobs.float(), entropy.float(), batch, bench.BETA, aggregation)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {k: float(v) for k, v in stats.items()}

    shipped = dict(attention.MATH_MAX_KEYS)
    variants = {"sdpa": ("sdpa", shipped), f"{NAME}, matmul path off": (NAME, {}), NAME: (NAME, shipped)}
    times: dict[str, list[float]] = {name: [] for name in variants}
    cpu_times: dict[str, list[float]] = {name: [] for name in variants}  # this process's CPU seconds: what a shared
    # host's stolen time (the hypervisor running others on our cores) does not inflate
    first: dict[str, dict] = {}
    one_step()  # warm-up
    try:
        for _ in range(pairs):
            for name, (implementation, max_keys) in variants.items():
                if implementation == "sdpa":
                    model.set_attn_implementation("sdpa")
                else:
                    use_cpu_attention(model)
                attention.MATH_MAX_KEYS.clear()
                attention.MATH_MAX_KEYS.update(max_keys)
                start, cpu = time.perf_counter(), time.process_time()
                stats = one_step()
                times[name].append(time.perf_counter() - start)
                cpu_times[name].append(time.process_time() - cpu)
                first.setdefault(name, stats)
    finally:
        attention.MATH_MAX_KEYS.update(shipped)
    return times, cpu_times, first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=3, help="timed training steps per variant, interleaved")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keys", type=int, nargs="+", default=[76, 128, 160], help="sequence lengths of the op rows")
    ap.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, {args.threads} threads, "
          f"{args.precision}; MATH_MAX_KEYS {attention.MATH_MAX_KEYS}")
    print("\n| keys | pass | sdpa ms | sdpa fp32 ms | matmul ms | sdpa / matmul |\n|---|---|---|---|---|---|")
    for keys in args.keys:
        ops = op_times(keys, dtype)
        for kind in ("forward+backward", "forward"):
            sdpa, fp32, matmul = (ops[f"{name} {kind}"] for name in ("sdpa", "sdpa fp32", "matmul"))
            print(f"| {keys} | {kind} | {sdpa:.1f} | {fp32:.1f} | {matmul:.1f} | {sdpa / matmul:.2f} |")
    times, cpu_times, first = step_times(args.pairs, args.precision)
    print(f"\n| PPO training step, SmolLM2 {args.precision} | wall s/step (median of {args.pairs}) | steps | "
          f"CPU s/step (median) | steps |\n|---|---|---|---|---|")
    for name in times:
        print(f"| {name} | {statistics.median(times[name]):.2f} | {[round(t, 2) for t in times[name]]} | "
              f"{statistics.median(cpu_times[name]):.2f} | {[round(t, 2) for t in cpu_times[name]]} |")
    for label, table in (("wall", times), ("CPU", cpu_times)):
        shipped = statistics.median(table[NAME])
        print(f"ratio x / {NAME}, {label} time: " + ", ".join(
            f"{name} {statistics.median(t) / shipped:.2f}" for name, t in table.items() if name != NAME))
    for name, stats in first.items():
        print(f"  {name} first timed step: policy_loss {stats['policy_loss']:.6f} kl_loss {stats['kl_loss']:.4f} "
              f"entropy {stats['entropy']:.5f}")


if __name__ == "__main__":
    main()
