"""PPO learners: the actor (policy) and the critic, each a DeepSpeed ZeRO engine per rank of a ModelGroup.

    actor = PolicyGroup(cfg, placement=plan["actor"])
    old_logprobs = actor.logprobs(batch)                 # (B, T-1)
    stats = actor.train(experience)                      # ppo_epochs over mini-batches, micro-batch accumulation
    refs = actor.export_params(bucket_bytes=256 << 20)   # [(hf_name, full tensor), ...] buckets for weight sync
    critic = CriticGroup(cfg, placement=plan["critic"])
    values = critic.values(batch); critic.train(experience)

Batch format and ALIGNMENT CONVENTION (every per-token tensor here is (B, T-1)):
    input_ids (B, T), attention_mask (B, T)   prompt + response tokens; padding anywhere (left-padded prompts,
                                              right-padded responses); position ids come from the mask.
    Per-token column t refers to the ACTION input_ids[:, t+1], predicted from the prefix input_ids[:, :t+1]:
        logprobs[:, t]  = log pi(input_ids[:, t+1] | input_ids[:, :t+1])
        values[:, t]    = V(prefix input_ids[:, :t+1]), the critic's value at token t (the state before the action)
        action_mask[:, t] = 1 where input_ids[:, t+1] is a generated response token (not prompt, not padding)
    PPO fields, same (B, T-1) layout: old_logprobs, advantages, returns, old_values (ref_logprobs for the
    controller's reward shaping). Advantages arrive final (whitened or not) from the controller.
    `logprobs` and `values` are 0 where attention_mask[:, 1:] is 0.

DeepSpeed configuration comes from PPOLearnerConfig (ppo.actor / ppo.critic): ZeRO stage, precision (one for the
whole run, config.ppo_precision; 'auto': bf16 on GPU or a CPU with native bf16, decided by each rank for itself),
optimizer/parameter offload (GPU only: ignored with a warning on CPU), gradient checkpointing, LoRA (peft), gradient
clipping, micro-batch size. The optimizer-step batch of a PPO learner is
ppo.mini_batch_size samples across ranks: gradient accumulation = mini_batch / (micro_batch x ranks).
Optimizer: torch's fused AdamW (CPU and GPU; no JIT build), DeepSpeedCPUAdam with ZeRO-Offload.
One rank runs ZeRO-1/2 as stage 0 (nothing to partition; deepspeed_config.zero_stage).

Options (DeepSpeed-Chat): ppo.ema_decay keeps an exponential moving average of the trainable weights
(partitioned like the weights under ZeRO-3), exported with ema=True; ppo.ptx_coef mixes a language-modelling
loss on a pretraining batch into every micro-step (train(experience, ptx=batch)).
"""
from __future__ import annotations

import abc
import inspect
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from rlhf_ray import rl
from rlhf_ray.config import Config, ModelConfig, PPOConfig, PPOLearnerConfig, ppo_learner
from rlhf_ray.groups import Batch, DistributedWorker, ModelGroup, RolePlacement, batch_rows, mean_stats, shard_batch
from rlhf_ray.models.attention import use_cpu_attention
from rlhf_ray.models.loading import resolve_model_path
from rlhf_ray.train.accumulation import StepWindow
from rlhf_ray.train.common import (build_optimizer, build_partitioned, hf_model_config, is_zero3,
                                   skip_one_rank_allreduce)
from rlhf_ray.train.deepspeed_config import autocast_bf16, deepspeed_config, precision, reduces_once_per_step

log = logging.getLogger(__name__)

DEFAULT_BUCKET_BYTES = 256 << 20
LORA_ADAPTER = "default"


def ppo_total_steps(cfg: Config) -> int:
    """Optimizer steps of a whole PPO run (what a decaying LR schedule spans)."""
    samples = cfg.ppo.rollout_batch_size * cfg.generation.n_samples_per_prompt
    return max(1, cfg.ppo.num_iterations * cfg.ppo.ppo_epochs * math.ceil(samples / cfg.ppo.mini_batch_size))


def hf_param_name(name: str) -> str:
    """Module parameter name -> the Hugging Face model's own name (peft wrappers removed)."""
    return name.replace("base_model.model.", "", 1).replace(".base_layer.", ".")


def is_lora_layer(module: torch.nn.Module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "base_layer")


def _numel(p: torch.nn.Parameter) -> int:
    return p.ds_numel if hasattr(p, "ds_numel") else p.numel()


