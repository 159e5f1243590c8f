"""Attention on CPU: fast on the short sequences RLHF trains and scores, and alike with and without autograd.

torch's CPU scaled_dot_product_attention is slow where RLHF spends its time (`benchmarks/bench_attention.py`,
`benchmarks/results/learner_speed.md`): its flash kernel's bf16 backward took 2.2-3.6x its fp32 one on SmolLM2's
shapes (16 rows x 9 heads x 76 tokens x 64), and on keys this short both lose to plain matmuls. So, per call:
- up to MATH_MAX_KEYS keys (by compute dtype, where the matmuls won in that bench): q k^T, a softmax in fp32 and
  p v as three ops in the compute dtype (transformers' eager attention, with sdpa's masks), the query heads grouped
  per key-value head instead of repeating k and v;
- longer: sdpa; where it would compute in bf16 it runs on q, k, v upcast to fp32 with autocast off (sdpa is on
  autocast's list of ops cast to bf16) and its result is rounded to bf16, what sdpa would have returned.
The path depends on the shapes only, so the training forward and the no-grad passes (old log-probs, the reference
and reward scorers) compute alike, bit for bit: the PPO ratio of an unchanged policy must be 1 and its KL to the
reference 0 (with fp32 attention only under autograd they were up to 0.1 nats apart). On GPU it is sdpa unchanged.
Registered with transformers' AttentionInterface / AttentionMaskInterface under its own name (sdpa's masks), and
chosen per model by `use_cpu_attention` in the CPU process that trains or scores.
"""
from __future__ import annotations

import torch

NAME = "rlhf_cpu_attention"
# The longest keys the matmul path takes, per compute dtype: beyond them sdpa's flash kernel wins (bench_attention,
# forward and forward + backward on SmolLM2's shapes, 2 threads) and the matmul path's (heads, T, T) probabilities
# would cost memory that grows with T^2.
MATH_MAX_KEYS = {torch.bfloat16: 160, torch.float32: 96}


def cpu_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.device.type != "cpu":
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    dtype = torch.bfloat16 if _runs_in_bf16(query, key, value) else query.dtype
    if _math_applies(query, key, attention_mask, dtype, kwargs):
        with torch.autocast("cpu", enabled=False):  # the three ops in `dtype`, as sdpa under autocast would
            return matmul_attention(module, query.to(dtype), key.to(dtype), value.to(dtype), attention_mask,
                                    **kwargs), None
    if dtype == torch.bfloat16:
        with torch.autocast("cpu", enabled=False):  # autocast would cast sdpa's inputs back to bf16
            out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                                  **kwargs)
        return out.to(torch.bfloat16), weights  # what sdpa would have returned
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def matmul_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                     dropout: float = 0.0, scaling: float | None = None, is_causal: bool | None = None,
                     **kwargs) -> torch.Tensor:
    """softmax(q k^T * scaling + mask) v for q (B, H, T, D) and k, v (B, KV, T, D), H a multiple of KV (grouped-
    query attention: head h reads key-value head h // (H / KV), as transformers' repeat_kv); `attention_mask` is
    sdpa's (a boolean (B or 1, 1, T, T), True = attend) or None for causal (or no mask where the module is not
    causal). Returns (B, T, H, D), as transformers' attention functions do; 0 for a query that may attend to no key,
    as sdpa."""
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    scaling = dim ** -0.5 if scaling is None else scaling
    if attention_mask is None and (is_causal if is_causal is not None else getattr(module, "is_causal", True)):
        attention_mask = torch.ones(length, length, dtype=torch.bool, device=query.device).tril()[None, None]
    grouped = query.reshape(batch, kv_heads, group * length, dim)  # the heads that share a key-value head, stacked
    scores = (grouped @ key.transpose(-1, -2) * scaling).view(batch, kv_heads, group, length, length)
    if attention_mask is not None:  # masked keys get the dtype's minimum (as eager): a row without keys stays finite
        scores = scores.masked_fill(~attention_mask[:, :, None], torch.finfo(scores.dtype).min)
    probs = scores.softmax(-1, dtype=torch.float32).to(query.dtype)
    probs = torch.nn.functional.dropout(probs, p=dropout, training=dropout > 0)
    out = (probs.view(batch, kv_heads, group * length, length) @ value).view(batch, heads, length, dim)
    if attention_mask is not None:  # a query without keys (left padding) gets 0, as from sdpa (not eager's mean)
        out = out.masked_fill(~attention_mask.any(-1, keepdim=True), 0.0)
    return out.transpose(1, 2).contiguous()


def _math_applies(query: torch.Tensor, key: torch.Tensor, attention_mask, dtype: torch.dtype, kwargs: dict) -> bool:
    """The matmul path: a whole sequence attending to itself (training and scoring passes; no cache, bias or
    attention weights asked for, sdpa's boolean mask or none) with at most MATH_MAX_KEYS[dtype] keys."""
    length = key.shape[2]
    mask_ok = attention_mask is None or (attention_mask.dtype == torch.bool and attention_mask.shape[-2:] == (
        length, length))
    return (query.shape[2] == length <= MATH_MAX_KEYS.get(dtype, 0) and query.shape[1] % key.shape[1] == 0
            and mask_ok and kwargs.get("cache") is None and kwargs.get("position_bias") is None
            and not kwargs.get("output_attentions", False))


def _runs_in_bf16(*tensors: torch.Tensor) -> bool:
    """Whether sdpa would compute in bf16 here: a bf16 input, or CPU autocast to bf16 (which casts them all; under
    it rotary embeddings often hand over q and k in fp32 beside a bf16 v)."""
    autocast = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    return autocast or any(t.dtype == torch.bfloat16 for t in tensors)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, cpu_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def use_cpu_attention(model: torch.nn.Module) -> bool:
    """Switch a transformers model (or a ValueHeadModel's backbone) that attends with sdpa to cpu_attention (every
    sub-model: set_attn_implementation walks them); the checkpoints it saves keep no trace of it. Called by CPU
    trainers and scorers; returns whether it switched (eager, flash or a model's own attention stay as they are)."""
    model = getattr(model, "backbone", model)
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return False
    _register()
    model.set_attn_implementation(NAME)
    return True
