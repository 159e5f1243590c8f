"""Benchmark one GRPO iteration, rlhf_ray vs TRL's GRPOTrainer, per precision (fp32, bf16) and rlhf_ray layout.

rlhf_ray: Ray + a vLLM engine + a DeepSpeed learner; layouts separate and hybrid (placement.layout).

    .venv/bin/python -m pip install -e '.[bench]'      # TRL 1.16 (not needed by anything else)
    flock /tmp/rlhf_ray_heavy.lock .venv/bin/python benchmarks/bench_grpo_vs_trl.py [--rows all]
        [--model builtin:smollm2] [--prompts 4] [--group 4] [--max-new-tokens 32] [--steps 3] [--natural-length]
        [--sides trl,rlhf_ray] [--rounds 1] [--peak-json FILE] [--out STEM]
        [--set placement.actor.num_workers=1 --set generation.num_engines=2 ...]

Not a test. Rows (--rows, comma-separated, default all): fp32-separate, fp32-hybrid, bf16-separate, bf16-hybrid.
A row sets rlhf_ray's ppo.actor.deepspeed.precision (fp32 | bf16: learner, reference, reward and engine) and
placement.layout (separate | hybrid; a tree without placement.layout runs separate rows without the key and skips
hybrid ones), and compares against TRL at the same precision: TRL with bf16=False (fp32) or bf16=True. TRL runs once
per precision and serves both layouts. Every side runs in its own fresh process, one after the other, with:
  the same model (loaded in fp32 by both), the same prompts in the same order (the built-in task's PPO prompts,
  rendered with the model's chat template: the bench checks both sides tokenize them identically), the same batch
  (--prompts x --group completions per iteration, ONE optimizer step over all of them), the same group size, the
  same lengths (by default every completion is exactly --max-new-tokens long, EOS ignored: vLLM's ignore_eos and HF
  generate's min_new_tokens, so both do identical work; --natural-length lets EOS end them), temperature 1, a frozen
  reference model with a k3 KL penalty (beta 0.04), lr 1e-6, AdamW betas (0.9, 0.999) (TRL's default; set on
  rlhf_ray's side since 2026-12-02 01:10 UTC), no gradient checkpointing, and the built-in rule reward.
TRL's settings are those of the first version of this bench except bf16 (GRPOConfig's other defaults unchanged).
The iteration = generate, score (reward, reference and old log-probs), train one step, and, for rlhf_ray,
broadcast the new weights to the vLLM engine (verified: generation.verify_weights). TRL generates with HF
generate in the training process (use_cpu=True), so it has no weight sync.

Reported per row (iteration 1 is the warm-up; "timed" = iterations 2..--steps+1):
  median s/iteration of each side and the ratio TRL / rlhf_ray (> 1: rlhf_ray faster);
  rlhf_ray's phases (metrics time/generate_s, score_s, train_s, sync_s; median) and TRL's (the bench times
    GRPOTrainer._generate = generate, _generate_and_score_completions minus that = score, the rest of the step =
    train: loss, backward, optimizer step);
  start-up + 10 iterations: what a user waits for, process launch to the end of iteration 10. Start-up = launch to
    the start of iteration 1 (imports, Ray, engines, model loads). Measured when 10 iterations ran (--steps 9),
    else estimated as start-up + iteration 1 + 9 x the timed median (the table says which);
  training FLOP utilisation: model FLOPs of the training step / train-phase seconds / peak, median over timed
    iterations. Model FLOPs = 6 x (N_body x T + N_head x R): N_body the parameters every token passes (all but the
    input embedding), N_head the LM head's (both sides compute logits only over response tokens), T the real
    (non-pad) prompt + response tokens, R the response tokens; attention score FLOPs (short sequences) and the
    forward-only passes (reference, generation) are not counted. Peak: this machine's best matmul GFLOP/s at the
    row's dtype with every core (benchmarks/bench_cpu_peak.py, run first unless --peak-json gives its JSON).
TRL's compute dtype is checked, not assumed: forward hooks on the first decoder layer's q_proj of the policy and
the reference record weight, input and output dtypes and the autocast state in each phase ("dtype probe").
Noise: the sides run one after the other on a machine that may be shared. Each side records the host's steal share
while it ran (benchmarks/host_cpu.py: the CPU time the hypervisor gave other tenants; the JSON also keeps the share
of the machine the side kept busy); --rounds N repeats the whole comparison N times, alternating which side goes
first (round 1 TRL, round 2 rlhf_ray, ...), and reports each round's ratio (its two sides adjacent in time) and the
median over rounds; every other number is then the median over rounds.
Writes <STEM>.md and <STEM>.json (default benchmarks/results/grpo_vs_trl_<UTC date-time>).
TRL spreads torch over every core in one process. rlhf_ray runs its roles as separate Ray actors; the bench's
defaults suit a 2-core machine (actor: 1 rank on 2 CPUs, the whole batch per micro-batch; reference on 2 CPUs;
1 vLLM engine on 1 core) and put the KL in the loss as TRL does (ppo.kl_penalty: loss); --set changes any of it,
e.g. --set ppo.kl_penalty=reward --set placement.actor.num_workers=2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import host_cpu  # noqa: E402  (benchmarks/, this file's folder)

BETA, LR, SEED = 0.04, 1e-6, 1234
ROWS = {"fp32-separate": ("fp32", "separate"), "fp32-hybrid": ("fp32", "hybrid"),
        "bf16-separate": ("bf16", "separate"), "bf16-hybrid": ("bf16", "hybrid")}
ROW_KEYS = ("ppo.actor.deepspeed.precision", "placement.layout")  # set by --rows, not --set
RESULTS = Path(__file__).resolve().parent / "results"


def has_layout_key() -> bool:
    """placement.layout exists in this tree's config (it arrived with the hybrid layout)."""
    from rlhf_ray.config import PlacementConfig

    return "layout" in {f.name for f in dataclasses.fields(PlacementConfig)}


