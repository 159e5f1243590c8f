"""Our learner settings -> the DeepSpeed JSON config. A pure function: SFT, RM and the PPO learners share it.

    ds = deepspeed_config(cfg.sft, num_ranks=8, cuda=True)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds)

The optimizer and learning-rate schedule are built by the caller (rlhf_ray.train.common) and handed to
deepspeed.initialize, so the config carries only what the engine itself does: batch sizes and gradient
accumulation, ZeRO stage and offload, precision, gradient clipping.
"""
from __future__ import annotations

from typing import Optional

from rlhf_ray.config import ConfigError, DeepSpeedConfig, PPOLearnerConfig

CPU_REDUCE_BUCKET_SIZE = 20_000_000  # gradient elements per ZeRO-1/2 reduction on CPU (80 MB fp32)


def resolve_precision(ds: DeepSpeedConfig, cuda: bool) -> str:
    """ds.precision on the calling worker's device; 'auto' is decided in one place (env.resolve_precision)."""
    from rlhf_ray.env import resolve_precision as resolve

    return resolve(ds.precision, "cuda" if cuda else "cpu")


def precision(stage_cfg: PPOLearnerConfig, cuda: bool) -> str:
    return resolve_precision(stage_cfg.deepspeed, cuda)


def gradient_accumulation_steps(stage_cfg: PPOLearnerConfig, num_ranks: int,
                                train_batch_size: Optional[int] = None) -> int:
    ds = stage_cfg.deepspeed
    batch = _step_batch(ds, train_batch_size)
    per_step = ds.micro_batch_size * num_ranks
    if num_ranks < 1 or batch % per_step:
        raise ConfigError(f"the optimizer-step batch ({batch}: deepspeed.global_batch_size, ppo.mini_batch_size for "
                          f"PPO) must be a multiple of micro_batch_size ({ds.micro_batch_size}) x ranks ({num_ranks})")
    return batch // per_step


def _step_batch(ds: DeepSpeedConfig, train_batch_size: Optional[int]) -> int:
    if train_batch_size is not None:
        return train_batch_size
    if not hasattr(ds, "global_batch_size"):
        raise ValueError("a PPO learner's deepspeed section has no global_batch_size: pass train_batch_size "
                         "(ppo.mini_batch_size)")
    return ds.global_batch_size


def zero_plus_plus(ds: DeepSpeedConfig, num_ranks: int, cuda: bool, training: bool = True) -> dict:
    """ZeRO++'s zero_optimization keys for a ZeRO-3 engine of `num_ranks` ranks (empty when none is set)."""
    out: dict = {}
    if ds.zero_hpz_partition_size > 1 and num_ranks > 1:  # one rank: nothing to partition
        if num_ranks % ds.zero_hpz_partition_size:
            raise ConfigError(f"deepspeed.zero_hpz_partition_size ({ds.zero_hpz_partition_size}) must divide the "
                              f"engine's {num_ranks} ranks")
        out["zero_hpz_partition_size"] = ds.zero_hpz_partition_size
    quantized = ds.zero_quantized_weights or (training and ds.zero_quantized_gradients)
    if quantized and not cuda:
        raise ConfigError("deepspeed.zero_quantized_weights / zero_quantized_gradients need a GPU (DeepSpeed's "
                          "quantizer is a CUDA kernel); set them to false on CPU")
    if ds.zero_quantized_weights:
        out["zero_quantized_weights"] = True
    if training and ds.zero_quantized_gradients:
        out["zero_quantized_gradients"] = True
    return out


def zero_stage(ds: DeepSpeedConfig, num_ranks: int) -> int:
    """The ZeRO stage the engine runs. ZeRO-1/2 partition optimizer states and gradients over the ranks; one rank has
    nothing to partition, and DeepSpeed's ZeRO-1/2 optimizer then only adds work (every gradient copied into a
    bucket and into a flat partition, a second fp32 copy of the weights, the updated partition copied back):
    stage 0 steps the client optimizer on the parameters directly, as a bare torch loop does. ZeRO-3 and
    offload keep their stage: they change where the weights and states live."""
    if num_ranks == 1 and ds.zero_stage in (1, 2) and not ds.offload_optimizer:
        return 0
    return ds.zero_stage


def reduces_once_per_step(ds: DeepSpeedConfig, num_ranks: int, cuda: bool) -> bool:
    """Whether this engine's ZeRO-2 gradient reduction is coalesced into one per optimizer step (grad_reduction; auto:
    on CPU). Only ZeRO-2 with ranks to reduce over has a choice: ZeRO-0/1 reduce once per step anyway, ZeRO-3 per
    micro-batch. Measured on CPU (2 SmolLM2 ranks, 2 micro-batches a step): benchmarks/results/learner_speed.md."""
    if zero_stage(ds, num_ranks) != 2:
        return False
    return ds.grad_reduction == "per_step" or (ds.grad_reduction == "auto" and not cuda)


