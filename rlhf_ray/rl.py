"""RL math core for RLHF: log-probs, KL, reward shaping, GAE, group advantages, PPO losses.

Pure torch: no Ray, vLLM or DeepSpeed. Everything here is a function of padded tensors so
that the distributed parts of the system (generators, learners) can call it unchanged.

Conventions
-----------
* Per-token tensors are ``(batch, seq)`` over the *response* tokens only.
* ``mask`` (bool or 0/1 float) is 1 on real generated tokens, 0 on padding. Responses are
  right-padded: each row's real tokens are a prefix ``[0, len_i)``.
* Per-token outputs are exactly 0 where ``mask == 0``. Values at padding positions of the
  inputs are never read (they may be garbage, even nan/inf), so padding never changes a result.
* No Python loop runs over the batch dimension; the only loops are over fixed-size chunks of
  tokens (``logprobs_from_logits``), parameter lists (``ema_update``) and a log-depth
  recursion in ``discounted_cumsum``.

Notation: ``pi`` policy being trained, ``pi_old`` policy that sampled the batch, ``pi_ref``
frozen reference (SFT) model, ``r_t = pi(a_t|s_t) / pi_old(a_t|s_t)`` the importance ratio.

References
----------
[InstructGPT]   Ouyang et al. 2022, "Training language models to follow instructions with human feedback".
[Ziegler]       Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences" (lm-human-preferences).
[PPO]           Schulman et al. 2017, "Proximal Policy Optimization Algorithms".
[GAE]           Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation".
[KL-approx]     Schulman 2020, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html.
[DualClip]      Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep RL" (dual-clip PPO).
[GRPO]          Shao et al. 2024, "DeepSeekMath" (Group Relative Policy Optimization).
[RLOO]          Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for RLHF".
[REINFORCE++]   Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning LLMs" (OpenRLHF).
[DAPO]          Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale" (arXiv 2503.14476).
[DS-Chat]       DeepSpeed-Chat, applications/DeepSpeed-Chat/dschat (ppo_trainer.py, main.py).
[DAPO]          Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale", arXiv 2503.14476.
[Dr.GRPO]       Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective", arXiv 2503.20783.
[GSPO]          Zheng et al. 2025, "Group Sequence Policy Optimization", arXiv 2507.18071.
[veRL]          volcengine/verl, verl/trainer/ppo/core_algos.py (agg_loss, compute_policy_loss_gspo).
[TIS]           Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training",
                https://fengyao.notion.site/off-policy-rl (truncated importance sampling, C = 2).
[IcePop]        Ling Team 2025, "Every Step Evolves: Scaling Reinforcement Learning for Trillion-Scale Thinking
                Model" (Ring-1T), arXiv 2510.18855, Sec. 3 (IcePop: tokens outside [alpha, beta] = [0.5, 5] masked).
[SeqMask]       Liu, Li et al. 2025, "When Speed Kills Stability: Demystifying RL Collapse from the Training-Inference
                Mismatch", https://richardli.xyz/rl-collapse (sequence-level, geometric-mean rejection; veRL's
                rollout correction).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Tuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

__all__ = [
    "PPODefaults",
    "DEFAULTS",
    "AGGREGATION_MODES",
    "POLICY_LOSSES",
    "KL_ESTIMATORS",
    "scoring_temperature",
    "logprobs_from_logits",
    "entropy_from_logits",
    "kl_estimate",
    "shape_rewards",
    "last_token_mask",
    "FixedKLController",
    "AdaptiveKLController",
    "masked_sum",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "discounted_cumsum",
    "gae_advantages",
    "grpo_advantages",
    "rloo_advantages",
    "group_mean_baseline",
    "reinforce_pp_advantages",
    "kl_penalty_for_advantages",
    "KL_REWARD_SHAPES",
    "groups_with_signal",
    "overlong_penalty",
    "aggregation_units",
    "aggregate",
    "Aggregation",
    "OFF_POLICY_CORRECTIONS",
    "off_policy_correction",
    "policy_loss",
    "gspo_loss",
    "value_loss",
    "entropy_bonus",
    "ema_update",
    "mix_ptx_loss",
]


# --------------------------------------------------------------------------------------------
# Defaults and where they come from
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PPODefaults:
    """Default hyper-parameters, each with its source.

    kl_coef = 0.1          DS-Chat ppo_trainer.py ``self.kl_ctl = 0.1`` (fixed beta of the per-token KL penalty).
    clip_ratio = 0.2       DS-Chat ``self.cliprange = 0.2``; [PPO] epsilon = 0.2.
    value_clip = 0.2       DS-Chat ``self.cliprange_value = 0.2``.
    reward_clip = 5.0      DS-Chat ``self.clip_reward_value = 5``.
    gamma = 1.0            DS-Chat ``self.gamma = 1.0`` (no discounting inside a response).
    lam = 0.95             DS-Chat ``self.lam = 0.95``.
    value_loss_coef = 0.5  DS-Chat critic_loss_fn ``0.5 * max(...)``.
    entropy_coef = 0.0     DS-Chat uses no entropy bonus.
    ptx_coef = 27.8        DS-Chat ``--unsup_coef`` default, "gamma in Equation 2 from the InstructGPT paper"
                           ([InstructGPT] Eq. 2, the pretraining-mix coefficient of PPO-ptx).
    ema_decay = 0.992      DS-Chat ``moving_average(..., beta=0.992)`` used by ``--enable_ema``.
    adaptive_kl_target = 6.0, adaptive_kl_horizon = 10000, adaptive_init_kl_coef = 0.2
                           [Ziegler] adaptive KL controller (horizon K_beta = 10000); target 6 and
                           initial beta 0.2 are the values TRL's PPOConfig adopted from it.
    adaptive_kl_clip = 0.2 [Ziegler] proportional error clipped to [-0.2, 0.2].
    dual_clip = 3.0        [DualClip] uses c = 3 (only applied when dual clipping is enabled).
    gspo_clip_ratio_low = 3e-4, gspo_clip_ratio_high = 4e-4
                           [GSPO] Sec. 5 (experiments): the clip range of the sequence-level ratio, left 3e-4,
                           right 4e-4 (a length-normalised ratio stays close to 1: orders smaller than PPO's).
    is_cap = 2.0           [TIS] truncation C = 2 of the token importance weight.
    is_mask_low = 0.5, is_mask_high = 5.0
                           [IcePop] Sec. 3: tokens whose ratio lies outside [alpha, beta] = [0.5, 5] are masked.
    group_eps = 1e-6       veRL compute_grpo_outcome_advantage ``epsilon=1e-6``.
    whiten_eps = 1e-8      TRL/OpenRLHF ``masked_whiten`` (``torch.rsqrt(var + 1e-8)``).
    """

    kl_coef: float = 0.1
    clip_ratio: float = 0.2
    value_clip: float = 0.2
    reward_clip: float = 5.0
    gamma: float = 1.0
    lam: float = 0.95
    value_loss_coef: float = 0.5
    entropy_coef: float = 0.0
    ptx_coef: float = 27.8
    ema_decay: float = 0.992
    adaptive_init_kl_coef: float = 0.2
    adaptive_kl_target: float = 6.0
    adaptive_kl_horizon: int = 10000
    adaptive_kl_clip: float = 0.2
    dual_clip: float = 3.0
    gspo_clip_ratio_low: float = 3e-4
    gspo_clip_ratio_high: float = 4e-4
    is_cap: float = 2.0
    is_mask_low: float = 0.5
    is_mask_high: float = 5.0
    group_eps: float = 1e-6
    whiten_eps: float = 1e-8


DEFAULTS = PPODefaults()

KL_ESTIMATORS = ("k1", "k2", "k3")
KL_REWARD_SHAPES = ("per_token", "return_to_go")
AGGREGATION_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
POLICY_LOSSES = ("ppo", "gspo")
OFF_POLICY_CORRECTIONS = ("none", "tis", "icepop", "seq_mask")


# --------------------------------------------------------------------------------------------
# Masked statistics
# --------------------------------------------------------------------------------------------


def _bool(mask: Tensor) -> Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def _zero_pad(x: Tensor, mask: Tensor) -> Tensor:
    """x where mask else 0 (a `where`, not a product, so nan/inf on padding cannot leak)."""
    return torch.where(_bool(mask), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: Tensor, mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """sum_m(x) = sum_i m_i x_i  (over all elements, or along ``dim``)."""
    x = _zero_pad(x, mask)
    return x.sum() if dim is None else x.sum(dim)


def _count(mask: Tensor, dim: Optional[int] = None) -> Tensor:
    m = _bool(mask)
    return m.sum() if dim is None else m.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """mean_m(x) = sum_i m_i x_i / sum_i m_i ; 0 where there is no real token."""
    return masked_sum(x, mask, dim) / _count(mask, dim).clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True, dim: Optional[int] = None) -> Tensor:
    """var_m(x) = sum_i m_i (x_i - mean_m(x))^2 / (n - 1 if unbiased else n),  n = sum_i m_i.

    Bessel-corrected by default, as TRL/OpenRLHF ``masked_var``. With n <= 1 it returns 0.
    """
    mean = masked_mean(x, mask, dim)
    mean = mean if dim is None else mean.unsqueeze(dim)
    n = _count(mask, dim)
    sum_sq = masked_sum((x - mean) ** 2, mask, dim)
    return sum_sq / ((n - 1) if unbiased else n).clamp(min=1)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = DEFAULTS.whiten_eps) -> Tensor:
    """whiten(x) = (x - mean_m(x)) / sqrt(var_m(x) + eps)        (shift_mean=True)
               = (x - mean_m(x)) / sqrt(var_m(x) + eps) + mean_m(x)  (shift_mean=False: keep the mean)

    Statistics over all masked elements; 0 on padding. As TRL/OpenRLHF ``masked_whiten``
    (DS-Chat does not whiten; ``shift_mean=False`` is what TRL uses for rewards).
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return _zero_pad(whitened, mask)


def last_token_mask(mask: Tensor) -> Tensor:
    """Boolean (B, T): True only at each row's last real token (the last t with mask == 1).

    Rows without any real token are all False.
    """
    m = _bool(mask)
    positions = torch.arange(m.shape[-1], device=m.device).expand_as(m)
    last_index = torch.where(m, positions, -1).amax(dim=-1, keepdim=True)  # -1 for empty rows
    return positions == last_index


# --------------------------------------------------------------------------------------------
# Log-probs, entropy, KL
# --------------------------------------------------------------------------------------------


def _float_dtype(x: Tensor) -> torch.dtype:
    """float32 for half/bfloat16 inputs (log-probs need the precision), else the input's dtype."""
    return torch.promote_types(x.dtype, torch.float32)


def _row_chunks(n_rows: int, chunk_size: int) -> Iterable[slice]:
    return (slice(start, min(start + chunk_size, n_rows)) for start in range(0, n_rows, chunk_size))


def scoring_temperature(temperature: float) -> float:
    """The temperature tau that log-probs and entropies are scored at: the generator's sampling temperature.

    Tokens sampled from softmax(z / tau) are scored under softmax(z / tau) by the policy, the old policy
    and the reference alike, so the PPO ratio, the KL and the entropy are those of the sampling distribution
    (veRL ``dp_actor._forward_micro_batch``: ``logits.div_(temperature)`` for actor, old and reference
    log-probs and entropy; OpenRLHF ``log_probs_from_logits(logits, labels, temperature)``). vLLM's
    ``processed_logprobs`` are the same log-softmax(z / tau).
    tau = 0 (greedy) has no such distribution: scored at 1, as vLLM's greedy path applies no temperature.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    return 1.0 if temperature == 0 else float(temperature)


def _scaled(logits: Tensor, temperature: float) -> Tensor:
    """logits / tau; at tau = 1 the logits themselves: x / 1 is x, and skipping it saves a (tokens, vocab) copy and
    its backward, which page-fault on CPU (a fresh ~100 MB buffer each time)."""
    return logits if temperature == 1.0 else logits / temperature


def logprobs_from_logits(
    logits: Tensor,
    tokens: Tensor,
    temperature: float = 1.0,
    mask: Optional[Tensor] = None,
    chunk_size: int = 4096,
) -> Tensor:
    """log pi(a_t) = z_t[a_t] / tau - logsumexp(z_t / tau)       logits (B, T, V), tokens (B, T) -> (B, T)

    ``logits[b, t]`` must be the distribution that produced ``tokens[b, t]`` (the caller does the
    usual one-position shift). ``temperature`` is the sampling temperature of the generator, so that
    the log-probs are those of the distribution the tokens were sampled from (``scoring_temperature``;
    0, greedy, scores at 1). Memory-lean: the (B*T, V) logits
    are processed ``chunk_size`` tokens at a time (half precision upcast to float32) and only one
    (chunk, V) temporary of logsumexp lives at a time; no softmax copy is kept. 0 on padding when
    ``mask`` is given.
    """
    temperature = scoring_temperature(temperature)
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_tokens = tokens.reshape(-1, 1)
    out = torch.empty(flat_tokens.shape[0], dtype=_float_dtype(logits), device=logits.device)
    for rows in _row_chunks(flat_logits.shape[0], chunk_size):
        z = _scaled(flat_logits[rows].to(out.dtype), temperature)
        out[rows] = z.gather(-1, flat_tokens[rows]).squeeze(-1) - torch.logsumexp(z, dim=-1)
    out = out.view(tokens.shape)
    return out if mask is None else _zero_pad(out, mask)


def entropy_from_logits(
    logits: Tensor, temperature: float = 1.0, mask: Optional[Tensor] = None, chunk_size: int = 4096
) -> Tensor:
    """H(pi_t) = -sum_v p_v log p_v = logsumexp(z) - sum_v softmax(z)_v z_v,  z = logits / tau.

    logits (B, T, V) -> (B, T). Chunked over tokens like ``logprobs_from_logits``; ``temperature``
    as there (the entropy of the sampling distribution).
    """
    temperature = scoring_temperature(temperature)
    flat_logits = logits.reshape(-1, logits.shape[-1])
    out = torch.empty(flat_logits.shape[0], dtype=_float_dtype(logits), device=logits.device)
    for rows in _row_chunks(flat_logits.shape[0], chunk_size):
        z = _scaled(flat_logits[rows].to(out.dtype), temperature)
        out[rows] = torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(-1)
    out = out.view(logits.shape[:-1])
    return out if mask is None else _zero_pad(out, mask)


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k1", mask: Optional[Tensor] = None) -> Tensor:
    """Per-token estimators of KL(pi || pi_ref) from tokens sampled from pi  [KL-approx].

    With log rho = log pi_ref(a) - log pi(a):
        k1 = -log rho                    = log pi - log pi_ref     (unbiased, can be < 0; DS-Chat, InstructGPT)
        k2 = (log rho)^2 / 2                                       (biased, low variance, >= 0)
        k3 = rho - 1 - log rho                                     (unbiased, >= 0; GRPO's KL term)
    """
    log_rho = ref_logprobs - logprobs
    if kind == "k1":
        kl = -log_rho
    elif kind == "k2":
        kl = 0.5 * log_rho**2
    elif kind == "k3":
        kl = torch.exp(log_rho) - 1 - log_rho
    else:
        raise ValueError(f"unknown KL estimator {kind!r}; expected one of {KL_ESTIMATORS}")
    return kl if mask is None else _zero_pad(kl, mask)


# --------------------------------------------------------------------------------------------
# Reward shaping and KL controllers
# --------------------------------------------------------------------------------------------


def shape_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coef: float = DEFAULTS.kl_coef,
    reward_clip: Optional[float] = DEFAULTS.reward_clip,
    kl_estimator: str = "k1",
) -> Tuple[Tensor, Tensor]:
    """Per-token reward of RLHF-PPO  [InstructGPT Eq. 2; DS-Chat compute_rewards; Ziegler]:

        r_t = -beta * KL_t + [t == last real token] * clip(score, -c, c)

    scores (B,) reward-model scores; returns ``(rewards, kl)``, both (B, T) and 0 on padding.
    ``reward_clip=None`` disables clipping. ``kl_estimator`` picks k1/k2/k3 (DS-Chat uses k1).
    """
    kl = kl_estimate(logprobs, ref_logprobs, kl_estimator, mask)
    score = scores.to(kl.dtype)
    if reward_clip is not None:
        score = score.clamp(-reward_clip, reward_clip)
    rewards = -kl_coef * kl + last_token_mask(mask) * score.unsqueeze(-1)
    return rewards, kl


class FixedKLController:
    """beta_t = beta_0 for all t  (DS-Chat ``kl_ctl = 0.1``; Ziegler's non-adaptive setting)."""

    def __init__(self, kl_coef: float = DEFAULTS.kl_coef):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> Dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive beta  [Ziegler Sec. 2.2, lm-human-preferences AdaptiveKLController]:

        e_t      = clip(KL_t / KL_target - 1, -0.2, 0.2)
        beta_t+1 = beta_t * (1 + K_beta * e_t),   K_beta = n_steps / horizon

    ``n_steps`` is the number of samples (episodes) consumed since the last update.
    """

    def __init__(
        self,
        init_kl_coef: float = DEFAULTS.adaptive_init_kl_coef,
        target: float = DEFAULTS.adaptive_kl_target,
        horizon: int = DEFAULTS.adaptive_kl_horizon,
    ):
        if target <= 0 or horizon <= 0:
            raise ValueError("target and horizon must be positive")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        limit = DEFAULTS.adaptive_kl_clip
        proportional_error = min(max(float(current_kl) / self.target - 1, -limit), limit)
        self.value *= 1 + proportional_error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> Dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        self.value = float(state["value"])
        self.target = float(state.get("target", self.target))
        self.horizon = float(state.get("horizon", self.horizon))


# --------------------------------------------------------------------------------------------
# Advantage estimators
# --------------------------------------------------------------------------------------------


def discounted_cumsum(x: Tensor, discount: float, block_size: int = 32) -> Tensor:
    """Reverse discounted cumulative sum along the last dim:  y_t = x_t + c * y_{t+1},  y_T = 0.

    Equivalently y_t = sum_{j >= t} c^(j-t) x_j. Vectorised without any division by c^t (so it is
    numerically safe for any 0 <= c <= 1 and any length): time is cut into blocks of K steps,
      * inside a block:  y_local = x_block @ M,  M[j, t] = c^(j-t) for j >= t else 0   (one matmul);
      * across blocks:   s_b = y_local_b[0] + c^K s_{b+1}  is the same recurrence on T/K block heads
                         (solved by recursion), and  y_t = y_local_t + c^(K-t) s_{b+1}.
    Cost O(B T K); checked against the reverse-time loop in tests and benchmarks/bench_gae.py.
    """
    if not 0.0 <= discount <= 1.0:
        raise ValueError(f"discount must be in [0, 1], got {discount}")
    length = x.shape[-1]
    if length == 0:
        return x.clone()
    lead = x.shape[:-1]
    x2 = x.reshape(-1, length)
    k = min(block_size, length)
    n_blocks = -(-length // k)
    blocks = F.pad(x2, (0, n_blocks * k - length)).view(x2.shape[0], n_blocks, k)
    offsets = torch.arange(k, device=x.device, dtype=torch.float64)
    j_minus_t = offsets[:, None] - offsets[None, :]
    decay = torch.where(j_minus_t >= 0, discount ** j_minus_t.clamp(min=0), 0.0).to(x.dtype)
    y = blocks @ decay
    if n_blocks > 1:
        block_heads = discounted_cumsum(y[..., 0], discount**k, block_size)
        next_head = F.pad(block_heads[:, 1:], (0, 1))
        y = y + next_head.unsqueeze(-1) * (discount ** (k - offsets)).to(x.dtype)
    return y.reshape(x2.shape[0], n_blocks * k)[:, :length].reshape(*lead, length)


def _float(x: Tensor) -> Tensor:
    return x.to(_float_dtype(x))


def gae_advantages(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    gamma: float = DEFAULTS.gamma,
    lam: float = DEFAULTS.lam,
) -> Tuple[Tensor, Tensor]:
    """Generalised Advantage Estimation  [GAE Eq. 16; DS-Chat get_advantages_and_returns]:

        delta_t = r_t + gamma * V_{t+1} - V_t,        V_t = 0 beyond the last real token
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t                           (critic target)

    rewards, values, mask (B, T), right-padded; returns ``(advantages, returns)``, 0 on padding.
    (An interior 0 in the mask is treated as a step with r = V = 0, as OpenRLHF does.)
    The recurrence over t is ``discounted_cumsum`` (vectorised; no loop over batch or time).
    """
    rewards, values = _float(_zero_pad(rewards, mask)), _float(_zero_pad(values, mask))
    next_values = F.pad(values[:, 1:], (0, 1))
    deltas = rewards + gamma * next_values - values
    advantages = _zero_pad(discounted_cumsum(deltas, gamma * lam), mask)
    returns = _zero_pad(advantages + values, mask)
    return advantages, returns


def _groups(scores: Tensor, group_size: int) -> Tensor:
    if group_size < 1 or scores.shape[0] % group_size != 0:
        raise ValueError(f"batch of {scores.shape[0]} is not a whole number of groups of {group_size}")
    return _float(scores).view(-1, group_size)


def grpo_advantages(
    scores: Tensor,
    group_size: int,
    mask: Tensor,
    eps: float = DEFAULTS.group_eps,
    normalize_std: bool = True,
) -> Tensor:
    """GRPO outcome advantage  [GRPO Sec. 4.1.2; veRL compute_grpo_outcome_advantage]:

        A_i,t = (s_i - mean_g(s)) / (std_g(s) + eps)      for every real token t of sample i
        A_i,t =  s_i - mean_g(s)                          (normalize_std=False, Dr. GRPO)

    scores (B,) with rows grouped consecutively (rows [k*n, (k+1)*n) answer prompt k, n =
    group_size); std is the unbiased sample std (torch.std); a group of 1 gets mean 0, std 1
    as in veRL. Returns (B, T), 0 on padding.
    """
    groups = _groups(scores, group_size)
    if group_size == 1:
        mean, std = torch.zeros_like(groups), torch.ones_like(groups)
    else:
        mean, std = groups.mean(-1, keepdim=True), groups.std(-1, keepdim=True)
    advantage = groups - mean
    if normalize_std:
        advantage = advantage / (std + eps)
    return _zero_pad(advantage.reshape(-1, 1).expand(mask.shape), mask)


def rloo_advantages(scores: Tensor, group_size: int, mask: Tensor) -> Tensor:
    """REINFORCE Leave-One-Out  [RLOO Eq. 7]:

        A_i = s_i - 1/(n-1) * sum_{j != i} s_j            (= n/(n-1) * (s_i - mean_g(s)))

    scores (B,) grouped consecutively by ``group_size`` (n >= 2). Returns (B, T), 0 on padding.
    """
    if group_size < 2:
        raise ValueError("RLOO needs group_size >= 2")
    groups = _groups(scores, group_size)
    leave_one_out_baseline = (groups.sum(-1, keepdim=True) - groups) / (group_size - 1)
    advantage = groups - leave_one_out_baseline
    return _zero_pad(advantage.reshape(-1, 1).expand(mask.shape), mask)


def group_mean_baseline(scores: Tensor, group_size: int) -> Tensor:
    """s'_i = s_i - mean_g(s): each score minus the mean score of its prompt's group  [OpenRLHF ``reinforce_baseline``].

    scores (B,) grouped consecutively by ``group_size``. Returns (B,). REINFORCE++-baseline subtracts this
    baseline from the *score* before the KL-shaped rewards and returns are formed (OpenRLHF experience_maker
    ``compute_advantages_and_returns``: ``rewards - rewards.mean(-1)`` per prompt, then ``compute_reward``).
    """
    groups = _groups(scores, group_size)
    return (groups - groups.mean(-1, keepdim=True)).reshape(-1)


def reinforce_pp_advantages(
    rewards: Tensor,
    mask: Tensor,
    gamma: float = DEFAULTS.gamma,
    eps: float = DEFAULTS.whiten_eps,
) -> Tensor:
    """REINFORCE++  [REINFORCE++ Sec. 3; OpenRLHF ``reinforce`` / ``reinforce_baseline``]:

        G_t = sum_{j >= t} gamma^(j-t) r_j                        (return-to-go of shaped rewards)
        A_t = (G_t - mean_batch(G)) / sqrt(var_batch(G) + eps)    (global whitening over all masked tokens)

    rewards (B, T) per-token (e.g. from ``shape_rewards``), right-padded. Returns (B, T), 0 on padding.
    REINFORCE++-baseline is the same on rewards shaped from ``group_mean_baseline(scores)`` (the group mean
    of the score, not of the return, as OpenRLHF defines it). OpenRLHF whitens with the biased variance and
    ``clamp(var, 1e-8)``; ``masked_whiten``'s Bessel-corrected variance differs by a factor n/(n-1) over the
    n response tokens of the batch.
    """
    returns = _zero_pad(discounted_cumsum(_float(_zero_pad(rewards, mask)), gamma), mask)
    return masked_whiten(returns, mask, shift_mean=True, eps=eps)


def kl_penalty_for_advantages(kl: Tensor, mask: Tensor, kl_coef: float, shape: str = "per_token") -> Tensor:
    """The KL penalty subtracted from outcome advantages (GRPO, RLOO) when the KL is a reward, (B, T):

        per_token     P_t = beta * KL_t                           (each token pays its own KL)
        return_to_go  P_t = beta * sum_{j >= t} KL_j              (the KL reward summed to the end, gamma = 1:
                                                                   OpenRLHF ``compute_reward`` then
                                                                   ``get_cumulative_returns`` for rloo/group_norm)

    ``A_t = group_advantage_i - P_t``. 0 on padding.
    """
    kl = _float(_zero_pad(kl, mask))
    if shape == "per_token":
        penalty = kl
    elif shape == "return_to_go":
        penalty = discounted_cumsum(kl, 1.0)
    else:
        raise ValueError(f"unknown KL reward shape {shape!r}; expected one of {KL_REWARD_SHAPES}")
    return _zero_pad(kl_coef * penalty, mask)


def groups_with_signal(scores: Tensor, group_size: int) -> Tensor:
    """keep_g = not (s_i == s_1 for all i in g): the group's scores differ, (G,) bool  [DAPO Eq. 11: 0 < |{o_i
    correct}| < G].

    A group whose n scores tie has zero group-relative advantage for every sample: no gradient signal.
    Exact equality (veRL's DAPO filter keeps a group when ``std(scores) > 0``); a non-finite score counts as
    signal, so the non-finite filter later names it.
    """
    groups = _groups(scores, group_size)
    return ~(groups == groups[:, :1]).all(dim=-1)


def overlong_penalty(lengths: Tensor, max_new_tokens: int, buffer: int, factor: float = 1.0) -> Tensor:
    """Soft overlong punishment  [DAPO Eq. 13; OpenRLHF ``apply_overlong_penalty``], added to the score, (B,):

        R_len(|y|) = 0                                     |y| <= L_max - L_cache
                   = factor * ((L_max - L_cache) - |y|) / L_cache    L_max - L_cache < |y| <= L_max
                   = -factor                               |y| > L_max

    L_max = max_new_tokens, L_cache = buffer (> 0). Linear from 0 to -factor over the buffer.
    """
    if not 0 < buffer <= max_new_tokens:
        raise ValueError(f"overlong buffer must be in (0, max_new_tokens={max_new_tokens}], got {buffer}")
    excess = (_float(lengths) - (max_new_tokens - buffer)).clamp(min=0, max=buffer)
    return -factor * excess / buffer


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def aggregation_units(mask: Tensor, mode: str = "token-mean") -> Tensor:
    """The count N that ``aggregate`` divides by, for this batch:

        N = sum_{i,t} m_i,t            (token-mean: real tokens)
        N = #{i : sum_t m_i,t > 0}     (seq-mean-*: sequences with at least one real token)
    """
    if mode not in AGGREGATION_MODES:
        raise ValueError(f"unknown aggregation {mode!r}; expected one of {AGGREGATION_MODES}")
    return _count(mask) if mode == "token-mean" else (_count(mask, dim=-1) > 0).sum()


def aggregate(
    loss_per_token: Tensor,
    mask: Tensor,
    mode: str = "token-mean",
    units: Optional[float | Tensor] = None,
    max_len: Optional[int] = None,
) -> Tensor:
    """Reduce a (B, T) per-token loss to a scalar, a sum over this batch divided by a count N:

        token-mean               loss = sum_{i,t} m l / N                  N tokens: every token weighs the same
                                                                           ([DAPO] Sec. 3.3; veRL, OpenRLHF)
        seq-mean-token-mean      loss = sum_i [sum_t m l / sum_t m] / N    N sequences: every sequence the same
                                                                           ([GRPO] Eq. 3)
        seq-mean-token-sum       loss = sum_i [sum_t m l] / N              N sequences (veRL option)
        seq-mean-token-sum-norm  loss = sum_i [sum_t m l] / (N * max_len)  N sequences: GRPO's 1/|o_i| replaced by a
                                                                           constant, the generation budget max_len
                                                                           ([Dr.GRPO] Sec. 3.2; veRL's mode)

    ``units`` is N; None: this batch's own count (``aggregation_units``). A learner that splits a mini-batch over
    micro-batches and data-parallel ranks passes N = (the whole mini-batch's count) / (micro-batches x ranks):
    the average over them that gradient accumulation and data parallelism take then yields sum / count over the
    whole mini-batch, as if it were one batch (veRL ``agg_loss`` with ``batch_num_tokens`` / ``global_batch_size``).
    ``max_len`` (seq-mean-token-sum-norm only, required there): generation.max_new_tokens.
    """
    batch_count = aggregation_units(mask, mode)  # (raises on an unknown mode)
    count = batch_count.clamp(min=1) if units is None else units
    if mode == "token-mean":
        return masked_sum(loss_per_token, mask) / count
    if mode == "seq-mean-token-mean":
        return masked_mean(loss_per_token, mask, dim=-1).sum() / count
    if mode == "seq-mean-token-sum-norm":
        if max_len is None or max_len < 1:
            raise ValueError("aggregation 'seq-mean-token-sum-norm' needs max_len >= 1 (the generation limit)")
        return masked_sum(loss_per_token, mask) / (count * max_len)
    return masked_sum(loss_per_token, mask) / count  # seq-mean-token-sum


@dataclass(frozen=True)
class Aggregation:
    """An ``aggregate`` setting to hand to the losses:  loss = aggregate(l, m, mode, units, max_len).

    A plain mode string means ``Aggregation(mode)``: this batch's own count, no max_len.
    """

    mode: str = "token-mean"
    units: Optional[float] = None
    max_len: Optional[int] = None

    def __call__(self, loss_per_token: Tensor, mask: Tensor) -> Tensor:
        return aggregate(loss_per_token, mask, self.mode, self.units, self.max_len)


def _aggregation(aggregation: str | Aggregation) -> Aggregation:
    return Aggregation(aggregation) if isinstance(aggregation, str) else aggregation


def _clip_range(clip_ratio: float, low: Optional[float], high: Optional[float]) -> Tuple[float, float]:
    low, high = (clip_ratio if low is None else low), (clip_ratio if high is None else high)
    if not (0 < low < 1 and high > 0):
        raise ValueError(f"clip ratios must satisfy 0 < low < 1 and high > 0, got low {low}, high {high}")
    return low, high


def _clipped_surrogate(
    ratio: Tensor, advantages: Tensor, mask: Tensor, low: float, high: float, dual_clip: Optional[float]
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """L_t = max(-r_t A_t, -clip(r_t, 1 - low, 1 + high) A_t);  L_t = min(L_t, -c A_t) where A_t < 0 (dual clip c)."""
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    advantages = _zero_pad(advantages, mask)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - low, 1 + high)
    loss_per_token = torch.max(unclipped, clipped)
    stats = {"clip_fraction": masked_mean((clipped > unclipped).to(ratio.dtype), mask)}
    if dual_clip is not None:
        dual_clipped = torch.min(loss_per_token, -dual_clip * advantages)
        dual_clip_active = (advantages < 0) & (dual_clipped < loss_per_token)
        stats["dual_clip_fraction"] = masked_mean(dual_clip_active.to(ratio.dtype), mask)
        loss_per_token = torch.where(advantages < 0, dual_clipped, loss_per_token)
    return loss_per_token, stats


def off_policy_correction(
    old_logprobs: Tensor,
    behaviour_logprobs: Tensor,
    mask: Tensor,
    mode: str = "none",
    cap: float = DEFAULTS.is_cap,
    low: float = DEFAULTS.is_mask_low,
    high: float = DEFAULTS.is_mask_high,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Per-token weights that correct the policy loss for tokens sampled by a behaviour policy mu (the engines, with
    their own kernels, precision and, when asynchronous, older weights) other than pi_old (the learner's policy the
    PPO ratio is taken against):

        rho_t     = exp(log pi_old(a_t) - log mu(a_t))                        (token importance ratio)
        none      w_t = 1
        tis       w_t = min(rho_t, C)                                         [TIS]
        icepop    w_t = rho_t if low <= rho_t <= high, else 0                 [IcePop] (masked importance sampling)
        seq_mask  w_i,t = 1 if low <= rho_i <= high, else 0 for all of sequence i,
                  rho_i = exp(mean_t log rho_t)                               [SeqMask] (geometric-mean rejection)

    The loss becomes aggregate(w_t * L_t, m): a masked token adds nothing but still counts in the aggregation's
    denominator, as in IcePop's objective. Returns ``(weights, stats)``, detached; stats over the mask:
        is_ratio_mean, is_ratio_max   mean_m rho_t, max_m rho_t
        corrected_fraction            tokens truncated (tis) or masked (icepop, seq_mask)
        mismatch_kl                   mean_m [(rho - 1) - log rho]   (k3 estimate of KL(mu || pi_old) [KL-approx])
    """
    if mode not in OFF_POLICY_CORRECTIONS:
        raise ValueError(f"unknown off-policy correction {mode!r}; expected one of {OFF_POLICY_CORRECTIONS}")
    if not (0 < low < 1 < high and cap > 0):
        raise ValueError(f"off-policy correction needs 0 < low < 1 < high and cap > 0, got {low}, {high}, {cap}")
    real = _bool(mask)
    log_rho = _zero_pad(old_logprobs.detach() - behaviour_logprobs.detach(), mask)
    rho = torch.exp(log_rho)
    if mode == "tis":
        weights, corrected = rho.clamp(max=cap), rho > cap
    elif mode == "icepop":
        inside = (rho >= low) & (rho <= high)
        weights, corrected = torch.where(inside, rho, torch.zeros_like(rho)), ~inside
    elif mode == "seq_mask":
        sequence_rho = torch.exp(masked_mean(log_rho, mask, dim=-1)).unsqueeze(-1).expand_as(rho)
        inside = (sequence_rho >= low) & (sequence_rho <= high)
        weights, corrected = inside.to(rho.dtype), ~inside
    else:
        weights, corrected = torch.ones_like(rho), torch.zeros_like(real)
    stats = {"is_ratio_mean": masked_mean(rho, mask),
             "is_ratio_max": torch.where(real, rho, torch.zeros_like(rho)).max(),
             "corrected_fraction": masked_mean((corrected & real).to(rho.dtype), mask),
             "mismatch_kl": masked_mean(rho - 1 - log_rho, mask)}
    return _zero_pad(weights, mask), stats


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_ratio: float = DEFAULTS.clip_ratio,
    dual_clip: Optional[float] = None,
    aggregation: str | Aggregation = "token-mean",
    clip_ratio_low: Optional[float] = None,
    clip_ratio_high: Optional[float] = None,
    weights: Optional[Tensor] = None,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """PPO clipped surrogate  [PPO Eq. 7; DS-Chat actor_loss_fn], optionally dual-clipped [DualClip]:

        r_t    = exp(log pi(a_t) - log pi_old(a_t))
        L_t    = max(-r_t A_t, -clip(r_t, 1 - eps_low, 1 + eps_high) A_t)
        L_t    = min(L_t, -c A_t)   if A_t < 0 and dual_clip = c > 1   (OpenRLHF PolicyLoss)

    eps_low = clip_ratio_low, eps_high = clip_ratio_high, each clip_ratio when None. A larger eps_high than eps_low
    is DAPO's clip-higher ([DAPO] Sec. 3.1: 0.2 / 0.28), which lets low-probability tokens rise further.
    ``weights`` (detached, e.g. ``off_policy_correction``'s) multiply L_t before the aggregation.
    Returns ``(loss, stats)``; stats (detached scalars):
        clip_fraction       mean_m [ -clip(r) A > -r A ]     (tokens where the clip is active)
        dual_clip_fraction  mean_m [ dual clip active ]      (only with dual_clip)
        approx_kl           mean_m [ (r - 1) - log r ]       (k3 estimate of KL(pi_old || pi) [KL-approx])
        ratio_mean          mean_m [ r ]
    """
    low, high = _clip_range(clip_ratio, clip_ratio_low, clip_ratio_high)
    log_ratio = _zero_pad(logprobs - old_logprobs, mask)
    ratio = torch.exp(log_ratio)
    loss_per_token, stats = _clipped_surrogate(ratio, advantages, mask, low, high, dual_clip)
    if weights is not None:
        loss_per_token = loss_per_token * _zero_pad(weights.detach(), mask)
    loss = _aggregation(aggregation)(loss_per_token, mask)
    stats["approx_kl"] = masked_mean(ratio - 1 - log_ratio, mask)
    stats["ratio_mean"] = masked_mean(ratio, mask)
    return loss, {name: value.detach() for name, value in stats.items()}


def gspo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_ratio_low: float = DEFAULTS.gspo_clip_ratio_low,
    clip_ratio_high: float = DEFAULTS.gspo_clip_ratio_high,
    dual_clip: Optional[float] = None,
    aggregation: str | Aggregation = "seq-mean-token-mean",
    weights: Optional[Tensor] = None,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """GSPO: the importance ratio of a whole sequence, length-normalised, clipped per sequence  [GSPO Sec. 4]:

        s_i    = exp( (1/|y_i|) sum_t log(pi(y_i,t) / pi_old(y_i,t)) )   (the geometric mean of the token ratios)
        s_i,t  = sg[s_i] * pi(y_i,t) / sg[pi(y_i,t)]                       (GSPO-token: value s_i, gradient
                                                                             s_i * grad log pi(y_i,t))
        L_i,t  = max(-s_i,t A_i,t, -clip(s_i,t, 1 - eps_low, 1 + eps_high) A_i,t)
        loss   = (1/G) sum_i (1/|y_i|) sum_t L_i,t                           (seq-mean-token-mean)

    With one advantage per sequence (A_i,t = A_i, as GRPO's) this is GSPO's sequence objective
    (1/G) sum_i max(-s_i A_i, -clip(s_i) A_i) in value and gradient (as the paper notes for GSPO-token); per-token
    advantages are GSPO-token's case (veRL compute_policy_loss_gspo). The clip acts on whole sequences: with one
    advantage per sequence all its tokens are clipped or none. Stats as ``policy_loss`` (clip_fraction over tokens,
    approx_kl of the token ratios, ratio_mean of s_i over tokens).
    """
    log_ratio = _zero_pad(logprobs - old_logprobs, mask)
    sequence_log_ratio = masked_mean(log_ratio, mask, dim=-1).detach().unsqueeze(-1)
    current = _zero_pad(logprobs, mask)
    ratio = _zero_pad(torch.exp(sequence_log_ratio + current - current.detach()), mask)
    loss_per_token, stats = _clipped_surrogate(ratio, advantages, mask, clip_ratio_low, clip_ratio_high, dual_clip)
    if weights is not None:  # as policy_loss's
        loss_per_token = loss_per_token * _zero_pad(weights.detach(), mask)
    loss = _aggregation(aggregation)(loss_per_token, mask)
    stats["approx_kl"] = masked_mean(torch.exp(log_ratio) - 1 - log_ratio, mask)
    stats["ratio_mean"] = masked_mean(ratio, mask)
    return loss, {name: value.detach() for name, value in stats.items()}


def kl_loss(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coef: float,
    kl_estimator: str = "k3",
    aggregation: str | Aggregation = "token-mean",
) -> Tuple[Tensor, Tensor]:
    """The KL to the reference as a loss term instead of a reward penalty  [GRPO Eq. 3; veRL use_kl_loss]:

        L_kl = beta * agg_m( KL_t(pi_theta || pi_ref) )      (gradient through log pi_theta)

    Returns ``(loss, kl)`` with the per-token estimate ``kl`` (B, T), 0 on padding.
    """
    kl = kl_estimate(logprobs, ref_logprobs, kl_estimator, mask)
    return kl_coef * _aggregation(aggregation)(kl, mask), kl


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    value_clip: Optional[float] = DEFAULTS.value_clip,
    aggregation: str | Aggregation = "token-mean",
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Clipped value loss  [DS-Chat critic_loss_fn; PPO2 baselines]:

        V_clip = clip(V, V_old - eps, V_old + eps)
        L_t    = 0.5 * max((V - R)^2, (V_clip - R)^2)          (value_clip=None: 0.5 * (V - R)^2)

    Returns ``(loss, stats)`` with stats ``clip_fraction`` = mean_m[(V_clip - R)^2 > (V - R)^2].
    """
    values, returns = _zero_pad(values, mask), _zero_pad(returns, mask)
    unclipped = (values - returns) ** 2
    if value_clip is None:
        loss_per_token, clip_fraction = unclipped, torch.zeros((), device=values.device)
    else:
        old_values = _zero_pad(old_values, mask)
        values_clipped = old_values + (values - old_values).clamp(-value_clip, value_clip)
        clipped = (values_clipped - returns) ** 2
        loss_per_token = torch.max(unclipped, clipped)
        clip_fraction = masked_mean((clipped > unclipped).to(values.dtype), mask)
    loss = 0.5 * _aggregation(aggregation)(loss_per_token, mask)
    return loss, {"clip_fraction": clip_fraction.detach()}


def entropy_bonus(entropy: Tensor, mask: Tensor, coef: float, aggregation: str | Aggregation = "token-mean") -> Tensor:
    """Entropy regulariser as a term to ADD to the loss:  L_H = -coef * aggregate(H_t)  [PPO Eq. 9].

    Minimising ``loss + L_H`` maximises entropy for coef > 0 (DS-Chat default coef = 0).
    """
    return -coef * _aggregation(aggregation)(entropy, mask)


# --------------------------------------------------------------------------------------------
# EMA and PTX mixing
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def ema_update(ema_params: Iterable[Tensor], params: Iterable[Tensor], decay: float = DEFAULTS.ema_decay) -> None:
    """theta_ema <- decay * theta_ema + (1 - decay) * theta, in place  [DS-Chat moving_average, --enable_ema].

    DS-Chat writes it ``torch.lerp(theta, theta_ema, beta)`` with beta = 0.992.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    for ema_param, param in zip(ema_params, params, strict=True):
        ema_param.lerp_(param.detach().to(ema_param.dtype), 1.0 - decay)


def mix_ptx_loss(rl_loss: Tensor, ptx_loss: Tensor, ptx_coef: float = DEFAULTS.ptx_coef) -> Tensor:
    """PPO-ptx objective  [InstructGPT Eq. 2; DS-Chat --unsup_coef]:  L = L_RL + gamma_ptx * L_ptx.

    ``ptx_loss`` is the language-modelling (next-token cross-entropy) loss on pretraining data;
    InstructGPT's gamma = 27.8 is DS-Chat's default ``unsup_coef``.
    """
    return rl_loss + ptx_coef * ptx_loss

