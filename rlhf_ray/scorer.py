"""Frozen scorers of PPO: the reference policy's log-probs and the reward model's scores, plus reward functions.

    reference = ReferenceGroup(cfg, placement=plan["reference"])
    ref_logprobs = reference.logprobs(batch)          # (B, T-1), same alignment as learner.py
    reward = RewardGroup(cfg, placement=plan["reward"])
    scores = reward.scores(batch)                     # (B,) float32

Inference only. Each rank holds either a plain replica of the model (ZeRO stage 0) or a ZeRO-3 partition of it
(DeepSpeed engine without an optimizer, as DeepSpeed-Chat's reference model): `ppo.scorer_zero_stage`, or by size
when unset — models whose weight files exceed `ppo.scorer_replica_max_gib` are partitioned across the role's
ranks. Micro-batch size follows the matching learner (reference: ppo.actor, reward: ppo.critic); precision is the
run's one precision (config.ppo_precision), resolved by each rank on its own device.

The reward model's score is its value at the last real token of each row (found from attention_mask, so left and
right padding give the same score). Reward functions (`ppo.reward_functions`) add to it
(`reward_function_mode: add`) or replace it (`replace`: the reward model is then not loaded). Each entry is
    a dotted path   "my_pkg.rewards:exact_match" (or "my_pkg.rewards.exact_match"), importable by the actors;
    an HTTP URL     "http://host:port/score", POSTed JSON {"prompts": [...], "responses": [...], <list fields>}
                    and answering {"rewards": [float, ...]}; ppo.reward_http_timeout_s per attempt,
                    ppo.reward_http_retries more attempts (after a timeout, connection error, 5xx, 408 or 429;
                    other 4xx fail at once), then a RewardFunctionError naming the URL and the cause. With
                    ppo.reward_http_token_env: VAR, "Authorization: Bearer $VAR" (read in the reward actor).
Both are called as fn(prompts, responses, **fields) -> one float per row, where `fields` are the batch's other
per-row lists (for example reference answers under "labels"). The texts are decoded from the batch with the
actor's tokenizer unless the batch carries "prompts" and "responses" itself.
"""
from __future__ import annotations

import abc
import dataclasses
import importlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from rlhf_ray.config import Config, DeepSpeedConfig, ModelConfig, PPOConfig, ppo_precision
from rlhf_ray.groups import Batch, DistributedWorker, ModelGroup, RolePlacement
from rlhf_ray.learner import causal_logprobs, forward_accepts, micro_batches, to_device
from rlhf_ray.train.deepspeed_config import autocast_bf16, precision_sections, resolve_precision, zero_plus_plus
from rlhf_ray.models.loading import resolve_model_path

TEXT_FIELDS = ("prompts", "responses")


# ----------------------------------------------------------------------------------------- reward functions
class RewardFunctionError(RuntimeError):
    """A reward function could not be loaded, failed, or answered something that is not one score per row."""


def check_rewards(values: Any, n: int, source: str) -> list[float]:
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    if not isinstance(values, (list, tuple)) or len(values) != n:
        got = f"{len(values)} values" if isinstance(values, (list, tuple)) else repr(values)[:200]
        raise RewardFunctionError(f"reward function {source}: expected a list of {n} numbers, got {got}")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise RewardFunctionError(f"reward function {source}: row {i} is {v!r}, not a finite number")
        out.append(float(v))
    return out


# Client errors that a later attempt can cure: 408 Request Timeout, 429 Too Many Requests. Any other 4xx (bad
# request, unauthorised, not found, ...) answers the same way every time: fail at once, no retries.
RETRYABLE_CLIENT_ERRORS = (408, 429)


def bearer_token(token_env: Optional[str]) -> Optional[str]:
    """The token in the environment variable named `token_env` (ppo.reward_http_token_env), read in this process."""
    if not token_env:
        return None
    token = os.environ.get(token_env)
    if not token:
        raise RewardFunctionError(f"ppo.reward_http_token_env names {token_env}, which is not set (or empty) in the "
                                  f"reward actor's environment (pid {os.getpid()}); set it on the cluster's nodes "
                                  f"or pass it to the job's runtime environment")
    return token


