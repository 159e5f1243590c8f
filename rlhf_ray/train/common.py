"""One Ray Train job per training stage: the driver side (`run_stage`) and the per-worker loop (`train_loop`).

    driver:  tokenize the stage's data once -> object store; TorchTrainer(train_loop, ScalingConfig(workers),
             RunConfig(storage, FailureConfig)) .fit(); copy the exported Hugging Face folder to the output dir
    worker:  chooses its own device (env.choose_device; rank 0 logs every rank's choice, metrics "workers");
             Ray Train already made the process group (gloo on CPU, NCCL on GPU); DeepSpeed wraps it, builds the
             ZeRO engine, restores the latest checkpoint (after a worker death) or `resume_from`, trains the
             planned steps, reports metrics every `log_every` steps and a DeepSpeed checkpoint every
             `checkpoint_every` steps; the last checkpoint also carries the exported folder (`hf/`).

What differs between SFT and the reward model (model, batch, loss, eval, export) lives in a *task* module
(rlhf_ray.train.sft, rlhf_ray.train.rm) with the same functions; everything else is here.

Reports: ray.train.report is a barrier whose metrics Ray Train's controller collects at its health-check poll
(every 2 s); a worker reporting faster waits for it. Keep `log_every` so reports are seconds apart.
metrics.jsonl (rank 0) records every report and every attempt's start, across restarts.

Folders: the final model goes to `<stage>.output_dir` (default <run.output_dir>/<stage>); Ray Train's storage
(checkpoints) and one metrics.jsonl per run go to the sibling `<output_dir>_train/`. On a multi-node cluster
that folder must be on shared storage (Ray Train's own rule for storage_path).

Chaos testing: RLHF_RAY_FAULT_KILL_STEP=<step> with RLHF_RAY_FAULT_MARKER=<file> makes rank
RLHF_RAY_FAULT_RANK (default 1) SIGKILL itself before that step, once (the marker file records it), so the
FailureConfig restart path can be exercised for real. Every RLHF_RAY_* variable reaches the workers.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import logging
import math
import os
import re
import shutil
import signal
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Optional

import torch

from rlhf_ray.config import Config, ConfigError, OptimConfig, TrainStageConfig, load_config

log = logging.getLogger("rlhf_ray.train")

STAGES = {"sft": "rlhf_ray.train.sft", "rm": "rlhf_ray.train.rm"}
HF_SUBDIR = "hf"  # the exported Hugging Face folder inside the final checkpoint


def stage_task(stage: str):
    if stage not in STAGES:
        raise ValueError(f"unknown training stage {stage!r}; choose one of {', '.join(STAGES)}")
    return importlib.import_module(STAGES[stage])


# ------------------------------------------------------------------------------------------ step plan
@dataclasses.dataclass(frozen=True)
class StagePlan:
    """How many optimizer steps, and which rows each rank's micro-batches hold. Deterministic from the seed."""

    num_rows: int
    num_ranks: int
    micro_batch_size: int
    accumulation: int
    steps_per_epoch: int
    total_steps: int
    seed: int

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.num_ranks * self.accumulation


def make_plan(stage_cfg: TrainStageConfig, num_rows: int, num_ranks: int, seed: int, name: str = "stage") -> StagePlan:
    from rlhf_ray.train.deepspeed_config import gradient_accumulation_steps

    ds = stage_cfg.deepspeed
    accumulation = gradient_accumulation_steps(stage_cfg, num_ranks)
    steps_per_epoch = num_rows // ds.global_batch_size  # the last partial global batch is dropped
    if steps_per_epoch == 0:
        raise ConfigError(f"{name}: the training set has {num_rows} rows, fewer than one global batch "
                          f"({name}.deepspeed.global_batch_size = {ds.global_batch_size})")
    total = stage_cfg.max_steps if stage_cfg.max_steps > 0 else stage_cfg.epochs * steps_per_epoch
    return StagePlan(num_rows, num_ranks, ds.micro_batch_size, accumulation, steps_per_epoch, total, seed)


@functools.lru_cache(maxsize=4)
def _epoch_order(num_rows: int, seed: int) -> tuple[int, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randperm(num_rows, generator=g).tolist())


