"""Benchmark SFT throughput: Ray Train + DeepSpeed (rlhf_ray.train.run_sft) vs a bare single-process torch loop.

    flock /tmp/rlhf_ray_heavy.lock .venv/bin/python benchmarks/bench_sft.py [--model builtin:tiny-llama]
        [--workers 2] [--zero-stage 2] [--micro-batch 2] [--global-batch 8] [--steps 40] [--precision fp32|bf16]
        [--no-one-rank] [--grad-reduction auto|per_micro_batch|per_step ...]

Not a test. Both sides train the same model on the same built-in SFT rows with the same micro-batch and global
batch (the bare loop accumulates workers x accumulation micro-batches per optimizer step), and count the same
tokens (non-padding tokens of every micro-batch), both after one warm-up step: the bare loop times --steps steps
after its first, Ray Train runs --steps + 1 and its rate is the tokens over the time of steps 2.. as its workers
report them (one report per step, each step's window from its metrics: `tokens_per_s` x the `elapsed_s` between
two reports); the fit wall time, start-up included, is shown too.
The bare loop runs in this process with all cores (torch's default threads); each Ray Train worker gets
OMP_NUM_THREADS = its CPUs. Prints both rates and the ratio ray / bare. A second row (unless --no-one-rank) runs
the same training as ONE Ray Train worker with all cores (sft.cpus_per_worker = the bare loop's threads) against the
same bare loop: the learner's own overhead at equal threads, without data-parallel communication.
Precision: fp32 both sides, or bf16 both sides as torch.autocast(cpu, bfloat16) over fp32 weights: what the SFT
workers run for bf16 on CPU (deepspeed_config.autocast_bf16, DeepSpeed's torch_autocast section) and what HF Trainer /
TRL run with bf16=True on CPU; models/attention.py's CPU attention on the workers' side (the bare loop: transformers' sdpa).
The bare loop uses torch's fused AdamW (common.build_optimizer(fused=True)), what CPU workers use (one worker on
the parameters, several on their ZeRO partitions): the stronger baseline for both rows.
--grad-reduction (sft.deepspeed.grad_reduction; default auto) runs the multi-worker row once per value given, each
against the same bare loop: `--grad-reduction per_micro_batch per_step` compares ZeRO-2's reduction in every
micro-batch's backward with one per optimizer step, side by side in one run.
Each rate is printed with the host's steal share while that side ran (benchmarks/host_cpu.py): sides measured under
very different steal were not measured under the same conditions.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import host_cpu  # noqa: E402  (benchmarks/, this file's folder)
from rlhf_ray.config import load_config  # noqa: E402
from rlhf_ray.train import common, read_metrics, run_sft, sft  # noqa: E402
from rlhf_ray.train.deepspeed_config import zero_stage  # noqa: E402


def bare_loop_tokens_per_s(cfg, rows: list[dict], plan: common.StagePlan, steps: int, pad_id: int,
                           precision: str = "fp32") -> float:
    """Plain torch: one process, AdamW, gradient accumulation over the same micro-batches Ray Train's ranks see."""
    torch.manual_seed(cfg.run.seed)
    model = sft.build_model(cfg, cfg.sft).train()
    optimizer = common.build_optimizer(model, cfg.sft.optim, fused=True)
    micro_per_step = plan.accumulation * plan.num_ranks
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext

    def one_step(step: int) -> int:
        tokens = 0
        for micro in range(plan.accumulation):
            for rank in range(plan.num_ranks):
                batch = sft.collate([rows[i] for i in common.micro_batch_indices(plan, step, micro, rank)], pad_id)
                with autocast():
                    loss, n = sft.train_loss(model, batch)
                (loss / micro_per_step).backward()
                tokens += n
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.sft.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return tokens

    one_step(0)  # warm-up
    start, tokens = time.perf_counter(), 0
    for step in range(1, steps + 1):
        tokens += one_step(step)
    return tokens / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="builtin:tiny-llama")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--zero-stage", type=int, default=2)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--no-one-rank", action="store_true", help="skip the one-worker row")
    ap.add_argument("--grad-reduction", nargs="+", default=["auto"], choices=("auto", "per_micro_batch", "per_step"),
                    help="sft.deepspeed.grad_reduction of the multi-worker row; several values: one row each")
    args = ap.parse_args()
    threads = torch.get_num_threads()

    with tempfile.TemporaryDirectory(prefix="bench_sft_") as tmp:
        base = {
            "run.output_dir": tmp, "models.actor.path": args.model, "sft.num_workers": args.workers,
            "sft.deepspeed.zero_stage": args.zero_stage, "sft.deepspeed.micro_batch_size": args.micro_batch,
            "sft.deepspeed.global_batch_size": args.global_batch, "sft.max_steps": args.steps + 1,
            "sft.log_every": 1, "sft.eval_every": 0, "sft.checkpoint_every": 0,
            "data.eval_fraction": 0.0, "sft.optim.lr": 1e-4, "sft.deepspeed.precision": args.precision}
        # Every row's config goes through load_config, so a combination rlhf-ray refuses (per_step under ZeRO-3) is
        # refused here too, naming the key, instead of running something else under the row's name.
        cfg = load_config(None, base)
        rows_by_mode = {mode: fit(load_config(None, {**base, "sft.deepspeed.grad_reduction": mode}))
                        for mode in args.grad_reduction}
        result = next(iter(rows_by_mode.values()))[0]
        one = None
        if not args.no_one_rank:
            one_cfg = load_config(None, {**base, "sft.num_workers": 1, "sft.cpus_per_worker": threads})
            one = fit(one_cfg)

        from rlhf_ray.data import load_stage_dataset

        tokenizer = sft.load_tokenizer(cfg)
        rows = sft.rows(load_stage_dataset(cfg, "sft", tokenizer, split="train"))
        torch.set_num_threads(threads)
        before = host_cpu.ticks()
        bare_rate = bare_loop_tokens_per_s(cfg, rows, result.plan, args.steps, tokenizer.pad_token_id, args.precision)
        bare_steal = host_cpu.steal_share(before, host_cpu.ticks())

    plan = result.plan
    print(f"\nmodel {args.model}, {args.precision}: {args.steps} steps, global batch {plan.global_batch_size} = micro "
          f"{plan.micro_batch_size} x {plan.num_ranks} workers x {plan.accumulation} accumulation, ZeRO-{args.zero_stage}")
    print(f"bare torch loop (1 process, {threads} threads): {bare_rate:,.0f} tokens/s; {host_cpu.describe(bare_steal)}")
    for mode, (_, ray_rate, ray_wall, ray_steal, ran) in rows_by_mode.items():
        print(f"Ray Train + DeepSpeed ({plan.num_ranks} workers, grad_reduction {mode}: ran {ran}): "
              f"{ray_rate:,.0f} tokens/s over the training steps; "
              f"fit wall {ray_wall:.1f}s incl. start-up; {host_cpu.describe(ray_steal)}")
        print(f"ratio ray/bare ({mode}): {ray_rate / bare_rate:.2f}")
    if one is not None:
        print(f"Ray Train + DeepSpeed (1 worker, {threads} CPUs, ZeRO stage run: "
              f"{zero_stage(cfg.sft.deepspeed, 1)}): {one[1]:,.0f} tokens/s; fit wall {one[2]:.1f}s; "
              f"{host_cpu.describe(one[3])}")
        print(f"ratio one-worker ray/bare (equal threads): {one[1] / bare_rate:.2f}")


