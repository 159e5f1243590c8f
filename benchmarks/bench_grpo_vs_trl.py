"""Benchmark one GRPO iteration: rlhf_ray (Ray + vLLM engine + DeepSpeed learner) vs TRL's GRPOTrainer.

    .venv/bin/python -m pip install -e '.[bench]'      # TRL 1.16 (not needed by anything else)
    flock /tmp/rlhf_ray_heavy.lock .venv/bin/python benchmarks/bench_grpo_vs_trl.py [--model builtin:smollm2]
        [--prompts 4] [--group 4] [--max-new-tokens 32] [--steps 3] [--natural-length]
        [--set placement.actor.num_workers=1 --set generation.num_engines=2 ...]

Not a test. Both sides run in their own fresh process, one after the other, on the same machine, with:
  the same model (fp32), the same prompts in the same order (the built-in task's PPO prompts, rendered with the
  model's chat template: the bench checks both sides tokenize them identically), the same batch (--prompts x
  --group completions per iteration, ONE optimizer step over all of them), the same group size, the same lengths
  (by default every completion is exactly --max-new-tokens long, EOS ignored: vLLM's ignore_eos and HF
  generate's min_new_tokens, so both do identical work; --natural-length lets EOS end them), temperature 1,
  a frozen reference model with a k3 KL penalty (beta 0.04), lr 1e-6, no gradient checkpointing, and the
  built-in rule reward.
The iteration = generate, score (reward, reference and old log-probs), train one step, and, for rlhf_ray,
broadcast the new weights to the vLLM engine (verified: generation.verify_weights). TRL generates with HF
generate in the training process (use_cpu=True), so it has no weight sync.
Timed: every iteration after the first (warm-up). Reported: the median seconds per iteration of each side,
start-up (process start to the end of the first iteration), and the ratio TRL / rlhf_ray (> 1: rlhf_ray faster).
TRL spreads torch over every core in one process. rlhf_ray runs its roles as separate Ray actors; the bench's
defaults suit a 2-core machine (actor: 1 rank on 2 CPUs, the whole batch per micro-batch; reference on 2 CPUs;
1 vLLM engine on 1 core) and put the KL in the loss as TRL does (ppo.kl_penalty: loss); --set changes any of it,
e.g. --set ppo.kl_penalty=reward --set placement.actor.num_workers=2.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

START = time.time()
BETA, LR, SEED = 0.04, 1e-6, 1234


def rlhf_ray_config(args, out_dir: str):
    from rlhf_ray.config import load_config

    overrides = {
        "ray.address": "local", "run.output_dir": out_dir, "run.seed": SEED, "models.actor.path": args.model,
        "ppo.advantage_estimator": "grpo", "ppo.num_iterations": args.steps + 1,
        "ppo.rollout_batch_size": args.prompts, "ppo.mini_batch_size": args.prompts * args.group,
        "ppo.ppo_epochs": 1, "ppo.kl_coef": BETA, "ppo.kl_estimator": "k3",
        "ppo.reward_functions": ["rlhf_ray.data.builtin.rule_reward"], "ppo.reward_function_mode": "replace",
        "ppo.actor.optim.lr": LR, "ppo.actor.optim.lr_schedule": "constant",
        "ppo.actor.deepspeed.gradient_checkpointing": False,
        # TRL's formulation: the k3 KL in the loss (beta), one pass over one batch, so the training pass gives the
        # old log-probs (TRL skips them too when num_iterations is 1).
        "ppo.kl_penalty": "loss",
        # The layout for a 2-core machine: one actor rank with both cores and the whole batch per micro-batch
        # (as TRL), the reference on both cores, one vLLM engine (generation runs while the learners idle).
        "placement.actor.num_workers": 1, "placement.actor.cpus_per_worker": 2,
        "ppo.actor.deepspeed.micro_batch_size": args.prompts * args.group,
        "placement.reference.cpus_per_worker": 2,
        "generation.n_samples_per_prompt": args.group, "generation.max_new_tokens": args.max_new_tokens,
        "generation.temperature": 1.0, "generation.ignore_eos": not args.natural_length,
        "logging.tensorboard": False, "checkpoint.every": 0,
    }
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)  # as the CLI's dotted overrides
    return load_config(None, overrides)


def prompts_in_order(cfg, n: int) -> list[dict]:
    """The rows rlhf_ray's controller takes, in its order (PromptStream with the run seed)."""
    from rlhf_ray.data import load_stage_dataset
    from rlhf_ray.models.loading import load_tokenizer
    from rlhf_ray.experience import PromptStream

    tokenizer = load_tokenizer(cfg.models.actor)
    rows = load_stage_dataset(cfg, "ppo", tokenizer, split="train")
    return PromptStream.from_dataset(rows, seed=cfg.run.seed).take(n)


# ------------------------------------------------------------------------------------------- rlhf_ray side
def run_rlhf_ray(args) -> dict:
    from rlhf_ray.metrics import read_metrics
    from rlhf_ray.ppo import PPOTrainer

    out = tempfile.mkdtemp(prefix="bench_grpo_rlhf_ray_")
    cfg = rlhf_ray_config(args, out)
    trainer = PPOTrainer(cfg)
    try:
        trainer.run()
    finally:
        trainer.shutdown()
    rows = read_metrics(Path(out) / "ppo" / cfg.logging.metrics_file)
    return {"iteration_s": [r["time/iteration_s"] for r in rows],
            "phases_s": {k: [r[k] for r in rows] for k in ("time/generate_s", "time/score_s", "time/train_s",
                                                           "time/sync_s")},
            "response_length": [r["response/length_mean"] for r in rows], "reward": [r["reward/mean"] for r in rows],
            "weight_version": [r["weight_version"] for r in rows],
            "startup_s": time.time() - START - sum(r["time/iteration_s"] for r in rows[1:]),
            "layout": {"actor_ranks": cfg.placement.actor.num_workers, "engines": cfg.generation.num_engines,
                       "reference_ranks": cfg.placement.reference.num_workers, "kl_penalty": cfg.ppo.kl_penalty,
                       "old_logprobs_from_training": [r["experience/old_logprobs_from_training"] for r in rows]}}