def micro_batch_indices(plan: StagePlan, step: int, micro: int, rank: int) -> list[int]:
    """Rows of `rank`'s micro-batch `micro` within optimizer step `step` (0-based); epochs reshuffle."""
    epoch, position = divmod(step, plan.steps_per_epoch)
    order = _epoch_order(plan.num_rows, plan.seed + epoch)
    start = position * plan.global_batch_size + (micro * plan.num_ranks + rank) * plan.micro_batch_size
    return list(order[start:start + plan.micro_batch_size])


def eval_batches(num_rows: int, rank: int, num_ranks: int, batch_size: int) -> list[list[int]]:
    """Rank's share of the eval rows (rank, rank + R, ...) in batches; -1 pads every rank to the same count,
    because ZeRO-3 forwards are collective and every rank must run as many as the others."""
    rows = list(range(rank, num_rows, num_ranks))
    per_rank = math.ceil(num_rows / num_ranks)
    rows += [-1] * (per_rank - len(rows))
    return [rows[i:i + batch_size] for i in range(0, per_rank, batch_size)]


def evaluate(model, rows: list[dict], pad_id: int, task, batch_size: int, rank: int = 0, num_ranks: int = 1,
             device: Any = "cpu") -> dict[str, float]:
    """The task's eval metrics over all `rows`; each rank evaluates its share and the sums are all-reduced.
    Works on a plain transformers model in one process too (rank 0 of 1)."""
    sums = torch.zeros(len(task.EVAL_SUMS), dtype=torch.float64)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for indices in eval_batches(len(rows), rank, num_ranks, batch_size):
            valid = torch.tensor([i >= 0 for i in indices])
            batch = task.collate([rows[max(i, 0)] for i in indices], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            sums += task.eval_sums(model, batch, valid.to(device)).double().cpu()
    if num_ranks > 1:
        import torch.distributed as dist

        sums = sums.to(device)
        dist.all_reduce(sums)
        sums = sums.cpu()
    model.train(was_training)
    return task.eval_metrics(dict(zip(task.EVAL_SUMS, sums.tolist())))


# --------------------------------------------------------------------------------- model construction
def hf_model_config(path: str, disable_dropout: bool, **kwargs):
    """The model's transformers config; with `disable_dropout` every *dropout / *pdrop probability is 0
    (DeepSpeed-Chat's --disable_dropout)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, **kwargs)
    if disable_dropout:
        for key, value in list(config.to_dict().items()):
            if isinstance(value, float) and re.search(r"(dropout|pdrop)$", key):
                setattr(config, key, 0.0)
    return config


def zero_dropout_modules(model: torch.nn.Module) -> int:
    """Set p=0 on every nn.Dropout (catches dropouts a config does not control); returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
            count += 1
    return count


def apply_lora(model, stage_cfg: TrainStageConfig, name: str = "stage"):
    """Wrap a transformers model with peft LoRA adapters on `lora.module_names` (suffix match, like
    DeepSpeed-Chat's --lora_module_name); everything else frozen when `lora.only_optimize_lora`."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    lora = stage_cfg.lora
    peft_cfg = PeftLoraConfig(r=lora.dim, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                              target_modules=list(lora.module_names))
    try:
        model = get_peft_model(model, peft_cfg)
    except ValueError as e:
        raise ConfigError(f"{name}.lora.module_names {list(lora.module_names)}: {e}") from None
    if not lora.only_optimize_lora:
        for p in model.parameters():
            p.requires_grad_(True)
    return model


def enable_gradient_checkpointing(model) -> None:
    # Non-reentrant checkpointing also works when the inputs' embeddings are frozen (LoRA).
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def is_zero3(ds_config: dict) -> bool:
    return ds_config["zero_optimization"]["stage"] == 3


def load_dtype(ds_config: dict) -> torch.dtype:
    """The dtype to load weights in. Under ZeRO-3 the one DeepSpeed keeps the partitions in (zero.Init casts to it
    anyway; loading in it halves the transient copies under bf16/fp16); otherwise fp32, DeepSpeed casts later."""
    if is_zero3(ds_config) and ds_config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if is_zero3(ds_config) and ds_config.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


def build_partitioned(build, ds_config: dict) -> torch.nn.Module:
    """`build()`, the model for deepspeed.initialize(config=ds_config), such that under ZeRO-3 no rank ever holds
    it whole: while HfDeepSpeedConfig lives, transformers' from_pretrained creates every module straight into its
    ZeRO-3 partition (deepspeed.zero.Init) and loads the checkpoint one module at a time (rank 0 fills the gathered
    module, then it is re-partitioned). Parameters `build` creates itself (a value head, LoRA adapters: small) are
    created whole and partitioned here, before deepspeed.initialize, which would do the same. SFT, RM, the PPO
    learners share this. Below ZeRO-3 it just calls `build()`."""
    if not is_zero3(ds_config):
        return build()
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    hf_ds = HfDeepSpeedConfig(ds_config)  # transformers looks for it through a weak reference: keep it alive
    try:
        model = build()
    finally:
        del hf_ds
    # As deepspeed.initialize converts them (DeepSpeedZeRoOffload._convert_to_zero_parameters): rank 0's values win.
    partitioned = [p for p in model.parameters() if hasattr(p, "ds_id")]
    whole = [p for p in model.parameters() if not hasattr(p, "ds_id")]
    for p in whole:  # in the partitions' dtype, which ZeRO-3 requires of all (peft keeps LoRA weights in fp32)
        if p.is_floating_point():
            p.data = p.data.to(load_dtype(ds_config))
    if whole and partitioned:
        partitioned[0].convert_to_zero_parameters(param_list=whole)
    elif whole:
        deepspeed.zero.Init(module=model, config_dict_or_path=ds_config)
    return model


def build_stage_model(task, cfg: Config, stage_cfg: TrainStageConfig, ds_config: dict,
                      cuda: bool = False) -> torch.nn.Module:
    """The SFT / RM worker's trainable model, as deepspeed.initialize takes it (partitioned under ZeRO-3); on CPU
    its sdpa attention is models/attention.py's CPU attention (as the PPO scorers)."""
    from rlhf_ray.models.attention import use_cpu_attention

    model = build_partitioned(lambda: task.build_model(cfg, stage_cfg, dtype=load_dtype(ds_config)), ds_config)
    if not cuda:
        use_cpu_attention(model)  # a PeftModel (LoRA) hands the call to the model it wraps
    return model


# ------------------------------------------------------------------------------ optimizer and schedule
NO_DECAY = ("bias", "norm", "ln_")  # biases and LayerNorm/RMSNorm weights (DeepSpeed-Chat's no-decay list)


def optimizer_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if any(k in name.lower() for k in NO_DECAY) else decay).append(p)
    return [g for g in ({"params": decay, "weight_decay": weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def build_optimizer(model: torch.nn.Module, optim: OptimConfig, offload: bool = False, fused: bool = True):
    """AdamW over the trainable parameters (no decay on biases and norms: optimizer_groups), for every trainer (SFT,
    RM, PPO learners); DeepSpeed's CPU Adam when ZeRO-Offload keeps them in CPU memory. `fused`: torch's one-pass
    AdamW kernel, on CPU and CUDA alike (the same update; the default CPU implementation makes about ten passes over
    the weights and states, and allocates temporaries as large as the model)."""
    groups = optimizer_groups(model, optim.weight_decay)
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=optim.lr, betas=optim.betas, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, **({"fused": True} if fused else {}))


def skip_one_rank_allreduce(engine) -> None:
    """A one-rank engine without ZeRO has nothing to all-reduce, yet DeepSpeed would flatten every gradient into a
    fresh buffer at each accumulation boundary, all-reduce it with itself and copy it back."""
    if engine.dp_world_size == 1 and engine.zero_optimization_stage() == 0:
        engine.enable_backward_allreduce = False


# ------------------------------------------------- CPU all-reduce through DeepSpeed's shared-memory kernel
# ZeRO-1/2 all-reduce every micro-batch's whole gradient (540 MB for a 135M fp32 model); over gloo that took 0.29 s
# between two 1-thread processes, DeepSpeed's own shared-memory kernel 0.08 s. DeepSpeed builds that kernel on CPU
# (ShareMemCommBuilder) but only its inference layers call it (dist.inference_all_reduce). CPU workers only:
# shm_allreduce_env() before deepspeed.init_distributed (the kernel maps its buffers there, if LOCAL_SIZE says every
# rank is on this node; DeepSpeed's own launcher sets it), route_cpu_allreduce_through_shm() after, and
# release_shm_name() once every rank has mapped the buffers.
SHM_MAX_BYTES = 2 ** 31  # the kernel counts bytes in an int


def shm_allreduce_env(world: int, local_world: int) -> None:
    """Before deepspeed.init_distributed on a CPU worker: LOCAL_SIZE as DeepSpeed's launcher would set it, when
    all `world` ranks share this node (the kernel's precondition)."""
    if world > 1 and local_world == world:
        os.environ.setdefault("LOCAL_SIZE", str(world))


def route_cpu_allreduce_through_shm() -> bool:
    """After deepspeed.init_distributed on a CPU worker: DeepSpeed's all_reduce (what ZeRO calls) takes the shm kernel
    for in-place, synchronous SUMs of contiguous fp32/bf16 CPU tensors over the whole world; anything else stays on
    gloo. The same sums (in another order past 2 ranks). Returns whether it is on (False: one rank, ranks on several
    nodes, or no kernel)."""
    import torch.distributed as tdist
    from deepspeed import comm

    backend = comm.comm.cdb
    world = tdist.get_world_size()
    if (world < 2 or getattr(backend, "shm_comm_op", None) is None
            or int(os.environ.get("LOCAL_SIZE", 0)) != world):  # the kernel mapped no buffers (shm_allreduce_env)
        return False
    gloo_all_reduce = backend.all_reduce

    def all_reduce(tensor, op=comm.ReduceOp.SUM, group=None, async_op=False):
        # Every rank decides the same way (same tensors, same op), so the kernel's calls stay in step.
        if (not async_op and op in (comm.ReduceOp.SUM, tdist.ReduceOp.SUM) and tensor.device.type == "cpu"
                and tensor.dtype in (torch.float32, torch.bfloat16) and tensor.is_contiguous()
                and tensor.numel() * tensor.element_size() < SHM_MAX_BYTES and tdist.get_world_size(group) == world):
            return backend.inference_all_reduce(tensor, comm.ReduceOp.SUM, group)  # gloo where the CPU lacks AVX
        return gloo_all_reduce(tensor, op, group, async_op)

    backend.all_reduce = all_reduce  # this process's DeepSpeed backend only
    return True


def init_deepspeed_world(cuda: bool, world: int, local_world: int, **init_kwargs) -> str:
    """deepspeed.init_distributed on this rank's device (every trainer: SFT / RM workers, PPO learners, scorers):
    NCCL on GPU; gloo on CPU, with ZeRO's all-reduce through DeepSpeed's shm kernel when every rank is on this node.
    Returns the all-reduce path ("nccl", "shm" or "gloo"); with "shm", call release_shm_name after a collective."""
    import deepspeed

    if not cuda:
        shm_allreduce_env(world, local_world)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", **init_kwargs)
    return "nccl" if cuda else "shm" if route_cpu_allreduce_through_shm() else "gloo"


def release_shm_name(rank: int) -> None:
    """Once every rank has mapped every rank's buffer (call after a collective that follows init_distributed): remove
    this rank's name from /dev/shm. DeepSpeed never unlinks it, so each run would leave 66 MB per rank in RAM; the
    mappings stay valid until the process exits."""
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_" \
           f"{os.environ.get('MASTER_PORT', '')}_{rank}"  # as the kernel's shm_initialize names it
    Path("/dev/shm", name).unlink(missing_ok=True)


def build_lr_scheduler(optimizer, optim: OptimConfig, total_steps: int):
    """Linear warm-up over `warmup_steps`, then constant / linear decay to 0 / cosine to 0 at `total_steps`."""
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[optim.lr_schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=optim.warmup_steps, num_training_steps=total_steps)


# ------------------------------------------------------------------------------------------ export
def full_state_dict(engine, rank: int) -> Optional[dict[str, torch.Tensor]]:
    """Full weights with the module's own names on rank 0 (None elsewhere); every rank must call it.
    ZeRO-3 parameters are gathered one at a time; tied names share one tensor."""
    module = engine.module
    if engine.zero_optimization_stage() != 3:
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()} if rank == 0 else None
    import deepspeed

    keys = set(module.state_dict().keys())
    by_param: dict[int, tuple[torch.nn.Parameter, list[str]]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        by_param.setdefault(id(p), (p, []))[1].append(name)
    state: dict[str, torch.Tensor] = {}
    for p, names in by_param.values():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            if rank == 0:
                full = p.data.detach().cpu().clone()
                state.update({n: full for n in names if n in keys})
    if rank != 0:
        return None
    for name, buffer in module.named_buffers():
        if name in keys:
            state[name] = buffer.detach().cpu().clone()
    return state


def export_model(engine, task, cfg: Config, stage_cfg: TrainStageConfig, path: Path, rank: int, tokenizer) -> None:
    """Write the trained model as a Hugging Face folder at `path` (rank 0); LoRA adapters are merged."""
    state = full_state_dict(engine, rank)
    if rank != 0:
        return
    if stage_cfg.lora.dim > 0:
        # A fresh CPU copy with the same adapters takes the gathered weights, then merge_and_unload.
        fresh = task.build_model(cfg, dataclasses.replace(stage_cfg, deepspeed=dataclasses.replace(
            stage_cfg.deepspeed, gradient_checkpointing=False)))
        missing, unexpected = fresh.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"export: missing {missing[:5]}, unexpected {unexpected[:5]} weights")
        task.save_model(task.merge_lora(fresh), path, tokenizer)
    else:
        task.save_model(engine.module, path, tokenizer, state_dict=state)


# ---------------------------------------------------------------------------------- the worker loop
class MetricsLog:
    """Rank 0's record of every report (and every attempt's start), one JSON object a line."""

    def __init__(self, path: Optional[str]):
        self.path = Path(path) if path else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        if self.path:
            with self.path.open("a") as f:
                f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")


def maybe_inject_fault(step: int, rank: int) -> None:
    """Chaos testing (see the module docstring): SIGKILL this worker once, before optimizer step `step`."""
    kill_step, marker = os.environ.get("RLHF_RAY_FAULT_KILL_STEP"), os.environ.get("RLHF_RAY_FAULT_MARKER")
    if not kill_step or not marker or step != int(kill_step):
        return
    if rank != int(os.environ.get("RLHF_RAY_FAULT_RANK", "1")) or Path(marker).exists():
        return
    Path(marker).write_text(f"rank {rank} killed before step {step}\n")
    log.warning("fault injection: rank %d kills itself before step %d", rank, step)
    os.kill(os.getpid(), signal.SIGKILL)


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _setup_worker_logging() -> None:
    import warnings

    from rlhf_ray.console import setup_worker_logging

    # DeepSpeed calls torch.distributed functions torch has deprecated; the warning repeats every step.
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use", category=FutureWarning)
    setup_worker_logging()  # also without the cluster's setup hook (a cluster this job attached to late)


def train_loop(loop_cfg: dict) -> Optional[dict]:
    """Ray Train's per-worker function (every rank runs it). Returns the final metrics on rank 0."""
    from rlhf_ray.env import PRECISION_DTYPES, check_agreement, choose_device

    # First thing, in this worker's own process: its device, and DS_ACCELERATOR before deepspeed is imported here.
    device_type = choose_device()
    import deepspeed
    import ray
    import ray.train
    import torch.distributed as dist
    from ray.train import Checkpoint

    from rlhf_ray.train.accumulation import StepWindow
    from rlhf_ray.train.deepspeed_config import deepspeed_config, precision, reduces_once_per_step

    _setup_worker_logging()
    cfg: Config = loop_cfg["cfg"]
    stage: str = loop_cfg["stage"]
    plan: StagePlan = loop_cfg["plan"]
    task = stage_task(stage)
    stage_cfg: TrainStageConfig = getattr(cfg, stage)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cuda = device_type == "cuda"
    if cuda:
        torch.cuda.set_device(ray.train.torch.get_device())
    backend = "nccl" if cuda else "gloo"
    allreduce = init_deepspeed_world(cuda, world, ctx.get_local_world_size())  # wraps Ray Train's process group
    chosen = {"role": stage, "rank": rank, "device": device_type, "backend": backend, "allreduce": allreduce,
              "dtype": PRECISION_DTYPES[precision(stage_cfg, cuda)], "pid": os.getpid(),
              "node": ray.util.get_node_ip_address(),
              "grad_reduction": "per_step" if reduces_once_per_step(stage_cfg.deepspeed, world, cuda) else "deepspeed"}
    workers: list = [None] * world
    dist.all_gather_object(workers, chosen)  # every rank's own choice, checked and logged by rank 0
    devices = check_agreement(workers)
    for key in ("allreduce", "grad_reduction"):  # ranks that reduce differently would wait for each other forever
        if len({w[key] for w in workers}) > 1:
            raise RuntimeError(f"{stage} workers disagree on {key}: {[w[key] for w in workers]}")
    if allreduce == "shm":
        release_shm_name(rank)

    train_rows, eval_rows = ray.get(loop_cfg["train_rows"]), ray.get(loop_cfg["eval_rows"])
    tokenizer = task.load_tokenizer(cfg)
    pad_id = tokenizer.pad_token_id
    torch.manual_seed(cfg.run.seed)  # identical initial weights (value head, LoRA) on every rank
    ds_config = deepspeed_config(stage_cfg, world, cuda)
    model = build_stage_model(task, cfg, stage_cfg, ds_config, cuda)  # under ZeRO-3 never whole on any rank
    # fused: one pass instead of ~10 on CPU, also on ZeRO's flat partitions (benchmarks/results/learner_speed.md)
    optimizer = build_optimizer(model, stage_cfg.optim, offload=stage_cfg.deepspeed.offload_optimizer)
    scheduler = build_lr_scheduler(optimizer, stage_cfg.optim, plan.total_steps)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    skip_one_rank_allreduce(engine)
    device = engine.device

    # Restore: Ray Train's latest checkpoint of this run (after a worker death) wins over resume_from.
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and loop_cfg.get("resume_from"):
        checkpoint = Checkpoint.from_directory(loop_cfg["resume_from"])
    start_step = 0
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            loaded, client_state = engine.load_checkpoint(ckpt_dir)
        if loaded is None:
            raise RuntimeError(f"could not load a DeepSpeed checkpoint from {checkpoint.path}")
        start_step = int(client_state["step"])
    metrics_log = MetricsLog(loop_cfg["metrics_file"] if rank == 0 else None)
    metrics_log.write({"event": "start", "start_step": start_step, "total_steps": plan.total_steps,
                       "restored_from": checkpoint.path if checkpoint is not None else None, "workers": workers,
                       "grad_reduction": chosen["grad_reduction"]})
    if rank == 0:
        log.info("%s: %d ranks (%s), %d steps (%d per epoch), global batch %d = %d x %d ranks x %d accumulation, "
                 "gradient reduced %s%s", stage, world, devices, plan.total_steps, plan.steps_per_epoch,
                 plan.global_batch_size, plan.micro_batch_size, world, plan.accumulation,
                 "once per step (coalesced)" if chosen["grad_reduction"] == "per_step" else "as DeepSpeed schedules it",
                 f", resumed at step {start_step}" if checkpoint is not None else "")

    def run_eval() -> dict:
        if not eval_rows:
            return {}
        metrics = evaluate(engine, eval_rows, pad_id, task, plan.micro_batch_size, rank, world, device)
        return {f"eval_{k}": v for k, v in metrics.items()}

    def report(metrics: dict, checkpoint_dir: Optional[str] = None) -> None:
        metrics_log.write({"event": "report", **metrics})
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)

    if start_step == 0 and eval_rows:
        report({"step": 0, **run_eval()})  # the initial model's eval metrics

    final: dict = {}
    window_loss, window_micro, window_tokens = 0.0, 0, 0
    attempt_start, window_start = time.time(), time.time()
    engine.train()
    for step in range(start_step, plan.total_steps):
        maybe_inject_fault(step + 1, rank)
        with StepWindow(engine, once_per_step=chosen["grad_reduction"] == "per_step") as accumulation:
            for micro in range(plan.accumulation):
                rows = [train_rows[i] for i in micro_batch_indices(plan, step, micro, rank)]
                batch = {k: v.to(device) for k, v in task.collate(rows, pad_id).items()}
                loss, tokens = task.train_loss(engine, batch)
                accumulation.backward(loss, last=micro == plan.accumulation - 1)
                window_loss, window_micro = window_loss + loss.item(), window_micro + 1
                window_tokens += tokens
        engine.step()  # DeepSpeed steps the optimizer and schedule at the accumulation boundary
        done = step + 1
        last = done == plan.total_steps
        do_eval, do_checkpoint, do_log = step_actions(stage_cfg, done, plan.total_steps)
        if not do_log:
            continue
        stats = torch.tensor([window_loss, window_micro, window_tokens], dtype=torch.float64, device=device)
        dist.all_reduce(stats)
        now = time.time()
        metrics = {
            "step": done, "epoch": round(done / plan.steps_per_epoch, 4), "loss": stats[0].item() / stats[1].item(),
            "lr": engine.get_lr()[0], "tokens_per_s": stats[2].item() / max(now - window_start, 1e-9),
            "samples": done * plan.global_batch_size, "optimizer_steps": engine.global_steps,
            "elapsed_s": round(now - attempt_start, 3),
            "eta_s": round((now - attempt_start) / (done - start_step) * (plan.total_steps - done), 3),
        }
        window_loss, window_micro, window_tokens, window_start = 0.0, 0, 0, now
        if do_eval:
            metrics.update(run_eval())
        if rank == 0:
            evals = "".join(f" | {k} {v:.4f}" for k, v in metrics.items() if k.startswith("eval_"))
            log.info("%s step %d/%d | loss %.4f | lr %.2e | %.0f tokens/s%s | ETA %s", stage, done, plan.total_steps,
                     metrics["loss"], metrics["lr"], metrics["tokens_per_s"], evals, _format_eta(metrics["eta_s"]))
        if not do_checkpoint:
            report(metrics)
            continue
        with tempfile.TemporaryDirectory(prefix=f"rlhf_ray_{stage}_ckpt_") as ckpt_dir:
            engine.save_checkpoint(ckpt_dir, tag=f"step{done}", client_state={"step": done})
            if last:
                export_model(engine, task, cfg, stage_cfg, Path(ckpt_dir) / HF_SUBDIR, rank, tokenizer)
            report(metrics, ckpt_dir)
        final = metrics

    if start_step >= plan.total_steps:  # restored from a finished run: export again, nothing to train
        with tempfile.TemporaryDirectory(prefix=f"rlhf_ray_{stage}_ckpt_") as ckpt_dir:
            engine.save_checkpoint(ckpt_dir, tag=f"step{start_step}", client_state={"step": start_step})
            export_model(engine, task, cfg, stage_cfg, Path(ckpt_dir) / HF_SUBDIR, rank, tokenizer)
            final = {"step": start_step, **run_eval()}
            report(final, ckpt_dir)
    return final if rank == 0 else None