class HttpRewardFunction:
    """A remote reward: POST JSON, read {"rewards": [...]}; `retries` more attempts after a timeout, a connection
    error, a 5xx, 408 or 429 (other 4xx fail at once). With `token`, sends "Authorization: Bearer <token>"."""

    def __init__(self, url: str, timeout_s: float = 10.0, retries: int = 2, backoff_s: float = 0.2,
                 token: Optional[str] = None):
        self.url, self.timeout_s, self.retries, self.backoff_s = url, timeout_s, retries, backoff_s
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def __repr__(self) -> str:  # never the token
        return f"HttpRewardFunction({self.url!r}, auth={'bearer' if self.headers else 'none'})"

    def __call__(self, prompts: list[str], responses: list[str], **fields) -> list[float]:
        import requests

        payload = {"prompts": list(prompts), "responses": list(responses), **{k: list(v) for k, v in fields.items()}}
        last_error = ""
        attempts = 0
        for attempt in range(1 + self.retries):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            attempts += 1
            try:
                reply = requests.post(self.url, json=payload, timeout=self.timeout_s, headers=self.headers)
            except requests.Timeout:
                last_error = f"no answer within {self.timeout_s}s"
                continue
            except requests.RequestException as e:
                last_error = f"{type(e).__name__}: {e}"
                continue
            if reply.status_code != 200:
                last_error = f"HTTP {reply.status_code}: {reply.text[:200]!r}"
                if 400 <= reply.status_code < 500 and reply.status_code not in RETRYABLE_CLIENT_ERRORS:
                    break  # the request itself is wrong (or unauthorised): another attempt gets the same answer
                continue
            try:
                body = reply.json()
            except ValueError:
                last_error = f"answer is not JSON: {reply.text[:200]!r}"
                continue
            if not isinstance(body, dict) or "rewards" not in body:
                last_error = f"answer has no 'rewards' list: {json.dumps(body)[:200]}"
                continue
            try:
                return check_rewards(body["rewards"], len(prompts), self.url)
            except RewardFunctionError as e:
                last_error = str(e)
        raise RewardFunctionError(
            f"reward endpoint {self.url} failed after {attempts} attempt(s): {last_error}")


def import_callable(spec: str) -> Callable:
    """'pkg.module:function' or 'pkg.module.function' -> the function."""
    module_name, sep, attr = spec.partition(":")
    if not sep:
        module_name, _, attr = spec.rpartition(".")
    if not module_name or not attr:
        raise RewardFunctionError(f"reward function {spec!r}: expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise RewardFunctionError(f"reward function {spec!r}: cannot import module {module_name!r} ({e}); it must be "
                                  f"importable by the Ray actors (installed, or in the job's working_dir)") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardFunctionError(f"reward function {spec!r}: {module_name} has no callable {attr!r}")
    return fn


def load_reward_function(spec: str, timeout_s: float = 10.0, retries: int = 2,
                         token_env: Optional[str] = None) -> Callable:
    if spec.startswith(("http://", "https://")):
        return HttpRewardFunction(spec, timeout_s, retries, token=bearer_token(token_env))
    return import_callable(spec)


def batch_texts(batch: Batch, tokenizer) -> tuple[list[str], list[str]]:
    """Prompt and response texts of each row: given in the batch, or decoded (response = the action_mask tokens,
    prompt = the other real tokens; see learner.py for the alignment)."""
    if all(k in batch for k in TEXT_FIELDS):
        return list(batch["prompts"]), list(batch["responses"])
    if "action_mask" not in batch:
        raise KeyError("reward functions need 'prompts'/'responses' in the batch, or an 'action_mask' to split the "
                       "tokens into prompt and response")
    response = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
    response[:, 1:] = batch["action_mask"].bool()
    prompt = batch["attention_mask"].bool() & ~response
    ids = batch["input_ids"]
    prompts = [tokenizer.decode(ids[i][prompt[i]].tolist(), skip_special_tokens=True) for i in range(len(ids))]
    responses = [tokenizer.decode(ids[i][response[i]].tolist(), skip_special_tokens=True) for i in range(len(ids))]
    return prompts, responses