def rlhf_ray_config(args, out_dir: str, row_overrides: dict | None = None):
    from rlhf_ray.config import load_config

    overrides = {
        "ray.address": "local", "run.output_dir": out_dir, "run.seed": args.seed, "models.actor.path": args.model,
        "ppo.advantage_estimator": "grpo", "ppo.num_iterations": args.steps + 1,
        "ppo.rollout_batch_size": args.prompts, "ppo.mini_batch_size": args.prompts * args.group,
        "ppo.ppo_epochs": 1, "ppo.kl_coef": args.beta, "ppo.kl_estimator": "k3",
        "ppo.reward_functions": ["rlhf_ray.data.builtin.rule_reward"], "ppo.reward_function_mode": "replace",
        "ppo.actor.optim.lr": args.lr, "ppo.actor.optim.lr_schedule": "constant",
        "ppo.actor.optim.betas": [0.9, 0.999],  # TRL's (the HF Trainer's AdamW default; rlhf_ray's own is 0.9, 0.95)
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
        **(row_overrides or {}),
    }
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)  # as the CLI's dotted overrides
    if overrides.get("placement.layout") == "hybrid":  # the engine lives in the learner's rank: no engine restarts
        overrides.setdefault("generation.max_restarts", 0)  # (config.py refuses them); every bench that asks hybrid
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
    out = tempfile.mkdtemp(prefix="bench_grpo_rlhf_ray_")
    row = {"ppo.actor.deepspeed.precision": args.precision}
    if has_layout_key():
        row["placement.layout"] = args.layout
    elif args.layout != "separate":
        raise SystemExit("placement.layout is not in this tree's config")
    try:  # the run's folder (checkpoint and final model, ~0.5 GB on SmolLM2) goes once its metrics are read
        return rlhf_ray_run(args, out, row)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def rlhf_ray_run(args, out: str, row: dict) -> dict:
    """One rlhf_ray PPO run in `out` with the row's overrides: its per-iteration numbers from the metrics file."""
    from rlhf_ray.metrics import read_metrics
    from rlhf_ray.ppo import PPOTrainer

    cfg = rlhf_ray_config(args, out, row)
    trainer = PPOTrainer(cfg)
    first_iteration_start = time.time()
    try:
        trainer.run()
    finally:
        trainer.shutdown()
    rows = read_metrics(Path(out) / "ppo" / cfg.logging.metrics_file)
    return {"iteration_s": [r["time/iteration_s"] for r in rows],
            "phases_s": {k.split("/")[1][:-2]: [r[k] for r in rows]
                         for k in ("time/generate_s", "time/score_s", "time/train_s", "time/sync_s")},
            "response_length": [r["response/length_mean"] for r in rows], "reward": [r["reward/mean"] for r in rows],
            "kl_sequence": [r["kl/mean"] for r in rows],
            "overlong_penalty": [r.get("reward/overlong_penalty_mean", 0.0) for r in rows],  # in reward/mean
            "samples_generated": [r["rollout/prompts_consumed"] * cfg.generation.n_samples_per_prompt for r in rows],
            "weight_version": [r["weight_version"] for r in rows], "first_iteration_start": first_iteration_start,
            "devices": getattr(trainer, "devices", None),
            "layout": {"placement.layout": row.get("placement.layout", "absent (separate)"),
                       "actor_ranks": cfg.placement.actor.num_workers, "engines": cfg.generation.num_engines,
                       "reference_ranks": cfg.placement.reference.num_workers, "kl_penalty": cfg.ppo.kl_penalty,
                       "old_logprobs_from_training": [r["experience/old_logprobs_from_training"] for r in rows]}}


