"""Seconds per PPO iteration with rollout.mode off vs one_step vs bounded (issue 15's benchmark), on SmolLM2, for the
bench_grpo_vs_trl workload (4 prompts x 4 samples, 32 new tokens) and for one where generation dominates (256 new
tokens), against the ideal of a perfect overlap: max(generate, score + train + sync) of the `off` run, whose
phases run alone.

    flock /tmp/rlhf_ray_heavy.lock .venv/bin/python benchmarks/bench_async.py [--steps 3] [--out FILE.md]
    .venv/bin/python benchmarks/bench_async.py --from-json FILE.json   (the table again from a run's raw rows)

Not a test. Each row starts its own PPO run (one vLLM engine, one actor rank: the 2-core layout of
bench_grpo_vs_trl.py), runs --warmup iterations and --steps timed ones, and reports their mean. one_step takes the
ratio against the engines' log-probs (no correction), so neither mode runs an actor forward while scoring; so does
bounded (rollout.max_staleness 2) here, for the same work per iteration (a correction, which its README advice
and learning test use, adds that forward to scoring). The warm-up (default 2) covers bounded's first iteration,
which fills the pipeline (batch 0 generated whole, then batch 1 whole and batch 2's first chunk in the background).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_grpo_vs_trl import rlhf_ray_config  # noqa: E402

WORKLOADS = {"grpo_vs_trl (32 new tokens)": 32, "generation-heavy (256 new tokens)": 256}


MODES = {"off": {}, "one_step": {}, "bounded": {"rollout.max_staleness": 2}}


def run(args, max_new_tokens: int, mode: str) -> dict:
    from rlhf_ray.ppo import PPOTrainer

    args.max_new_tokens = max_new_tokens
    cfg = rlhf_ray_config(args, tempfile.mkdtemp(prefix=f"bench_async_{mode}_"), {
        "rollout.mode": mode, **MODES[mode],
        "ppo.num_iterations": args.warmup + args.steps + 2})  # the timed iterations still generate ahead
    started = time.time()
    trainer = PPOTrainer(cfg)
    startup = time.time() - started
    rows = []
    try:
        for _ in range(args.warmup + args.steps):
            stats = trainer.step()
            trainer.iteration += 1
            rows.append(stats)
    finally:
        trainer.shutdown()
    timed = rows[args.warmup:]
    mean = lambda key: statistics.mean(r[key] for r in timed)  # noqa: E731
    rest = mean("time/score_s") + mean("time/train_s") + mean("time/sync_s")
    # generation work per iteration: off's alone; the async modes' in the background (bounded's batches span
    # several iterations, so their time/generate_s is not work)
    work = "time/generate_s" if mode == "off" else "time/generate_background_s"
    return {"mode": mode, "startup_s": startup, "iteration_s": mean("time/iteration_s"),
            "generate_s": mean(work), "generate_wait_s": mean("time/generate_wait_s"),
            "score_train_sync_s": rest,
            "reward": [r["reward/mean"] for r in rows], "staleness_max": max(r["rollout/staleness_max"] for r in rows)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="builtin:smollm2")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--natural-length", action="store_true")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", help="write the table (markdown) here and the raw rows next to it (.json)")
    parser.add_argument("--from-json", help="print the table of an earlier run's raw rows instead of running")
    args = parser.parse_args()
    if args.from_json:
        results = json.loads(Path(args.from_json).read_text())
    else:
        results = {name: [run(args, tokens, mode) for mode in MODES] for name, tokens in WORKLOADS.items()}
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [f"# rollout.mode off vs one_step vs bounded ({when})", "",
             f"`flock /tmp/rlhf_ray_heavy.lock .venv/bin/python benchmarks/bench_async.py --steps {args.steps}`: "
             f"{args.model}, {args.prompts} prompts x {args.group} samples, mean of {args.steps} iterations after "
             f"{getattr(args, 'warmup', 1)} warm-up. generate s: the iteration's generation work (async modes: in the "
             f"background). ideal = max(generate, score + train + sync) of the off run (phases alone on the "
             f"machine).", "",
             "| workload | mode | s / iteration | generate s | score+train+sync s | waited for generation s | ideal s "
             "| off / mode | mode / ideal |", "|---|---|---|---|---|---|---|---|---|"]
    for name, rows in results.items():
        off = rows[0]
        ideal = max(off["generate_s"], off["score_train_sync_s"])
        for r in rows:
            lines.append(f"| {name} | {r['mode']} | {r['iteration_s']:.2f} | {r['generate_s']:.2f} | "
                         f"{r['score_train_sync_s']:.2f} | {r['generate_wait_s']:.2f} | {ideal:.2f} | "
                         + (f"{off['iteration_s'] / r['iteration_s']:.2f} | {r['iteration_s'] / ideal:.2f} |"
                            if r is not off else " | |"))
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
