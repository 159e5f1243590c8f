"""Step 3: the PPO controller. One process drives every group; the loop reads like DeepSpeed-Chat's pseudocode:

    for iteration in range(start, num_iterations):
        prompts    = next prompt batch (data position checkpointed)
        rollout    = generators.generate(prompts)                       # vLLM engines, weight version recorded
                     (dynamic sampling: score each round, drop tied groups, refill from the stream)
        experience = make_experience(rollout)                           # reference / reward / critic / old log-probs
        advantages = rl.* (GAE with critic | GRPO | RLOO | REINFORCE++)  # pure torch, rlhf_ray/rl.py
        actor.train(experience); critic.train(experience)               # DeepSpeed ZeRO groups
        generators.sync_weights(actor)                                  # broadcast + verify, version += 1
        log metrics; checkpoint every N iterations

With rollout.mode one_step or bounded the next iterations' rollouts are generated while this one scores and trains,
and the sync waits for them (rlhf_ray/rollout/pipeline.py); every trained sample's lineage: rlhf_ray/rollout/lineage.py.

The batches, the prompt stream and the RL math applied to a rollout are pure pieces in rlhf_ray/experience.py
(its docstring gives the tensor layout). The scored batch and the experience travel to the groups as Ray object
references.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

import torch

from rlhf_ray import rl
from rlhf_ray.config import (Config, ConfigError, PPOConfig, old_logprobs_from_engines, reuses_train_logprobs,
                             validate_ppo)
from rlhf_ray.experience import (PromptStream, answered_rollout, build_batch, compute_advantages,
                                 drop_nonfinite_samples, full_width, length_penalised, request_seed,
                                 response_slice, rollout_with_signal)
from rlhf_ray.rollout.lineage import lineage, sample_staleness, staleness_metrics, unused_records, write_samples
from rlhf_ray.rollout.pipeline import Generated, RolloutPipeline, chunk_tokens, next_chunk

log = logging.getLogger(__name__)


# Every logged PPO iteration (every logging.log_every) has at least these (console, metrics.jsonl, TensorBoard,
# W&B when configured).
METRIC_KEYS = (
    "reward/mean", "reward/std", "kl/mean", "entropy/mean", "loss/policy", "loss/value", "policy/clip_fraction",
    "policy/approx_kl", "response/length_mean", "logprob_gap/vllm_vs_learner", "time/generate_s", "time/score_s",
    "time/train_s", "time/sync_s", "throughput/tokens_per_s", "weight_version",
    "experience/nonfinite_samples", "actor/nonfinite_steps",
)  # loss/value only with a critic (advantage_estimator: gae)


# ------------------------------------------------------------------------------------ controller pieces
def value_model_paths(cfg: Config) -> list[tuple[str, str]]:
    """(config key, path) of every model PPO loads as a value-head folder: the reward model (unless the reward is
    functions only) and, under GAE, the critic (models.critic, else initialised from the reward model)."""
    m = cfg.models
    paths = [("models.reward.path", m.reward.path)] if m.reward.path else []
    if cfg.ppo.advantage_estimator == "gae":
        paths.append(("models.critic.path", m.critic.path) if m.critic is not None
                     else ("models.reward.path (the critic starts from it: models.critic is unset)", m.reward.path))
    return paths


def check_value_models(cfg: Config) -> None:
    """A reward or critic path that is not a value-head folder fails here, in one line, before anything starts
    (not after a minute of start-up, when the scorer loads it)."""
    from rlhf_ray.models.value_head import HEAD_META, is_value_head_folder

    for key, path in value_model_paths(cfg):
        if not is_value_head_folder(path):
            raise ConfigError(
                f"{key} {path!r} is not a value-head folder (no {HEAD_META}): PPO's reward model and critic are "
                f"reward-model folders as `rlhf-ray rm CONFIG` writes them (<run.output_dir>/rm). Train one (after "
                f"`rlhf-ray sft CONFIG`), or run `rlhf-ray pipeline CONFIG`; `rlhf-ray ppo CONFIG` uses the run's "
                f"own sft/ and rm/ folders when models.reward is not one and both exist")


def kl_controller(p: PPOConfig):
    """ppo.kl_coef, fixed, or with ppo.adaptive_kl Ziegler et al.'s controller towards ppo.kl_target."""
    return rl.AdaptiveKLController(p.kl_coef, p.kl_target, p.kl_horizon) if p.adaptive_kl else \
        rl.FixedKLController(p.kl_coef)


