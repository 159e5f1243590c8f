"""This machine's matmul peak: fp32 and bf16 GFLOP/s of torch.matmul on square matrices, all cores and 1 thread.

    flock /tmp/rlhf_ray_heavy.lock .venv/bin/python benchmarks/bench_cpu_peak.py [--sizes 2048 4096]
        [--threads 0 1] [--json PATH]

Not a test. One process; for each thread count (0: every core, os.cpu_count()), dtype and size: two warm-up
matmuls, then repeated matmuls for at least --seconds; GFLOP/s = 2 n^3 x repeats / elapsed. The "peak" of a dtype
and thread count is the best size: benchmarks/bench_grpo_vs_trl.py divides model FLOPs per second by it
(training FLOP utilisation). Prints a markdown table and one JSON line (also written to --json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

DTYPES = ("fp32", "bf16")


def cpu_flags() -> list[str]:
    """The matmul-relevant flags of /proc/cpuinfo (AMX, AVX-512 BF16/FP16/VNNI); empty where it does not exist."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in flags if f.startswith("amx") or f in ("avx512_bf16", "avx512_fp16", "avx512_vnni"))


def matmul_gflops(n: int, dtype_name: str, seconds: float) -> float:
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        torch.matmul(a, b)
    repeats, start = 0, time.perf_counter()
    while True:
        torch.matmul(a, b)
        repeats += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and repeats >= 3:
            return 2 * n ** 3 * repeats / elapsed / 1e9


def measure(sizes=(2048, 4096), threads=(0, 1), seconds: float = 1.0) -> dict:
    """{"peak_gflops": {"fp32": {"2": best, "1": best}, "bf16": {...}}, "runs": [...], ...}; thread keys as strings."""
    import torch

    runs, peak = [], {d: {} for d in DTYPES}
    for t in threads:
        t = t or os.cpu_count()
        torch.set_num_threads(t)
        for dtype_name in DTYPES:
            for n in sizes:
                gflops = matmul_gflops(n, dtype_name, seconds)
                runs.append({"threads": t, "dtype": dtype_name, "n": n, "gflops": round(gflops, 1)})
                peak[dtype_name][str(t)] = max(peak[dtype_name].get(str(t), 0.0), round(gflops, 1))
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu_count": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(), "cpu_flags": cpu_flags(), "torch": torch.__version__,
            "peak_gflops": peak, "runs": runs}


def table(result: dict) -> str:
    lines = ["| threads | dtype | n | GFLOP/s |", "|---|---|---|---|"]
    lines += [f"| {r['threads']} | {r['dtype']} | {r['n']} | {r['gflops']:.0f} |" for r in result["runs"]]
    peak = result["peak_gflops"]
    lines.append("peak (best size): " + "; ".join(f"{d} {t} thread(s) {v:.0f}" for d in DTYPES
                                                  for t, v in peak[d].items())
                 + f" GFLOP/s; flags {' '.join(result['cpu_flags']) or 'none'}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--threads", type=int, nargs="+", default=[0, 1], help="0: every core")
    parser.add_argument("--seconds", type=float, default=1.0, help="minimum timed seconds per measurement")
    parser.add_argument("--json", help="also write the JSON here")
    args = parser.parse_args()
    result = measure(args.sizes, args.threads, args.seconds)
    print(table(result))
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