def forward_accepts(model: torch.nn.Module, argument: str) -> bool:
    """Whether the (peft-unwrapped) model's forward takes `argument` (position_ids, logits_to_keep)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return argument in inspect.signature(base.forward).parameters


def first_action_column(batch: Batch) -> int:
    """The first column of (B, T-1) in which some row acts (action_mask); 0 without one: every column counts."""
    action = batch.get("action_mask")
    acting = action.bool().any(dim=0).nonzero() if action is not None else None
    return int(acting[0]) if acting is not None and len(acting) else 0


def causal_logprobs(model: Callable, batch: Batch, position_ids: bool, entropy: bool | str = False,
                    logits_to_keep: bool = False, temperature: float = 1.0,
                    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(B, T-1) log-probs of input_ids[:, 1:] (0 where that target is padding), and optionally the entropies, of
    softmax(logits / temperature): pass the sampling temperature (generation.temperature; 0 scores at 1, see
    rl.scoring_temperature) so they are those of the distribution the engines sampled from.
    Position ids come from the attention mask, so left-padded rows score like unpadded ones.

    With `logits_to_keep` (a model that takes it) and an action_mask in the batch, the LM head and the softmax run
    only from the first action column on, as TRL and veRL do: the columns before it, prompt tokens that no PPO
    quantity reads, are 0. On a long prompt that is most of the head's and the log-softmax's work."""
    from rlhf_ray.models.value_head import position_ids_from_mask

    input_ids, mask = batch["input_ids"], batch["attention_mask"]
    kwargs = {"position_ids": position_ids_from_mask(mask)} if position_ids else {}
    start = first_action_column(batch) if logits_to_keep else 0
    if start:  # positions start..T-1 -> columns start..T-2, kept by index (transformers' 1-D tensor form): the
        # head then reads a contiguous copy. The int form hands it a slice of the hidden states, and torch's matmul
        # expands the head's weight over the batch for a non-contiguous input (one weight copy per row): with bf16
        # weights on CPU that doubled a SmolLM2 reference forward (16 x 72 tokens: 2.0 -> 0.94 s).
        kwargs["logits_to_keep"] = torch.arange(start, input_ids.shape[1], device=input_ids.device)
    logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False, **kwargs).logits[:, :-1]
    target_mask = mask[:, start + 1:]
    left = lambda x: torch.nn.functional.pad(x, (start, 0)) if start else x  # noqa: E731 -- back to (B, T-1)
    logprobs = left(rl.logprobs_from_logits(logits, input_ids[:, start + 1:], temperature, mask=target_mask))
    if not entropy:
        return logprobs, None
    if entropy == "detached":  # a metric only: no graph through the second pass over the logits
        with torch.no_grad():
            return logprobs, left(rl.entropy_from_logits(logits.detach(), temperature, mask=target_mask))
    return logprobs, left(rl.entropy_from_logits(logits, temperature, mask=target_mask))


def to_device(batch: Batch, device) -> Batch:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def micro_batches(batch: Batch, size: int) -> Iterator[Batch]:
    n = batch_rows(batch)
    for start in range(0, n, size):
        yield {k: v[start:start + size] if isinstance(v, (torch.Tensor, list)) else v for k, v in batch.items()}


class NonfiniteStepError(RuntimeError):
    """ppo.max_nonfinite_steps optimizer steps in a row were skipped for a non-finite loss or gradient norm."""


class NonfiniteSteps:
    """Counts optimizer steps skipped for a non-finite loss or gradient norm; `limit` in a row stop the run: a NaN
    that keeps coming back is a diverged run or broken inputs, not bad luck (ppo.max_nonfinite_steps)."""

    def __init__(self, limit: int, role: str = "learner"):
        self.limit, self.role = limit, role
        self.in_a_row = self.total = 0

    def record(self, skipped: bool) -> None:
        if not skipped:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.total += 1
        if self.in_a_row >= self.limit:
            raise NonfiniteStepError(
                f"{self.role}: {self.in_a_row} optimizer steps in a row skipped for a non-finite loss or gradient "
                f"norm (ppo.max_nonfinite_steps: {self.limit}); stopping. Look for NaN/inf in the rewards or "
                f"advantages, or lower the learning rate")


# ------------------------------------------------------------------------------------------ objectives
def policy_objective(p: PPOConfig, logprobs: torch.Tensor, entropy: torch.Tensor, mb: Batch, kl_coef: float,
                     aggregation: Optional[rl.Aggregation] = None) -> tuple[torch.Tensor, dict]:
    """The actor's loss on one micro-batch, from its (B, T-1) log-probs and entropy: the clipped surrogate
    (ppo.policy_loss: ppo or gspo; ppo.clip_ratio / clip_ratio_low / clip_ratio_high, dual_clip), + kl_coef x KL to
    the reference (ppo.kl_estimator) when `mb` has ref_logprobs, + the entropy bonus (ppo.entropy_coef), each
    aggregated by `aggregation` (the learner's: ppo.loss_aggregation over the whole mini-batch; None: over `mb`
    alone). The learner adds PTX."""
    mask = mb["action_mask"]
    agg = aggregation or rl.Aggregation(p.loss_aggregation)
    old = mb["old_logprobs"] if "old_logprobs" in mb else logprobs.detach()
    weights, correction = None, {}
    if p.off_policy_correction != "none":  # the engines' log-probs are the behaviour policy (make_experience)
        weights, correction = rl.off_policy_correction(old, mb["vllm_logprobs"], mask, p.off_policy_correction,
                                                       p.is_cap, p.is_mask_low, p.is_mask_high)
    if p.policy_loss == "gspo":  # unset clip ratios: the GSPO paper's, not clip_ratio (a sequence ratio stays near 1)
        low = rl.DEFAULTS.gspo_clip_ratio_low if p.clip_ratio_low is None else p.clip_ratio_low
        high = rl.DEFAULTS.gspo_clip_ratio_high if p.clip_ratio_high is None else p.clip_ratio_high
        loss, stats = rl.gspo_loss(logprobs, old, mb["advantages"], mask, low, high, p.dual_clip, agg, weights)
    else:
        loss, stats = rl.policy_loss(logprobs, old, mb["advantages"], mask, p.clip_ratio, p.dual_clip, agg,
                                     p.clip_ratio_low, p.clip_ratio_high, weights)
    stats = {"policy_loss": loss.detach(), **stats, **correction, "entropy": rl.masked_mean(entropy.detach(), mask)}
    if "ref_logprobs" in mb:
        kl_term, kl = rl.kl_loss(logprobs, mb["ref_logprobs"], mask, kl_coef, p.kl_estimator, agg)
        loss = loss + kl_term
        stats.update(kl_loss=kl_term.detach(), kl_sequence=(kl.detach() * mask).sum(dim=1).mean())
    if "vllm_logprobs" in mb:
        stats["logprob_gap"] = rl.masked_mean((mb["vllm_logprobs"] - logprobs.detach()).abs(), mask)
    if p.entropy_coef > 0:
        loss = loss + rl.entropy_bonus(entropy, mask, p.entropy_coef, agg)
    return loss, stats