# ----------------------------------------------------------------------------------------------- workers
def weights_gib(path: str) -> Optional[float]:
    """Size of a local folder's weight files, or None for a hub name (not known before download)."""
    folder = Path(path)
    if not folder.is_dir():
        return None
    files = [f for pattern in ("*.safetensors", "*.bin", "*.gguf") for f in folder.glob(pattern)]
    return sum(f.stat().st_size for f in files) / 2**30


class ScorerWorker(DistributedWorker, abc.ABC):
    """One rank of a frozen model: a plain replica (ZeRO 0) or a ZeRO-3 partition (DeepSpeed engine, no optimizer)."""

    def __init__(self, role: str, rank: int, world_size: int, placement_group_id: Optional[str] = None, *,
                 model: Optional[ModelConfig], deepspeed: DeepSpeedConfig, zero_stage: Optional[int] = None,
                 replica_max_gib: float = 4.0, seed: int = 0):
        super().__init__(role, rank, world_size, placement_group_id)
        self.model_cfg, self.ds, self.seed = model, deepspeed, seed
        self.requested_stage, self.replica_max_gib = zero_stage, replica_max_gib
        self.model: Any = None
        self.zero_stage: Optional[int] = None
        self.autocast = False  # set by setup(): bf16 as autocast over fp32 weights (autocast_bf16)

    def choose_zero_stage(self, path: str) -> int:
        if self.requested_stage is not None:
            return self.requested_stage
        size = weights_gib(path)
        return 3 if self.world_size > 1 and size is not None and size > self.replica_max_gib else 0

    @abc.abstractmethod
    def load(self, path: str, dtype: torch.dtype) -> torch.nn.Module:
        """The model from `path` in `dtype` (loaded while ZeRO-3's HfDeepSpeedConfig is alive). Loaded straight in
        the run's dtype: an fp32 copy cast afterwards would be a transient extra copy the allocator may keep."""

    def setup(self) -> None:
        import deepspeed

        from rlhf_ray.env import PRECISION_DTYPES
        from rlhf_ray.models.attention import use_cpu_attention

        torch.manual_seed(self.seed)
        if self.model_cfg is None:
            return
        cuda = self.device_type == "cuda"  # chosen in this rank's process (DistributedWorker)
        precision = resolve_precision(self.ds, cuda)
        self.dtype_name = PRECISION_DTYPES[precision]  # what the model computes in
        # As the learners (autocast_bf16): on CPU, bf16 is autocast over fp32 weights, so that the reference and the
        # actor start from identical log-probs (a KL of 0) and the reward model scores as it was trained to.
        self.autocast = autocast_bf16(precision, cuda)
        dtype = torch.float32 if self.autocast else getattr(torch, self.dtype_name)
        path = resolve_model_path(self.model_cfg.path)

        def load() -> torch.nn.Module:
            model = self.load(path, dtype)
            if not cuda:  # attention as the CPU learners compute it (models/attention.py): in bf16 the reference's
                use_cpu_attention(model)  # log-probs equal an unchanged actor's training forward, bit for bit
            return model

        self.zero_stage = self.choose_zero_stage(path)
        if self.zero_stage == 3:
            from rlhf_ray.train.common import build_partitioned

            micro = self.ds.micro_batch_size
            config = {"train_batch_size": micro * self.world_size, "train_micro_batch_size_per_gpu": micro,
                      "zero_optimization": {"stage": 3, **zero_plus_plus(self.ds, self.world_size, cuda, False)},
                      **precision_sections(precision, self.autocast), "steps_per_print": 10**9}
            module = build_partitioned(load, config)  # straight into partitions
            module.requires_grad_(False)
            self.model, *_ = deepspeed.initialize(model=module, config=config)
            self.device = self.model.device
        else:
            self.device = torch.device("cuda", 0) if cuda else torch.device("cpu")
            self.model = load().to(self.device).requires_grad_(False)
        self.model.eval()

    def zero_stage_used(self) -> int:
        return self.zero_stage

    def computing(self):
        """The context every forward of this scorer runs in: bf16 autocast when self.autocast, else nothing."""
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast)


