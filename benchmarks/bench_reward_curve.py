"""Benchmark: the built-in task's reward curve on SmolLM2-135M-Instruct at bounded KL (PPO, GAE + critic).

    flock /tmp/rlhf_ray_heavy.lock .venv/bin/python benchmarks/bench_reward_curve.py \
        [benchmarks/configs/smollm2_reward_curve.yaml] [--kl-bound 1.0] [dotted overrides: --ppo.num_iterations 10]

Not a test. Runs `rlhf-ray ppo` on the config (a real PPO run: vLLM engine, DeepSpeed actor and critic,
reference scorer, rule reward, weight sync every iteration), then reads its metrics.jsonl and prints per
iteration: mean reward, summed per-sequence KL to the reference (k3), response length and seconds; then the
mean reward of the first and last quarter of the run, the largest KL, and whether it stayed under --kl-bound.
Without a reward model the critic starts as a fresh value head on the actor (<output_dir>/critic_init).
The reward/KL PNG is <output_dir>/ppo/reward_kl.png. Exit status 1 when the KL bound was exceeded.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlhf_ray.config import load_config  # noqa: E402
from rlhf_ray.metrics import read_metrics  # noqa: E402
from rlhf_ray.ppo import run_ppo  # noqa: E402

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "smollm2_reward_curve.yaml"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     usage="%(prog)s [CONFIG] [--kl-bound X] [--dotted.override VALUE ...]")
    parser.add_argument("--kl-bound", type=float, default=1.0, help="largest acceptable mean sequence KL (nats)")
    argv = sys.argv[1:]
    # CONFIG is the first argument unless it is an option (a positional would swallow an override's value)
    config = argv.pop(0) if argv and not argv[0].startswith("-") else str(DEFAULT_CONFIG)
    args, overrides = parser.parse_known_args(argv)
    args.config = config
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = load_config(args.config, overrides)
    if cfg.ppo.advantage_estimator == "gae" and cfg.models.critic is None and not cfg.models.reward.path:
        # No reward model to start the critic from: a fresh value head (seeded) on the actor's backbone.
        import torch

        from rlhf_ray.models import ValueHeadModel
        from rlhf_ray.models.loading import resolve_model_path

        critic_init = Path(cfg.run.output_dir) / "critic_init"
        if not (critic_init / "value_head.json").is_file():
            torch.manual_seed(cfg.run.seed)
            ValueHeadModel.from_causal_lm(resolve_model_path(cfg.models.actor.path)).save_pretrained(critic_init)
        cfg = load_config(args.config, overrides + [f"--models.critic.path={critic_init}"])
    started = time.time()
    run_ppo(cfg)
    wall = time.time() - started
    rows = read_metrics(Path(cfg.run.output_dir) / "ppo" / cfg.logging.metrics_file)
    print(f"\nPPO ({cfg.ppo.advantage_estimator}) on {cfg.models.actor.path}, built-in task, "
          f"{cfg.ppo.rollout_batch_size} prompts x {cfg.generation.n_samples_per_prompt} samples per iteration, "
          f"kl_coef {cfg.ppo.kl_coef} ({cfg.ppo.kl_estimator}), actor lr {cfg.ppo.actor.optim.lr}")
    print("| iteration | reward mean | KL (nats/sequence) | response length | seconds |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['iteration']} | {r['reward/mean']:.3f} | {r['kl/mean']:.4f} | {r['response/length_mean']:.1f} "
              f"| {r['time/iteration_s']:.0f} |")
    quarter = max(1, len(rows) // 4)
    first = statistics.mean(r["reward/mean"] for r in rows[:quarter])
    last = statistics.mean(r["reward/mean"] for r in rows[-quarter:])
    max_kl = max(r["kl/mean"] for r in rows)
    print(f"reward: first {quarter} iterations {first:.3f}, last {quarter} iterations {last:.3f} "
          f"(change {last - first:+.3f}); largest KL {max_kl:.4f} (bound {args.kl_bound}); "
          f"{len(rows)} iterations in {wall:.0f} s, start-up included")
    print(f"curves: {Path(cfg.run.output_dir) / 'ppo' / 'reward_kl.png'}")
    return 0 if max_kl <= args.kl_bound else 1


if __name__ == "__main__":
    sys.exit(main())