def fit(cfg):
    """run_sft, its tokens/s over the training steps after the first (steady_tokens_per_s), the fit's wall time,
    the host's steal share during the fit and the gradient reduction the workers ran (read while the run's folder
    exists)."""
    start, before = time.perf_counter(), host_cpu.ticks()
    result = run_sft(cfg)
    wall, steal = time.perf_counter() - start, host_cpu.steal_share(before, host_cpu.ticks())
    records = read_metrics(result.metrics_file)
    ran = next(r for r in records if r["event"] == "start")["grad_reduction"]
    return result, steady_tokens_per_s(records), wall, steal, ran


def steady_tokens_per_s(records: list[dict]) -> float:
    """Tokens per second over steps 2.. from the per-step reports (step 1, the warm-up, left out as the bare loop's)."""
    reports = sorted((r for r in records if r["event"] == "report" and r["step"] > 0), key=lambda r: r["step"])
    tokens = seconds = 0.0
    for before, after in zip(reports, reports[1:]):
        window = after["elapsed_s"] - before["elapsed_s"]
        tokens, seconds = tokens + after["tokens_per_s"] * window, seconds + window
    if seconds <= 0:
        raise SystemExit(f"bench_sft: no per-step reports after the warm-up step in the metrics ({len(reports)} reports)")
    return tokens / seconds


if __name__ == "__main__":
    main()