def value_objective(p: PPOConfig, values: torch.Tensor, mb: Batch,
                    aggregation: Optional[rl.Aggregation] = None) -> tuple[torch.Tensor, dict]:
    """The critic's loss on one micro-batch: clipped value loss (ppo.value_clip), aggregated as policy_objective's."""
    loss, stats = rl.value_loss(values, mb["old_values"], mb["returns"], mb["action_mask"], value_clip=p.value_clip,
                                aggregation=aggregation or rl.Aggregation(p.loss_aggregation))
    return loss, {"value_loss": loss.detach(), "value_clip_fraction": stats["clip_fraction"]}


# ------------------------------------------------------------------------------------------ worker body
class EngineWorker(DistributedWorker, abc.ABC):
    """One rank of a DeepSpeed learner: engine, optional EMA, export, checkpoints. Subclasses build the model."""

    def __init__(self, role: str, rank: int, world_size: int, placement_group_id: Optional[str] = None, *,
                 model: ModelConfig, stage: PPOLearnerConfig, ppo: PPOConfig, total_steps: int = 1, seed: int = 0,
                 max_new_tokens: Optional[int] = None):
        super().__init__(role, rank, world_size, placement_group_id)
        self.model_cfg, self.stage, self.ppo = model, stage, ppo
        self.max_new_tokens = max_new_tokens  # generation.max_new_tokens: seq-mean-token-sum-norm's constant
        self.total_steps, self.seed = total_steps, seed
        self.engine = None
        self.ema: Optional[dict[str, torch.Tensor]] = None
        self.nonfinite = NonfiniteSteps(ppo.max_nonfinite_steps, role)

    # -- construction
    @abc.abstractmethod
    def build_model(self) -> torch.nn.Module:
        """The fp32 model this learner trains (under ZeRO-3 called inside build_partitioned: loads into partitions)."""

    def lora_target(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def setup(self) -> None:
        import deepspeed

        from rlhf_ray.env import PRECISION_DTYPES

        torch.manual_seed(self.seed)
        self.cuda = self.device_type == "cuda"  # chosen in this rank's process (DistributedWorker)
        prec = precision(self.stage, self.cuda)
        self.dtype_name = PRECISION_DTYPES[prec]  # what the model computes in
        self.autocast = autocast_bf16(prec, self.cuda)  # fp32 weights, bf16 matmuls
        self.ds_config = deepspeed_config(self.stage, self.world_size, self.cuda,
                                          train_batch_size=self.ppo.mini_batch_size, torch_autocast=self.autocast)
        self.zero3 = is_zero3(self.ds_config)
        # Under ZeRO-3 straight into partitions, never whole on any rank (the helper SFT and RM use too).
        model = build_partitioned(lambda: self.prepare_model(self.build_model()), self.ds_config)
        optimizer = self.make_optimizer(model)
        scheduler = self.make_scheduler(optimizer)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config)
        skip_one_rank_allreduce(self.engine)
        self.once_per_step = reduces_once_per_step(self.stage.deepspeed, self.world_size, self.cuda)
        self.device = self.engine.device
        if self.ppo.ema_decay is not None:
            self.ema = {name: self._local(p).detach().float().clone() for name, p in self._trainable()}

    def describe(self) -> dict:
        return {**super().describe(), "grad_reduction": "per_step" if self.once_per_step else "deepspeed"}

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """ppo.<role>.disable_dropout, deepspeed.gradient_checkpointing and lora.* applied to the built model; on CPU
        its sdpa attention is models/attention.py's CPU attention (as its scorers: faster on short sequences)."""
        if not self.cuda:
            use_cpu_attention(model)
        if self.stage.disable_dropout:
            for module in model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
        if self.stage.deepspeed.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.stage.lora.dim > 0:
            model = self.apply_lora(model)
        return model

    def make_scheduler(self, optimizer):
        """Linear warm-up, then ppo.<role>.optim.lr_schedule over the run's optimizer steps (as SFT / RM)."""
        from rlhf_ray.train.common import build_lr_scheduler

        return build_lr_scheduler(optimizer, self.stage.optim, self.total_steps)

    def make_optimizer(self, model: torch.nn.Module):
        """The optimizer SFT and RM build too (train.common.build_optimizer), from ppo.<role>.optim."""
        return build_optimizer(model, self.stage.optim, offload=self.stage.deepspeed.offload_optimizer)

    def apply_lora(self, model: torch.nn.Module) -> torch.nn.Module:
        """peft LoRA on `lora_target(model)`'s listed modules; with only_optimize_lora everything else is frozen."""
        from peft import LoraConfig, get_peft_model

        lora = self.stage.lora
        target = self.lora_target(model)
        peft_model = get_peft_model(target, LoraConfig(r=lora.dim, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                       target_modules=list(lora.module_names)))
        if not lora.only_optimize_lora:
            for p in peft_model.parameters():
                p.requires_grad_(True)
        return self.replace_lora_target(model, peft_model)

    def replace_lora_target(self, model, peft_model):
        return peft_model

    # -- helpers
    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def _trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]

    def _local(self, p: torch.nn.Parameter) -> torch.Tensor:
        """What this rank holds of a parameter: its ZeRO-3 partition, or the whole tensor below ZeRO-3."""
        return p.ds_tensor if self.zero3 else p.data

    def _optimizer_step_taken(self, steps_before: int) -> bool:
        if self.engine.global_steps == steps_before:
            return False
        if self.ema is not None:
            names, params = zip(*self._trainable())
            rl.ema_update([self.ema[n] for n in names], [self._local(p) for p in params], self.ppo.ema_decay)
        return True

    def _any_rank(self, flag: bool) -> bool:
        """`flag` or-ed over this learner's ranks (one all_reduce in its torch.distributed world): every rank gets
        the same answer, so every rank takes the same branch after it."""
        import torch.distributed as dist

        flags = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return bool(flags.item())

    def _grads_finite(self) -> bool:
        grads = [p.grad for _, p in self._trainable() if p.grad is not None]
        # the L2 norm of every tensor in one fused call, finite when every element is (NaN and inf propagate) and the
        # norm does not overflow (a gradient no step should take). Not the inf-norm: on CPU it was 8x slower, 0.18 s
        # a step on SmolLM2 (benchmarks/results/learner_speed.md)
        return not grads or bool(torch.stack(torch._foreach_norm(grads, 2.0)).isfinite().all())

    def _boundary_step(self, skip: bool) -> bool:
        """The optimizer step at a gradient-accumulation boundary, or its skip on every rank; True when applied.

        A step is skipped when `skip` (a non-finite loss on some rank, decided collectively; its gradient has been
        made NaN everywhere) or when the gradient norm is not finite. DeepSpeed's optimizer wrappers (ZeRO 1-3,
        bf16, fp16) check the norm themselves, collectively, and then discard the accumulated gradients without
        touching weights, optimizer state or LR schedule (their overflow path); a plain client optimizer (ZeRO-0,
        fp32) checks nothing, so its all-reduced gradients are checked and dropped here. A skipped step is not a
        step: the engine's step and sample counters are put back."""
        engine = self.engine
        steps, samples = engine.global_steps, engine.global_samples
        if not hasattr(engine.optimizer, "overflow"):
            if self._any_rank(skip or not self._grads_finite()):
                engine.zero_grad()
                engine.micro_steps += 1  # what step() counts besides the update
                return False
        engine.step()
        if engine.was_step_applied():
            return True
        engine.global_steps, engine.global_samples = steps, samples
        return False

    def _finish_stats(self, sums: dict[str, float], count: int, steps: int, skipped: int = 0) -> dict[str, float]:
        stats = {k: v / max(count, 1) for k, v in sums.items()}
        stats["optimizer_steps"] = float(steps)
        stats["nonfinite_steps"] = float(skipped)  # skipped for a non-finite loss or gradient norm (every rank alike)
        stats["lr"] = float(self.scheduler.get_last_lr()[0])
        norm = self.engine.get_global_grad_norm()
        if norm is not None:
            stats["grad_norm"] = float(norm)
        return stats

    def _mini_batch_aggregation(self, mini: Batch) -> rl.Aggregation:
        """ppo.loss_aggregation over one whole mini-batch (this rank's rows `mini` and the other ranks' rows of the
        same step): its count N of response tokens (token-mean) or of sequences with one (seq-mean-*), summed over
        the ranks with one all_reduce, is shared out over the micro-batches x ranks whose gradients DeepSpeed
        averages (engine.backward divides by gradient_accumulation_steps, the all-reduce by the ranks). Each
        micro-batch's loss is then its own sum / that share, and the step's gradient that of sum / N over the whole
        mini-batch, as veRL and DAPO do: a short micro-batch weighs less than a long one. (Sequence counts are equal
        per micro-batch unless samples are masked out, dropped as non-finite or overlong.)"""
        import torch.distributed as dist

        mode = self.ppo.loss_aggregation
        count = rl.aggregation_units(mini["action_mask"], mode).to(self.device, torch.float64).reshape(1)
        dist.all_reduce(count)
        shares = self.engine.gradient_accumulation_steps() * self.world_size
        return rl.Aggregation(mode, units=max(float(count.item()), 1.0) / shares, max_len=self.max_new_tokens)

    def _train_loop(self, experience: Batch,
                    micro_loss: Callable[[Batch, int, rl.Aggregation], tuple[torch.Tensor, dict]]) -> dict:
        """ppo_epochs passes over this rank's rows in micro-batches; DeepSpeed steps the optimizer every
        gradient_accumulation_steps micro-batches (one mini-batch of ppo.mini_batch_size samples over all ranks),
        each micro-batch's loss aggregated over its whole mini-batch (_mini_batch_aggregation).
        Rows are taken in order, as DeepSpeed-Chat does: the controller shuffles the experience if it wants to.

        A step whose loss (on any rank) or gradient norm is not finite is skipped on every rank (_boundary_step) and
        its micro-batches left out of the returned means; ppo.max_nonfinite_steps such steps in a row raise
        NonfiniteStepError on every rank."""
        rows = batch_rows(experience)
        per_rank_mini = self.ppo.mini_batch_size // self.world_size
        if rows % per_rank_mini:
            raise ValueError(f"{self.role} rank {self.rank}: {rows} rows is not a whole number of mini-batches of "
                             f"{per_rank_mini} per rank (ppo.mini_batch_size {self.ppo.mini_batch_size} over "
                             f"{self.world_size} ranks)")
        self.engine.train()
        sums: dict[str, float] = {}  # stats of the micro-batches whose step was applied
        skipped_sums: dict[str, float] = {}  # reported only when no step was applied
        window: list[dict] = []  # stats of this gradient-accumulation window's micro-batches
        index = count = skipped_count = steps = skipped = 0
        window_finite = True
        for _ in range(self.ppo.ppo_epochs):
            for mini in micro_batches(experience, per_rank_mini):  # one optimizer step each
                aggregation = self._mini_batch_aggregation(mini)
                micros = list(micro_batches(mini, self.stage.deepspeed.micro_batch_size))  # the step's accumulation
                with StepWindow(self.engine, self.once_per_step) as accumulation:
                    for i, micro in enumerate(micros):
                        loss, stats = micro_loss(to_device(micro, self.device), index, aggregation)
                        index += 1
                        window.append(stats)
                        window_finite &= bool(torch.isfinite(loss.detach()).all())
                        last = i == len(micros) - 1
                        skip = last and self._any_rank(not window_finite)
                        if skip:  # NaN gradients everywhere: every rank's optimizer wrapper then discards the step
                            loss = loss * float("nan")
                        accumulation.backward(loss, last)
                steps_before = self.engine.global_steps
                applied = self._boundary_step(skip)
                steps += self._optimizer_step_taken(steps_before)
                skipped += not applied
                for stats in window:
                    target = sums if applied else skipped_sums
                    for k, v in stats.items():
                        target[k] = target.get(k, 0.0) + float(v)
                count, skipped_count = count + applied * len(window), skipped_count + (not applied) * len(window)
                window, window_finite = [], True
                self.nonfinite.record(skipped=not applied)
        if not count:
            sums, count = skipped_sums, skipped_count
        return self._finish_stats(sums, count, steps, skipped)

    # -- parameter export (weight broadcast, HF export)
    def _export_units(self) -> list[list[tuple[str, torch.nn.Parameter]]]:
        """Parameters in model order, grouped so a LoRA layer's base weight and adapters gather together."""
        owner: dict[int, str] = {}
        lora_params: dict[str, list[tuple[str, torch.nn.Parameter]]] = {}
        for mod_name, mod in self.module.named_modules():
            if is_lora_layer(mod):
                lora_params[mod_name] = [(f"{mod_name}.{n}", p) for n, p in mod.named_parameters()]
                owner.update({id(p): mod_name for _, p in lora_params[mod_name]})
        units, emitted = [], set()
        for name, p in self.module.named_parameters():
            mod_name = owner.get(id(p))
            if mod_name is None:
                units.append([(name, p)])
            elif mod_name not in emitted:
                emitted.add(mod_name)
                units.append(lora_params[mod_name])
        return units

    def _merge_lora(self, tensors: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
        """Module-named full tensors -> HF-named ones, LoRA adapters folded into their base weights."""
        out = []
        for name, tensor in tensors.items():
            if ".lora_" in name:
                continue
            if ".base_layer." in name and name.endswith(".weight"):
                mod_name = name[: -len(".base_layer.weight")]
                mod = self.module.get_submodule(mod_name)
                extra = [k for k in tensors if k.startswith(mod_name + ".lora_")
                         and not k.startswith((f"{mod_name}.lora_A.", f"{mod_name}.lora_B."))]
                if extra:
                    raise ValueError(f"cannot merge LoRA layer {mod_name}: unsupported adapter tensors {extra}")
                a = tensors[f"{mod_name}.lora_A.{LORA_ADAPTER}.weight"].float()
                b = tensors[f"{mod_name}.lora_B.{LORA_ADAPTER}.weight"].float()
                delta = b @ a
                if getattr(mod, "fan_in_fan_out", False):
                    delta = delta.T
                tensor = (tensor.float() + delta * mod.scaling[LORA_ADAPTER]).to(tensor.dtype)
            out.append((hf_param_name(name), tensor))
        return out

    def _gather_ema(self, name: str, p: torch.nn.Parameter, keep: bool) -> Optional[torch.Tensor]:
        shard = self.ema[name]
        if not self.zero3:
            return shard.to(p.dtype, copy=True) if keep else None
        import torch.distributed as dist

        shard = shard.to(self.device)
        parts = [torch.empty_like(shard) for _ in range(self.world_size)]
        dist.all_gather(parts, shard)
        return torch.cat(parts)[: p.ds_numel].view(p.ds_shape).to(p.dtype).cpu() if keep else None

    def iter_param_buckets(self, bucket_bytes: int = DEFAULT_BUCKET_BYTES, ema: bool = False,
                           to_cpu: bool = True) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """Yield buckets of (HF name, full tensor), about `bucket_bytes` each, in model order. Every rank must
        iterate together (ZeRO-3 shards are gathered a bucket at a time); rank 0 gets the tensors, the others
        empty buckets. LoRA is merged into the base weights; names are the Hugging Face model's."""
        import deepspeed

        if ema and self.ema is None:
            raise ValueError(f"{self.role}: no EMA weights (set ppo.ema_decay)")
        keep = self.rank == 0
        bucket: list[list[tuple[str, torch.nn.Parameter]]] = []
        size = 0
        units = self._export_units()
        for i, unit in enumerate(units):
            bucket.append(unit)
            size += sum(_numel(p) * p.element_size() for _, p in unit)
            if size < bucket_bytes and i + 1 < len(units):
                continue
            params = [p for u in bucket for _, p in u]
            tensors: dict[str, torch.Tensor] = {}
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                for name, p in (item for u in bucket for item in u):
                    if ema and name in self.ema:
                        t = self._gather_ema(name, p, keep)
                    else:
                        t = p.data.detach().clone() if keep else None
                    if keep:
                        tensors[name] = t.cpu() if to_cpu else t
            yield self._merge_lora(tensors) if keep else []
            bucket, size = [], 0

    def export_params(self, bucket_bytes: int = DEFAULT_BUCKET_BYTES, ema: bool = False,
                      callback: Optional[Callable[[list[tuple[str, torch.Tensor]]], None]] = None,
                      to_cpu: bool = True) -> list:
        """All ranks call this together. On rank 0 each bucket goes to `callback(bucket)` (a transport), or, without
        one, into the Ray object store: returns rank 0's list of ObjectRefs, one per bucket (others return [])."""
        import ray

        refs = []
        for bucket in self.iter_param_buckets(bucket_bytes, ema=ema, to_cpu=to_cpu):
            if self.rank != 0:
                continue
            if callback is not None:
                callback(bucket)
            else:
                refs.append(ray.put(bucket))
        return refs

    def save_pretrained(self, path: str, ema: bool = False) -> Optional[str]:
        """Hugging Face folder of the (merged) weights, written by rank 0 (all ranks gather together)."""
        state: dict[str, torch.Tensor] = {}
        for bucket in self.iter_param_buckets(ema=ema):
            state.update(bucket)
        if self.rank != 0:
            return None
        self.write_pretrained(path, state)
        return path

    @abc.abstractmethod
    def write_pretrained(self, path: str, state: dict[str, torch.Tensor]) -> None:
        """Write a Hugging Face style folder from full, HF-named tensors (rank 0 only)."""

    # -- checkpoints (DeepSpeed: model, optimizer, scheduler; plus this rank's EMA partition)
    def save_checkpoint(self, ckpt_dir: str, tag: Optional[str] = None) -> str:
        """This rank's part of a DeepSpeed checkpoint in `ckpt_dir`: a local folder every node sees, or an object
        store URI (written to local scratch, then uploaded: checkpoint.staged_upload)."""
        from rlhf_ray.checkpoint import staged_upload

        tag = tag or f"global_step{self.engine.global_steps}"
        with staged_upload(ckpt_dir) as local:
            self.engine.save_checkpoint(local, tag=tag)
            if self.ema is not None:
                torch.save(self.ema, Path(local) / tag / f"ema_rank{self.rank}.pt")
        return tag

    def load_checkpoint(self, ckpt_dir: str, tag: Optional[str] = None) -> str:
        """Load a DeepSpeed checkpoint from a local folder or an object store URI (downloaded to scratch first)."""
        from rlhf_ray.checkpoint import staged_download

        with staged_download(ckpt_dir) as local:
            return self._load_local_checkpoint(local, tag, where=ckpt_dir)

    def _load_local_checkpoint(self, ckpt_dir: str, tag: Optional[str], where: str) -> str:
        if tag is None:
            latest = Path(ckpt_dir) / "latest"
            if not latest.is_file():
                raise FileNotFoundError(f"{self.role}: no DeepSpeed checkpoint in {where} (no 'latest' file)")
            tag = latest.read_text().strip()
        load_path, _ = self.engine.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
        if load_path is None:
            raise FileNotFoundError(f"{self.role}: could not load checkpoint {where}/{tag}")
        if self.ema is not None:
            ema_file = Path(ckpt_dir) / tag / f"ema_rank{self.rank}.pt"
            if not ema_file.is_file():
                raise FileNotFoundError(f"{self.role}: {where}/{tag}/{ema_file.name} missing (checkpoint saved "
                                        "without ppo.ema_decay?)")
            self.ema = torch.load(ema_file, map_location="cpu")
        return tag

    def optimizer_state(self) -> dict:
        """This rank's optimizer state tensors (for checks that a restore is exact)."""
        flat: dict[str, torch.Tensor] = {}

        def walk(obj: Any, path: str) -> None:
            if isinstance(obj, torch.Tensor):
                flat[path] = obj.detach().cpu().clone()
            elif isinstance(obj, dict):
                for k, v in obj.items():
                    walk(v, f"{path}.{k}")
            elif isinstance(obj, (list, tuple)):
                for i, v in enumerate(obj):
                    walk(v, f"{path}.{i}")

        walk(self.optimizer.state_dict(), "optimizer")  # what DeepSpeed checkpoints: moments and fp32 partitions
        return flat

    def global_steps(self) -> int:
        return int(self.engine.global_steps)


class PolicyLearner(EngineWorker):
    """The PPO actor: a causal LM. logprobs / train / lm_loss / export."""

    def __init__(self, *args, temperature: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.temperature = temperature  # generation.temperature: old, training-pass and entropy log-probs use it

    def build_model(self):
        from rlhf_ray.models.loading import load_causal_lm

        path = resolve_model_path(self.model_cfg.path)
        kwargs = {}
        if self.stage.disable_dropout and not self.model_cfg.gguf_file:
            kwargs["config"] = hf_model_config(path, True, trust_remote_code=self.model_cfg.trust_remote_code)
        return load_causal_lm(self.model_cfg, dtype=torch.float32, **kwargs)  # fp32 master; DeepSpeed casts

    def setup(self) -> None:
        super().setup()
        self._position_ids = forward_accepts(self.module, "position_ids")
        self._logits_to_keep = forward_accepts(self.module, "logits_to_keep")

    def _forward(self, batch: Batch, entropy: bool = False,
                 temperature: Optional[float] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        temperature = self.temperature if temperature is None else temperature
        return causal_logprobs(self.engine, batch, self._position_ids, entropy, self._logits_to_keep, temperature)

    @torch.no_grad()
    def logprobs(self, batch: Batch, temperature: Optional[float] = None) -> torch.Tensor:
        """(B, T-1) log-probs of input_ids[:, 1:] at the sampling temperature (or `temperature`: the weight-sync
        probe scores at 1); 0 where the target is padding and, with an action_mask, before its first action column
        (causal_logprobs)."""
        self.engine.eval()
        out = [self._forward(to_device(mb, self.device), temperature=temperature)[0].float().cpu()
               for mb in micro_batches(batch, self.stage.deepspeed.micro_batch_size)]
        return torch.cat(out)

    @torch.no_grad()
    def reference_logprobs(self, batch: Batch) -> torch.Tensor:
        """The reference's log-probs (as ReferenceScorer.logprobs) from this rank's base model: the actor with its
        LoRA adapters disabled (placement.reference_in_actor; config checks the base is frozen and is the reference)."""
        if not hasattr(self.module, "disable_adapter"):
            raise RuntimeError(f"{self.role} rank {self.rank}: reference log-probs from the actor need LoRA adapters to "
                               f"disable (ppo.actor.lora.dim > 0)")
        with self.module.disable_adapter():  # peft: every adapter layer off inside the block
            return self.logprobs(batch)

    def _lm_loss(self, batch: Batch) -> torch.Tensor:
        from rlhf_ray.models.value_head import position_ids_from_mask

        input_ids, mask = batch["input_ids"], batch["attention_mask"]
        kwargs = {"position_ids": position_ids_from_mask(mask)} if self._position_ids else {}
        labels = input_ids.masked_fill(mask == 0, -100)
        return self.engine(input_ids=input_ids, attention_mask=mask, labels=labels, use_cache=False, **kwargs).loss

    @torch.no_grad()
    def lm_loss(self, batch: Batch) -> float:
        """Next-token cross-entropy over the real tokens of `batch` (whole batch, every rank: call on all)."""
        self.engine.eval()
        return float(self._lm_loss(to_device(batch, self.device)))

    def train(self, experience: Batch, ptx: Optional[Batch] = None, kl_coef: float = 0.0) -> dict:
        """PPO on this rank's rows: ppo_epochs x mini-batches, clipped surrogate (+ entropy bonus, + PTX).

        With `ref_logprobs` in the experience, kl_coef * KL to the reference joins the loss (ppo.kl_penalty: loss).
        Without `old_logprobs` (on-policy: one epoch, one mini-batch), this pass's detached log-probs are the old
        ones (ratio 1); `vllm_logprobs`, when given, yields the engine-vs-learner log-prob gap from this pass."""
        p = self.ppo
        ptx_shard = None
        if ptx is not None and p.ptx_coef > 0:
            ptx_shard, _ = shard_batch(ptx, self.rank, self.world_size, pad=True)
        micro_size = self.stage.deepspeed.micro_batch_size

        def micro_loss(mb: Batch, index: int, aggregation: rl.Aggregation):
            # entropy is always reported; it carries gradient only with an entropy bonus
            logprobs, entropy = self._forward(mb, entropy=True if p.entropy_coef > 0 else "detached")
            loss, stats = policy_objective(p, logprobs, entropy, mb, kl_coef, aggregation)
            if ptx_shard is not None:  # the next micro-batch of pretraining rows, cycling
                rows = torch.arange(index * micro_size, (index + 1) * micro_size) % batch_rows(ptx_shard)
                ptx_mb = to_device({k: v[rows] for k, v in ptx_shard.items() if isinstance(v, torch.Tensor)},
                               self.device)
                ptx_loss = self._lm_loss(ptx_mb)
                loss = rl.mix_ptx_loss(loss, ptx_loss, p.ptx_coef)
                stats["ptx_loss"] = ptx_loss.detach()
            return loss, stats

        return self._train_loop(experience, micro_loss)

    def write_pretrained(self, path: str, state: dict[str, torch.Tensor]) -> None:
        from rlhf_ray.io import atomic_directory
        from rlhf_ray.models.loading import load_tokenizer

        base = self.module.get_base_model() if hasattr(self.module, "get_base_model") else self.module
        with atomic_directory(path) as tmp:
            base.save_pretrained(tmp, state_dict=state)
            try:
                load_tokenizer(self.model_cfg).save_pretrained(tmp)
            except (OSError, ValueError) as e:
                log.warning("no tokenizer saved with %s: %s", path, e)


class CriticLearner(EngineWorker):
    """The PPO critic: a value-head model initialised from the reward model's folder (DeepSpeed-Chat)."""

    def build_model(self):
        from rlhf_ray.models.value_head import ValueHeadModel

        path = resolve_model_path(self.model_cfg.path)
        kwargs = {"trust_remote_code": self.model_cfg.trust_remote_code}
        if self.stage.disable_dropout:
            kwargs["config"] = hf_model_config(path, True, trust_remote_code=self.model_cfg.trust_remote_code)
        return ValueHeadModel.from_pretrained(path, dtype=torch.float32, **kwargs)

    def lora_target(self, model):
        return model.backbone

    def replace_lora_target(self, model, peft_model):
        model.backbone = peft_model  # the value head stays trainable beside the adapters
        return model

    def _values(self, batch: Batch) -> torch.Tensor:
        mask = batch["attention_mask"]
        values = self.engine(input_ids=batch["input_ids"], attention_mask=mask)[:, :-1]
        return torch.where(mask[:, 1:].bool(), values, torch.zeros((), dtype=values.dtype, device=values.device))

    @torch.no_grad()
    def values(self, batch: Batch) -> torch.Tensor:
        """(B, T-1): values[:, t] = V(input_ids[:, :t+1]); 0 where attention_mask[:, 1:] is 0."""
        self.engine.eval()
        return torch.cat([self._values(to_device(mb, self.device)).float().cpu()
                          for mb in micro_batches(batch, self.stage.deepspeed.micro_batch_size)])

    def train(self, experience: Batch) -> dict:
        p = self.ppo

        def micro_loss(mb: Batch, index: int, aggregation: rl.Aggregation):
            return value_objective(p, self._values(mb), mb, aggregation)

        return self._train_loop(experience, micro_loss)

    def write_pretrained(self, path: str, state: dict[str, torch.Tensor]) -> None:
        from rlhf_ray.models.value_head import ValueHeadModel

        backbone = self.module.backbone
        if hasattr(backbone, "get_base_model"):  # LoRA: the merged weights in `state` belong to the plain backbone
            backbone = backbone.get_base_model()
        # A fresh head is created only to reach the format's one writer; its weights come from `state`.
        ValueHeadModel(backbone).save_pretrained(path, state_dict=state)


# ------------------------------------------------------------------------------------------ driver side
def critic_model(cfg: Config) -> ModelConfig:
    """models.critic, or else the reward model's folder (DeepSpeed-Chat initialises the critic from the RM)."""
    return cfg.models.critic or cfg.models.reward


class _LearnerGroup(ModelGroup):
    def save_checkpoint(self, ckpt_dir: str, tag: Optional[str] = None) -> str:
        """Every rank writes its part into `ckpt_dir` (a shared folder or an object store URI)."""
        return self.run("save_checkpoint", ckpt_dir, tag)[0]

    def load_checkpoint(self, ckpt_dir: str, tag: Optional[str] = None) -> str:
        return self.run("load_checkpoint", ckpt_dir, tag)[0]

    def save_pretrained(self, path: str, ema: bool = False) -> str:
        return self.run("save_pretrained", path, ema)[0]

    def export_params(self, bucket_bytes: int = DEFAULT_BUCKET_BYTES, ema: bool = False,
                      callback: Optional[Callable[[list[tuple[str, torch.Tensor]]], None]] = None) -> list:
        """ObjectRefs of the weight buckets (lists of (hf_name, tensor)), put by rank 0; all ranks gather. With a
        `callback` (shipped to rank 0's process) each bucket goes to it instead and [] is returned."""
        return self.run("export_params", bucket_bytes, ema, callback)[0]


class PolicyGroup(_LearnerGroup):
    """Driver handle of the PPO actor's ranks (ppo.actor learner config, placement.actor resources)."""

    worker_cls: type = PolicyLearner  # hybrid.HybridPolicyGroup: a rank that also hosts a vLLM engine

    def __init__(self, cfg: Config, placement: Optional[RolePlacement] = None, model: Optional[ModelConfig] = None,
                 worker_kwargs: Optional[dict] = None, **group_kwargs):
        super().__init__("actor", self.worker_cls, cfg.placement.actor.num_workers, resources=cfg.placement.actor,
                         placement=placement, placement_timeout_s=cfg.ray.placement_timeout_s,
                         worker_kwargs=dict(model=model or cfg.models.actor, stage=ppo_learner(cfg, "actor"),
                                            ppo=cfg.ppo,
                                            total_steps=ppo_total_steps(cfg), seed=cfg.run.seed,
                                            max_new_tokens=cfg.generation.max_new_tokens,
                                            temperature=cfg.generation.temperature, **(worker_kwargs or {})),
                         **group_kwargs)

    def logprobs(self, batch, as_ref: bool = False, temperature: Optional[float] = None):
        """Log-probs at generation.temperature, or at `temperature` when given (the weight-sync probe: 1)."""
        return self.run_sharded("logprobs", batch, as_ref=as_ref, temperature=temperature)

    def train(self, experience, ptx: Optional[Batch] = None, kl_coef: float = 0.0) -> dict[str, float]:
        return mean_stats(self.run_sharded_each("train", experience, ptx=ptx, kl_coef=kl_coef))

    def lm_loss(self, batch: Batch) -> float:
        return self.run("lm_loss", batch)[0]


class ActorReference:
    """placement.reference_in_actor: the reference scorer's interface (ReferenceGroup.logprobs) served by the actor's
    own ranks with their LoRA adapters disabled. No processes, placement group or weights of its own; it asks for the
    trainer's current actor group each time (recovery may replace that group)."""

    role = "reference"
    workers: list = []  # nothing of its own to ping (recovery), report (check_agreement) or shut down
    reports: list = []

    def __init__(self, actor: Callable[[], PolicyGroup]):
        self._actor = actor

    def logprobs(self, batch, as_ref: bool = False):
        return self._actor().run_sharded("reference_logprobs", batch, as_ref=as_ref)

    def shutdown(self, remove_placement_group: bool = True) -> None:
        """Nothing to stop: the actor's group is shut down as the actor."""


class CriticGroup(_LearnerGroup):
    """Driver handle of the PPO critic's ranks, initialised from models.critic or else the reward model."""

    def __init__(self, cfg: Config, placement: Optional[RolePlacement] = None, model: Optional[ModelConfig] = None,
                 **group_kwargs):
        super().__init__("critic", CriticLearner, cfg.placement.critic.num_workers, resources=cfg.placement.critic,
                         placement=placement, placement_timeout_s=cfg.ray.placement_timeout_s,
                         worker_kwargs=dict(model=model or critic_model(cfg),
                                            stage=ppo_learner(cfg, "critic"), ppo=cfg.ppo,
                                            total_steps=ppo_total_steps(cfg), seed=cfg.run.seed,
                                            max_new_tokens=cfg.generation.max_new_tokens), **group_kwargs)

    def values(self, batch, as_ref: bool = False):
        return self.run_sharded("values", batch, as_ref=as_ref)

    def train(self, experience) -> dict[str, float]:
        return mean_stats(self.run_sharded_each("train", experience))