def engines_sleep(enabled: bool, engine_info: list[dict]) -> bool:
    """Whether the engines sleep between generating and the weight sync (generation.enable_sleep_mode): vLLM sleep
    level 1 moves the weights to host memory and drops the KV cache, so learners and scorers sharing the engines'
    GPUs get that memory while they score and train. CPU engines free nothing: one log line, and they stay awake."""
    if enabled and not all(info.get("sleep_enabled") for info in engine_info):
        log.info("generation.enable_sleep_mode: ignored, the engines run on CPU where vLLM's sleep frees nothing")
        return False
    return enabled


def export_actor(actor, out_dir: Path, ema_decay: Optional[float]) -> Path:
    """The trained actor as a Hugging Face folder <out>/ppo/actor; with ppo.ema_decay also its exponential moving
    average (DeepSpeed-Chat --enable_ema) as <out>/ppo/actor_ema. Returns the actor's folder."""
    final = out_dir / "actor"
    actor.save_pretrained(str(final))
    if ema_decay is not None:
        actor.save_pretrained(str(out_dir / "actor_ema"), ema=True)
    return final


# ------------------------------------------------------------------------------------------ the controller
class PPOTrainer:
    """Builds every group from the config, then `run()` iterates. Groups live in their own placement groups."""

    def __init__(self, cfg: Config):
        from rlhf_ray.control import start_control
        from rlhf_ray.data import load_stage_dataset
        from rlhf_ray.env import check_agreement
        from rlhf_ray.groups import placement_plan
        from rlhf_ray.models.loading import load_tokenizer
        from rlhf_ray.resources import init_ray, peak_concurrent_threads

        validate_ppo(cfg)  # before anything starts
        check_value_models(cfg)
        self.cfg, p = cfg, cfg.ppo
        self.out_dir = Path(cfg.run.output_dir) / "ppo"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.tokenizer = load_tokenizer(cfg.models.actor)
        rows = load_stage_dataset(cfg, "ppo", self.tokenizer, split="train")
        self.prompts = PromptStream.from_dataset(rows, seed=cfg.run.seed)
        self.ptx_rows = load_stage_dataset(cfg, "ptx", self.tokenizer) if p.ptx_coef > 0 else None
        self.kl_ctl = kl_controller(p)
        self.iteration = 0
        init_ray(cfg, concurrent_threads=peak_concurrent_threads(cfg, stages=("ppo",)))  # the pipeline's: every stage
        self.uses_critic = p.advantage_estimator == "gae"
        self.reuses_train_logprobs = reuses_train_logprobs(cfg)
        self.plan: dict = {}
        self.actor = self.reference = self.reward = self.critic = self.generators = self.control = None
        # rollout.mode one_step / bounded: how many learner steps a trained sample may be behind (off: 0)
        self.max_staleness = {"off": 0, "one_step": 1, "bounded": cfg.rollout.max_staleness}[cfg.rollout.mode]
        self.chunk_tokens = chunk_tokens(cfg.generation.max_new_tokens, max(1, self.max_staleness))
        self.rollouts = RolloutPipeline(self.max_staleness, p.num_iterations, self.admit, self.extend) \
            if self.max_staleness else None
        self.version_steps = {0: 0}  # weight version -> the learner step those weights are (lineage's staleness)
        self.samples_written = 0  # lineage records seen by rollout.samples_every (checkpointed)
        self.last_lineage: list[dict] = []  # the last trained batch's (rollout.lineage)
        self.last_unused: list[dict] = []  # the prompts taken for it and not trained on, with the reason
        started = time.time()
        # All or nothing: a failure anywhere in start-up (placement, a group, the checks, resume) releases every
        # actor and placement group started so far, so a long-lived driver is not starved by a failed attempt.
        try:
            self.control = start_control(cfg)  # `rlhf-ray engines` reaches the run through it (rlhf_ray/control.py)
            self.plan = placement_plan(cfg)  # every role's placement group, ready (or a PlacementError)
            self.start_groups(["actor", "reference", "reward", "critic", "generators"])
            # Every worker chose its device, backend, dtype (and the engines their transport) in its own process;
            # the driver only checks that they agree (a DeviceMismatchError names the roles that do not).
            self.devices = check_agreement(self.worker_reports())
            log.info("devices: %s", self.devices)
            log.info("groups up in %.1fs: actor x%d, reference %s, reward x%d, critic x%s, %d engine(s) x TP%d",
                     time.time() - started, cfg.placement.actor.num_workers,
                     "in the actor" if cfg.placement.reference_in_actor else f"x{cfg.placement.reference.num_workers}",
                     cfg.placement.reward.num_workers, cfg.placement.critic.num_workers if self.critic else 0,
                     cfg.generation.num_engines, cfg.generation.tensor_parallel_size)
            self.engines_sleep = engines_sleep(cfg.generation.enable_sleep_mode, self.generators.info)
            self.start_state = self.controller_state()  # where recovery goes back to before the first checkpoint
            self.recovery = None  # rlhf_ray/recovery.py: what replacing dead groups did (metrics faults/*)
            self.iteration_start_position = 0
            self.checkpoints = None
            if cfg.checkpoint.every or cfg.checkpoint.resume:
                from rlhf_ray.checkpoint import CheckpointManager

                self.checkpoints = CheckpointManager(cfg.checkpoint.storage or self.out_dir / "checkpoints",
                                                     cfg.checkpoint.keep_last)
                self.checkpoints.remove_incomplete()  # a write killed midway is never resumed from
            if cfg.checkpoint.resume:
                self.resume()
        except BaseException:
            self.shutdown()
            raise

    def start_groups(self, roles: list[str]) -> None:
        """Start `roles`' groups side by side (groups.start_concurrently) and set them on the trainer: at start-up, and
        when recovery replaces several. A hybrid generator group is the actor's own ranks, so it follows the actor.
        Every start has ended when this raises the first failure; what started is set, so shutdown releases it."""
        # start_group's modules imported once here, not by several threads at the same time
        import rlhf_ray.generator, rlhf_ray.hybrid, rlhf_ray.learner, rlhf_ray.scorer  # noqa: E401, F401
        from rlhf_ray.groups import start_concurrently

        after_actor = ["generators"] if self.cfg.placement.layout == "hybrid" and "generators" in roles else []
        started, failure = start_concurrently(self.start_group, [r for r in roles if r not in after_actor])
        for role, group in started.items():
            setattr(self, role, group)
        if failure is not None:
            raise failure
        for role in after_actor:
            setattr(self, role, self.start_group(role))

    def start_group(self, role: str):
        """One role's group in its placement group (self.plan): at start-up, and again when recovery replaces it."""
        from rlhf_ray.generator import GeneratorGroup
        from rlhf_ray.hybrid import HybridGeneratorGroup, HybridPolicyGroup
        from rlhf_ray.learner import ActorReference, CriticGroup, PolicyGroup
        from rlhf_ray.models.loading import resolve_model_path
        from rlhf_ray.scorer import ReferenceGroup, RewardGroup

        cfg, plan = self.cfg, self.plan
        hybrid = cfg.placement.layout == "hybrid"  # the engine lives in the actor's rank (rlhf_ray/hybrid.py)
        if role == "actor":
            return (HybridPolicyGroup if hybrid else PolicyGroup)(cfg, placement=plan["actor"])
        if role == "reference":  # placement.reference_in_actor: the actor's ranks, adapters disabled
            return ActorReference(lambda: self.actor) if cfg.placement.reference_in_actor else \
                ReferenceGroup(cfg, placement=plan["reference"])
        if role == "reward":
            return RewardGroup(cfg, placement=plan["reward"])
        if role == "critic":
            return CriticGroup(cfg, placement=plan["critic"]) if self.uses_critic else None
        return HybridGeneratorGroup(cfg, self.actor) if hybrid else \
            GeneratorGroup(cfg, resolve_model_path(cfg.models.actor.path), plan=plan)

    def worker_reports(self) -> list[dict]:
        """What every rank and engine reported choosing (describe()): role, rank, device, backend, dtype, ..."""
        groups = (self.actor, self.critic, self.reference, self.reward, self.generators)
        return [r for g in groups if g is not None for r in g.reports]

    # -- one iteration, in the order of the module docstring
    def generate(self, num_prompts: int, iteration: Optional[int] = None,
                 max_new_tokens: Optional[int] = None) -> tuple[dict, dict]:
        """Samples for `num_prompts` answered prompts from the stream (too-long ones replaced: answered_rollout).
        With ppo.dynamic_sampling each round is also scored here, and only prompts whose samples' scores differ are
        kept (rollout_with_signal); info["scores"] then holds the scores, and make_experience does not score again.
        Every prompt taken from the stream is trained on or counted: skipped (too long) or dropped (scores tied).
        `max_new_tokens`: a first chunk's (rollout.mode bounded), else generation.max_new_tokens."""
        import ray

        from rlhf_ray.generator import Sampling

        g, p = self.cfg.generation, self.cfg.ppo
        iteration = self.iteration if iteration is None else iteration  # async modes: a later one's (seeds)
        sampling = Sampling.from_config(g, **({"max_new_tokens": max_new_tokens} if max_new_tokens else {}))
        start, started = self.prompts.position, time.time()
        totals = {"skipped": 0, "redispatched": 0, "engines": set(), "generated_tokens": 0, "skipped_ids": []}

        def answered(k: int) -> tuple[list[dict], list]:
            first = self.prompts.position - start  # per-request seeds continue across dynamic-sampling rounds

            def generate_rows(rows: list[dict], offset: int):
                seeds = [request_seed(self.cfg.run.seed, iteration, first + offset + i) for i in range(len(rows))]
                return self.generators.generate([r["prompt_input_ids"] for r in rows], sampling, seeds=seeds)

            rows, samples, got = answered_rollout(self.prompts.take, generate_rows, k, max_prompts=len(self.prompts.rows))
            totals["skipped"] += got["skipped"]
            totals["skipped_ids"] += got["skipped_ids"]
            totals["redispatched"] += got["redispatched"]
            totals["engines"] |= {e for e, n in got["engine_prompts"].items() if n > 0}
            totals["generated_tokens"] += sum(len(s.token_ids) for s in samples)
            return rows, samples

        def scored_round(k: int) -> tuple[list[dict], list, torch.Tensor]:
            rows, samples = answered(k)
            batch, info = self.rollout_batch(rows, samples)
            return rows, samples, self.scores_trained_on(ray.get(self.reward.scores(ray.put(batch), as_ref=True)), info)

        counts = {}
        if p.dynamic_sampling:
            rows, samples, scores, counts = rollout_with_signal(scored_round, num_prompts, g.n_samples_per_prompt,
                                                                p.dynamic_sampling_max_rounds)
        else:
            rows, samples = answered(num_prompts)
        batch, info = self.rollout_batch(rows, samples)
        if p.dynamic_sampling:
            info["scores"] = scores
        # every prompt taken is trained on, or not for a named reason (rollout.lineage.unused_records)
        untrained = set(range(start, self.prompts.position)) - {row["prompt_id"] for row in rows}
        unused = {"skipped": totals["skipped_ids"], "filtered": sorted(untrained - set(totals["skipped_ids"]))}
        info.update(redispatched=totals["redispatched"], skipped_prompts=totals["skipped"], unused_prompts=unused,
                    engines_used=len(totals["engines"]), generated_tokens=totals["generated_tokens"],
                    prompts_consumed=self.prompts.position - start, dynamic_sampling=counts,
                    engines=sorted(totals["engines"]), rows=rows, samples=samples, times=(started, time.time()))
        return batch, info

    # -- rollout.mode one_step / bounded: the batches in flight (rollout/pipeline.py)
    def admit(self, iteration: int) -> Generated:
        """The first chunk of the batch `iteration` will train on, its prompts taken from the stream now."""
        _, info = self.generate(self.cfg.ppo.rollout_batch_size, iteration, max_new_tokens=self.chunk_tokens)
        return Generated(iteration, info["rows"], info["samples"], 1,
                         {k: info[k] for k in ("redispatched", "skipped_prompts", "generated_tokens",
                                               "prompts_consumed", "unused_prompts")}, info["engines"],
                         list(info["times"]))

    def extend(self, g: Generated) -> Generated:
        """`g` with one more chunk from the engines' current weights (rollout.pipeline.next_chunk)."""
        return next_chunk(g, self.generators, self.cfg.generation, self.chunk_tokens, self.cfg.run.seed)

    def rollout_of(self, g: Generated) -> tuple[dict, dict]:
        """A finished batch in flight as generate() returns a rollout."""
        batch, info = self.rollout_batch(g.rows, g.samples)
        info.update(g.counts, engines_used=len(g.engines), engines=g.engines, dynamic_sampling={}, rows=g.rows,
                    samples=g.samples, times=tuple(g.times))
        return batch, info

    def rollout_batch(self, batch_rows: list[dict], samples: list) -> tuple[dict, dict]:
        """The learners' batch (build_batch) of these prompts' samples, with the texts the reward reads; info: what
        only the controller needs (vLLM log-probs, weight versions, response lengths, truncation)."""
        rows = [batch_rows[s.prompt_index] for s in samples]
        batch = build_batch([r["prompt_input_ids"] for r in rows], [s.token_ids for s in samples],
                            self.tokenizer.pad_token_id)
        batch.update(prompts=[r["prompt"] for r in rows], references=[r["reference"] for r in rows],
                     responses=[self.tokenizer.decode(s.token_ids, skip_special_tokens=True) for s in samples])
        vllm_logprobs = torch.zeros(len(samples), batch["input_ids"].shape[1] - batch["prompt_width"])
        for i, s in enumerate(samples):
            vllm_logprobs[i, :len(s.logprobs)] = torch.tensor(s.logprobs)
        info = {"weight_versions": sorted({v for s in samples for v in s.token_versions or [s.weight_version]}),
                "vllm_logprobs": vllm_logprobs,
                "group_size": self.cfg.generation.n_samples_per_prompt,
                "response_lengths": torch.tensor([len(s.token_ids) for s in samples]),
                # cut at max_new_tokens (or max_model_len) before an EOS or stop string
                "truncated": torch.tensor([s.finish_reason == "length" for s in samples])}
        return batch, info

    def scores_trained_on(self, scores: torch.Tensor, info: dict) -> torch.Tensor:
        """The reward's scores plus, with ppo.overlong_buffer, DAPO's soft overlong penalty."""
        return length_penalised(self.cfg.ppo, self.cfg.generation.max_new_tokens, scores.float(),
                                info["response_lengths"])

    def make_experience(self, batch: dict, info: dict) -> tuple[dict, dict]:
        import ray

        p, reuse = self.cfg.ppo, self.reuses_train_logprobs
        behaviour_old = old_logprobs_from_engines(self.cfg)  # asynchronous rollouts without an off-policy correction
        P = batch["prompt_width"]
        ref = ray.put(batch)  # every group reads the rollout from the object store
        futures = {"ref": self.reference.logprobs(ref, as_ref=True)}
        if "scores" not in info:  # dynamic sampling scored every round while generating
            futures["scores"] = self.reward.scores(ref, as_ref=True)
        if not reuse and not behaviour_old:
            futures["old"] = self.actor.logprobs(ref, as_ref=True)
        if self.critic is not None:
            futures["values"] = self.critic.values(ref, as_ref=True)
        got = dict(zip(futures, ray.get(list(futures.values()))))
        if behaviour_old:
            got["old"] = full_width(info["vllm_logprobs"], P)
        scores = info["scores"] if "scores" in info else self.scores_trained_on(got["scores"], info)
        # Non-finite scores, log-probs or values: those samples are masked out, counted (experience/nonfinite_samples)
        scores, action_mask, per_token, dropped = drop_nonfinite_samples(
            scores, batch["action_mask"], {k: got[k] for k in ("ref", "old", "values") if k in got},
            info["group_size"])
        got.update(per_token)
        info["scores_trained"] = scores  # lineage (samples.jsonl)
        lengths = response_slice(action_mask, P).sum(dim=1)
        if p.overlong_mask:  # DAPO overlong filtering: samples cut at max_new_tokens take no part in the loss
            action_mask = action_mask * (~info["truncated"])[:, None].to(action_mask.dtype)
        if "stale" in info:  # older than rollout.mode allows (a guard: the schedule never makes them): not trained on
            action_mask = action_mask * (~info["stale"])[:, None].to(action_mask.dtype)
        mask = response_slice(action_mask, P)
        ref_lp = response_slice(got["ref"], P)
        old = ref_lp if reuse else response_slice(got["old"], P)  # reuse: KL is measured in the training pass
        values = response_slice(got["values"], P) if self.critic is not None else None
        reward_kl_coef = self.kl_ctl.value if p.kl_penalty == "reward" else 0.0
        adv = compute_advantages(p, reward_kl_coef, scores, old, ref_lp, mask, info["group_size"], values)
        advantages = full_width(adv.advantages, P)
        returns = full_width(adv.returns, P) if adv.returns is not None else torch.zeros_like(advantages)
        # Finite inputs can still overflow (k3's exp of a large log-ratio): such rows are dropped the same way.
        bad = ((~torch.isfinite(advantages) | ~torch.isfinite(returns)) & action_mask.bool()).any(dim=1)
        if bad.any():
            dropped |= bad
            action_mask = action_mask * (~bad)[:, None].to(action_mask.dtype)
            advantages, returns = (torch.where(bad[:, None], 0.0, x) for x in (advantages, returns))
        experience = {k: batch[k] for k in ("input_ids", "attention_mask")}
        experience["action_mask"] = action_mask
        experience["advantages"] = advantages
        if reuse or p.off_policy_correction != "none":  # the gap's and the correction's behaviour log-probs
            experience["vllm_logprobs"] = full_width(info["vllm_logprobs"], P)
        if not reuse:
            experience["old_logprobs"] = got["old"]
        if p.kl_penalty == "loss":
            experience["ref_logprobs"] = got["ref"]
        if self.critic is not None:
            experience.update(old_values=got["values"], returns=returns)
        kept = scores[~dropped]
        stats = {
            "reward/mean": kept.mean().item(), "reward/std": kept.std().item(),
            "experience/nonfinite_samples": int(dropped.sum()),
            "reward/shaped_mean": adv.sequence_rewards.mean().item(), "kl/coef": self.kl_ctl.value,
            "response/length_mean": lengths.mean().item(),
            "response/truncated_fraction": info["truncated"].float().mean().item(),
            "experience/old_logprobs_from_training": float(reuse),
            "experience/old_logprobs_from_engines": float(behaviour_old),
        }
        if p.overlong_mask:
            stats["experience/overlong_masked"] = int(info["truncated"].sum())
        if p.overlong_buffer:
            stats["reward/overlong_penalty_mean"] = rl.overlong_penalty(
                info["response_lengths"], self.cfg.generation.max_new_tokens, p.overlong_buffer,
                p.overlong_penalty).mean().item()
        if not reuse:  # else both come from the training pass (train())
            n_tokens = mask.sum().clamp(min=1).item()
            stats["kl/mean"] = (adv.kl * mask).sum(dim=1).mean().item()
            stats["logprob_gap/vllm_vs_learner"] = ((info["vllm_logprobs"] - old).abs() * mask).sum().item() / n_tokens
        return experience, stats

    def train(self, experience: dict) -> dict:
        import ray

        ref = ray.put(experience)
        ptx = self._ptx_batch() if self.ptx_rows is not None else None
        actor_stats = self.actor.train(ref, ptx=ptx, kl_coef=self.kl_ctl.value)
        stats = {"loss/policy": actor_stats.get("policy_loss", float("nan")),
                 "policy/clip_fraction": actor_stats.get("clip_fraction", float("nan")),
                 "policy/approx_kl": actor_stats.get("approx_kl", float("nan")),
                 "entropy/mean": actor_stats.get("entropy", float("nan"))}
        if "kl_loss" in actor_stats:
            stats["loss/kl"] = actor_stats["kl_loss"]
        for key in ("is_ratio_mean", "is_ratio_max", "corrected_fraction", "mismatch_kl"):  # ppo.off_policy_correction
            if key in actor_stats:  # means over micro-batches (is_ratio_max: of their maxima)
                stats[f"off_policy/{key}"] = actor_stats[key]
        if self.reuses_train_logprobs:  # measured on the rollout's own weights, before this step's update
            stats["kl/mean"] = actor_stats["kl_sequence"]
            stats["logprob_gap/vllm_vs_learner"] = actor_stats["logprob_gap"]
        if "ptx_loss" in actor_stats:
            stats["loss/ptx"] = actor_stats["ptx_loss"]
        stats["actor/nonfinite_steps"] = actor_stats["nonfinite_steps"]  # skipped on every rank (learner.py)
        if self.critic is not None:
            critic_stats = self.critic.train(ref)
            stats.update({"loss/value": critic_stats["value_loss"],
                          "value/clip_fraction": critic_stats.get("value_clip_fraction", float("nan")),
                          "critic/nonfinite_steps": critic_stats["nonfinite_steps"]})
        return stats

    def _ptx_batch(self) -> dict:
        from rlhf_ray.data import pad_batch

        n = self.cfg.ppo.rollout_batch_size * self.cfg.generation.n_samples_per_prompt
        start = (self.iteration * n) % len(self.ptx_rows)
        rows = [self.ptx_rows[(start + i) % len(self.ptx_rows)]["input_ids"] for i in range(n)]
        input_ids, attention_mask = pad_batch(rows, self.tokenizer.pad_token_id)
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def step(self) -> dict:
        p, started = self.cfg.ppo, time.time()
        timings = {}
        t = time.time()
        batch, info = self.next_rollout(p.rollout_batch_size)
        timings["time/generate_wait_s"] = time.time() - t
        try:
            if self.rollouts is not None:  # the next batches, while this one trains
                self.rollouts.start(self.iteration)
            if self.engines_sleep:  # the engines' GPU memory goes to the scorers and learners until the sync
                self.generators.sleep()
            t = time.time()
            experience, stats = self.make_experience(batch, info)
            timings["time/score_s"] = time.time() - t
            t = time.time()
            stats.update(self.train(experience))
            timings["time/train_s"] = time.time() - t
            stats.update(self.record_lineage(batch, info, (t, time.time())))
            t = time.time()
            if self.rollouts is not None:
                timings["time/generate_wait_s"] += self.rollouts.finish()
                timings["time/generate_background_s"] = self.rollouts.busy_s  # this iteration's generation work
            if self.engines_sleep:
                self.generators.wake_up()  # weights back on the GPU before they are updated and sampled from
            version = self.sync_engines(self.iteration + 1)
            timings["time/sync_s"] = time.time() - t
        except BaseException:
            if self.rollouts is not None:
                self.rollouts.abandon()  # what was in flight (this batch too) stays for the retry (recovery)
            raise
        if self.rollouts is not None:
            self.rollouts.commit()
        timings["time/generate_s"] = info["times"][1] - info["times"][0]  # this batch's, wherever it ran
        self.kl_ctl.update(stats["kl/mean"], len(batch["input_ids"]))
        stats.update(timings)
        stats.update({"time/iteration_s": time.time() - started, "weight_version": version,
                      "rollout/weight_version": max(info["weight_versions"]),
                      "rollout/redispatched": info["redispatched"], "rollout/engines_used": info["engines_used"],
                      "rollout/skipped_prompts": info["skipped_prompts"],
                      "rollout/prompts_consumed": info["prompts_consumed"],
                      "faults/sync_engine_failures": len(self.generators.last_sync.engine_failures),
                      **{f"dynamic_sampling/{k}": v for k, v in info["dynamic_sampling"].items()},
                      "throughput/tokens_per_s": info["generated_tokens"] / max(timings["time/generate_s"], 1e-9)})
        return stats

    def next_rollout(self, num_prompts: int) -> tuple[dict, dict]:
        """off: generate now. one_step / bounded: the batch generated during the previous iterations (the first one:
        now). info["staleness"]: each sample's, in learner steps; info["stale"]: older than the mode allows (never
        scheduled so: a guard), left out of the loss and counted."""
        batch, info = self.generate(num_prompts) if self.rollouts is None else \
            self.rollout_of(self.rollouts.take(self.iteration))
        info["staleness"] = sample_staleness(info["samples"], self.version_steps, self.iteration)
        info["stale"] = torch.tensor([s > self.max_staleness for s in info["staleness"]])
        return batch, info

    def sync_engines(self, step: int, version: Optional[int] = None) -> int:
        """The actor's weights (learner step `step`) to every engine, as weight version `version` (default: the
        next); returns the version."""
        version = self.generators.sync_weights(self.actor, version=version)
        self.version_steps[version] = step
        return version

    def record_lineage(self, batch: dict, info: dict, trained_at: tuple[float, float]) -> dict:
        """Each sample's lineage (rollout.lineage): staleness metrics, and rollout.samples_every's samples.jsonl."""
        records = lineage(info, self.iteration, trained_at)
        self.last_unused = unused_records(info, self.iteration)
        every = self.cfg.rollout.samples_every
        if every:
            self.samples_written = write_samples(self.out_dir / "samples.jsonl", records, batch,
                                                 info["scores_trained"].tolist(), every, self.samples_written,
                                                 unused=[{**r, "prompt": self.prompts.row_at(r["prompt_id"])["prompt"]}
                                                         for r in self.last_unused])
        self.last_lineage = records
        return staleness_metrics(records)

    def run(self) -> Path:
        from ray.exceptions import RayActorError

        from rlhf_ray.metrics import MetricsLogger, plot_curves, read_metrics, run_summary

        cfg, started = self.cfg, time.time()
        logger = MetricsLogger.from_config(cfg, self.out_dir, total_steps=cfg.ppo.num_iterations,
                                           initial_step=self.iteration, append=self.iteration > 0)
        try:
            while self.iteration < cfg.ppo.num_iterations:
                self.apply_requests()  # `rlhf-ray engines CONFIG --set N`, between two iterations
                self.iteration_start_position = self.prompts.position
                try:
                    stats = self.step()
                except RayActorError as error:  # a worker process died: replace it, maybe back to a checkpoint
                    logger.close()
                    self.recover(error)
                    logger = MetricsLogger.from_config(cfg, self.out_dir, total_steps=cfg.ppo.num_iterations,
                                                       initial_step=self.iteration, append=True)
                    continue
                if self.recovery is not None:
                    stats.update(self.recovery.metrics())
                self.iteration += 1
                logger.log(self.iteration, stats)
                if self.checkpoints is not None and cfg.checkpoint.every and self.iteration % cfg.checkpoint.every == 0:
                    self.save_checkpoint()
        finally:
            logger.close()
        final = export_actor(self.actor, self.out_dir, cfg.ppo.ema_decay)
        png = plot_curves(logger.path, self.out_dir / "reward_kl.png")
        log.info("ppo done in %.0fs: %s -> %s (curves: %s)", time.time() - started,
                 run_summary(read_metrics(logger.path)), final, png)
        return final

    def apply_requests(self) -> None:
        from rlhf_ray.control import apply_requests

        apply_requests(self.control, self.generators,
                       {"iteration": self.iteration, "weight_version": self.generators.weight_version})

    # -- checkpoint / resume
    def save_checkpoint(self) -> str:
        from rlhf_ray.checkpoint import join, write_controller_state

        def write(folder: str) -> None:
            self.actor.save_checkpoint(join(folder, "actor"))
            if self.critic is not None:
                self.critic.save_checkpoint(join(folder, "critic"))
            write_controller_state(folder, self.controller_state())

        path = self.checkpoints.save(self.iteration, write)
        log.info("checkpoint %s", path)
        return path

    def controller_state(self) -> dict:
        """What the controller needs besides the learners' checkpoints to continue exactly (JSON data)."""
        from rlhf_ray.checkpoint import rng_state

        return {"iteration": self.iteration, "prompt_position": self.prompts.position,
                "kl_controller": self.kl_ctl.state_dict(), "rng": rng_state(),
                "weight_version": self.generators.weight_version, "samples_written": self.samples_written,
                "version_steps": sorted(self.version_steps.items()),
                "in_flight": self.rollouts.state() if self.rollouts is not None else []}

    def apply_controller_state(self, state: dict) -> None:
        from rlhf_ray.checkpoint import set_rng_state

        self.iteration, self.prompts.position = state["iteration"], state["prompt_position"]
        self.kl_ctl.load_state_dict(state["kl_controller"])
        set_rng_state(state["rng"])
        self.samples_written = state.get("samples_written", 0)
        self.version_steps = {v: step for v, step in state.get("version_steps", [(0, 0)])}
        if self.rollouts is not None:  # the batches generated ahead and not yet trained on
            self.rollouts.load_state(state.get("in_flight"), self.prompts.row_at)

    def resume(self) -> None:
        latest = self.checkpoints.latest()
        if latest is None:
            log.info("checkpoint.resume: no checkpoint under %s, starting fresh", self.checkpoints.uri)
            return
        self.restore(latest)
        log.info("resumed from %s at iteration %d", latest, self.iteration)

    def restore(self, checkpoint: str, weight_version: Optional[int] = None) -> None:
        """Learners, controller state and engines as `checkpoint` left them; the engines get `weight_version`
        (default: the checkpoint's own)."""
        from rlhf_ray.checkpoint import join, read_controller_state

        state = read_controller_state(checkpoint)  # JSON: a checkpoint folder is data, never code to unpickle
        self.actor.load_checkpoint(join(checkpoint, "actor"))
        if self.critic is not None:
            self.critic.load_checkpoint(join(checkpoint, "critic"))
        self.apply_controller_state(state)
        self.sync_engines(self.iteration, state["weight_version"] if weight_version is None else weight_version)

    def recover(self, error: BaseException) -> None:
        """After a worker process died mid-iteration (`error`): replace the dead groups in their placement groups
        and, when a learner died, go back to the last checkpoint with a new, higher weight version on the engines
        (rlhf_ray/recovery.py). Raises `error` when no group is dead, or when recovery is not possible."""
        from rlhf_ray.env import check_agreement
        from rlhf_ray.recovery import recover

        self.recovery = recover(self, error)
        self.devices = check_agreement(self.worker_reports())

    def shutdown(self) -> None:
        from rlhf_ray.groups import remove_placement

        for group in (self.generators, self.actor, self.reference, self.reward, self.critic):
            if group is not None:
                group.shutdown()
        remove_placement(self.plan)
        self.plan = {}  # removed: a second shutdown (a caller's finally after a failed step) has nothing left to do
        if self.control is not None:
            from rlhf_ray.control import stop_control

            stop_control(self.control)
            self.control = None


def run_ppo(cfg: Config) -> Path:
    """`rlhf-ray ppo CONFIG`: PPO from the configured actor and reward model; returns the final actor folder."""
    trainer = PPOTrainer(cfg)
    try:
        return trainer.run()
    finally:
        trainer.shutdown()
