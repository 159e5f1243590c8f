"""Step 1, supervised fine-tuning: causal-LM loss on the response tokens only (prompt tokens carry label -100).

    rlhf-ray sft CONFIG [--sft.max_steps 100 ...]      or      run_sft("launchers/x.yaml")

The input model is `models.actor`; the output (<sft.output_dir>, default <run.output_dir>/sft) is a plain Hugging
Face causal-LM folder with the tokenizer, loadable by transformers and vLLM. Eval: token-mean loss and perplexity.
The functions below are the SFT *task* that rlhf_ray.train.common's Ray Train loop calls.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from rlhf_ray.config import Config, TrainStageConfig

COLUMNS = ("input_ids", "labels")
EVAL_SUMS = ("nll", "tokens")


def run_sft(config: Config | str | Path, overrides: Optional[list[str] | dict] = None):
    """Run SFT as one Ray Train job; returns a StageResult (output folder, final metrics, metrics file)."""
    from rlhf_ray.train.common import run_stage

    return run_stage(config, "sft", overrides)


# ------------------------------------------------------------------------------------------ the task
def load_tokenizer(cfg: Config):
    from rlhf_ray.models.loading import load_tokenizer as load

    return load(cfg.models.actor)


def rows(dataset) -> list[dict]:
    return dataset.select_columns(list(COLUMNS)).to_list()


def build_model(cfg: Config, stage_cfg: TrainStageConfig, dtype: torch.dtype = torch.float32):
    """The trainable causal LM (fp32 unless told; DeepSpeed casts and places it): dropout, checkpointing, LoRA.
    Under ZeRO-3 the worker calls it inside common.build_partitioned, which loads it straight into partitions."""
    from rlhf_ray.models.loading import load_causal_lm, resolve_model_path
    from rlhf_ray.train.common import apply_lora, enable_gradient_checkpointing, hf_model_config, zero_dropout_modules

    mc = cfg.models.actor
    extra = {"gguf_file": mc.gguf_file} if mc.gguf_file else {}
    config = hf_model_config(resolve_model_path(mc.path), stage_cfg.disable_dropout,
                             trust_remote_code=mc.trust_remote_code, **extra)
    model = load_causal_lm(mc, dtype=dtype, config=config)
    if stage_cfg.disable_dropout:
        zero_dropout_modules(model)
    model.config.use_cache = False
    if stage_cfg.deepspeed.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if stage_cfg.lora.dim > 0:
        model = apply_lora(model, stage_cfg, "sft")
    return model


def collate(batch_rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    from rlhf_ray.data import pad_batch

    input_ids, attention_mask = pad_batch([r["input_ids"] for r in batch_rows], pad_id, side="right")
    labels, _ = pad_batch([r["labels"] for r in batch_rows], -100, side="right")
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token negative log-likelihood over labelled positions, and their count.
    `labels` is aligned with the inputs (Hugging Face convention); position t predicts labels[t + 1]."""
    targets = labels[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                          ignore_index=-100, reduction="none")
    return nll.sum(), (targets != -100).sum()


def _logits(model, batch: dict) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits


def train_loss(model, batch: dict) -> tuple[torch.Tensor, int]:
    """Token-mean loss over the micro-batch's response tokens, and the number of tokens processed."""
    nll, count = token_nll(_logits(model, batch), batch["labels"])
    return nll / count.clamp(min=1), int(batch["attention_mask"].sum())


def eval_sums(model, batch: dict, valid: torch.Tensor) -> torch.Tensor:
    labels = batch["labels"].masked_fill(~valid.unsqueeze(1), -100)  # padding rows of an uneven shard count 0
    nll, count = token_nll(_logits(model, batch), labels)
    return torch.stack([nll.detach().double(), count.double()])


def eval_metrics(sums: dict[str, float]) -> dict[str, float]:
    loss = sums["nll"] / max(sums["tokens"], 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def merge_lora(model):
    return model.merge_and_unload()


def save_model(model, path: Path, tokenizer, state_dict: Optional[dict] = None) -> None:
    from rlhf_ray.io import atomic_directory

    with atomic_directory(path) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
