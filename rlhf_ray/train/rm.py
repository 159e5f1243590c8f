"""Step 2, the reward model: a value head on a causal-LM backbone, trained with the pairwise ranking loss
-log sigmoid(r_chosen - r_rejected), where r is the value at the last real (non-padding) token of the answer.

    rlhf-ray rm CONFIG [--rm.max_steps 100 ...]      or      run_rm("launchers/x.yaml")

The backbone is `models.reward` (usually the SFT output). The output (<rm.output_dir>, default
<run.output_dir>/rm) is in the value-head format (rlhf_ray.models.ValueHeadModel) that PPO's reward scorer and
critic load. Eval: accuracy (chosen scored above rejected) and the mean chosen / rejected scores.
The last real token comes from the attention mask, not DeepSpeed-Chat's num_padding_at_beginning heuristic.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from rlhf_ray.config import Config, TrainStageConfig

COLUMNS = ("chosen_input_ids", "rejected_input_ids")
EVAL_SUMS = ("pairs", "correct", "chosen", "rejected", "loss")


def run_rm(config: Config | str | Path, overrides: Optional[list[str] | dict] = None):
    """Train the reward model as one Ray Train job; returns a StageResult."""
    from rlhf_ray.train.common import run_stage

    return run_stage(config, "rm", overrides)


# ------------------------------------------------------------------------------------------ the task
def load_tokenizer(cfg: Config):
    from rlhf_ray.models.loading import load_tokenizer as load

    return load(cfg.models.reward)


def rows(dataset) -> list[dict]:
    return dataset.select_columns(list(COLUMNS)).to_list()


def build_model(cfg: Config, stage_cfg: TrainStageConfig, dtype: torch.dtype = torch.float32):
    """ValueHeadModel (fp32 unless told) with a fresh head (seeded by the caller); dropout, checkpointing, LoRA.
    Under ZeRO-3 the worker calls it inside common.build_partitioned, which loads it straight into partitions."""
    from rlhf_ray.models import ValueHeadModel
    from rlhf_ray.models.loading import resolve_model_path
    from rlhf_ray.train.common import apply_lora, enable_gradient_checkpointing, hf_model_config, zero_dropout_modules

    mc = cfg.models.reward
    path = resolve_model_path(mc.path)
    extra = {"gguf_file": mc.gguf_file} if mc.gguf_file else {}
    config = hf_model_config(path, stage_cfg.disable_dropout, trust_remote_code=mc.trust_remote_code, **extra)
    model = ValueHeadModel.from_causal_lm(path, dtype=dtype, config=config,
                                          trust_remote_code=mc.trust_remote_code, **extra)
    if stage_cfg.disable_dropout:
        zero_dropout_modules(model)
    if stage_cfg.deepspeed.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if stage_cfg.lora.dim > 0:
        model.backbone = apply_lora(model.backbone, stage_cfg, "rm")  # the value head stays fully trainable
    return model


def collate(batch_rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows in one right-padded batch (one forward for both, as DeepSpeed-Chat)."""
    from rlhf_ray.data import pad_batch

    sequences = [r["chosen_input_ids"] for r in batch_rows] + [r["rejected_input_ids"] for r in batch_rows]
    input_ids, attention_mask = pad_batch(sequences, pad_id, side="right")
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def pair_scores(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) scores: each sequence's value at its last real token."""
    from rlhf_ray.models.value_head import last_token_index

    mask = batch["attention_mask"]
    values = model(batch["input_ids"], mask)
    scores = values.gather(1, last_token_index(mask).unsqueeze(1)).squeeze(1)
    half = scores.shape[0] // 2
    return scores[:half], scores[half:]


def ranking_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Per-pair -log sigmoid(r_chosen - r_rejected)."""
    return -F.logsigmoid(chosen - rejected)


def train_loss(model, batch: dict) -> tuple[torch.Tensor, int]:
    chosen, rejected = pair_scores(model, batch)
    return ranking_loss(chosen, rejected).mean(), int(batch["attention_mask"].sum())


def eval_sums(model, batch: dict, valid: torch.Tensor) -> torch.Tensor:
    chosen, rejected = pair_scores(model, batch)
    w = valid.double()
    return torch.stack([w.sum(), ((chosen > rejected).double() * w).sum(), (chosen.double() * w).sum(),
                        (rejected.double() * w).sum(), (ranking_loss(chosen, rejected).double() * w).sum()])


def eval_metrics(sums: dict[str, float]) -> dict[str, float]:
    n = max(sums["pairs"], 1.0)
    return {"accuracy": sums["correct"] / n, "chosen_score": sums["chosen"] / n,
            "rejected_score": sums["rejected"] / n, "loss": sums["loss"] / n}


def merge_lora(model):
    model.backbone = model.backbone.merge_and_unload()
    return model


def save_model(model, path: Path, tokenizer, state_dict: Optional[dict] = None) -> None:
    model.save_pretrained(path, tokenizer=tokenizer, state_dict=state_dict)
