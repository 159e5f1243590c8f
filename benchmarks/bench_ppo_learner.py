"""Benchmark the PPO actor learner: rlhf_ray's PolicyGroup (Ray actor + DeepSpeed) vs a bare torch loop.

    flock /tmp/rlhf_ray_heavy.lock .venv/bin/python benchmarks/bench_ppo_learner.py [--model builtin:smollm2]
        [--precision fp32|bf16] [--steps 3] [--sequences 16] [--prompt-tokens 40] [--completion-tokens 32]
        [--workers 1] [--cpus 2] [--zero-stage 2] [--skip-ray] [--torch-profile] [--phase-times]

Not a test. One experience batch like bench_grpo_vs_trl.py's (16 sequences = 4 prompts x 4 completions, a
left-padded ~40-token prompt + 32 completion tokens, GRPO advantages, reference log-probs with the k3 KL in the
loss at beta 0.04, on-policy: no old log-probs, the training pass gives them), one optimizer step per call over all
of it (mini-batch = micro-batch = 16), the GRPO bench's learner settings (AdamW lr 1e-6, constant schedule, no
gradient checkpointing).
  rlhf_ray:  PolicyGroup(cfg).train(experience, kl_coef) -- the real learner: --workers Ray actor ranks of --cpus
             CPUs each (Ray sets OMP_NUM_THREADS to them), DeepSpeed ZeRO --zero-stage, gloo; timed at the driver.
  bare:      this process, torch.set_num_threads(--cpus), the same model, AdamW and the same loss code
             (learner.causal_logprobs + learner.policy_objective + rl.py), backward, grad clip, step.
Precision: fp32 both sides, or bf16 both sides as torch.autocast(cpu, bfloat16) over fp32 weights (the CPU learners'
bf16, deepspeed_config.autocast_bf16; torch's documented mixed precision, what HF Trainer / TRL do with bf16=True on
CPU). The learner's attention is models/attention.py's; the bare loop's transformers' sdpa.
--phase-times: seconds per timed step in rank 0's pieces (DeepSpeed's forward, backward and step, the learner's loss
forward, boundary step and gradient check), timers wrapped around them in the rank's process.
Timed: every step after the first (warm-up); reported: median seconds per step, tokens/s, ratio ray / bare (bare
time / ray time), and both sides' first-step losses (the same math on the same batch and weights: they must agree).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlhf_ray import rl  # noqa: E402
from rlhf_ray.config import load_config  # noqa: E402

BETA, LR, SEED = 0.04, 1e-6, 1234


def make_config(args, out_dir: str):
    n = args.sequences
    return load_config(None, {
        "ray.address": "local", "run.output_dir": out_dir, "run.seed": SEED, "models.actor.path": args.model,
        "ppo.advantage_estimator": "grpo", "ppo.rollout_batch_size": n // args.group, "ppo.mini_batch_size": n,
        "ppo.ppo_epochs": 1, "ppo.kl_coef": BETA, "ppo.kl_estimator": "k3", "ppo.kl_penalty": "loss",
        "ppo.num_iterations": args.steps + 1,
        "ppo.actor.optim.lr": LR, "ppo.actor.optim.lr_schedule": "constant",
        "ppo.actor.deepspeed.gradient_checkpointing": False, "ppo.actor.deepspeed.zero_stage": args.zero_stage,
        "ppo.actor.deepspeed.micro_batch_size": n // args.workers, "ppo.actor.deepspeed.precision": args.precision,
        "placement.actor.num_workers": args.workers, "placement.actor.cpus_per_worker": args.cpus,
        "generation.n_samples_per_prompt": args.group, "generation.max_new_tokens": args.completion_tokens,
        "generation.temperature": 1.0,
        **({"placement.layout": "hybrid", "generation.max_restarts": 0} if args.layout == "hybrid" else {}),
    })


def experience_batch(args, vocab: int, pad_id: int) -> dict:
    """GRPO-shaped experience: prompts of prompt_tokens +- 4 real tokens left-padded to prompt_tokens + 4, then
    completion_tokens response tokens; group-normalised advantages; reference log-probs near a model's."""
    g = torch.Generator().manual_seed(SEED)
    n, width, resp = args.sequences, args.prompt_tokens + 4, args.completion_tokens
    ids = torch.randint(3, vocab, (n, width + resp), generator=g)
    mask = torch.ones_like(ids)
    for i, length in enumerate(torch.randint(args.prompt_tokens - 4, width + 1, (n,), generator=g).tolist()):
        mask[i, :width - length] = 0
    ids[mask == 0] = pad_id
    action = torch.zeros(n, width + resp - 1, dtype=torch.long)
    action[:, width - 1:] = 1  # columns whose target is a response token
    scores = torch.rand(n, generator=g)
    # log-probs of random tokens under a model: about log(1 / vocab), spread by a few nats
    ref = (-math.log(vocab) + 2 * torch.randn(n, width + resp - 1, generator=g)).clamp(max=-0.01) * action
    return {"input_ids": ids, "attention_mask": mask, "action_mask": action,
            "advantages": rl.grpo_advantages(scores, args.group, action), "ref_logprobs": ref,
            "vllm_logprobs": ref + 0.01 * action}