def autocast_bf16(precision: str, cuda: bool) -> bool:
    """Whether bf16 training (SFT, RM, PPO learners) runs as torch autocast over fp32 weights (CPU) rather than
    DeepSpeed's bf16 mode (GPU: bf16 weights, fp32 master copies in the optimizer, what DeepSpeed-Chat and OpenRLHF
    run and the planner models).
    On CPU DeepSpeed's bf16 mode stalled GRPO on SmolLM2 at lr 1e-5: over 6 iterations the k3 KL to the reference
    stayed at ~0.0025 nats per token and the reward flat, while fp32 and autocast both moved (KL 0.018-0.023 per
    token, reward 0.25 -> 0.5; benchmarks/results/precision_learning.md): rounding the weights and the residual stream
    to bf16 loses most of each small update. Autocast (TRL's and HF Trainer's bf16 on CPU) computes the matmuls in
    bf16 and keeps weights, norms and residual stream in fp32, at the same speed here."""
    return precision == "bf16" and not cuda


def precision_sections(precision: str, torch_autocast: bool = False) -> dict:
    """DeepSpeed's bf16 / fp16 / torch_autocast sections for a resolved precision (trainers and frozen scorers):
    with `torch_autocast` (bf16 only, autocast_bf16) fp32 weights under torch.autocast instead of bf16 mode."""
    autocast = precision == "bf16" and torch_autocast
    return {"bf16": {"enabled": precision == "bf16" and not autocast},
            **({"torch_autocast": {"enabled": True, "dtype": "bfloat16"}} if autocast else {}),
            "fp16": {"enabled": precision == "fp16"}}


def deepspeed_config(stage_cfg: PPOLearnerConfig, num_ranks: int, cuda: bool,
                     train_batch_size: Optional[int] = None, torch_autocast: Optional[bool] = None) -> dict:
    """The DeepSpeed config dict for `num_ranks` data-parallel ranks, on GPU (`cuda`) or CPU.
    `train_batch_size` (samples per optimizer step across ranks) defaults to a stage's deepspeed.global_batch_size;
    PPO learners (no global batch of their own) pass ppo.mini_batch_size. `torch_autocast` (bf16 only): fp32
    weights with DeepSpeed's torch.autocast section instead of its bf16 mode; default autocast_bf16 (CPU)."""
    ds = stage_cfg.deepspeed
    batch = _step_batch(ds, train_batch_size)
    prec = precision(stage_cfg, cuda)
    if torch_autocast is None:
        torch_autocast = autocast_bf16(prec, cuda)
    if not cuda and prec == "fp16":
        raise ConfigError("deepspeed.precision fp16 needs a GPU; use fp32 or bf16 on CPU")
    if not cuda and (ds.offload_optimizer or ds.offload_params):
        raise ConfigError("deepspeed.offload_optimizer / offload_params need a GPU (on CPU the optimizer and "
                          "parameters already live in CPU memory); set them to false")
    zero: dict = {"stage": zero_stage(ds, num_ranks)}
    if not cuda and zero["stage"] in (1, 2):
        # ZeRO-1/2 all-reduce the gradient bucket either way; reduce_scatter's path first copies it into a fresh
        # bucket-sized tensor and copies the result back (on CPU, 0.24 s per 540 MB), this one reduces it in place.
        zero["reduce_scatter"] = False
        # DeepSpeed allocates the bucket anew for every micro-batch; fresh CPU memory is page-faulted in as it is
        # filled (DeepSpeed's 5e8 elements: the whole gradient of a 135M model, every micro-batch). A smaller one
        # is filled and reduced several times per backward; a gradient larger than it is reduced in place.
        zero["reduce_bucket_size"] = CPU_REDUCE_BUCKET_SIZE
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if ds.zero_stage == 3:
        # Export gathers full weights at the end; these keep ZeRO-3's live working set small (DeepSpeed-Chat).
        zero.update({"stage3_gather_16bit_weights_on_model_save": True, "stage3_param_persistence_threshold": 1e4,
                     "stage3_max_live_parameters": 3e7, "stage3_prefetch_bucket_size": 3e7,
                     **zero_plus_plus(ds, num_ranks, cuda)})
    return {
        "train_batch_size": batch,
        "train_micro_batch_size_per_gpu": ds.micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps(stage_cfg, num_ranks, batch),
        "gradient_clipping": stage_cfg.optim.grad_clip,  # 0 disables clipping
        "zero_optimization": zero,
        **precision_sections(prec, torch_autocast),
        "fp16": {"enabled": prec == "fp16", "loss_scale": 0, "loss_scale_window": 100, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,  # a plain torch AdamW client optimizer on CPU (no JIT build)
        "steps_per_print": 10 ** 9,  # we log progress ourselves
        "wall_clock_breakdown": False,
    }
