"""Benchmark GAE on a (2048 x 1024) batch: rlhf_ray.rl.gae_advantages vs the reverse-time loop.

    .venv/bin/python benchmarks/bench_gae.py [--batch 2048] [--seq 1024] [--repeats 5] [--device cpu|cuda] [--threads N]

Not a test: it prints timings (median of --repeats runs after one warm-up) and the ratio
naive-loop / vectorised, plus the largest difference between the two (float32). On a CPU shared
with other busy processes, multi-threaded matmuls slow down a lot; compare with --threads 1.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlhf_ray.rl import gae_advantages  # noqa: E402


def gae_reverse_loop(rewards, values, mask, gamma, lam):
    """The textbook implementation (DS-Chat / OpenRLHF): a Python loop over time, vectorised over batch."""
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    T = rewards.shape[1]
    last_gae = torch.zeros_like(rewards[:, 0])
    advantages_reversed = []
    for t in reversed(range(T)):
        next_values = values[:, t + 1] if t < T - 1 else 0.0
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        advantages_reversed.append(last_gae)
    advantages = torch.stack(advantages_reversed[::-1], dim=1) * mask
    return advantages, (advantages + values) * mask


def median_seconds(fn, repeats, device):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--gamma", type=float, default=1.0)
    parser.add_argument("--lam", type=float, default=0.95)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(args.batch, args.seq, generator=g).to(device)
    values = torch.randn(args.batch, args.seq, generator=g).to(device)
    lengths = torch.randint(1, args.seq + 1, (args.batch, 1), generator=g).to(device)
    mask = torch.arange(args.seq, device=device) < lengths  # right-padded

    fast = median_seconds(lambda: gae_advantages(rewards, values, mask, args.gamma, args.lam), args.repeats, device)
    slow = median_seconds(lambda: gae_reverse_loop(rewards, values, mask, args.gamma, args.lam), args.repeats, device)
    a1, r1 = gae_advantages(rewards, values, mask, args.gamma, args.lam)
    a2, r2 = gae_reverse_loop(rewards, values, mask, args.gamma, args.lam)
    max_diff = max((a1 - a2).abs().max().item(), (r1 - r2).abs().max().item())

    print(f"GAE {args.batch}x{args.seq} float32 on {device} ({torch.get_num_threads()} threads), median of {args.repeats}:")
    print(f"  vectorised gae_advantages : {fast * 1e3:9.2f} ms")
    print(f"  naive reverse-time loop   : {slow * 1e3:9.2f} ms")
    print(f"  speed-up (loop / vectorised): {slow / fast:.1f}x ; max |difference| = {max_diff:.2e}")


if __name__ == "__main__":
    main()