# ------------------------------------------------------------------------------------------------ TRL side
def dtype_probe(trainer, phase: list[str]) -> Counter:
    """Forward hooks on layer 0's q_proj of the policy and the reference: what each phase really computes in."""
    import torch

    seen = Counter()

    def hook(name):
        def record(module, inputs, output):
            autocast = torch.is_autocast_enabled("cpu")
            seen[(phase[0], name, str(module.weight.dtype), str(inputs[0].dtype), str(output.dtype),
                  str(torch.get_autocast_dtype("cpu")) if autocast else "off")] += 1
        return record

    for name, model in (("policy", trainer.model), ("reference", trainer.ref_model)):
        if model is not None:
            model.model.layers[0].self_attn.q_proj.register_forward_hook(hook(name))
    return seen


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

    steps_s, lengths, rewards, kls, first_start = [], [], [], [], []
    phases = {"generate": [], "score": [], "train": []}
    phase, spent = ["startup"], Counter()  # the phase the hooks attribute a forward to; seconds per method this step

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            spent.clear()
            self.t = time.perf_counter()
            first_start.append(time.time())

        def on_step_end(self, *a, **k):
            step = time.perf_counter() - self.t
            steps_s.append(step)
            phases["generate"].append(spent["generate"])
            phases["score"].append(spent["generate_and_score"] - spent["generate"])
            phases["train"].append(step - spent["generate_and_score"])

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])
                rewards.append(logs.get("reward", float("nan")))
                kls.append(logs.get("kl", float("nan")))  # k3, mean over completion tokens

    def timed(obj, method: str, label: str, phase_label: str) -> None:
        original = getattr(obj, method)

        def wrapper(*a, **k):
            previous, phase[0], t = phase[0], phase_label, time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                spent[label] += time.perf_counter() - t
                phase[0] = previous
        setattr(obj, method, wrapper)

    gen_kwargs = {} if args.natural_length else {"min_new_tokens": args.max_new_tokens}
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_grpo_trl_out_"), use_cpu=True, seed=args.seed,
        bf16=args.precision == "bf16",
        per_device_train_batch_size=args.prompts * args.group, gradient_accumulation_steps=1,
        num_generations=args.group, max_completion_length=args.max_new_tokens, temperature=1.0, top_k=0,
        beta=args.beta, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, max_steps=args.steps + 1,
        num_iterations=1, gradient_checkpointing=False, shuffle_dataset=False, logging_steps=1,
        report_to="none", save_strategy="no", generation_kwargs=gen_kwargs or None, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=path, reward_funcs=reward, args=config, train_dataset=train,
                          processing_class=tokenizer, callbacks=[Timer()])
    if next(trainer.model.parameters()).dtype != torch.float32:
        raise SystemExit("TRL loaded the model in a dtype other than fp32")
    seen = dtype_probe(trainer, phase)
    timed(trainer, "_generate", "generate", "generate")
    timed(trainer, "_generate_and_score_completions", "generate_and_score", "score")
    timed(trainer, "compute_loss", "compute_loss", "train")
    trainer.train()
    probe = [{"phase": k[0], "model": k[1], "weight": k[2], "input": k[3], "output": k[4], "autocast": k[5],
              "calls": n} for k, n in sorted(seen.items())]
    return {"iteration_s": steps_s, "phases_s": phases, "response_length": lengths, "reward": rewards,
            "kl_token": kls, "first_iteration_start": first_start[0], "torch_threads": torch.get_num_threads(),
            "dtype_probe": probe, "mixed_precision": str(trainer.accelerator.mixed_precision)}