# -------------------------------------------------------------------------------------- the driver
@dataclasses.dataclass
class StageResult:
    output_dir: Path  # the final Hugging Face folder
    metrics: dict  # the last reported metrics (with the final eval)
    metrics_file: Path  # every report of the run, one JSON a line
    checkpoint: str  # the final Ray Train checkpoint (DeepSpeed state + hf/); usable as resume_from
    plan: StagePlan


def stage_output_dir(cfg: Config, stage: str) -> Path:
    stage_cfg = getattr(cfg, stage)
    return Path(stage_cfg.output_dir or Path(cfg.run.output_dir) / stage).expanduser().resolve()


def _worker_env() -> dict[str, str]:
    """Folders and switches for the workers; never a device choice (each worker makes its own: train_loop)."""
    from rlhf_ray.env import worker_env_vars

    env = worker_env_vars()
    env.update({k: v for k, v in os.environ.items() if k.startswith("RLHF_RAY_")})
    return env


def _as_config(config: Config | str | Path, overrides) -> Config:
    return config if isinstance(config, Config) else load_config(config, overrides)


def step_actions(stage_cfg: TrainStageConfig, done: int, total: int) -> tuple[bool, bool, bool]:
    """(eval, checkpoint, log) after optimizer step `done` of `total`: every eval_every / checkpoint_every (0: only
    at the end) and log_every steps, and all three at the last step. A step that evaluates or checkpoints logs too."""
    last = done == total
    do_eval = last or (stage_cfg.eval_every > 0 and done % stage_cfg.eval_every == 0)
    do_checkpoint = last or (stage_cfg.checkpoint_every > 0 and done % stage_cfg.checkpoint_every == 0)
    return do_eval, do_checkpoint, do_eval or do_checkpoint or done % stage_cfg.log_every == 0


