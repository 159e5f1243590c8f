"""Our TrainStageConfig -> the DeepSpeed JSON config. A pure function: SFT, RM and the PPO learners share it.

    ds = deepspeed_config(cfg.sft, num_ranks=8, cuda=True)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds)

The optimizer and learning-rate schedule are built by the caller (rlhf_ray.train.common) and handed to
deepspeed.initialize, so the config carries only what the engine itself does: batch sizes and gradient
accumulation, ZeRO stage and offload, precision, gradient clipping.
"""
from __future__ import annotations

from typing import Optional

from rlhf_ray.config import ConfigError, DeepSpeedConfig, TrainStageConfig


def resolve_precision(ds: DeepSpeedConfig, cuda: bool) -> str:
    """'auto' is bf16 on GPU and fp32 on CPU (CPU bf16 matmuls are slow and lose exactness checks)."""
    return ("bf16" if cuda else "fp32") if ds.precision == "auto" else ds.precision


def precision(stage_cfg: TrainStageConfig, cuda: bool) -> str:
    return resolve_precision(stage_cfg.deepspeed, cuda)


def gradient_accumulation_steps(stage_cfg: TrainStageConfig, num_ranks: int, train_batch_size: Optional[int] = None) -> int:
    ds = stage_cfg.deepspeed
    batch = ds.global_batch_size if train_batch_size is None else train_batch_size
    per_step = ds.micro_batch_size * num_ranks
    if num_ranks < 1 or batch % per_step:
        raise ConfigError(f"the optimizer-step batch ({batch}, deepspeed.global_batch_size) must be a multiple "
                          f"of micro_batch_size ({ds.micro_batch_size}) x ranks ({num_ranks})")
    return batch // per_step


def deepspeed_config(stage_cfg: TrainStageConfig, num_ranks: int, cuda: bool,
                     train_batch_size: Optional[int] = None) -> dict:
    """The DeepSpeed config dict for `num_ranks` data-parallel ranks, on GPU (`cuda`) or CPU.
    `train_batch_size` (samples per optimizer step across ranks) defaults to deepspeed.global_batch_size;
    PPO learners pass ppo.mini_batch_size."""
    ds = stage_cfg.deepspeed
    batch = ds.global_batch_size if train_batch_size is None else train_batch_size
    prec = precision(stage_cfg, cuda)
    if not cuda and prec == "fp16":
        raise ConfigError("deepspeed.precision fp16 needs a GPU; use fp32 or bf16 on CPU")
    if not cuda and (ds.offload_optimizer or ds.offload_params):
        raise ConfigError("deepspeed.offload_optimizer / offload_params need a GPU (on CPU the optimizer and "
                          "parameters already live in CPU memory); set them to false")
    zero: dict = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if ds.zero_stage == 3:
        # Export gathers full weights at the end; these keep ZeRO-3's live working set small (DeepSpeed-Chat).
        zero.update({"stage3_gather_16bit_weights_on_model_save": True, "stage3_param_persistence_threshold": 1e4,
                     "stage3_max_live_parameters": 3e7, "stage3_prefetch_bucket_size": 3e7})
    return {
        "train_batch_size": batch,
        "train_micro_batch_size_per_gpu": ds.micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps(stage_cfg, num_ranks, batch),
        "gradient_clipping": stage_cfg.optim.grad_clip,  # 0 disables clipping
        "zero_optimization": zero,
        "bf16": {"enabled": prec == "bf16"},
        "fp16": {"enabled": prec == "fp16", "loss_scale": 0, "loss_scale_window": 100, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,  # a plain torch AdamW client optimizer on CPU (no JIT build)
        "steps_per_print": 10 ** 9,  # we log progress ourselves
        "wall_clock_breakdown": False,
    }