# --------------------------------------------------------------------------------------------------- driver
def side(name: str, precision: str, layout: str, env: dict | None = None) -> dict:
    """One side in a fresh process (with `env` added to its environment); {'error': ...} instead of raising, so one
    broken row leaves the others."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        launched, before = time.time(), host_cpu.ticks()
        rc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--side", name, "--precision", precision,
                             "--layout", layout, "--result", f.name], env={**os.environ, **(env or {})}).returncode
        after = host_cpu.ticks()
        host = {"host_steal": host_cpu.steal_share(before, after), "host_busy": host_cpu.busy_share(before, after)}
        if rc != 0:
            return {"error": f"{name} side exited with {rc} (its log is above)", **host}
        result = json.loads(Path(f.name).read_text())
    return {**result, "launched": launched, **host}


def model_params(model: str) -> dict:
    """N_body (parameters every token passes) and N_head (LM head) from the model's config, on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from rlhf_ray.models.loading import resolve_model_path

    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve_model_path(model)))
    total = sum(p.numel() for p in m.parameters())  # a tied head is counted once
    embed, head = m.get_input_embeddings().weight, m.get_output_embeddings().weight
    body = total - embed.numel() - (0 if head is embed else head.numel())
    return {"total": total, "body": body, "head": head.numel()}


def cpu_peak(args) -> dict:
    if args.peak_json:
        return json.loads(Path(args.peak_json).read_text())
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        subprocess.run([sys.executable, str(Path(__file__).with_name("bench_cpu_peak.py")), "--threads", "0",
                        "--seconds", "0.5", "--json", f.name], check=True, stdout=subprocess.DEVNULL)
        return json.loads(Path(f.name).read_text())


def summarise(r: dict, prompt_tokens: list[int], n_seq: int, params: dict, peak_gflops: float) -> dict:
    """The row's numbers for one side (see the docstring for each definition)."""
    its = r["iteration_s"]
    timed = range(1, len(its))
    median = statistics.median(its[i] for i in timed)
    startup = r["first_iteration_start"] - r["launched"]
    if len(its) >= 10:
        wait10, how = startup + sum(its[:10]), "measured"
    else:
        wait10, how = startup + its[0] + 9 * median, "estimated"
    util = []
    for i in timed:
        response = n_seq * r["response_length"][i]
        flops = 6 * (params["body"] * (prompt_tokens[i] + response) + params["head"] * response)
        util.append(flops / r["phases_s"]["train"][i] / (peak_gflops * 1e9))
    return {"median_s": median, "phases_median_s": {k: statistics.median(v[i] for i in timed)
                                                    for k, v in r["phases_s"].items()},
            "startup_s": startup, "startup_plus_10_s": wait10, "startup_plus_10": how,
            "train_flop_utilisation": statistics.median(util),
            "response_length_mean": statistics.mean(r["response_length"][i] for i in timed),
            "host_steal": r.get("host_steal"), "host_busy": r.get("host_busy")}