def resume_checkpoint(stage_cfg: TrainStageConfig, stage: str) -> Optional[str]:
    """<stage>.resume_from as an absolute folder (None when unset); a folder that is not there is a ConfigError."""
    if not stage_cfg.resume_from:
        return None
    path = Path(stage_cfg.resume_from).expanduser().resolve()
    if not path.is_dir():
        raise ConfigError(f"{stage}.resume_from: no checkpoint folder at {path}")
    return str(path)


def run_config(cfg: Config, stage_cfg: TrainStageConfig, run_name: str, work_dir: Path):
    """Ray Train's RunConfig: restarts after worker failures (<stage>.max_failures), checkpoints kept
    (checkpoint.keep_last), storage under the stage's work folder."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    return RunConfig(name=run_name, storage_path=str(work_dir / "ray"),
                     failure_config=FailureConfig(max_failures=stage_cfg.max_failures),
                     checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep_last),
                     worker_runtime_env={"env_vars": _worker_env()})


def scaling_config(stage_cfg: TrainStageConfig, cluster_gpus: float):
    """The stage's Ray Train workers: num_workers of cpus_per_worker CPUs, plus one GPU each when use_gpu (None:
    when the cluster has GPUs)."""
    from ray.train import ScalingConfig

    use_gpu = stage_cfg.use_gpu if stage_cfg.use_gpu is not None else cluster_gpus > 0
    return ScalingConfig(num_workers=stage_cfg.num_workers, use_gpu=use_gpu,
                         resources_per_worker={"CPU": stage_cfg.cpus_per_worker, **({"GPU": 1} if use_gpu else {})})


def run_stage(config: Config | str | Path, stage: str, overrides: Optional[list[str] | dict] = None) -> StageResult:
    """Run one training stage ("sft" or "rm") as a Ray Train job on the current (or a local) Ray cluster."""
    import ray
    from ray.train.torch import TorchTrainer

    from rlhf_ray.data import load_stage_dataset
    from rlhf_ray.io import atomic_directory
    from rlhf_ray.resources import init_ray, peak_concurrent_threads

    cfg = _as_config(config, overrides)
    task = stage_task(stage)
    stage_cfg: TrainStageConfig = getattr(cfg, stage)
    output_dir = stage_output_dir(cfg, stage)
    work_dir = output_dir.with_name(output_dir.name + "_train")
    started = time.time()
    init_ray(cfg, concurrent_threads=peak_concurrent_threads(cfg, stages=(stage,)))  # the pipeline's: every stage

    tokenizer = task.load_tokenizer(cfg)
    train_rows = task.rows(load_stage_dataset(cfg, stage, tokenizer, split="train"))
    eval_rows = task.rows(load_stage_dataset(cfg, stage, tokenizer, split="eval"))
    plan = make_plan(stage_cfg, len(train_rows), stage_cfg.num_workers, cfg.run.seed, stage)
    scaling = scaling_config(stage_cfg, ray.cluster_resources().get("GPU", 0))
    use_gpu = scaling.use_gpu
    run_name = f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    metrics_file = work_dir / "logs" / f"{run_name}.jsonl"
    resume_from = resume_checkpoint(stage_cfg, stage)
    log.info("%s: %d train / %d eval rows, %d steps on %d %s workers -> %s", stage, len(train_rows), len(eval_rows),
             plan.total_steps, stage_cfg.num_workers, "GPU" if use_gpu else "CPU", output_dir)

    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg, "stage": stage, "plan": plan, "train_rows": ray.put(train_rows),
                           "eval_rows": ray.put(eval_rows), "metrics_file": str(metrics_file),
                           "resume_from": resume_from},
        scaling_config=scaling,
        run_config=run_config(cfg, stage_cfg, run_name, work_dir),
    )
    sigint_handler = signal.getsignal(signal.SIGINT)
    try:
        result = trainer.fit()
    finally:
        # Ray Train's Ctrl-C handler holds the run's controller actor: with ours back, that actor (and the actors it
        # owns) go when the run does, not when this driver exits.
        if signal.getsignal(signal.SIGINT) is not sigint_handler:
            signal.signal(signal.SIGINT, sigint_handler)
    if result.error is not None:
        raise result.error
    with result.checkpoint.as_directory() as ckpt_dir, atomic_directory(output_dir) as tmp:
        shutil.copytree(Path(ckpt_dir) / HF_SUBDIR, tmp, dirs_exist_ok=True)
    metrics = result.return_value or result.metrics or {}
    log.info("%s done in %.1fs: %s -> %s", stage, time.time() - started,
             {k: round(v, 4) for k, v in metrics.items() if k.startswith("eval_")}, output_dir)
    return StageResult(output_dir, metrics, metrics_file, result.checkpoint.path, plan)


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