# ------------------------------------------------------------------------------------------------ TRL side
def run_trl(args) -> dict:
    import datasets
    import torch
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlhf_ray.data import parse_conversation
    from rlhf_ray.data.builtin import rule_reward
    from rlhf_ray.models.loading import resolve_model_path

    cfg = rlhf_ray_config(args, tempfile.mkdtemp(prefix="bench_grpo_trl_"))
    path = resolve_model_path(cfg.models.actor.path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = prompts_in_order(cfg, args.prompts * (args.steps + 1))
    conversations = [parse_conversation(r["prompt"]) for r in rows]  # as rlhf_ray renders a prompt
    for conv, row in zip(conversations, rows):  # the same prompt tokens as rlhf_ray's
        ids = tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=False)
        if list(ids) != list(row["prompt_input_ids"]):
            raise SystemExit(f"prompt tokens differ between TRL's rendering and rlhf_ray's for {row['prompt']!r}")
    # TRL repeats each prompt num_generations times; a dataset of the distinct prompts in order, unshuffled.
    train = datasets.Dataset.from_list([{"prompt": c, "reference": r["reference"]} for c, r in zip(conversations, rows)])

    def reward(prompts, completions, reference, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return rule_reward([str(p) for p in prompts], texts, list(reference))

    steps_s, lengths, rewards = [], [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            steps_s.append(time.perf_counter() - self.t)

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])
                rewards.append(logs.get("reward", float("nan")))

    gen_kwargs = {} if args.natural_length else {"min_new_tokens": args.max_new_tokens}
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_grpo_trl_out_"), use_cpu=True, seed=SEED, bf16=False,
        per_device_train_batch_size=args.prompts * args.group, gradient_accumulation_steps=1,
        num_generations=args.group, max_completion_length=args.max_new_tokens, temperature=1.0, top_k=0,
        beta=BETA, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, max_steps=args.steps + 1,
        num_iterations=1, gradient_checkpointing=False, shuffle_dataset=False, logging_steps=1,
        report_to="none", save_strategy="no", generation_kwargs=gen_kwargs or None, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=path, reward_funcs=reward, args=config, train_dataset=train,
                          processing_class=tokenizer, callbacks=[Timer()])
    if next(trainer.model.parameters()).dtype != torch.float32:
        raise SystemExit("TRL loaded the model in a dtype other than fp32")
    trainer.train()
    return {"iteration_s": steps_s, "response_length": lengths, "reward": rewards,
            "startup_s": time.time() - START - sum(steps_s[1:]), "torch_threads": torch.get_num_threads()}


# --------------------------------------------------------------------------------------------------- driver
def side(name: str, argv: list[str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        subprocess.run([sys.executable, __file__, *argv, "--side", name, "--result", f.name], check=True)
        return json.loads(Path(f.name).read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="builtin:smollm2")
    parser.add_argument("--prompts", type=int, default=4, help="distinct prompts per iteration")
    parser.add_argument("--group", type=int, default=4, help="completions per prompt (GRPO group size)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="timed iterations, after one warm-up iteration")
    parser.add_argument("--natural-length", action="store_true", help="let EOS end completions (default: exact length)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an rlhf_ray config override, e.g. generation.num_engines=2 (repeatable)")
    parser.add_argument("--side", choices=["trl", "rlhf_ray"], help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        result = run_trl(args) if args.side == "trl" else run_rlhf_ray(args)
        Path(args.result).write_text(json.dumps(result))
        return 0

    results = {name: side(name, sys.argv[1:]) for name in ("trl", "rlhf_ray")}
    median = {name: statistics.median(r["iteration_s"][1:]) for name, r in results.items()}
    print(f"\nGRPO iteration, {args.model}, {args.prompts} prompts x {args.group} completions of "
          f"{'<=' if args.natural_length else 'exactly '}{args.max_new_tokens} tokens, reference + k3 KL, fp32, "
          f"{os.cpu_count()} cores")
    print(f"| side | median s/iteration (iterations 2..{args.steps + 1}) | start-up s | mean completion length |")
    print("|---|---|---|---|")
    for name, r in results.items():
        length = statistics.mean(r["response_length"][1:]) if r["response_length"][1:] else float("nan")
        print(f"| {name} | {median[name]:.2f} | {r['startup_s']:.0f} | {length:.1f} |")
    phases = results["rlhf_ray"]["phases_s"]
    print("rlhf_ray phases (median s): " + ", ".join(
        f"{k.split('/')[1][:-2]} {statistics.median(v[1:]):.2f}" for k, v in phases.items()))
    print(f"rlhf_ray layout: {results['rlhf_ray']['layout']}, overrides {args.set or 'none'}; "
          f"TRL torch threads: {results['trl']['torch_threads']}")
    print(f"ratio TRL / rlhf_ray seconds per iteration: {median['trl'] / median['rlhf_ray']:.2f} "
          f"(> 1: rlhf_ray is faster)")
    print("raw:", json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
