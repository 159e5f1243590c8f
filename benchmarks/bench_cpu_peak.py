"""This machine's matmul peak: fp32 and bf16 GFLOP/s of torch.matmul on square matrices, all cores and 1 thread.

    flock /tmp/rlhf_ray_heavy.lock .venv/bin/python benchmarks/bench_cpu_peak.py [--sizes 2048 4096]
        [--threads 0 1] [--max-seconds 60] [--json PATH] [--decode]

Not a test. One process; for each thread count (0: every core, os.cpu_count()), dtype and size: two warm-up
matmuls, then repeated matmuls for at least --seconds; GFLOP/s = 2 n^3 x repeats / elapsed. The "peak" of a dtype
and thread count is the best size: benchmarks/bench_grpo_vs_trl.py divides model FLOPs per second by it
(training FLOP utilisation). Prints a markdown table and one JSON line (also written to --json).

--decode adds what bounds generation instead: the memory read bandwidth (a sum over 512 MB) and decode-shaped
matmuls, 16 rows (the GRPO bench's 16 sequences) x SmolLM2's 576 -> 1536 MLP weight, over 200 distinct weights so
each comes from memory as in a decode step: ms per matmul, GB/s of weights read and GFLOP/s.
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


PROBE_N = 512  # one matmul of this size first estimates each larger one's time (--max-seconds)


def square_operands(n: int, dtype_name: str):
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    return torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)


def one_matmul_seconds(n: int, dtype_name: str) -> float:
    import torch

    a, b = square_operands(n, dtype_name)
    start = time.perf_counter()
    torch.matmul(a, b)
    return time.perf_counter() - start


def matmul_gflops(n: int, dtype_name: str, seconds: float) -> float:
    import torch

    a, b = square_operands(n, dtype_name)
    for _ in range(2):
        torch.matmul(a, b)
    repeats, start = 0, time.perf_counter()
    while True:
        torch.matmul(a, b)
        repeats += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and repeats >= 3:
            return 2 * n ** 3 * repeats / elapsed / 1e9


def measure(sizes=(2048, 4096), threads=(0, 1), seconds: float = 1.0, max_seconds: float = 60.0) -> dict:
    """{"peak_gflops": {"fp32": {"2": best, "1": best}, "bf16": {...}}, "runs": [...], ...}; thread keys as strings.
    A size whose five matmuls (two warm-up, three timed) would take longer than `max_seconds`, estimated from one
    PROBE_N matmul, is skipped (listed in "skipped"): bf16 without native support (no AVX-512 BF16 or AMX) runs
    at ~1 GFLOP/s, a 4096 matmul 2-3 minutes. Where every size is skipped, the probe's rate is the peak."""
    import torch

    runs, peak, skipped = [], {d: {} for d in DTYPES}, []
    for t in threads:
        t = t or os.cpu_count()
        torch.set_num_threads(t)
        for dtype_name in DTYPES:
            one_matmul_seconds(PROBE_N, dtype_name)  # warm-up
            probe_s = one_matmul_seconds(PROBE_N, dtype_name)
            estimated_s = {n: 5 * probe_s * (n / PROBE_N) ** 3 for n in sizes}
            fit = [n for n in sizes if estimated_s[n] <= max_seconds]
            skipped += [{"threads": t, "dtype": dtype_name, "n": n, "estimated_s": round(estimated_s[n], 1)}
                        for n in sizes if n not in fit]
            if not fit:
                gflops = 2 * PROBE_N ** 3 / probe_s / 1e9
                runs.append({"threads": t, "dtype": dtype_name, "n": PROBE_N, "gflops": round(gflops, 1)})
                peak[dtype_name][str(t)] = round(gflops, 1)
            for n in fit:
                gflops = matmul_gflops(n, dtype_name, seconds)
                runs.append({"threads": t, "dtype": dtype_name, "n": n, "gflops": round(gflops, 1)})
                peak[dtype_name][str(t)] = max(peak[dtype_name].get(str(t), 0.0), round(gflops, 1))
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu_count": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(), "cpu_flags": cpu_flags(), "torch": torch.__version__,
            "peak_gflops": peak, "runs": runs, "skipped": skipped}


def read_gbps(mbytes: int = 512) -> float:
    import torch

    a = torch.ones(mbytes * 2**20 // 4)
    a.sum()
    start = time.perf_counter()
    for _ in range(5):
        a.sum()
    return a.numel() * 4 * 5 / (time.perf_counter() - start) / 1e9


def decode_matmul(dtype_name: str, rows: int = 16, k: int = 576, n: int = 1536, weights: int = 200) -> dict:
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    ws, x = [torch.randn(n, k, dtype=dtype) for _ in range(weights)], torch.randn(rows, k, dtype=dtype)
    for w in ws[:10]:
        x @ w.t()
    start = time.perf_counter()
    for w in ws:
        x @ w.t()
    each = (time.perf_counter() - start) / weights
    return {"dtype": dtype_name, "shape": [rows, k, n], "ms": round(each * 1e3, 3),
            "weight_gbps": round(n * k * ws[0].element_size() / each / 1e9, 2),
            "gflops": round(2 * rows * k * n / each / 1e9, 1)}


def measure_decode(threads=(0, 1)) -> list[dict]:
    import torch

    out = []
    for t in threads:
        t = t or os.cpu_count()
        torch.set_num_threads(t)
        out.append({"threads": t, "read_gbps": round(read_gbps(), 1),
                    "matmuls": [decode_matmul(d) for d in DTYPES]})
    return out


def table(result: dict) -> str:
    lines = ["| threads | dtype | n | GFLOP/s |", "|---|---|---|---|"]
    lines += [f"| {r['threads']} | {r['dtype']} | {r['n']} | {r['gflops']:.0f} |" for r in result["runs"]]
    peak = result["peak_gflops"]
    lines.append("peak (best size): " + "; ".join(f"{d} {t} thread(s) {v:.0f}" for d in DTYPES
                                                  for t, v in peak[d].items())
                 + f" GFLOP/s; flags {' '.join(result['cpu_flags']) or 'none'}")
    for r in result.get("skipped", []):
        lines.append(f"skipped: {r['dtype']} n={r['n']} on {r['threads']} thread(s), estimated {r['estimated_s']:.0f} s "
                     f"(> --max-seconds)")
    for d in result.get("decode", []):
        lines.append(f"decode, {d['threads']} thread(s): memory read {d['read_gbps']:.1f} GB/s; " + "; ".join(
            f"{m['dtype']} {m['shape'][0]}x{m['shape'][1]}x{m['shape'][2]} {m['ms']:.3f} ms ({m['weight_gbps']:.1f} "
            f"GB/s of weights, {m['gflops']:.0f} GFLOP/s)" for m in d["matmuls"]))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--threads", type=int, nargs="+", default=[0, 1], help="0: every core")
    parser.add_argument("--seconds", type=float, default=1.0, help="minimum timed seconds per measurement")
    parser.add_argument("--max-seconds", type=float, default=60.0,
                        help="skip a size whose measurement would take longer (estimated from one 512 matmul)")
    parser.add_argument("--json", help="also write the JSON here")
    parser.add_argument("--decode", action="store_true", help="also memory bandwidth and decode-shaped matmuls")
    args = parser.parse_args()
    result = measure(args.sizes, args.threads, args.seconds, args.max_seconds)
    if args.decode:
        result["decode"] = measure_decode(args.threads)
    print(table(result))
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
