"""Attention in CPU bf16 training: torch's sdpa in bf16 vs rlhf_ray's sdpa_fp32 (models/attention.py).

    flock /tmp/rlhf_ray_heavy.lock .venv/bin/python benchmarks/bench_attention.py [--pairs 3] [--threads 2]

Not a test. Each training step is timed in wall seconds and in this process's CPU seconds (time.process_time, all
threads): on a shared host the hypervisor's stolen time inflates the first, not the second. Two measurements, each side by side in one process, the two variants interleaved (A B A B ...) so that
a machine whose speed drifts (shared hosts) slows both alike; medians and the ratio bf16 / fp32-backward:
  1. the op alone: scaled_dot_product_attention forward + backward on SmolLM2-135M's shapes in the GRPO bench
     (16 rows x 9 heads x 76 tokens x 64, causal + left padding mask), and forward only (no_grad);
  2. one PPO training step of bench_ppo_learner.py's bare loop (SmolLM2, 16 x (40 + 32) tokens, k3 KL in the loss,
     autocast bf16 over fp32 weights, fused AdamW), the model switched between attn_implementation "sdpa" and
     "sdpa_fp32" before each step.
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

from rlhf_ray.models.attention import NAME, use_fp32_attention  # noqa: E402


def op_times(reps: int = 8, calls: int = 5) -> dict[str, float]:
    b, h, t, d = 16, 9, 76, 64
    q, k, v = (torch.randn(b, h, t, d, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    mask = torch.ones(t, t, dtype=torch.bool).tril()[None, None] & (torch.arange(t) >= 4)[None, None, None, :]
    mask[..., 0] |= ~mask.any(-1)  # no row without a key

    def bf16():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def fp32():
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask).to(torch.bfloat16)

    out: dict[str, list[float]] = {}
    for _ in range(reps):
        for name, f in (("bf16", bf16), ("fp32", fp32)):
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


def step_times(pairs: int) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, dict]]:
    import bench_ppo_learner as bench
    from rlhf_ray import rl
    from rlhf_ray.learner import causal_logprobs, forward_accepts, policy_objective
    from rlhf_ray.models.loading import load_causal_lm, load_tokenizer

    args = argparse.Namespace(model="builtin:smollm2", precision="bf16", steps=pairs, sequences=16, group=4,
                              prompt_tokens=40, completion_tokens=32, workers=1, cpus=2, zero_stage=2)
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
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logprobs, entropy = causal_logprobs(model, batch, position_ids, "detached", keep, 1.0)
        loss, stats = policy_objective(p, logprobs.float(), entropy.float(), batch, bench.BETA, aggregation)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {k: float(v) for k, v in stats.items()}

    times: dict[str, list[float]] = {"sdpa": [], NAME: []}
    cpu_times: dict[str, list[float]] = {"sdpa": [], NAME: []}  # this process's CPU seconds: what a shared host's
    # stolen time (the hypervisor running others on our cores) does not inflate
    first: dict[str, dict] = {}
    one_step()  # warm-up
    for _ in range(pairs):
        for name in times:
            if name == "sdpa":
                model.set_attn_implementation("sdpa")
            else:
                use_fp32_attention(model)
            start, cpu = time.perf_counter(), time.process_time()
            stats = one_step()
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu)
            first.setdefault(name, stats)
    return times, cpu_times, first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=3, help="timed training steps per variant, interleaved")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, {args.threads} threads")
    ops = op_times()
    print("\n| sdpa on SmolLM2's shapes | bf16 ms | fp32 ms | ratio bf16 / fp32 |\n|---|---|---|---|")
    for kind in ("forward+backward", "forward"):
        bf, fp = ops[f"bf16 {kind}"], ops[f"fp32 {kind}"]
        print(f"| {kind} | {bf:.1f} | {fp:.1f} | {bf / fp:.2f} |")
    times, cpu_times, first = step_times(args.pairs)
    print(f"\n| PPO training step, SmolLM2 bf16 autocast | wall s/step (median of {args.pairs}) | steps | "
          f"CPU s/step (median) | steps |\n|---|---|---|---|---|")
    for name in times:
        print(f"| {name} | {statistics.median(times[name]):.2f} | {[round(t, 2) for t in times[name]]} | "
              f"{statistics.median(cpu_times[name]):.2f} | {[round(t, 2) for t in cpu_times[name]]} |")
    for label, table in (("wall", times), ("CPU", cpu_times)):
        print(f"ratio sdpa / {NAME}, {label} time: {statistics.median(table['sdpa']) / statistics.median(table[NAME]):.2f}")
    for name, stats in first.items():
        print(f"  {name} first timed step: policy_loss {stats['policy_loss']:.6f} kl_loss {stats['kl_loss']:.4f} "
              f"entropy {stats['entropy']:.5f}")


if __name__ == "__main__":
    main()
