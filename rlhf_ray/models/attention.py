"""Attention for bf16 on CPU: transformers' sdpa, computed in fp32 in every forward of a CPU bf16 model.

torch's CPU scaled_dot_product_attention backward is slow in bf16 on short sequences: on SmolLM2's shapes (16 rows x
9 heads x 76 tokens x 64) forward + backward took 2.2-3.6x as long in bf16 as on q, k, v upcast to fp32, and it was
17 % of a bf16 PPO training step (`benchmarks/bench_attention.py`, `benchmarks/results/learner_speed.md`). So
attention that sdpa would run in bf16 runs in fp32 (its result rounded to bf16, what sdpa would have returned).
It does so without autograd too (log-probs under no_grad, the reference and reward scorers): the PPO ratio of an
unchanged policy must be 1 and its KL to the reference 0, which needs the training forward and the no-grad passes to
compute alike, bit for bit (with fp32 attention only under autograd they were up to 0.1 nats apart). On GPU it is
sdpa unchanged. sdpa is on autocast's list of ops cast to bf16, so the fp32 call runs with autocast off. Registered
with transformers' AttentionInterface / AttentionMaskInterface under its own name (sdpa's masks), and chosen per
model by `use_fp32_attention` in the CPU process that trains or scores.
"""
from __future__ import annotations

import torch

NAME = "sdpa_fp32"


def sdpa_fp32(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.device.type == "cpu" and _runs_in_bf16(query, key, value):
        with torch.autocast("cpu", enabled=False):  # autocast would cast sdpa's inputs back to bf16
            out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                                  **kwargs)
        return out.to(torch.bfloat16), weights  # what sdpa would have returned
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _runs_in_bf16(*tensors: torch.Tensor) -> bool:
    """Whether sdpa would compute in bf16 here: a bf16 input, or CPU autocast to bf16 (which casts them all; under
    it rotary embeddings often hand over q and k in fp32 beside a bf16 v)."""
    autocast = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    return autocast or any(t.dtype == torch.bfloat16 for t in tensors)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, sdpa_fp32)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def use_fp32_attention(model: torch.nn.Module) -> bool:
    """Switch a transformers model (or a ValueHeadModel's backbone) that attends with sdpa to sdpa_fp32 (every
    sub-model: set_attn_implementation walks them); the checkpoints it saves keep no trace of it. Called by CPU
    trainers and scorers (in fp32 it is sdpa itself); returns whether it switched (eager, flash or a model's own
    attention stay as they are)."""
    model = getattr(model, "backbone", model)
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return False
    _register()
    model.set_attn_implementation(NAME)
    return True
