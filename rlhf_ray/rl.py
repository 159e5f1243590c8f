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
[DS-Chat]       DeepSpeed-Chat, applications/DeepSpeed-Chat/dschat (ppo_trainer.py, main.py).
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
    "reinforce_pp_advantages",
    "aggregate",
    "policy_loss",
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
    group_eps: float = 1e-6
    whiten_eps: float = 1e-8


DEFAULTS = PPODefaults()

KL_ESTIMATORS = ("k1", "k2", "k3")
AGGREGATION_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


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
        z = flat_logits[rows].to(out.dtype) / temperature
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
        z = flat_logits[rows].to(out.dtype) / temperature
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


def reinforce_pp_advantages(
    rewards: Tensor,
    mask: Tensor,
    gamma: float = DEFAULTS.gamma,
    group_size: Optional[int] = None,
    eps: float = DEFAULTS.whiten_eps,
) -> Tensor:
    """REINFORCE++  [REINFORCE++ Sec. 3; OpenRLHF ``reinforce`` / ``reinforce_baseline``]:

        G_t = sum_{j >= t} gamma^(j-t) r_j                        (return-to-go of shaped rewards)
        G_t <- G_t - mean_g(G_0)                                  (only with group_size: group baseline
                                                                   on the sequence return G_0)
        A_t = (G_t - mean_batch(G)) / sqrt(var_batch(G) + eps)    (global whitening over all masked tokens)

    rewards (B, T) per-token (e.g. from ``shape_rewards``), right-padded. Returns (B, T), 0 on padding.
    """
    returns = _zero_pad(discounted_cumsum(_float(_zero_pad(rewards, mask)), gamma), mask)
    if group_size is not None:
        sequence_return = returns[:, 0]
        group_baseline = _groups(sequence_return, group_size).mean(-1, keepdim=True)
        returns = _zero_pad(returns - group_baseline.expand(-1, group_size).reshape(-1, 1), mask)
    return masked_whiten(returns, mask, shift_mean=True, eps=eps)


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def aggregate(loss_per_token: Tensor, mask: Tensor, mode: str = "token-mean") -> Tensor:
    """Reduce a (B, T) per-token loss to a scalar:

        token-mean           loss = sum_{i,t} m l / sum_{i,t} m     (every token weighs the same; OpenRLHF, DAPO)
        seq-mean-token-mean  loss = mean_i [ sum_t m l / sum_t m ]  (every sequence weighs the same; GRPO paper)
        seq-mean-token-sum   loss = mean_i [ sum_t m l ]            (sequence-level sum; veRL option)

    The sequence means run over rows with at least one real token.
    """
    if mode == "token-mean":
        return masked_mean(loss_per_token, mask)
    has_tokens = _count(mask, dim=-1) > 0
    if mode == "seq-mean-token-mean":
        return masked_mean(masked_mean(loss_per_token, mask, dim=-1), has_tokens)
    if mode == "seq-mean-token-sum":
        return masked_mean(masked_sum(loss_per_token, mask, dim=-1), has_tokens)
    raise ValueError(f"unknown aggregation {mode!r}; expected one of {AGGREGATION_MODES}")


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_ratio: float = DEFAULTS.clip_ratio,
    dual_clip: Optional[float] = None,
    aggregation: str = "token-mean",
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """PPO clipped surrogate  [PPO Eq. 7; DS-Chat actor_loss_fn], optionally dual-clipped [DualClip]:

        r_t    = exp(log pi(a_t) - log pi_old(a_t))
        L_t    = max(-r_t A_t, -clip(r_t, 1 - eps, 1 + eps) A_t)
        L_t    = min(L_t, -c A_t)   if A_t < 0 and dual_clip = c > 1   (OpenRLHF PolicyLoss)

    Returns ``(loss, stats)``; stats (detached scalars):
        clip_fraction       mean_m [ -clip(r) A > -r A ]     (tokens where the clip is active)
        dual_clip_fraction  mean_m [ dual clip active ]      (only with dual_clip)
        approx_kl           mean_m [ (r - 1) - log r ]       (k3 estimate of KL(pi_old || pi) [KL-approx])
        ratio_mean          mean_m [ r ]
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    log_ratio = _zero_pad(logprobs - old_logprobs, mask)
    ratio = torch.exp(log_ratio)
    advantages = _zero_pad(advantages, mask)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_ratio, 1 + clip_ratio)
    loss_per_token = torch.max(unclipped, clipped)
    stats = {"clip_fraction": masked_mean((clipped > unclipped).to(ratio.dtype), mask)}
    if dual_clip is not None:
        dual_clipped = torch.min(loss_per_token, -dual_clip * advantages)
        dual_clip_active = (advantages < 0) & (dual_clipped < loss_per_token)
        stats["dual_clip_fraction"] = masked_mean(dual_clip_active.to(ratio.dtype), mask)
        loss_per_token = torch.where(advantages < 0, dual_clipped, loss_per_token)
    loss = aggregate(loss_per_token, mask, aggregation)
    stats["approx_kl"] = masked_mean(ratio - 1 - log_ratio, mask)
    stats["ratio_mean"] = masked_mean(ratio, mask)
    return loss, {name: value.detach() for name, value in stats.items()}


def kl_loss(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coef: float,
    kl_estimator: str = "k3",
    aggregation: str = "token-mean",
) -> Tuple[Tensor, Tensor]:
    """The KL to the reference as a loss term instead of a reward penalty  [GRPO Eq. 3; veRL use_kl_loss]:

        L_kl = beta * agg_m( KL_t(pi_theta || pi_ref) )      (gradient through log pi_theta)

    Returns ``(loss, kl)`` with the per-token estimate ``kl`` (B, T), 0 on padding.
    """
    kl = kl_estimate(logprobs, ref_logprobs, kl_estimator, mask)
    return kl_coef * aggregate(kl, mask, aggregation), kl


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    value_clip: Optional[float] = DEFAULTS.value_clip,
    aggregation: str = "token-mean",
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
    loss = 0.5 * aggregate(loss_per_token, mask, aggregation)
    return loss, {"clip_fraction": clip_fraction.detach()}


def entropy_bonus(entropy: Tensor, mask: Tensor, coef: float, aggregation: str = "token-mean") -> Tensor:
    """Entropy regulariser as a term to ADD to the loss:  L_H = -coef * aggregate(H_t)  [PPO Eq. 9].

    Minimising ``loss + L_H`` maximises entropy for coef > 0 (DS-Chat default coef = 0).
    """
    return -coef * aggregate(entropy, mask, aggregation)


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

