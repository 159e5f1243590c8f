"""Processes sharing cores: OpenMP's default (spinning) wait vs OMP_WAIT_POLICY=PASSIVE vs a short spin
(GOMP_SPINCOUNT=1000, torch's libgomp: spin ~1000 iterations, then sleep).

A private local cluster (resources.init_ray) has more logical CPUs than cores, so the PPO groups' worker processes
share them: in the score phase the reference, the actor and the critic compute at once, each with its own OpenMP
threads. Each process here runs SmolLM2-135M forwards (32 x 88 tokens, bf16 autocast, micro-batches of 8, 3 passes);
all start together and the wall time until the last one ends is reported.

    flock /tmp/rlhf_ray_heavy.lock .venv/bin/python benchmarks/bench_omp_wait_policy.py [--out FILE.md]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKER = r"""
import os, sys, time, torch
from transformers import AutoModelForCausalLM
torch.set_num_threads(int(sys.argv[1]))
model = AutoModelForCausalLM.from_pretrained(sys.argv[2], dtype=torch.float32).eval()
ids = torch.randint(0, 40000, (32, 88), generator=torch.Generator().manual_seed(0))
with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
    model(input_ids=ids[:4])  # warm-up
    open(sys.argv[3], "w").close()
    while not os.path.exists(sys.argv[4]):
        time.sleep(0.01)
    for _ in range(3):
        for i in range(0, 32, 8):
            model(input_ids=ids[i:i + 8])
"""

POLICIES = {"default (unset)": {}, "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
            "GOMP_SPINCOUNT=1000": {"GOMP_SPINCOUNT": "1000"}}
CASES = [(procs, 2, policy) for procs in (1, 2, 3) for policy in POLICIES] + [(3, 1, "default (unset)")]


def run_case(model: str, procs: int, threads: int, policy: str) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(POLICIES[policy])
    with tempfile.TemporaryDirectory() as tmp:
        go = Path(tmp) / "go"
        ready = [Path(tmp) / f"ready{i}" for i in range(procs)]
        children = [subprocess.Popen([sys.executable, "-c", WORKER, str(threads), model, str(r), str(go)], env=env,
                                     stderr=subprocess.DEVNULL) for r in ready]
        while not all(r.exists() for r in ready):
            if any(c.poll() not in (None, 0) for c in children):
                raise RuntimeError("a worker failed")
            time.sleep(0.05)
        started = time.time()
        go.touch()
        for c in children:
            c.wait()
        return time.time() - started


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from rlhf_ray.models.loading import resolve_model_path
    from rlhf_ray.resources import machine_cores

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the table as Markdown here")
    args = parser.parse_args()
    model = resolve_model_path("builtin:smollm2")
    rows = []
    for procs, threads, policy in CASES:
        wall = run_case(model, procs, threads, policy)
        rows.append((procs, threads, policy, wall))
        print(f"{procs} process(es) x {threads} thread(s), {policy}: {wall:.1f} s", flush=True)
    table = ["| processes | threads each | OpenMP wait | wall (s) |", "|---|---|---|---|"]
    table += [f"| {p} | {t} | {w} | {s:.1f} |" for p, t, w, s in rows]
    text = (f"Machine: {machine_cores()} cores, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Each process: "
            "SmolLM2-135M forwards, 32 x 88 tokens in micro-batches of 8, 3 passes, bf16 autocast.\n\n"
            + "\n".join(table) + "\n")
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