def combine(summaries: list[dict]) -> dict:
    """Several rounds' summaries of one side -> one: every number (and every phase) the median over the rounds."""
    out = dict(summaries[0])
    for key, value in summaries[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = statistics.median(s[key] for s in summaries)
        elif isinstance(value, dict) and all(isinstance(v, (int, float)) for v in value.values()):
            out[key] = {k: statistics.median(s[key][k] for s in summaries) for k in value}
    out["host_steal"] = [s.get("host_steal") for s in summaries]
    out["host_busy"] = [s.get("host_busy") for s in summaries]
    return out


def number(d: dict, key: str, spec: str) -> str:
    return format(d[key], spec) if key in d else "-"


def steals(value) -> str:
    """A side's host steal share(s) as a percentage (one per round)."""
    values = value if isinstance(value, list) else [value]
    return ", ".join("n/a" if v is None else f"{v:.0%}" for v in values) or "-"


def markdown(report: dict) -> str:
    a, lines = report["args"], []
    lines.append(f"GRPO iteration, {a['model']}, {a['prompts']} prompts x {a['group']} completions of "
                 f"{'<=' if a['natural_length'] else 'exactly '}{a['max_new_tokens']} tokens, reference + k3 KL, "
                 f"{report['cpu_count']} cores, {report['date']}; median of iterations 2..{a['steps'] + 1}")
    lines.append(f"command: `{report['command']}`")
    peak = report["peak_gflops"]
    lines.append(f"peak (bench_cpu_peak.py, {report['cpu_count']} threads): fp32 {peak['fp32']:.0f} GFLOP/s, "
                 f"bf16 {peak['bf16']:.0f} GFLOP/s")
    lines.append("")
    rounds = a.get("rounds", 1)
    if rounds > 1:
        lines.append(f"{rounds} rounds, alternating which side runs first (TRL in round 1); every number is the median "
                     f"over the rounds; the ratio is the median of the rounds' ratios")
    lines.append("| row | TRL s/it | rlhf_ray s/it | ratio TRL / rlhf_ray | ratio per round | host steal TRL / rlhf_ray "
                 "| rlhf_ray generate / score / train / sync s "
                 "| start-up + 10 it, TRL s | start-up + 10 it, rlhf_ray s | train FLOP util TRL | rlhf_ray |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, row in report["rows"].items():
        trl, ours = row.get("trl") or {}, row.get("rlhf_ray") or {}
        if "median_s" not in ours:
            why = ours.get("error") or ours.get("skipped") or "rlhf_ray side not run"
            lines.append(f"| {name} | {number(trl, 'median_s', '.2f')} | {why} | | | | | | | | |")
            continue
        p = ours["phases_median_s"]
        phases = " / ".join(f"{p[k]:.2f}" for k in ("generate", "score", "train", "sync"))
        ratio = f"{row['ratio']:.2f}" if row.get("ratio") is not None else "-"
        per_round = ", ".join("-" if r is None else f"{r:.2f}" for r in row.get("ratio_rounds", []))
        steal = f"{steals(trl.get('host_steal'))} / {steals(ours.get('host_steal'))}"
        lines.append(
            f"| {name} | {number(trl, 'median_s', '.2f')} | {ours['median_s']:.2f} | {ratio} | {per_round} | {steal} "
            f"| {phases} | {number(trl, 'startup_plus_10_s', '.0f')} | {ours['startup_plus_10_s']:.0f} "
            f"| {number(trl, 'train_flop_utilisation', '.1%')} | {ours['train_flop_utilisation']:.1%} |")
    lines.append("")
    lines.append("| TRL | s/it | generate / score / train s | start-up s | start-up + 10 it | train FLOP util "
                 "| host steal | dtype probe (phase model: weight -> q_proj output, autocast) |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for precision, trl in report["trl"].items():
        if "error" in trl:
            lines.append(f"| {precision} | {trl['error']} | | | | | | |")
            continue
        s, p = trl["summary"], trl["summary"]["phases_median_s"]
        probe = "; ".join(sorted({f"{d['phase']} {d['model']}: {d['weight'].split('.')[1]} -> "
                                  f"{d['output'].split('.')[1]}, {d['autocast'].split('.')[-1]}"
                                  for d in trl["dtype_probe"] if d["phase"] != "startup"}))
        lines.append(f"| {precision} (bf16={precision == 'bf16'}, accelerate mixed_precision "
                     f"{trl['mixed_precision']}, {trl['torch_threads']} threads) | {s['median_s']:.2f} "
                     f"| {p['generate']:.2f} / {p['score']:.2f} / "
                     f"{p['train']:.2f} | {s['startup_s']:.0f} | {s['startup_plus_10_s']:.0f} ({s['startup_plus_10']}) "
                     f"| {s['train_flop_utilisation']:.1%} | {steals(s.get('host_steal'))} | {probe} |")
    lines.append("")
    for name, row in report["rows"].items():
        ours = row.get("rlhf_ray") or {}
        if "median_s" in ours:
            lines.append(f"{name}: rlhf_ray start-up {ours['startup_s']:.0f} s, start-up + 10 it "
                         f"{ours['startup_plus_10']}; layout {ours['layout']}; workers {ours['devices']}")
    env = a.get("rlhf_ray_env") or "unchanged"
    lines.append(f"Overrides: {a['set'] or 'none'}; added to rlhf_ray's environment: {env}. "
                 f"Model FLOPs: 6 x (N_body {report['params']['body'] / 1e6:.1f}M x "
                 f"prompt+response tokens + N_head {report['params']['head'] / 1e6:.1f}M x response tokens) per "
                 f"iteration / train-phase s / peak at the row's dtype.")
    return "\n".join(lines)


def merge_trl(results: list[dict]) -> dict:
    """One precision's TRL side over the rounds: the first round's record with the median summary, or a failed
    round's error."""
    failed = next((t for t in results if "error" in t), None)
    return failed or {**results[0], "summary": combine([t["summary"] for t in results])}


def precision_of(row: str) -> str:
    return ROWS[row][0]


def one_round(args, rows, sides, prompt_tokens, n_seq, params, peak, layout_key, trl_first: bool) -> dict:
    """Every side of the comparison once: TRL per precision and rlhf_ray per row, TRL first or last."""
    trl: dict = {}

    def run_trl_sides() -> None:
        for precision in dict.fromkeys(precision_of(r) for r in rows):
            if "trl" in sides:
                trl[precision] = side("trl", precision, "separate")
                if "error" not in trl[precision]:
                    trl[precision]["summary"] = summarise(trl[precision], prompt_tokens, n_seq, params,
                                                          peak[precision])

    ours: dict = {}

    def run_rlhf_ray_sides() -> None:
        for name in rows:
            precision, layout = ROWS[name]
            if "rlhf_ray" not in sides:
                continue
            if layout != "separate" and not layout_key:
                ours[name] = {"skipped": "placement.layout is not in this tree's config"}
                continue
            r = side("rlhf_ray", precision, layout, dict(e.split("=", 1) for e in args.rlhf_ray_env))
            ours[name] = r if "error" in r else {**summarise(r, prompt_tokens, n_seq, params, peak[precision]),
                                                 "layout": r["layout"], "devices": r["devices"], "raw": r}

    for run in ((run_trl_sides, run_rlhf_ray_sides) if trl_first else (run_rlhf_ray_sides, run_trl_sides)):
        run()
    return {"trl_first": trl_first, "trl": trl,
            "rows": {name: {"trl": trl.get(precision_of(name), {}).get("summary"), "rlhf_ray": ours.get(name)}
                     for name in rows}}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="all", help=f"comma-separated, or all: {', '.join(ROWS)}")
    parser.add_argument("--sides", default="trl,rlhf_ray", help="comma-separated: trl, rlhf_ray")
    parser.add_argument("--model", default="builtin:smollm2")
    parser.add_argument("--prompts", type=int, default=4, help="distinct prompts per iteration")
    parser.add_argument("--group", type=int, default=4, help="completions per prompt (GRPO group size)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3,
                        help="timed iterations, after one warm-up iteration (9: start-up + 10 iterations measured)")
    parser.add_argument("--lr", type=float, default=LR, help="learning rate, both sides")
    parser.add_argument("--beta", type=float, default=BETA, help="k3 KL coefficient in the loss, both sides")
    parser.add_argument("--seed", type=int, default=SEED, help="run seed, both sides (also orders the prompts)")
    parser.add_argument("--natural-length", action="store_true", help="let EOS end completions (default: exact length)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an rlhf_ray config override, e.g. generation.num_engines=2 (repeatable)")
    parser.add_argument("--rlhf-ray-env", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable for the rlhf_ray side only (repeatable), e.g. "
                             "OMP_WAIT_POLICY=PASSIVE: its Ray workers inherit it")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat the comparison, alternating which side runs first; report medians over rounds")
    parser.add_argument("--peak-json", help="bench_cpu_peak.py's JSON (default: measure it first, ~15 s)")
    parser.add_argument("--out", help="output stem (default benchmarks/results/grpo_vs_trl_<UTC date-time>)")
    parser.add_argument("--side", choices=["trl", "rlhf_ray"], help=argparse.SUPPRESS)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--layout", choices=["separate", "hybrid"], default="separate", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> int:
    args = parse_args()
    if args.side:
        result = run_trl(args) if args.side == "trl" else run_rlhf_ray(args)
        Path(args.result).write_text(json.dumps(result))
        return 0

    rows = list(ROWS) if args.rows == "all" else args.rows.split(",")
    sides = args.sides.split(",")
    unknown = [r for r in rows if r not in ROWS] + [s for s in sides if s not in ("trl", "rlhf_ray")]
    if unknown:
        raise SystemExit(f"unknown --rows/--sides entries {unknown}; rows: {', '.join(ROWS)}; sides: trl, rlhf_ray")
    if args.rounds < 1:
        raise SystemExit("--rounds must be >= 1")
    malformed = [e for e in args.rlhf_ray_env if "=" not in e or not e.partition("=")[0]]
    if malformed:
        raise SystemExit(f"--rlhf-ray-env {malformed}: give NAME=VALUE")
    fixed = [s for s in args.set if s.partition("=")[0] in ROW_KEYS]
    if fixed:
        raise SystemExit(f"--set {fixed}: {' and '.join(ROW_KEYS)} are chosen per row by --rows")
    stamp = time.strftime("%Y-%m-%d_%H%M", time.gmtime())
    stem = Path(args.out) if args.out else RESULTS / f"grpo_vs_trl_{stamp}"
    cfg = rlhf_ray_config(args, tempfile.mkdtemp(prefix="bench_grpo_driver_"))
    prompts = prompts_in_order(cfg, args.prompts * (args.steps + 1))
    n_seq = args.prompts * args.group
    per_prompt = [len(r["prompt_input_ids"]) for r in prompts]
    prompt_tokens = [args.group * sum(per_prompt[i * args.prompts:(i + 1) * args.prompts])
                     for i in range(args.steps + 1)]  # per iteration: each prompt once per completion
    params = model_params(args.model)
    peak_json = cpu_peak(args)
    threads = str(os.cpu_count())
    if any(threads not in peak_json["peak_gflops"][d] for d in ("fp32", "bf16")):
        raise SystemExit(f"--peak-json has no {threads}-thread peak (bench_cpu_peak.py --threads 0 measures it)")
    peak = {d: peak_json["peak_gflops"][d][threads] for d in ("fp32", "bf16")}
    layout_key = has_layout_key()

    measure = dict(args=args, rows=rows, sides=sides, prompt_tokens=prompt_tokens, n_seq=n_seq, params=params,
                   peak=peak, layout_key=layout_key)
    rounds = [one_round(trl_first=k % 2 == 0, **measure) for k in range(args.rounds)]
    trl = {precision: merge_trl([r["trl"][precision] for r in rounds]) for precision in rounds[0]["trl"]}
    report_rows = {}
    for name in rows:
        per_round = [r["rows"][name] for r in rounds]
        ours = [x.get("rlhf_ray") or {} for x in per_round]
        theirs = [x.get("trl") or {} for x in per_round]
        ratios = [t["median_s"] / o["median_s"] if "median_s" in t and "median_s" in o else None
                  for t, o in zip(theirs, ours)]
        ok = [o for o in ours if "median_s" in o]
        row = {"trl": trl.get(precision_of(name), {}).get("summary"),
               "rlhf_ray": ({**combine(ok), "layout": ok[0]["layout"], "devices": ok[0]["devices"],
                             "raw": [o["raw"] for o in ok]} if ok and len(ok) == len(ours)
                            else next((o for o in ours if "median_s" not in o), {})),  # a failed round's error
               "ratio_rounds": ratios,
               "ratio": statistics.median(ratios) if ratios and None not in ratios else None}
        report_rows[name] = row
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu_count": os.cpu_count(),
              "command": " ".join(["benchmarks/bench_grpo_vs_trl.py", *sys.argv[1:]]), "args": vars(args),
              "peak_gflops": peak, "cpu_peak": peak_json, "params": params, "prompt_tokens": prompt_tokens,
              "trl": trl, "rows": report_rows, "rounds": rounds if args.rounds > 1 else None}
    text = markdown(report)
    print("\n" + text)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(text + "\n")
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nwrote {stem.with_suffix('.md')} and {stem.with_suffix('.json')}")
    failed = [r for r in [*trl.values(), *(row.get("rlhf_ray") or {} for row in report_rows.values())] if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
