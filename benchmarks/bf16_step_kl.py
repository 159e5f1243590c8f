"""How far a tiny fp32 update moves a model computed in bf16 autocast: every fp32 weight moved by +-delta (random
signs), then the k3 KL (the GRPO bench's, per sequence) between the log-probs before and after, in fp32 and under
CPU bf16 autocast. Shows why the KL to the reference jumps after one lr-1e-6 step in bf16 (rlhf_ray and TRL alike)
while it stays ~0 in fp32: the step moves some weights' bf16 roundings by a whole bf16 step.

    .venv/bin/python benchmarks/bf16_step_kl.py [--model builtin:smollm2] [--delta 1e-6] [--rows 4] [--tokens 32]

Not a test.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="builtin:smollm2")
    ap.add_argument("--delta", type=float, default=1e-6)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32, help="scored tokens per row (after as many context tokens)")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    from rlhf_ray.models.loading import resolve_model_path

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(args.model), dtype=torch.float32).eval()
    ids = torch.randint(10, model.config.vocab_size, (args.rows, 2 * args.tokens))

    def logprobs(bf16: bool) -> torch.Tensor:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=ids).logits[:, args.tokens - 1:-1].float()
        return torch.log_softmax(logits, -1).gather(-1, ids[:, args.tokens:, None]).squeeze(-1)

    before = {bf16: logprobs(bf16) for bf16 in (False, True)}
    signs = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(args.delta * (torch.randint(0, 2, p.shape, generator=signs) * 2 - 1).float())
    for bf16 in (False, True):
        d = logprobs(bf16) - before[bf16]  # log p_new - log p_ref
        k3 = torch.exp(-d) + d - 1
        print(f"{'bf16 autocast' if bf16 else 'fp32':>13}: k3 KL per sequence {k3.sum(1).mean().item():.3g}, "
              f"max |d log p| {d.abs().max().item():.3g}")


if __name__ == "__main__":
    main()
