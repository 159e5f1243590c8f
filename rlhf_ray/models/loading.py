"""Loading causal LMs and tokenizers from a local folder or a hub name (the same from_pretrained call)."""
from __future__ import annotations

from typing import Optional

import torch

from rlhf_ray.config import ModelConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, cuda: Optional[bool] = None) -> torch.dtype:
    """A models.<role>.dtype; 'auto' is what precision 'auto' resolves to on this device (env.resolve_precision:
    bf16 on GPU and on CPUs with native bf16, else fp32). In a PPO run 'auto' follows
    ppo.actor.deepspeed.precision (config.ppo_precision)."""
    if name == "auto":
        from rlhf_ray.env import precision_dtype

        if cuda is None:
            cuda = torch.cuda.is_available()
        return getattr(torch, precision_dtype("auto", "cuda" if cuda else "cpu"))
    return _DTYPES[name]


def load_tokenizer(mc: ModelConfig):
    from transformers import AutoTokenizer

    kwargs = {"trust_remote_code": mc.trust_remote_code}
    if mc.gguf_file and not mc.tokenizer:
        kwargs["gguf_file"] = mc.gguf_file
    tok = AutoTokenizer.from_pretrained(resolve_model_path(mc.tokenizer or mc.path), **kwargs)
    if tok.pad_token is None:  # batching needs one; EOS is what DeepSpeed-Chat and OpenRLHF use
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(mc: ModelConfig, dtype: Optional[torch.dtype] = None, **kwargs):
    from transformers import AutoModelForCausalLM

    if mc.gguf_file:
        kwargs["gguf_file"] = mc.gguf_file
    return AutoModelForCausalLM.from_pretrained(
        resolve_model_path(mc.path), dtype=dtype or resolve_dtype(mc.dtype), trust_remote_code=mc.trust_remote_code, **kwargs)


BUILTIN_PREFIX = "builtin:"
BUILTIN_MODELS = ("smollm2", "tiny-llama", "tiny-opt", "tiny-gpt2", "tiny-bloom")


def resolve_model_path(path: str) -> str:
    """`builtin:smollm2` / `builtin:tiny-<family>` -> a local folder built offline (cached); anything else as is
    (a local folder, or a hub name that from_pretrained resolves)."""
    if not path.startswith(BUILTIN_PREFIX):
        return path
    name = path[len(BUILTIN_PREFIX):]
    if name == "smollm2":
        from rlhf_ray.models.smollm2 import smollm2_path

        return str(smollm2_path())
    if name.startswith("tiny-"):
        from rlhf_ray.models.tiny import tiny_model_path

        return str(tiny_model_path(name[len("tiny-"):]))
    raise ValueError(f"unknown built-in model {path!r}; choose one of "
                     + ", ".join(BUILTIN_PREFIX + m for m in BUILTIN_MODELS))
