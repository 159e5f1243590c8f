"""Tiny random-weight causal LMs with a locally trained tokenizer: fixtures for tests and the fast CPU demo.

Nothing is downloaded. A byte-level BPE tokenizer is trained with `tokenizers` on a generated corpus, wrapped
as a transformers fast tokenizer with a ChatML chat template, and saved next to a random-weight model of one
of the FAMILIES. Head dim is 32 (vLLM's CPU attention rejects 16). Weights are drawn with a wide init so
logit gaps are large and greedy decoding does not hinge on float rounding differences between
implementations.
"""
from __future__ import annotations

import random
from pathlib import Path

from rlhf_ray.env import cache_root
from rlhf_ray.io import atomic_directory

FAMILIES = ("llama", "opt", "gpt2", "bloom")
FIXTURE_VERSION = 1  # bump when the recipe changes: cached folders are keyed by it
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_WORDS = ("the a an and or of to in on is are was be what which who how many much add plus minus times "
          "number answer question sum total result equals yes no good bad helpful harmless honest assistant "
          "user system please thanks hello world capital city country river mountain red green blue cat dog "
          "bird apple orange water fire earth wind sun moon star one two three four five six seven eight nine "
          "ten hundred first last next before after because therefore so then if not all some any").split()


def training_corpus(n_lines: int = 4000, seed: int = 0) -> list[str]:
    """Sentences, arithmetic and chat-formatted lines: covers what the built-in data and tests feed the model."""
    rng = random.Random(seed)
    lines = []
    for i in range(n_lines):
        kind = i % 3
        if kind == 0:
            lines.append(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 16))).capitalize() + ".")
        elif kind == 1:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            lines.append(f"What is {a} plus {b}? The answer is {a + b}.")
        else:
            q = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 8)))
            lines.append(f"<|im_start|>user\n{q}?<|im_end|>\n<|im_start|>assistant\n{q}.<|im_end|>")
    return lines


def build_tokenizer(vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(training_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token=None)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(family: str, vocab_size: int, eos_id: int, pad_id: int, bos_id: int, tie_embeddings: bool = False):
    """hidden 64, 2 heads of 32, 2 layers: ~100k parameters, instant on CPU. `tie_embeddings`: lm_head shares the
    input embedding, as in SmolLM2 (what weight sync must handle: no tensor of the head's own arrives)."""
    from transformers import BloomConfig, GPT2Config, LlamaConfig, OPTConfig

    common = dict(vocab_size=vocab_size, eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=bos_id,
                  tie_word_embeddings=tie_embeddings)
    if family == "llama":
        return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2,
                           rms_norm_eps=1e-5, **common)
    if family == "opt":
        return OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=2,
                         word_embed_proj_dim=64, max_position_embeddings=512, init_std=0.2,
                         do_layer_norm_before=True, dropout=0.0, attention_dropout=0.0, **common)
    if family == "gpt2":
        return GPT2Config(n_embd=64, n_layer=2, n_head=2, n_positions=512, initializer_range=0.2,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
    if family == "bloom":  # ALiBi positions, fused query_key_value laid out per head (BLOOM-176B's layout)
        return BloomConfig(hidden_size=64, n_layer=2, n_head=2, initializer_range=0.2, layer_norm_epsilon=1e-5,
                           hidden_dropout=0.0, attention_dropout=0.0, **common)
    raise ValueError(f"unknown tiny model family {family!r}; choose one of {', '.join(FAMILIES)}")


def build_tiny_model(family: str, out_dir: str | Path, seed: int = 0, tie_embeddings: bool = False) -> Path:
    """Write a tiny random causal LM + tokenizer (save_pretrained) to `out_dir` atomically; return the path."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer()
    config = tiny_config(family, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id,
                         tokenizer.bos_token_id, tie_embeddings)
    config.dtype = "float32"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def tiny_model_path(family: str = "llama", seed: int = 0) -> Path:
    """Cached tiny model folder (built on first use)."""
    path = cache_root() / "models" / f"tiny-{family}-s{seed}-v{FIXTURE_VERSION}"
    if not (path / "config.json").is_file():
        build_tiny_model(family, path, seed=seed)
    return path