class ReferenceScorer(ScorerWorker):
    """The frozen reference policy (the actor's initial weights unless models.reference is set)."""

    def __init__(self, *args, temperature: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.temperature = temperature  # generation.temperature: KL to the reference is of the sampling distribution

    def load(self, path: str, dtype: torch.dtype) -> torch.nn.Module:
        from rlhf_ray.models.loading import load_causal_lm

        return load_causal_lm(self.model_cfg, dtype=dtype)

    def setup(self) -> None:
        super().setup()
        module = self.model.module if hasattr(self.model, "module") else self.model
        self._position_ids = forward_accepts(module, "position_ids")
        self._logits_to_keep = forward_accepts(module, "logits_to_keep")

    @torch.no_grad()
    def logprobs(self, batch: Batch) -> torch.Tensor:
        """(B, T-1) log-probs of input_ids[:, 1:] under the reference model at the sampling temperature (0 where the
        target is padding and, with an action_mask, before its first action column: causal_logprobs)."""
        with self.computing():
            return torch.cat([causal_logprobs(self.model, to_device(mb, self.device), self._position_ids,
                                              logits_to_keep=self._logits_to_keep,
                                              temperature=self.temperature)[0].float().cpu()
                              for mb in micro_batches(batch, self.ds.micro_batch_size)])


class RewardScorer(ScorerWorker):
    """The frozen reward model (a value-head folder) and the configured reward functions."""

    def __init__(self, role: str, rank: int, world_size: int, placement_group_id: Optional[str] = None, *,
                 model: Optional[ModelConfig], tokenizer: Optional[ModelConfig] = None,
                 functions: Sequence[str] = (), mode: str = "add", http_timeout_s: float = 10.0,
                 http_retries: int = 2, http_token_env: Optional[str] = None, **kwargs):
        if mode not in ("add", "replace"):
            raise ValueError(f"reward_function_mode must be 'add' or 'replace', got {mode!r}")
        if mode == "replace" and not functions:
            raise ValueError("reward_function_mode 'replace' needs ppo.reward_functions")
        if model is None and not functions:
            raise ValueError("the reward scorer needs a reward model (models.reward.path) or ppo.reward_functions")
        use_model = model is not None and bool(model.path) and not (mode == "replace")
        super().__init__(role, rank, world_size, placement_group_id, model=model if use_model else None, **kwargs)
        self.tokenizer_cfg = tokenizer
        self.function_specs, self.mode = list(functions), mode
        # Loaded now, so a bad dotted path fails at start-up with its name, not at the first batch.
        self.functions = [load_reward_function(s, http_timeout_s, http_retries, http_token_env)
                          for s in self.function_specs]
        self.tokenizer = None

    def load(self, path: str, dtype: torch.dtype) -> torch.nn.Module:
        from rlhf_ray.models.value_head import ValueHeadModel

        return ValueHeadModel.from_pretrained(path, dtype=dtype,
                                              trust_remote_code=self.model_cfg.trust_remote_code)

    def _model_scores(self, batch: Batch) -> torch.Tensor:
        from rlhf_ray.models.value_head import last_token_index

        out = []
        for mb in micro_batches(batch, self.ds.micro_batch_size):
            mb = to_device(mb, self.device)
            with self.computing():
                values = self.model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"])
            out.append(values.gather(1, last_token_index(mb["attention_mask"]).unsqueeze(1)).squeeze(1).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def scores(self, batch: Batch, details: bool = False):
        """(B,) scores; with details=True a dict of the total ("score") and every component by source."""
        n = len(batch["input_ids"])
        parts: dict[str, torch.Tensor] = {}
        if self.model is not None:
            parts["model"] = self._model_scores(batch)
        if self.functions:
            if self.tokenizer is None and not all(k in batch for k in TEXT_FIELDS):
                from rlhf_ray.models.loading import load_tokenizer

                if self.tokenizer_cfg is None:
                    raise ValueError("reward functions need a tokenizer to decode the batch (models.actor)")
                self.tokenizer = load_tokenizer(self.tokenizer_cfg)
            # The shard's padding rows (copies of the batch's last row, see call_sharded) are never sent to a
            # function: a service would see duplicates. They score 0 here and are dropped when the shards join.
            real = n - self.padding_rows
            prompts, responses = batch_texts(batch, self.tokenizer)
            fields = {k: list(v)[:real] for k, v in batch.items()
                      if k not in TEXT_FIELDS and isinstance(v, (list, tuple)) and len(v) == n}
            for spec, fn in zip(self.function_specs, self.functions):
                values = check_rewards(fn(prompts[:real], responses[:real], **fields), real, spec) if real else []
                parts[spec] = torch.tensor(values + [0.0] * (n - real))
        total = torch.stack(list(parts.values())).sum(0)
        return {"score": total, **parts} if details else total


# ------------------------------------------------------------------------------------------ driver side
def reference_model(cfg: Config) -> ModelConfig:
    """models.reference, or else the actor's initial weights (models.actor)."""
    return cfg.models.reference or cfg.models.actor


def _scorer_kwargs(cfg: Config, ds: DeepSpeedConfig) -> dict:
    """`ds`: the matching learner's section (micro-batch size), with the run's one precision (config.ppo_precision)."""
    return dict(deepspeed=dataclasses.replace(ds, precision=ppo_precision(cfg)), zero_stage=cfg.ppo.scorer_zero_stage, replica_max_gib=cfg.ppo.scorer_replica_max_gib,
                seed=cfg.run.seed)


class ReferenceGroup(ModelGroup):
    """Driver handle of the reference scorer's ranks (placement.reference; micro-batches of ppo.actor)."""

    def __init__(self, cfg: Config, placement: Optional[RolePlacement] = None, model: Optional[ModelConfig] = None,
                 **group_kwargs):
        super().__init__("reference", ReferenceScorer, cfg.placement.reference.num_workers,
                         resources=cfg.placement.reference, placement=placement,
                         placement_timeout_s=cfg.ray.placement_timeout_s,
                         worker_kwargs=dict(model=model or reference_model(cfg),
                                            temperature=cfg.generation.temperature,
                                            **_scorer_kwargs(cfg, cfg.ppo.actor.deepspeed)), **group_kwargs)

    def logprobs(self, batch, as_ref: bool = False):
        return self.run_sharded("logprobs", batch, as_ref=as_ref)


def reward_worker_kwargs(cfg: Config, model: Optional[ModelConfig] = None) -> dict:
    """What each RewardScorer rank is built with: models.reward (or `model`), ppo.reward_* and the scorer keys."""
    p: PPOConfig = cfg.ppo
    model = model or cfg.models.reward
    return dict(model=model if model.path else None, tokenizer=cfg.models.actor, functions=p.reward_functions,
                mode=p.reward_function_mode, http_timeout_s=p.reward_http_timeout_s, http_retries=p.reward_http_retries,
                http_token_env=p.reward_http_token_env, **_scorer_kwargs(cfg, cfg.ppo.critic.deepspeed))


class RewardGroup(ModelGroup):
    """Driver handle of the reward scorer's ranks (placement.reward; micro-batches of ppo.critic)."""

    def __init__(self, cfg: Config, placement: Optional[RolePlacement] = None, model: Optional[ModelConfig] = None,
                 **group_kwargs):
        super().__init__("reward", RewardScorer, cfg.placement.reward.num_workers, resources=cfg.placement.reward,
                         placement=placement, placement_timeout_s=cfg.ray.placement_timeout_s,
                         worker_kwargs=reward_worker_kwargs(cfg, model), **group_kwargs)

    def scores(self, batch, details: bool = False, as_ref: bool = False):
        return self.run_sharded("scores", batch, details=details, as_ref=as_ref)
