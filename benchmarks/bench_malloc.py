"""glibc malloc settings for a training process, A/B: bench_ppo_learner.py's bare PPO loop (SmolLM2, 16 x 72 tokens,
one optimizer step per step) in fresh processes, alternating, under

  heap          rlhf_ray's worker environment (rlhf_ray/env.py): MALLOC_MMAP_THRESHOLD_ 32 MiB, MALLOC_MMAP_MAX_ 0,
                MALLOC_TOP_PAD_ 256 MiB, MALLOC_TRIM_THRESHOLD_ 64 GiB
  threshold     the same without MALLOC_MMAP_MAX_ (what rlhf_ray shipped before: blocks above glibc's 32 MiB cap on
                the threshold are still mmapped, and zero-filled again, every step)
  glibc         glibc's defaults (what a plain `python train.py` gets, TRL's GRPO bench side included)

Prints each process's median s/step, its page faults per step and its peak RSS, then the medians per variant and
the ratios. The variables must be in the environment when a process starts (glibc reads them once), hence one
process per run.

    flock /tmp/rlhf_ray_heavy.lock .venv/bin/python benchmarks/bench_malloc.py [--precision bf16] [--pairs 2]
        [--steps 4] [--variants heap,threshold,glibc]

Not a test.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
KEYS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TOP_PAD_", "MALLOC_TRIM_THRESHOLD_")


def variant_env(name: str) -> dict[str, str]:
    sys.path.insert(0, str(HERE.parent))
    from rlhf_ray.env import _process_defaults

    env = {k: v for k, v in os.environ.items() if k not in KEYS}
    heap = {k: v for k, v in _process_defaults().items() if k in KEYS}
    if name == "heap":
        env.update(heap)
    elif name == "threshold":
        env.update({k: v for k, v in heap.items() if k != "MALLOC_MMAP_MAX_"})
    elif name != "glibc":
        raise SystemExit(f"unknown variant {name!r}: heap, threshold or glibc")
    return env


def run_once(name: str, args) -> dict:
    cmd = [sys.executable, str(HERE / "bench_ppo_learner.py"), "--skip-ray", "--precision", args.precision,
           "--steps", str(args.steps)]
    wrapped = [sys.executable, "-c", "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
               "print('maxrss_kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)", *cmd]
    out = subprocess.run(wrapped, env=variant_env(name), capture_output=True, text=True, check=True).stdout
    seconds = float(re.search(r"bare torch loop \(\d+ threads\): ([\d.]+) s/step", out).group(1))
    faults = [int(x) for x in re.search(r"page faults per step \(warm-up first\): \[([\d, ]+)\]", out).group(1).split(",")]
    rss = int(re.search(r"maxrss_kib (\d+)", out).group(1)) / 2**20
    return {"variant": name, "s_per_step": seconds, "faults": faults, "maxrss_gib": rss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    ap.add_argument("--pairs", type=int, default=2, help="rounds; each runs every variant once, in rotating order")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per process (after one warm-up)")
    ap.add_argument("--variants", default="heap,threshold,glibc")
    args = ap.parse_args()
    names = args.variants.split(",")
    runs = []
    for r in range(args.pairs):
        for name in names[r % len(names):] + names[:r % len(names)]:
            got = run_once(name, args)
            runs.append(got)
            print(f"round {r + 1} {name:9s}: {got['s_per_step']:.2f} s/step, page faults per step "
                  f"{got['faults']}, peak RSS {got['maxrss_gib']:.2f} GiB", flush=True)
    med = {n: statistics.median(g["s_per_step"] for g in runs if g["variant"] == n) for n in names}
    print(f"\nSmolLM2 bare PPO loop, {args.precision}, medians over {args.pairs} process(es) per variant: "
          + ", ".join(f"{n} {s:.2f} s/step" for n, s in med.items()))
    for n in names[1:]:
        print(f"  {n} / {names[0]}: {med[n] / med[names[0]]:.2f}")


if __name__ == "__main__":
    main()
