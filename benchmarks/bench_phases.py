"""Where the time of one rlhf_ray GRPO iteration goes: the generate / score / sync phases split into their steps, on
the workload of bench_grpo_vs_trl.py (same config, same overrides).

    flock /tmp/rlhf_ray_heavy.lock .venv/bin/python benchmarks/bench_phases.py [--steps 2] [--set KEY=VALUE ...]

Not a test. Runs one warm-up iteration plus --steps timed ones, then prints per iteration:
  generate  the phase, and the engines' own generate calls (Rollout.seconds: dispatch to the last answer)
  score     the phase, and the reference and the reward scorer alone on the same batch (run again afterwards)
  sync      SyncReport: driver steps (start / push / probe / finish), the sender's checksum and transfer seconds,
            each engine's load, finish (reload + prefix cache) and verify (checksums + probe) seconds
  --learner-timers: also the train phase inside actor rank 0 (bench_ppo_learner.py --phase-times' timers: DeepSpeed's
            forward, backward and step, the learner's loss forward and boundary step) and the minor page faults the
            rank took during the iteration
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

from bench_grpo_vs_trl import BETA, LR, SEED, rlhf_ray_config  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="builtin:smollm2")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--natural-length", action="store_true")
    parser.add_argument("--lr", type=float, default=LR)  # as bench_grpo_vs_trl.py
    parser.add_argument("--beta", type=float, default=BETA)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", help="also write the raw rows here")
    parser.add_argument("--learner-timers", action="store_true",
                        help="the train phase inside actor rank 0: seconds per piece and page faults per iteration")
    args = parser.parse_args()

    import ray

    from rlhf_ray.ppo import PPOTrainer

    cfg = rlhf_ray_config(args, tempfile.mkdtemp(prefix="bench_phases_"))
    trainer = PPOTrainer(cfg)
    rows = []
    try:
        rollouts = []
        generate = trainer.generators.generate

        def timed_generate(*a, **k):
            r = generate(*a, **k)
            rollouts.append(r.seconds)
            return r

        trainer.generators.generate = timed_generate
        batches = []
        make_experience = trainer.make_experience

        def keep_batch(batch, info):
            batches.append(batch)
            return make_experience(batch, info)

        trainer.make_experience = keep_batch
        if args.learner_timers:
            from bench_ppo_learner import _install_phase_timers, read_phase_timers

            ray.get(trainer.actor.workers[0].apply.remote(_install_phase_timers))
            faults = ray.get(trainer.actor.workers[0].apply.remote(read_phase_timers))[1]
        for _ in range(args.steps + 1):
            rollouts.clear()
            stats = trainer.step()
            trainer.iteration += 1
            sync = trainer.generators.last_sync
            ref = ray.put(batches[-1])
            t = time.perf_counter()
            ray.get(trainer.reference.logprobs(ref, as_ref=True))
            reference_s = time.perf_counter() - t
            t = time.perf_counter()
            ray.get(trainer.reward.scores(ref, as_ref=True))
            reward_s = time.perf_counter() - t
            rows.append({k: stats[k] for k in ("time/iteration_s", "time/generate_s", "time/score_s", "time/train_s",
                                               "time/sync_s")}
                        | {"engine_generate_s": sum(rollouts), "reference_alone_s": reference_s,
                           "reward_alone_s": reward_s, "sync_s": sync.seconds, "sync_steps_s": sync.steps_s,
                           "sender": sync.sender, "engines": sync.engines, "buckets": sync.buckets,
                           "bytes": sync.bytes, "transport": sync.transport})
            if args.learner_timers:
                pieces, now = ray.get(trainer.actor.workers[0].apply.remote(read_phase_timers))
                rows[-1]["learner"] = {label: seconds for label, (seconds, _) in pieces.items()}
                rows[-1]["learner"]["page_faults"], faults = now - faults, now
    finally:
        trainer.shutdown()
    for i, r in enumerate(rows):
        e = r["engines"][0]
        print(f"iteration {i}{' (warm-up)' if i == 0 else ''}: total {r['time/iteration_s']:.2f}s")
        print(f"  generate {r['time/generate_s']:.2f}s (engines' calls {r['engine_generate_s']:.2f}s)")
        print(f"  score {r['time/score_s']:.2f}s (reference alone {r['reference_alone_s']:.2f}s, reward alone "
              f"{r['reward_alone_s']:.2f}s)")
        print(f"  train {r['time/train_s']:.2f}s" + ("; rank 0: " + ", ".join(
            f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in r["learner"].items())
            if "learner" in r else ""))
        print(f"  sync {r['time/sync_s']:.2f}s: report {r['sync_s']:.2f}s over {r['transport']}, {r['buckets']} "
              f"bucket(s), {r['bytes'] / 1e6:.0f} MB; driver steps "
              + ", ".join(f"{k} {v:.2f}" for k, v in r["sync_steps_s"].items())
              + "; sender " + ", ".join(f"{k} {v:.2f}" for k, v in r["sender"].items() if isinstance(v, float))
              + "; engine 0 " + ", ".join(f"{k} {v:.3f}" for k, v in e.items() if isinstance(v, float)))
    timed = rows[1:]
    print("median over timed iterations: " + ", ".join(
        f"{k} {statistics.median(r[k] for r in timed):.2f}" for k in
        ("time/iteration_s", "time/generate_s", "time/score_s", "time/train_s", "time/sync_s")))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
