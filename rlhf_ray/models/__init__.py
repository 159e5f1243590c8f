"""Model loading (hub names, local folders, GGUF), the value-head model, and locally built fixtures."""
from rlhf_ray.models.loading import load_causal_lm, load_tokenizer, resolve_dtype, resolve_model_path
from rlhf_ray.models.value_head import ValueHeadModel

__all__ = ["load_causal_lm", "load_tokenizer", "resolve_dtype", "resolve_model_path", "ValueHeadModel"]