# --------------------------------------------------------------------------------------------- rlhf_ray side
def _install_phase_timers(worker) -> None:
    """In the learner rank's process: accumulate wall seconds per piece of its training step (--phase-times)."""
    import collections
    import functools

    totals = worker.bench_phase_times = collections.defaultdict(list)

    def timed(owner, name: str, label: str) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                totals[label].append(time.perf_counter() - start)
        setattr(owner, name, wrapper)

    for name in ("forward", "backward", "step"):
        timed(worker.engine, name, f"deepspeed engine.{name}")
    timed(worker.engine.optimizer, "step", f"optimizer.step ({type(worker.engine.optimizer).__name__})")
    for name in ("_forward", "_boundary_step", "_grads_finite"):
        timed(worker, name, f"learner.{name}")


def read_phase_timers(worker) -> tuple[dict[str, tuple[float, int]], int]:
    """In the learner rank's process: {piece: (seconds, calls)} since the timers were installed or last read (then
    cleared), and the process's minor page faults so far."""
    import resource

    totals = {label: (sum(seconds), len(seconds)) for label, seconds in worker.bench_phase_times.items()}
    worker.bench_phase_times.clear()
    return totals, resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def ray_side(cfg, batch: dict, steps: int, profile: str = "", phase_times: bool = False) -> tuple[list[float], dict]:
    import os
    import signal
    import subprocess

    import ray

    from rlhf_ray.generator import Sampling
    from rlhf_ray.hybrid import HybridPolicyGroup
    from rlhf_ray.learner import PolicyGroup
    from rlhf_ray.resources import init_ray

    init_ray(cfg, logging_level="WARNING")
    hybrid = cfg.placement.layout == "hybrid"
    group = (HybridPolicyGroup if hybrid else PolicyGroup)(cfg)
    try:
        ref = ray.put(batch)
        times, first, spy = [], None, None
        group_rows = slice(None, None, cfg.generation.n_samples_per_prompt)  # one prompt per GRPO group
        prompts = [ids[mask.bool()][:8].tolist()
                   for ids, mask in zip(batch["input_ids"][group_rows], batch["attention_mask"][group_rows])]
        sampling = Sampling(n=cfg.generation.n_samples_per_prompt, max_new_tokens=cfg.generation.max_new_tokens,
                            ignore_eos=True, seed=SEED)
        for step in range(steps + 1):
            if hybrid:  # as in a GRPO iteration: the rank's engine generates, then the learner trains (timed)
                ray.get(group.workers[0].generate.remote(prompts, sampling))
            if step == 1 and profile:  # py-spy on rank 0's process over the timed steps
                spy = subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record", "--pid",
                                        str(group.reports[0]["pid"]), "--format", "raw", "--rate", "100",
                                        "--idle", "-o", profile])
                time.sleep(1.0)
            if step == 1 and phase_times:
                ray.get(group.workers[0].apply.remote(_install_phase_timers))
            start = time.perf_counter()
            stats = group.train(ref, kl_coef=BETA)
            times.append(time.perf_counter() - start)
            first = first or stats
        if phase_times:
            first["phase_times"] = ray.get(group.workers[0].apply.remote(read_phase_timers))[0]
        first["zero_stage_run"] = group.apply(lambda w: w.engine.zero_optimization_stage())[0]
        if spy is not None:
            os.kill(spy.pid, signal.SIGINT)
            spy.wait()
        return times[1:], first
    finally:
        group.shutdown()
        ray.shutdown()


