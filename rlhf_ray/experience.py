"""Experience: from rollouts to the learners' batches, in pure pieces the PPO controller (rlhf_ray/ppo.py) strings
together: the prompt stream and per-request seeds, rollouts that refill skipped prompts (answered_rollout) and keep
only groups with signal (rollout_with_signal, DAPO's dynamic sampling), the batch layout (build_batch), the RL math
applied to it (compute_advantages, over rlhf_ray/rl.py), and non-finite samples masked out (drop_nonfinite_samples).

Tensor layout (learner.py's convention): a batch holds prompt + response rows, prompts LEFT-padded to a common
length P and responses RIGHT-padded, so every row's response starts at column P. Per-token tensors are (B, T-1),
column t scoring token t+1; the response tokens are columns P-1 .. T-2. The RL math runs on that response slice
[:, P-1:], which is right-padded exactly as rlhf_ray/rl.py expects, and the results are put back into (B, T-1).
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any, Optional

import torch

from rlhf_ray import rl
from rlhf_ray.config import PPOConfig
def request_seed(run_seed: int, iteration: int, row: int) -> int:
    """A per-request sampling seed: the same (seed, iteration, row) samples the same tokens, resumed or not."""
    digest = hashlib.blake2b(f"{run_seed}:{iteration}:{row}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def continuation_seed(run_seed: int, prompt_id: int, sample_index: int, chunk: int) -> int:
    """The seed of a sample's `chunk`-th continuation (rollout.mode bounded): its own, whichever engine serves it."""
    digest = hashlib.blake2b(f"{run_seed}:continue:{prompt_id}:{sample_index}:{chunk}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def build_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> dict[str, Any]:
    """Rows = prompt (left-padded to P) + response (right-padded to R). Returns input_ids, attention_mask (B, P+R),
    action_mask (B, P+R-1: 1 where column t+1 is a response token) and prompt_width P."""
    P = max(len(p) for p in prompts)
    R = max(1, max(len(r) for r in responses))
    B = len(prompts)
    input_ids = torch.full((B, P + R), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, P + R), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        input_ids[i, P - len(p):P] = torch.tensor(p, dtype=torch.long)
        attention_mask[i, P - len(p):P] = 1
        if r:
            input_ids[i, P:P + len(r)] = torch.tensor(r, dtype=torch.long)
            attention_mask[i, P:P + len(r)] = 1
    action_mask = torch.zeros((B, P + R - 1), dtype=torch.float32)
    action_mask[:, P - 1:] = attention_mask[:, P:].float()
    return {"input_ids": input_ids, "attention_mask": attention_mask, "action_mask": action_mask, "prompt_width": P}


def response_slice(per_token: torch.Tensor, prompt_width: int) -> torch.Tensor:
    """(B, T-1) -> (B, R): the columns that score response tokens."""
    return per_token[:, prompt_width - 1:]


def full_width(response: torch.Tensor, prompt_width: int) -> torch.Tensor:
    """(B, R) -> (B, T-1) with zeros over the prompt columns (what the learners consume)."""
    return torch.cat([response.new_zeros(response.shape[0], prompt_width - 1), response], dim=1)


@dataclass
class Advantages:
    advantages: torch.Tensor  # (B, R)
    returns: Optional[torch.Tensor]  # (B, R), critic targets (GAE only)
    rewards: torch.Tensor  # (B, R) per-token rewards after shaping
    kl: torch.Tensor  # (B, R) per-token KL estimate to the reference
    sequence_rewards: torch.Tensor  # (B,) what a sequence earned in total (for logging)


def compute_advantages(p: PPOConfig, kl_coef: float, scores: torch.Tensor, logprobs: torch.Tensor,
                       ref_logprobs: torch.Tensor, mask: torch.Tensor, group_size: int,
                       values: Optional[torch.Tensor] = None) -> Advantages:
    """Rewards and advantages on the response slice (B, R), by ppo.advantage_estimator.

    gae          per-token r = -kl_coef * KL, + clip(score) on the last token (InstructGPT); GAE with the critic.
    reinforce_pp the same shaped rewards; discounted returns, global whitening. With n > 1 samples per prompt,
                 REINFORCE++-baseline as OpenRLHF's reinforce_baseline: the group mean of the score is subtracted
                 from the score before shaping (then clip, KL reward, returns, whitening).
    grpo / rloo  clip(score) normalised within each prompt's group of n samples (GRPO: mean/std; dr_grpo: mean
                 only, Dr. GRPO; RLOO: leave-one-out mean), broadcast over the tokens, minus the KL penalty:
                 kl_coef * KL_t per token, or with ppo.kl_reward_shape return_to_go kl_coef * sum_{j>=t} KL_j
                 (rl.kl_penalty_for_advantages).
    """
    baselined = p.advantage_estimator == "reinforce_pp" and group_size > 1
    rewards, kl = rl.shape_rewards(rl.group_mean_baseline(scores, group_size) if baselined else scores, logprobs,
                                   ref_logprobs, mask, kl_coef=kl_coef, reward_clip=p.reward_clip,
                                   kl_estimator=p.kl_estimator)
    returns = None
    if p.advantage_estimator == "gae":
        advantages, returns = rl.gae_advantages(rewards, values, mask, gamma=p.gamma, lam=p.lam)
        if p.whiten_advantages:
            advantages = rl.masked_whiten(advantages, mask)
    elif p.advantage_estimator == "reinforce_pp":
        advantages = rl.reinforce_pp_advantages(rewards, mask, gamma=p.gamma)
    else:
        clipped = scores.clamp(-p.reward_clip, p.reward_clip)
        if p.advantage_estimator == "rloo":
            group = rl.rloo_advantages(clipped, group_size, mask)
        else:  # grpo; dr_grpo: the same without the division by the group's std (Dr. GRPO)
            group = rl.grpo_advantages(clipped, group_size, mask, normalize_std=p.advantage_estimator == "grpo")
        # The KL penalty stays outside the group normalisation: normalising it with the scores turns KL noise
        # into unit-size advantages whenever a group's scores tie (all 0 early in training).
        advantages = group - rl.kl_penalty_for_advantages(kl, mask, kl_coef, p.kl_reward_shape)
    return Advantages(advantages * mask, returns, rewards, kl, (rewards * mask).sum(dim=1))


def drop_nonfinite_samples(scores: torch.Tensor, action_mask: torch.Tensor, per_token: dict[str, torch.Tensor],
                           group_size: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Drop the samples whose score is not finite (a reward model gone NaN/inf), or whose per-token inputs (log-probs,
    values; (B, T-1)) are not finite on their response tokens. Returns (scores, action_mask, per_token, dropped).

    A dropped sample keeps its row, masked out rather than removed: the batch must still split into whole
    mini-batches over the learner ranks, and GRPO/RLOO groups are n consecutive rows. Its action mask is cleared (no
    loss, whitening or statistic counts it), its per-token inputs are zeroed (a NaN under a zero mask still turns a
    gradient into NaN: 0 * NaN) and its score becomes the mean of its group's finite scores, which leaves GRPO's
    group mean where the finite samples put it (the group std and RLOO's leave-one-out baselines move slightly)."""
    act = action_mask.bool()
    dropped = ~torch.isfinite(scores)
    for x in per_token.values():
        dropped |= (~torch.isfinite(x) & act).any(dim=1)
    if not dropped.any():
        return scores, action_mask, per_token, dropped
    keep = ~dropped
    kept_sum = torch.where(keep, scores, 0.0).view(-1, group_size).sum(dim=1)
    group_mean = kept_sum / keep.view(-1, group_size).sum(dim=1).clamp(min=1)  # 0 for a group with none left
    scores = torch.where(keep, scores, group_mean.repeat_interleave(group_size))
    per_token = {k: torch.where(keep[:, None], x, torch.zeros((), dtype=x.dtype)) for k, x in per_token.items()}
    return scores, action_mask * keep[:, None].to(action_mask.dtype), per_token, dropped


class PromptStream:
    """The PPO prompts in a seeded order, reshuffled every epoch; `position` is checkpointed for resume."""

    def __init__(self, rows: list[dict], seed: int, position: int = 0):
        if not rows:
            raise ValueError("the PPO prompt data set is empty")
        self.rows, self.seed, self.position = rows, seed, position
        self._epoch, self._order_cache = -1, []

    @classmethod
    def from_dataset(cls, rows, seed: int) -> "PromptStream":
        """The stream over a tokenized PPO split (load_stage_dataset): the columns the controller reads."""
        return cls([{"prompt_input_ids": r["prompt_input_ids"], "prompt": r["prompt"],
                     "reference": r.get("reference", "")} for r in rows], seed=seed)

    def _order(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch, self._order_cache = epoch, torch.randperm(len(self.rows), generator=g).tolist()
        return self._order_cache

    def take(self, n: int) -> list[dict]:
        """The next n prompt rows, each with its prompt_id: its position in the stream (lineage)."""
        out = [self.row_at(self.position + i) for i in range(n)]
        self.position += n
        return out

    def row_at(self, prompt_id: int) -> dict:
        """The row at stream position `prompt_id` (whichever epoch), with its prompt_id."""
        epoch, index = divmod(prompt_id, len(self.rows))
        return {**self.rows[self._order(epoch)[index]], "prompt_id": prompt_id}


def answered_rollout(take, generate, want: int, max_prompts: int) -> tuple[list[dict], list, dict]:
    """Prompts and their samples until `want` prompts are answered. Prompts the engines skip as too long
    (generation.long_prompt: skip) are replaced by the stream's next ones, so an iteration always trains on
    rollout_batch_size x n_samples_per_prompt samples: the whole mini-batches the learners need (checked at load).

    `take(k)` -> k prompt rows; `generate(rows, offset)` -> a Rollout of those rows (offset: how many prompts this
    iteration asked for before, for per-request seeds). Returns (rows, samples with prompt_index into rows, totals:
    skipped, redispatched, engine_prompts, skipped_ids: the skipped rows' prompt_id). Fails when `max_prompts` (one pass over the data) were not enough."""
    rows: list[dict] = []
    samples: list = []
    totals = {"skipped": 0, "redispatched": 0, "engine_prompts": {}, "skipped_ids": []}
    asked = 0
    while len(rows) < want:
        if asked >= max_prompts:
            raise ValueError(f"generation.long_prompt: skip: {totals['skipped']} of {asked} prompts were longer than "
                             f"the engines' max_model_len, too few left for ppo.rollout_batch_size ({want}); shorten "
                             f"data.max_prompt_len or raise generation.max_model_len")
        batch = take(want - len(rows))
        rollout = generate(batch, asked)
        asked += len(batch)
        skipped = set(rollout.skipped)
        totals["skipped"] += len(skipped)
        totals["skipped_ids"] += [batch[i].get("prompt_id") for i in sorted(skipped)]
        totals["redispatched"] += rollout.redispatched
        for engine, n in rollout.engine_prompts.items():
            totals["engine_prompts"][engine] = totals["engine_prompts"].get(engine, 0) + n
        by_prompt: dict[int, list] = {}
        for sample in rollout.samples:
            by_prompt.setdefault(sample.prompt_index, []).append(sample)
        for i, row in enumerate(batch):
            if i in skipped:
                continue
            rows.append(row)
            samples += [dataclasses.replace(x, prompt_index=len(rows) - 1)
                        for x in sorted(by_prompt.get(i, []), key=lambda x: x.sample_index)]
    return rows, samples, totals


def rollout_with_signal(scored_round, want: int, group_size: int, max_rounds: int) -> tuple[list[dict], list,
                                                                                            torch.Tensor, dict]:
    """DAPO dynamic sampling [DAPO Sec. 3.2, Eq. 11]: a prompt whose n samples' scores all tie has zero
    group-relative advantage (no gradient signal), so its group is dropped and more prompts are generated and scored,
    until `want` groups have signal or `max_rounds` rounds after the first are spent. Each round asks for exactly the
    groups still missing (no surplus is generated and thrown away). Bound hit with the batch still short: the last
    round's tied groups fill it, so the learners always get rollout_batch_size x n samples, whole mini-batches (a tied
    group's GRPO/RLOO advantage is 0: it adds only its KL term).

    `scored_round(k)` -> (rows, samples, scores) for k answered prompts: samples grouped per row, n each, in row
    order; scores (k*n,) as trained on. Returns (rows, samples with prompt_index into rows, scores, counts:
    extra_rounds, groups_dropped (tied, not trained on), groups_filled (tied, trained on: bound hit))."""
    n = group_size
    kept: list[tuple] = []  # (row, samples, scores) of the groups trained on
    counts = {"extra_rounds": 0, "groups_dropped": 0, "groups_filled": 0}
    for round_index in range(max_rounds + 1):
        rows, samples, scores = scored_round(want - len(kept))
        if len(samples) != len(rows) * n:
            raise ValueError(f"dynamic sampling: {len(samples)} samples for {len(rows)} prompts x {n}")
        counts["extra_rounds"] = round_index
        groups = [(row, samples[i * n:(i + 1) * n], scores[i * n:(i + 1) * n]) for i, row in enumerate(rows)]
        signal = rl.groups_with_signal(scores, n).tolist()
        kept += [group for group, has_signal in zip(groups, signal) if has_signal]
        tied = [group for group, has_signal in zip(groups, signal) if not has_signal]
        counts["groups_dropped"] += len(tied)
        if len(kept) == want:
            break
    else:  # the bound is hit: the last round's tied groups fill the batch (that round asked for the shortfall)
        fill = tied[:want - len(kept)]
        kept += fill
        counts["groups_dropped"] -= len(fill)
        counts["groups_filled"] = len(fill)
    rows = [row for row, _, _ in kept]
    samples = [dataclasses.replace(x, prompt_index=i) for i, (_, group, _) in enumerate(kept) for x in group]
    return rows, samples, torch.cat([scores for _, _, scores in kept]), counts


def length_penalised(p: PPOConfig, max_new_tokens: int, scores: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The scores trained on: with ppo.overlong_buffer > 0, plus DAPO's soft overlong penalty (rl.overlong_penalty)."""
    if p.overlong_buffer == 0:
        return scores
    return scores + rl.overlong_penalty(lengths, max_new_tokens, p.overlong_buffer, p.overlong_penalty)
