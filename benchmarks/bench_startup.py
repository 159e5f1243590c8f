"""Time PPO start-up (PPOTrainer(cfg): placement, every role's group up, the agreement check) with the roles started
side by side (rlhf_ray.groups.start_concurrently, what PPOTrainer does) against one after another (the same function
replaced, in this process only, by a loop), alternating, on the GRPO bench's workload (bench_grpo_vs_trl.py's
config: actor, reference, rule-reward scorer, one vLLM engine).

    flock /tmp/rlhf_ray_heavy.lock .venv/bin/python benchmarks/bench_startup.py [--layout hybrid|separate]
        [--pairs 2] [--cold] [--set KEY=VALUE ...]

Not a test. One Ray cluster for the whole run, started by an untimed warm-up start-up (which also warms the file
caches), so each timing is the groups' start-up, not Ray's; the order alternates (sequential first in even pairs).
--cold: each start-up in a fresh process that starts its own Ray (what a user's `rlhf-ray ppo` waits for; Ray's
start is in the timing), after one untimed cold start that warms the file caches.
Prints every timing, the medians and the ratio sequential / concurrent.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_grpo_vs_trl import BETA, LR, SEED, rlhf_ray_config  # noqa: E402


def one_after_another(start, roles):
    """What PPOTrainer did before groups.start_concurrently: each role's group up before the next one starts."""
    started = {}
    for role in roles:
        try:
            started[role] = start(role)
        except Exception as e:  # noqa: BLE001 - same contract as start_concurrently
            return started, e
    return started, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layout", choices=["hybrid", "separate"], default="hybrid")
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--cold", action="store_true", help="each start-up in a fresh process with its own Ray")
    parser.add_argument("--one", choices=["sequential", "concurrent"], help=argparse.SUPPRESS)  # --cold's child
    args = parser.parse_args()
    if args.cold:
        return cold(args)
    # what rlhf_ray_config reads from bench_grpo_vs_trl's arguments (its defaults)
    bench = argparse.Namespace(model="builtin:smollm2", prompts=4, group=4, max_new_tokens=32, steps=1, lr=LR,
                               beta=BETA, seed=SEED, natural_length=False, set=args.set)
    row = {"ppo.actor.deepspeed.precision": "fp32", "placement.layout": args.layout}  # as bench_grpo_vs_trl's rows
    from rlhf_ray import groups
    from rlhf_ray.ppo import PPOTrainer

    concurrently = groups.start_concurrently
    if args.one:  # a --cold child: one start-up, Ray's own start included
        groups.start_concurrently = one_after_another if args.one == "sequential" else concurrently
        started = time.perf_counter()
        PPOTrainer(rlhf_ray_config(bench, tempfile.mkdtemp(prefix="bench_startup_"), row)).shutdown()
        print(f"start-up {time.perf_counter() - started:.2f} s", flush=True)  # PPOTrainer(cfg) and its shutdown
        return
    times: dict[str, list[float]] = {"sequential": [], "concurrent": []}
    warm_up = PPOTrainer(rlhf_ray_config(bench, tempfile.mkdtemp(prefix="bench_startup_"), row))  # starts Ray too
    warm_up.shutdown()
    time.sleep(3)
    for pair in range(args.pairs):
        for mode in (("sequential", "concurrent") if pair % 2 == 0 else ("concurrent", "sequential")):
            groups.start_concurrently = one_after_another if mode == "sequential" else concurrently
            cfg = rlhf_ray_config(bench, tempfile.mkdtemp(prefix="bench_startup_"), row)
            started = time.perf_counter()
            trainer = PPOTrainer(cfg)
            seconds = time.perf_counter() - started
            trainer.shutdown()
            times[mode].append(seconds)
            print(f"pair {pair} {mode}: start-up {seconds:.1f} s", flush=True)
            time.sleep(3)  # the removed groups' processes exit
    groups.start_concurrently = concurrently
    report(args, times, "Ray up before each")


def report(args, times: dict[str, list[float]], how: str) -> None:
    med = {mode: statistics.median(ts) for mode, ts in times.items()}
    print(f"layout {args.layout} ({how}): sequential {med['sequential']:.1f} s, concurrent {med['concurrent']:.1f} s "
          f"(medians of {args.pairs}); ratio sequential / concurrent {med['sequential'] / med['concurrent']:.2f}")


def cold(args) -> None:
    times: dict[str, list[float]] = {"sequential": [], "concurrent": []}
    runs = [("concurrent", None)] + [(mode, pair) for pair in range(args.pairs) for mode in
                                     (("sequential", "concurrent") if pair % 2 == 0 else ("concurrent", "sequential"))]
    for mode, pair in runs:  # pair None: the untimed warm-up
        command = [sys.executable, __file__, "--layout", args.layout, "--one", mode,
                   *[a for item in args.set for a in ("--set", item)]]
        done = subprocess.run(command, capture_output=True, text=True)
        line = [ln for ln in done.stdout.splitlines() if ln.startswith("start-up ")]
        if done.returncode or not line:
            raise SystemExit(f"{mode} start-up failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        if pair is not None:
            times[mode].append(float(line[-1].split()[1]))
            print(f"pair {pair} {mode}: start-up {times[mode][-1]:.1f} s (cold: Ray started in it)", flush=True)
    report(args, times, "cold, a fresh process and Ray each")


if __name__ == "__main__":
    main()