# ------------------------------------------------------------------------------------------------- bare side
def bare_side(cfg, batch: dict, steps: int, threads: int, precision: str, fused: bool,
              torch_profile: bool = False) -> tuple[list[float], dict]:
    from rlhf_ray.learner import causal_logprobs, forward_accepts, policy_objective
    from rlhf_ray.models.loading import load_causal_lm

    torch.set_num_threads(threads)
    torch.manual_seed(cfg.run.seed)
    p, optim = cfg.ppo, cfg.ppo.actor.optim
    model = load_causal_lm(cfg.models.actor, dtype=torch.float32).train()
    for module in model.modules():  # ppo.actor.disable_dropout, as the learner
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=optim.lr,
                                  betas=tuple(optim.betas), weight_decay=optim.weight_decay,
                                  fused=fused)  # as the learner on CPU: fused at one rank
    position_ids, keep = forward_accepts(model, "position_ids"), forward_accepts(model, "logits_to_keep")
    units = max(float(rl.aggregation_units(batch["action_mask"], p.loss_aggregation)), 1.0)
    aggregation = rl.Aggregation(p.loss_aggregation, units=units, max_len=cfg.generation.max_new_tokens)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext

    def one_step() -> dict:
        with autocast():
            logprobs, entropy = causal_logprobs(model, batch, position_ids, "detached", keep,
                                                cfg.generation.temperature)
        loss, stats = policy_objective(p, logprobs.float(), entropy.float(), batch, BETA, aggregation)
        loss.backward()
        if optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {k: float(v) for k, v in stats.items()}

    times, first = [], None
    for _ in range(steps + 1):
        faults, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        stats = one_step()
        times.append(time.perf_counter() - start)
        first = first or {**stats, "page_faults": []}
        first["page_faults"].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
    if torch_profile:  # one more step under torch.profiler: where the bare loop's time goes, op by op
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            one_step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    return times[1:], first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="builtin:smollm2")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--steps", type=int, default=3, help="timed optimizer steps per side (after one warm-up)")
    ap.add_argument("--sequences", type=int, default=16)
    ap.add_argument("--group", type=int, default=4, help="completions per prompt (GRPO advantages)")
    ap.add_argument("--prompt-tokens", type=int, default=40)
    ap.add_argument("--completion-tokens", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1, help="learner ranks (Ray actors)")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs (threads) per rank; the bare loop's threads")
    ap.add_argument("--zero-stage", type=int, default=2)
    ap.add_argument("--layout", choices=("separate", "hybrid"), default="separate",
                    help="hybrid: the rank also hosts its vLLM engine (placement.layout hybrid), which generates "
                         "before each (timed) training step, as in a GRPO iteration")
    ap.add_argument("--skip-ray", action="store_true", help="bare loop only (profiling)")
    ap.add_argument("--profile", default="", help="write a py-spy raw profile of learner rank 0's timed steps here")
    ap.add_argument("--phase-times", action="store_true",
                    help="seconds per timed step in learner rank 0's pieces (forward, backward, step, gradient check)")
    ap.add_argument("--torch-profile", action="store_true",
                    help="after the bare loop's timed steps, one more under torch.profiler; print its ops by self CPU time")
    args = ap.parse_args()

    from rlhf_ray.models.loading import load_tokenizer

    with tempfile.TemporaryDirectory(prefix="bench_ppo_learner_") as tmp:
        cfg = make_config(args, tmp)
        tokenizer = load_tokenizer(cfg.models.actor)
        batch = experience_batch(args, len(tokenizer), tokenizer.pad_token_id)
        tokens = int(batch["attention_mask"].sum())
        ray_times, ray_stats = ([], None) if args.skip_ray else ray_side(cfg, batch, args.steps, args.profile,
                                                                         args.phase_times)
        bare_times, bare_stats = bare_side(cfg, batch, args.steps, args.workers * args.cpus, args.precision,
                                           fused=args.workers == 1, torch_profile=args.torch_profile)

    bare = statistics.median(bare_times)
    print(f"\nmodel {args.model}, {args.precision}: {args.sequences} sequences x ({args.prompt_tokens} prompt + "
          f"{args.completion_tokens} completion) tokens = {tokens} real tokens, one optimizer step, kl in the loss")
    print(f"bare torch loop ({args.workers * args.cpus} threads): {bare:.2f} s/step "
          f"({tokens / bare:,.0f} tokens/s); steps {[round(t, 2) for t in bare_times]}")
    print(f"  minor page faults per step (warm-up first): {bare_stats['page_faults']}")
    print(f"  first step: policy_loss {bare_stats['policy_loss']:.6f} kl_loss {bare_stats['kl_loss']:.6f} "
          f"entropy {bare_stats['entropy']:.5f}")
    if ray_times:
        ray = statistics.median(ray_times)
        print(f"rlhf_ray PolicyGroup ({args.workers} rank(s) x {args.cpus} CPUs, ZeRO-{args.zero_stage} asked, "
              f"stage {ray_stats.get('zero_stage_run', '?')} run): "
              f"{ray:.2f} s/step ({tokens / ray:,.0f} tokens/s); steps {[round(t, 2) for t in ray_times]}")
        print(f"  first step: policy_loss {ray_stats['policy_loss']:.6f} kl_loss {ray_stats['kl_loss']:.6f} "
              f"entropy {ray_stats['entropy']:.5f}")
        print(f"ratio ray/bare (tokens/s): {bare / ray:.2f}")
        for label, (seconds, calls) in sorted(ray_stats.get("phase_times", {}).items(), key=lambda kv: -kv[1][0]):
            print(f"  rank 0 {label}: {seconds / len(ray_times):.3f} s per step ({calls} calls)")


if __name__ == "__main__":
    main()
