"""Tests of rlhf_ray.rl against independent oracles.

Every oracle below is a naive per-element Python loop over the definition, on Python lists and
`math` (never a call of the function under test). Each function also has at least one small case
worked by hand in a comment, with its numbers asserted.
"""

import ast
import inspect
import math
import statistics

import pytest
import torch

from rlhf_ray import rl

TOL = dict(rtol=1e-9, atol=1e-9)


@pytest.fixture(autouse=True)
def float64_by_default():
    """Oracles are float64 Python math: compare tightly (restored afterwards for other test files)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


# ============================================================================================
# Helpers: right-padded random batches, garbage padding
# ============================================================================================


def lengths_to_mask(lengths, T):
    return torch.tensor([[1.0 if t < n else 0.0 for t in range(T)] for n in lengths])


def random_batch(B=6, T=7, seed=0, lengths=None):
    g = torch.Generator().manual_seed(seed)
    if lengths is None:
        lengths = [T, 1] + torch.randint(1, T + 1, (B - 2,), generator=g).tolist()
    mask = lengths_to_mask(lengths, T)
    x = lambda: torch.randn(B, T, generator=g)  # noqa: E731
    return g, mask, x


def garbage_pad(x, mask, extra=3, value=float("nan")):
    """Write ``value`` on every padding position and append ``extra`` padding columns of it."""
    x = torch.where(mask.bool(), x, torch.full_like(x, value))
    pad = torch.full((*x.shape[:1], extra, *x.shape[2:]), value, dtype=x.dtype)
    return torch.cat([x, pad], dim=1)


def extend_mask(mask, extra=3):
    return torch.cat([mask, torch.zeros(mask.shape[0], extra, dtype=mask.dtype)], dim=1)


def L(t):
    return t.tolist()


def row_lengths(mask):
    """Length of each right-padded row, by scanning (oracle helper)."""
    out = []
    for row in L(mask):
        n = 0
        for m in row:
            if m:
                n += 1
        out.append(n)
    return out


# ============================================================================================
# Oracles (naive loops)
# ============================================================================================


def oracle_logprob(logits, tokens, temperature=1.0):
    out = []
    for b, row in enumerate(L(logits)):
        out_row = []
        for t, z in enumerate(row):
            z = [v / temperature for v in z]
            m = max(z)
            lse = m + math.log(sum(math.exp(v - m) for v in z))
            out_row.append(z[int(tokens[b][t])] - lse)
        out.append(out_row)
    return torch.tensor(out)


def oracle_entropy(logits, temperature=1.0):
    out = []
    for row in L(logits):
        out_row = []
        for z in row:
            z = [v / temperature for v in z]
            m = max(z)
            lse = m + math.log(sum(math.exp(v - m) for v in z))
            out_row.append(-sum(math.exp(v - lse) * (v - lse) for v in z))
        out.append(out_row)
    return torch.tensor(out)


def oracle_kl_scalar(lp, ref, kind):
    if kind == "k1":
        return lp - ref
    if kind == "k2":
        return 0.5 * (ref - lp) ** 2
    return math.exp(ref - lp) - (ref - lp) - 1


def oracle_kl(lp, ref, mask, kind):
    return torch.tensor(
        [[oracle_kl_scalar(a, b, kind) if m else 0.0 for a, b, m in zip(ra, rb, rm)] for ra, rb, rm in zip(L(lp), L(ref), L(mask))]
    )


def oracle_shape_rewards(scores, lp, ref, mask, beta, clip, kind):
    rewards = []
    for b, (ra, rr, rm) in enumerate(zip(L(lp), L(ref), L(mask))):
        last = -1
        for t, m in enumerate(rm):
            if m:
                last = t
        row = []
        for t in range(len(rm)):
            r = 0.0
            if rm[t]:
                r = -beta * oracle_kl_scalar(ra[t], rr[t], kind)
            if t == last:
                s = float(scores[b])
                if clip is not None:
                    s = min(max(s, -clip), clip)
                r += s
            row.append(r)
        rewards.append(row)
    return torch.tensor(rewards)


def oracle_masked_values(x, mask):
    return [v for rx, rm in zip(L(x), L(mask)) for v, m in zip(rx, rm) if m]


def oracle_mean(x, mask):
    vals = oracle_masked_values(x, mask)
    return sum(vals) / len(vals) if vals else 0.0


def oracle_var(x, mask, unbiased=True):
    vals = oracle_masked_values(x, mask)
    mu = sum(vals) / len(vals)
    return sum((v - mu) ** 2 for v in vals) / (len(vals) - 1 if unbiased else len(vals))


def oracle_whiten(x, mask, shift_mean=True, eps=1e-8):
    mu, var = oracle_mean(x, mask), oracle_var(x, mask)
    out = []
    for rx, rm in zip(L(x), L(mask)):
        row = []
        for v, m in zip(rx, rm):
            w = (v - mu) / math.sqrt(var + eps) + (0.0 if shift_mean else mu)
            row.append(w if m else 0.0)
        out.append(row)
    return torch.tensor(out)


def oracle_discounted_cumsum(x, c):
    out = []
    for row in L(x):
        acc, rev = 0.0, []
        for v in reversed(row):
            acc = v + c * acc
            rev.append(acc)
        out.append(rev[::-1])
    return torch.tensor(out)


def oracle_gae(rewards, values, mask, gamma, lam):
    """DS-Chat get_advantages_and_returns, one row and one timestep at a time."""
    advs, rets = [], []
    for rr, rv, n, T in zip(L(rewards), L(values), row_lengths(mask), [mask.shape[1]] * mask.shape[0]):
        adv = [0.0] * T
        last = 0.0
        for t in reversed(range(n)):
            next_v = rv[t + 1] if t + 1 < n else 0.0
            delta = rr[t] + gamma * next_v - rv[t]
            last = delta + gamma * lam * last
            adv[t] = last
        advs.append(adv)
        rets.append([adv[t] + rv[t] if t < n else 0.0 for t in range(T)])
    return torch.tensor(advs), torch.tensor(rets)


def oracle_grpo(scores, n, mask, eps=1e-6, normalize_std=True):
    s = L(scores)
    out = []
    for i, row_mask in enumerate(L(mask)):
        group = s[(i // n) * n : (i // n) * n + n]
        mu = sum(group) / n
        sd = statistics.stdev(group) if n > 1 else 1.0
        mu = mu if n > 1 else 0.0
        a = (s[i] - mu) / (sd + eps) if normalize_std else s[i] - mu
        out.append([a if m else 0.0 for m in row_mask])
    return torch.tensor(out)


def oracle_rloo(scores, n, mask):
    s = L(scores)
    out = []
    for i, row_mask in enumerate(L(mask)):
        start = (i // n) * n
        others = [s[j] for j in range(start, start + n) if j != i]
        a = s[i] - sum(others) / len(others)
        out.append([a if m else 0.0 for m in row_mask])
    return torch.tensor(out)


def oracle_reinforce_pp(rewards, mask, gamma, eps=1e-8):
    returns = []
    for rr, rm in zip(L(rewards), L(mask)):
        acc, row = 0.0, [0.0] * len(rr)
        for t in reversed(range(len(rr))):
            if rm[t]:
                acc = rr[t] + gamma * acc
                row[t] = acc
        returns.append(row)
    return oracle_whiten(torch.tensor(returns), mask, shift_mean=True, eps=eps)


MAX_LEN = 10  # seq-mean-token-sum-norm's constant (generation.max_new_tokens) in these tests


def oracle_aggregate(loss, mask, mode, max_len=MAX_LEN):
    rows = [[v for v, m in zip(rl_, rm) if m] for rl_, rm in zip(L(loss), L(mask))]
    if mode == "token-mean":
        flat = [v for r in rows for v in r]
        return sum(flat) / len(flat)
    rows = [r for r in rows if r]
    if mode == "seq-mean-token-mean":
        return sum(sum(r) / len(r) for r in rows) / len(rows)
    if mode == "seq-mean-token-sum-norm":
        return sum(sum(r) / max_len for r in rows) / len(rows)
    return sum(sum(r) for r in rows) / len(rows)


def oracle_policy_loss_per_token(lp, old, adv, eps, dual_clip):
    out, clipped_flags = [], []
    for ra, ro, rA in zip(L(lp), L(old), L(adv)):
        row, flags = [], []
        for a, o, A in zip(ra, ro, rA):
            r = math.exp(a - o)
            surr1 = -r * A
            surr2 = -min(max(r, 1 - eps), 1 + eps) * A
            v = max(surr1, surr2)
            if dual_clip is not None and A < 0:
                v = min(v, -dual_clip * A)
            row.append(v)
            flags.append(1.0 if surr2 > surr1 else 0.0)
        out.append(row)
        clipped_flags.append(flags)
    return torch.tensor(out), torch.tensor(clipped_flags)


def oracle_value_loss_per_token(v, old, R, eps):
    out = []
    for rv, ro, rR in zip(L(v), L(old), L(R)):
        row = []
        for a, o, ret in zip(rv, ro, rR):
            if eps is None:
                row.append((a - ret) ** 2)
            else:
                vc = min(max(a, o - eps), o + eps)
                row.append(max((a - ret) ** 2, (vc - ret) ** 2))
        out.append(row)
    return torch.tensor(out)


# ============================================================================================
# Defaults, module hygiene
# ============================================================================================


def test_defaults_match_documented_sources():
    d = rl.DEFAULTS
    assert (d.kl_coef, d.clip_ratio, d.value_clip, d.reward_clip, d.gamma, d.lam) == (0.1, 0.2, 0.2, 5.0, 1.0, 0.95)
    assert d.ptx_coef == 27.8 and d.ema_decay == 0.992
    with pytest.raises(Exception):
        d.kl_coef = 0.5  # frozen


def test_module_is_pure_torch_and_has_no_batch_loops():
    tree = ast.parse(inspect.getsource(rl))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    assert imported <= {"torch", "math", "dataclasses", "typing", "__future__"}, imported
    # The only Python loops allowed: token chunks (logprobs/entropy) and parameter lists (EMA).
    allowed = {"logprobs_from_logits", "entropy_from_logits", "ema_update"}
    for fn in [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]:
        loops = [n for n in ast.walk(fn) if isinstance(n, (ast.For, ast.While))]
        assert not loops or fn.name in allowed, fn.name


def test_every_public_function_documents_its_equation():
    for name in rl.__all__:
        obj = getattr(rl, name)
        if callable(obj) and not isinstance(obj, type(rl.DEFAULTS)):
            assert obj.__doc__ and ("=" in obj.__doc__ or "<-" in obj.__doc__), name


# ============================================================================================
# Log-probs and entropy
# ============================================================================================


def test_logprobs_hand_case():
    # logits [0, ln 3] -> softmax [1/4, 3/4]: log p(token 1) = ln 0.75 = -0.287682, log p(0) = ln 0.25 = -1.386294
    # temperature 2: z = [0, ln3/2], p(1) = sqrt3 / (1 + sqrt3) = 0.633975 -> ln = -0.455746
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])
    tokens = torch.tensor([[1, 0]])
    assert torch.allclose(rl.logprobs_from_logits(logits, tokens).double(), torch.tensor([[-0.287682, -1.386294]]), atol=1e-6)
    assert torch.allclose(rl.logprobs_from_logits(logits, tokens, temperature=2.0)[0, 0].double(), torch.tensor(-0.455746), atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_and_entropy_match_loop_oracle(temperature):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, 11, generator=g) * 3
    tokens = torch.randint(0, 11, (3, 5), generator=g)
    for chunk in (1, 4, 4096):  # chunking never changes the result
        lp = rl.logprobs_from_logits(logits, tokens, temperature=temperature, chunk_size=chunk)
        assert torch.allclose(lp.double(), oracle_logprob(logits, tokens, temperature), atol=1e-5)
        ent = rl.entropy_from_logits(logits, temperature=temperature, chunk_size=chunk)
        assert torch.allclose(ent.double(), oracle_entropy(logits, temperature), atol=1e-5)
    # temperature is not ignored
    assert not torch.allclose(rl.logprobs_from_logits(logits, tokens), rl.logprobs_from_logits(logits, tokens, temperature=0.5))


def test_entropy_hand_case():
    # uniform over 4 -> H = ln 4 = 1.386294 ; [0, ln3] -> -(.25 ln .25 + .75 ln .75) = 0.562335
    logits = torch.tensor([[[1.0, 1.0, 1.0, 1.0], [0.0, math.log(3.0), -1e9, -1e9]]])
    assert torch.allclose(rl.entropy_from_logits(logits).double(), torch.tensor([[1.386294, 0.562335]]), atol=1e-6)


def test_logprobs_mask_zeroes_garbage_padding():
    logits = torch.randn(2, 3, 5)
    logits[1, 2] = float("nan")
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    tokens = torch.zeros(2, 3, dtype=torch.long)
    lp = rl.logprobs_from_logits(logits, tokens, mask=mask)
    ent = rl.entropy_from_logits(logits, mask=mask)
    assert torch.isfinite(lp).all() and lp[1, 2] == 0 and ent[1, 2] == 0


# ============================================================================================
# KL estimators
# ============================================================================================


def test_kl_hand_case():
    # pi = 0.5, pi_ref = 0.25: log rho = ln 0.5 = -0.693147
    # k1 = 0.693147, k2 = 0.693147^2 / 2 = 0.240227, k3 = 0.5 - 1 + 0.693147 = 0.193147
    lp, ref = torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]])
    got = [rl.kl_estimate(lp, ref, k).item() for k in ("k1", "k2", "k3")]
    assert got == pytest.approx([0.693147, 0.240227, 0.193147], abs=1e-6)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_matches_loop_oracle(kind):
    g, mask, x = random_batch(seed=2)
    lp, ref = x(), x()
    assert torch.allclose(rl.kl_estimate(lp, ref, kind, mask=mask), oracle_kl(lp, ref, mask, kind), **TOL)


def test_kl_loss_hand_case_and_gradient():
    # Two tokens, one row, the second padded out: pi = 0.5 vs pi_ref = 0.25 -> k3 = 0.193147 (hand case above).
    # beta = 0.04, token-mean over the one real token -> loss = 0.04 * 0.193147 = 0.0077259.
    # d k3 / d log pi = 1 - rho = 1 - 0.5 = 0.5 -> d loss / d log pi = 0.04 * 0.5 = 0.02; 0 on the padded token.
    lp = torch.tensor([[math.log(0.5), -3.0]], requires_grad=True)
    ref, mask = torch.tensor([[math.log(0.25), -1.0]]), torch.tensor([[1.0, 0.0]])
    loss, kl = rl.kl_loss(lp, ref, mask, kl_coef=0.04, kl_estimator="k3")
    assert loss.item() == pytest.approx(0.0077259, abs=1e-7)
    assert kl[0].tolist() == pytest.approx([0.193147, 0.0], abs=1e-6)
    loss.backward()
    assert lp.grad[0].tolist() == pytest.approx([0.02, 0.0], abs=1e-9)
    # k1 and sequence aggregation are passed through: k1 = 0.693147, seq-mean-token-sum of one row = itself.
    assert rl.kl_loss(lp, ref, mask, 1.0, "k1", "seq-mean-token-sum")[0].item() == pytest.approx(0.693147, abs=1e-6)


def test_k3_is_nonnegative_and_estimator_choice_matters():
    g = torch.Generator().manual_seed(3)
    lp, ref = torch.randn(64, 50, generator=g) * 4, torch.randn(64, 50, generator=g) * 4
    assert (rl.kl_estimate(lp, ref, "k3") >= 0).all()
    assert (rl.kl_estimate(lp, ref, "k2") >= 0).all()
    assert (rl.kl_estimate(lp, ref, "k1") < 0).any()
    k = {kind: rl.kl_estimate(lp, ref, kind) for kind in rl.KL_ESTIMATORS}
    assert not torch.allclose(k["k1"], k["k2"]) and not torch.allclose(k["k1"], k["k3"]) and not torch.allclose(k["k2"], k["k3"])
    with pytest.raises(ValueError):
        rl.kl_estimate(lp, ref, "k4")


# ============================================================================================
# Reward shaping
# ============================================================================================


def test_shape_rewards_hand_case():
    # lp = [-1, -2, pad], ref = [-1.5, -1.5, pad] -> k1 = [0.5, -0.5, 0]; beta = 0.1 -> -beta*kl = [-0.05, 0.05, 0]
    # score 7 clipped to 5 on the last real token (t = 1): rewards = [-0.05, 5.05, 0]
    lp, ref = torch.tensor([[-1.0, -2.0, 9.0]]), torch.tensor([[-1.5, -1.5, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    rewards, kl = rl.shape_rewards(torch.tensor([7.0]), lp, ref, mask, kl_coef=0.1, reward_clip=5.0)
    assert torch.allclose(rewards, torch.tensor([[-0.05, 5.05, 0.0]]), **TOL)
    assert torch.allclose(kl, torch.tensor([[0.5, -0.5, 0.0]]), **TOL)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
@pytest.mark.parametrize("clip", [5.0, 0.3, None])
def test_shape_rewards_matches_loop_oracle(kind, clip):
    g, mask, x = random_batch(seed=4, lengths=[7, 1, 4, 0, 6, 3])  # includes an empty row
    lp, ref = x(), x()
    scores = torch.randn(6, generator=g) * 8
    rewards, kl = rl.shape_rewards(scores, lp, ref, mask, kl_coef=0.05, reward_clip=clip, kl_estimator=kind)
    assert torch.allclose(rewards, oracle_shape_rewards(scores, lp, ref, mask, 0.05, clip, kind), **TOL)
    assert torch.allclose(kl, oracle_kl(lp, ref, mask, kind), **TOL)
    assert (rewards[3] == 0).all()  # empty row gets nothing


def test_shape_rewards_options_change_result():
    g, mask, x = random_batch(seed=5)
    lp, ref, scores = x(), x(), torch.full((6,), 9.0)
    base = rl.shape_rewards(scores, lp, ref, mask, 0.1, 5.0, "k1")[0]
    assert not torch.allclose(base, rl.shape_rewards(scores, lp, ref, mask, 0.1, None, "k1")[0])  # reward_clip
    assert not torch.allclose(base, rl.shape_rewards(scores, lp, ref, mask, 0.1, 5.0, "k3")[0])  # estimator
    assert not torch.allclose(base, rl.shape_rewards(scores, lp, ref, mask, 0.2, 5.0, "k1")[0])  # kl_coef


def test_last_token_mask_hand_case():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    assert rl.last_token_mask(mask).tolist() == [[False, True, False], [False, False, True], [False, False, False]]


# ============================================================================================
# KL controllers
# ============================================================================================


def test_kl_controllers_hand_case_and_adaptive_vs_fixed():
    # beta = 0.1, target 6, horizon 10000:
    #   KL = 12 -> e = clip(12/6 - 1, +-0.2) = 0.2,  n = 100 -> beta = 0.1 * (1 + 0.2 * 100/10000) = 0.1002
    #   KL = 3  -> e = clip(-0.5) = -0.2, n = 100 -> beta = 0.1002 * 0.998 = 0.0999996
    #   KL = 6.6-> e = 0.1 (not clipped), n = 1000 -> beta = 0.0999996 * 1.01 = 0.100999596
    adaptive, fixed = rl.AdaptiveKLController(0.1, target=6.0, horizon=10000), rl.FixedKLController(0.1)
    assert adaptive.update(12.0, 100) == pytest.approx(0.1002)
    assert adaptive.update(torch.tensor(3.0), 100) == pytest.approx(0.0999996)
    assert adaptive.update(6.6, 1000) == pytest.approx(0.100999596)
    for kl in (12.0, 3.0, 6.6):
        fixed.update(kl, 100)
    assert fixed.value == 0.1 and adaptive.value != fixed.value


def test_adaptive_kl_matches_loop_oracle_and_state_roundtrip():
    ctl = rl.AdaptiveKLController(0.2, target=6.0, horizon=10000)
    beta = 0.2
    for step, kl in enumerate([0.0, 1.0, 5.9, 6.0, 7.0, 30.0, 100.0]):
        n = 64 * (step + 1)
        err = kl / 6.0 - 1
        err = -0.2 if err < -0.2 else (0.2 if err > 0.2 else err)
        beta = beta * (1 + err * n / 10000)
        assert ctl.update(kl, n) == pytest.approx(beta, rel=1e-12)
    restored = rl.AdaptiveKLController(1.0, target=1.0, horizon=1)
    restored.load_state_dict(ctl.state_dict())
    assert (restored.value, restored.target, restored.horizon) == (ctl.value, ctl.target, ctl.horizon)
    assert restored.update(9.0, 10) == ctl.update(9.0, 10)
    fixed = rl.FixedKLController(0.3)
    other = rl.FixedKLController()
    other.load_state_dict(fixed.state_dict())
    assert other.value == 0.3


# ============================================================================================
# Masked statistics
# ============================================================================================


def test_masked_stats_hand_case():
    # x = [1, 2, 3 | pad 100]: mean 2, unbiased var ((1 + 0 + 1) / 2) = 1, biased 2/3
    # whiten: [-1, 0, 1, 0] (shift_mean) ; [1, 2, 3, 0] (shift_mean=False: mean added back)
    x, mask = torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1, 1, 1, 0]])
    assert rl.masked_mean(x, mask).item() == pytest.approx(2.0)
    assert rl.masked_var(x, mask).item() == pytest.approx(1.0)
    assert rl.masked_var(x, mask, unbiased=False).item() == pytest.approx(2 / 3)
    assert torch.allclose(rl.masked_whiten(x, mask), torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-7)
    assert torch.allclose(rl.masked_whiten(x, mask, shift_mean=False), torch.tensor([[1.0, 2.0, 3.0, 0.0]]), atol=1e-7)


def test_masked_stats_match_loop_oracle():
    g, mask, x = random_batch(seed=6)
    v = x() * 3 + 1
    assert rl.masked_mean(v, mask).item() == pytest.approx(oracle_mean(v, mask), rel=1e-12)
    assert rl.masked_var(v, mask).item() == pytest.approx(oracle_var(v, mask), rel=1e-12)
    assert rl.masked_var(v, mask, unbiased=False).item() == pytest.approx(oracle_var(v, mask, False), rel=1e-12)
    for shift in (True, False):
        assert torch.allclose(rl.masked_whiten(v, mask, shift_mean=shift), oracle_whiten(v, mask, shift), **TOL)
    # per-row mean / var
    row_means = rl.masked_mean(v, mask, dim=-1)
    row_vars = rl.masked_var(v, mask, dim=-1, unbiased=False)
    for b in range(v.shape[0]):
        assert row_means[b].item() == pytest.approx(oracle_mean(v[b : b + 1], mask[b : b + 1]), rel=1e-12)
        assert row_vars[b].item() == pytest.approx(oracle_var(v[b : b + 1], mask[b : b + 1], False), rel=1e-12, abs=1e-12)


def test_masked_stats_options_change_result():
    g, mask, x = random_batch(seed=7)
    v = x() + 5.0
    assert not torch.allclose(rl.masked_whiten(v, mask), rl.masked_whiten(v, mask, shift_mean=False))
    assert rl.masked_var(v, mask).item() != pytest.approx(rl.masked_var(v, mask, unbiased=False).item())


def test_masked_mean_of_empty_mask_is_zero():
    assert rl.masked_mean(torch.ones(2, 3), torch.zeros(2, 3)).item() == 0.0


# ============================================================================================
# Discounted cumulative sum (the vectorised recurrence behind GAE and REINFORCE++)
# ============================================================================================


@pytest.mark.parametrize("T", [1, 5, 31, 32, 33, 100, 1100])
@pytest.mark.parametrize("c", [0.0, 0.5, 0.95, 1.0])
def test_discounted_cumsum_matches_reverse_loop(T, c):
    x = torch.randn(3, T, generator=torch.Generator().manual_seed(T))
    assert torch.allclose(rl.discounted_cumsum(x, c), oracle_discounted_cumsum(x, c), rtol=1e-10, atol=1e-10)
    assert torch.allclose(rl.discounted_cumsum(x, c, block_size=4), oracle_discounted_cumsum(x, c), rtol=1e-10, atol=1e-10)


def test_discounted_cumsum_hand_case_and_float32_stability():
    # x = [1, 2, 3], c = 0.5: y2 = 3, y1 = 2 + 1.5 = 3.5, y0 = 1 + 1.75 = 2.75
    assert rl.discounted_cumsum(torch.tensor([[1.0, 2.0, 3.0]]), 0.5).tolist() == [[2.75, 3.5, 3.0]]
    # long float32 sequence: no c^-t blow-up
    x = torch.randn(2, 4096, dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    y = rl.discounted_cumsum(x, 0.95)
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    assert torch.allclose(y.double(), oracle_discounted_cumsum(x.double(), 0.95), atol=1e-4)


# ============================================================================================
# GAE
# ============================================================================================


def test_gae_hand_case():
    # r = [0, 0, 1], V = [0.5, 0.6, 0.7], gamma = 1, lam = 0.5, then 2 padding steps (garbage V)
    # delta = [0 + 0.6 - 0.5, 0 + 0.7 - 0.6, 1 + 0 - 0.7] = [0.1, 0.1, 0.3]
    # A2 = 0.3, A1 = 0.1 + 0.5*0.3 = 0.25, A0 = 0.1 + 0.5*0.25 = 0.225 ; R = A + V = [0.725, 0.85, 1.0]
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0]])
    values = torch.tensor([[0.5, 0.6, 0.7, 42.0, float("nan")]])
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    adv, ret = rl.gae_advantages(rewards, values, mask, gamma=1.0, lam=0.5)
    assert torch.allclose(adv, torch.tensor([[0.225, 0.25, 0.3, 0.0, 0.0]]), **TOL)
    assert torch.allclose(ret, torch.tensor([[0.725, 0.85, 1.0, 0.0, 0.0]]), **TOL)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.95), (0.9, 0.0), (0.5, 1.0)])
def test_gae_matches_loop_oracle(gamma, lam):
    g, mask, x = random_batch(B=7, T=9, seed=8, lengths=[9, 1, 5, 0, 8, 3, 2])
    rewards, values = x(), x()
    adv, ret = rl.gae_advantages(rewards, values, mask, gamma, lam)
    oadv, oret = oracle_gae(rewards, values, mask, gamma, lam)
    assert torch.allclose(adv, oadv, **TOL) and torch.allclose(ret, oret, **TOL)


def test_gae_lambda1_gamma1_is_reward_to_go_minus_value():
    g, mask, x = random_batch(seed=9)
    rewards, values = x(), x()
    adv, ret = rl.gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    for b, n in enumerate(row_lengths(mask)):
        for t in range(n):
            reward_to_go = sum(rewards[b, j].item() for j in range(t, n))
            assert adv[b, t].item() == pytest.approx(reward_to_go - values[b, t].item(), abs=1e-10)
            assert ret[b, t].item() == pytest.approx(reward_to_go, abs=1e-10)


def test_gae_options_change_result():
    g, mask, x = random_batch(seed=10)
    rewards, values = x(), x()
    base = rl.gae_advantages(rewards, values, mask, 1.0, 0.95)[0]
    assert not torch.allclose(base, rl.gae_advantages(rewards, values, mask, 0.9, 0.95)[0])
    assert not torch.allclose(base, rl.gae_advantages(rewards, values, mask, 1.0, 0.5)[0])


def test_gae_rows_are_independent_of_batch_padding():
    # each row computed alone, truncated to its own length, equals the row in the padded batch
    g, mask, x = random_batch(seed=11)
    rewards, values = x(), x()
    adv, ret = rl.gae_advantages(rewards, values, mask, 1.0, 0.95)
    for b, n in enumerate(row_lengths(mask)):
        a1, r1 = rl.gae_advantages(rewards[b : b + 1, :n], values[b : b + 1, :n], mask[b : b + 1, :n], 1.0, 0.95)
        assert torch.allclose(adv[b, :n], a1[0], **TOL) and torch.allclose(ret[b, :n], r1[0], **TOL)


# ============================================================================================
# GRPO / RLOO / REINFORCE++
# ============================================================================================


def test_grpo_hand_case():
    # group [1, 2, 3]: mean 2, unbiased std 1 -> [-1, 0, 1] ; group [1, 3, 5]: mean 3, std 2 -> [-1, 0, 1]
    # normalize_std=False on [1, 3, 5] -> [-2, 0, 2]
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1], [1, 0], [1, 1]])
    adv = rl.grpo_advantages(torch.tensor([1.0, 2.0, 3.0, 1.0, 3.0, 5.0]), 3, mask, eps=0.0)
    assert torch.allclose(adv, torch.tensor([[-1.0, -1], [0, 0], [1, 1], [-1, -1], [0, 0], [1, 1]]), **TOL)
    adv = rl.grpo_advantages(torch.tensor([1.0, 3.0, 5.0]), 3, mask[:3], normalize_std=False)
    assert torch.allclose(adv, torch.tensor([[-2.0, -2], [0, 0], [2, 2]]), **TOL)


@pytest.mark.parametrize("normalize_std", [True, False])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_grpo_matches_loop_oracle(normalize_std, n):
    g, mask, x = random_batch(B=8, T=5, seed=12)
    scores = torch.randn(8, generator=g)
    adv = rl.grpo_advantages(scores, n, mask, normalize_std=normalize_std)
    assert torch.allclose(adv, oracle_grpo(scores, n, mask, 1e-6, normalize_std), **TOL)


def test_grpo_group_sums_to_zero_and_normalize_std_matters():
    g, mask, x = random_batch(B=12, T=4, seed=13)
    scores = torch.randn(12, generator=g) * 5
    for normalize in (True, False):
        seq_adv = rl.grpo_advantages(scores, 4, torch.ones(12, 1), normalize_std=normalize)[:, 0]
        assert torch.allclose(seq_adv.view(3, 4).sum(-1), torch.zeros(3), atol=1e-10)
    assert not torch.allclose(rl.grpo_advantages(scores, 4, mask), rl.grpo_advantages(scores, 4, mask, normalize_std=False))
    with pytest.raises(ValueError):
        rl.grpo_advantages(scores, 5, mask)


def test_rloo_hand_case_and_oracle():
    # [1, 2, 3]: baselines [(2+3)/2, (1+3)/2, (1+2)/2] = [2.5, 2, 1.5] -> A = [-1.5, 0, 1.5]
    adv = rl.rloo_advantages(torch.tensor([1.0, 2.0, 3.0]), 3, torch.ones(3, 2))
    assert torch.allclose(adv, torch.tensor([[-1.5, -1.5], [0.0, 0.0], [1.5, 1.5]]), **TOL)
    g, mask, x = random_batch(B=8, T=5, seed=14)
    scores = torch.randn(8, generator=g)
    for n in (2, 4, 8):
        assert torch.allclose(rl.rloo_advantages(scores, n, mask), oracle_rloo(scores, n, mask), **TOL)
    with pytest.raises(ValueError):
        rl.rloo_advantages(scores, 1, mask)


def test_reinforce_pp_hand_case():
    # T = 1, G = [1, 3, 10, 14], mean 7, unbiased var (36 + 16 + 9 + 49) / 3 = 110/3 -> (G - 7) / 6.055301
    rewards, mask = torch.tensor([[1.0], [3.0], [10.0], [14.0]]), torch.ones(4, 1)
    adv = rl.reinforce_pp_advantages(rewards, mask, gamma=1.0)
    assert torch.allclose(adv[:, 0], torch.tensor([-6.0, -4.0, 3.0, 7.0]) / math.sqrt(110 / 3), atol=1e-6)


def test_group_mean_baseline_hand_case():
    # groups of 2: [1, 3] mean 2, [10, 14] mean 12
    assert rl.group_mean_baseline(torch.tensor([1.0, 3.0, 10.0, 14.0]), 2).tolist() == [-1.0, 1.0, -2.0, 2.0]
    with pytest.raises(ValueError):
        rl.group_mean_baseline(torch.ones(3), 2)


def test_reinforce_pp_baseline_subtracts_the_group_mean_score_before_the_kl_return():
    # OpenRLHF reinforce_baseline: scores [1, 3 | 10, 14] -> centred [-1, 1, -2, 2] on each row's last token,
    # KL reward -0.5 * k1 per token (k1 = logprob - ref), returns to go (gamma 1), then whitening over all 7 tokens.
    scores = torch.tensor([1.0, 3.0, 10.0, 14.0])
    logprobs = torch.tensor([[0.2, 0.4], [0.2, 0.0], [0.2, 0.0], [0.4, 9.9]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
    rewards, _ = rl.shape_rewards(rl.group_mean_baseline(scores, 2), logprobs, torch.zeros(4, 2), mask,
                                  kl_coef=0.5, reward_clip=None)
    # rewards [[-0.1, -0.2 - 1], [-0.1, 1], [-0.1, -2], [-0.2 + 2]] -> returns to go:
    returns = [-1.3, -1.2, 0.9, 1.0, -2.1, -2.0, 1.8]
    mean = sum(returns) / 7
    std = math.sqrt(sum((g - mean) ** 2 for g in returns) / 6 + 1e-8)
    adv = rl.reinforce_pp_advantages(rewards, mask, gamma=1.0)
    assert adv[mask.bool()].tolist() == pytest.approx([(g - mean) / std for g in returns], abs=1e-6)
    # the former variant subtracted the group mean of the KL-shaped sequence return G_0 from the return:
    # raw returns [[0.7, 0.8], [2.9, 3.0], [9.9, 10.0], [13.8]], G_0 group means 1.8 and 11.85 -> other values
    former = torch.tensor([[-1.1, -1.0], [1.1, 1.2], [-1.95, -1.85], [1.95, 0.0]])
    assert not torch.allclose(adv, rl.masked_whiten(former, mask), atol=1e-3)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp_matches_loop_oracle(gamma):
    g, mask, x = random_batch(B=6, T=7, seed=15)
    rewards = x()
    adv = rl.reinforce_pp_advantages(rewards, mask, gamma)
    assert torch.allclose(adv, oracle_reinforce_pp(rewards, mask, gamma), **TOL)
    assert rl.masked_mean(adv, mask).abs().item() < 1e-10  # globally whitened


def test_reinforce_pp_options_change_result():
    g, mask, x = random_batch(B=6, T=7, seed=16)
    rewards = x()
    base = rl.reinforce_pp_advantages(rewards, mask, 1.0)
    assert not torch.allclose(base, rl.reinforce_pp_advantages(rewards, mask, 0.5))


def test_kl_penalty_per_token_or_as_return_to_go_hand_case():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, float("nan")]])  # padding is never read
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    per_token = rl.kl_penalty_for_advantages(kl, mask, 0.5, "per_token")
    assert torch.allclose(per_token, torch.tensor([[0.05, 0.1, 0.15], [0.2, 0.25, 0.0]]), atol=1e-7)
    # 0.5 x [[0.1+0.2+0.3, 0.2+0.3, 0.3], [0.4+0.5, 0.5, 0]]
    to_go = rl.kl_penalty_for_advantages(kl, mask, 0.5, "return_to_go")
    assert torch.allclose(to_go, torch.tensor([[0.3, 0.25, 0.15], [0.45, 0.25, 0.0]]), atol=1e-7)
    with pytest.raises(ValueError, match="unknown KL reward shape"):
        rl.kl_penalty_for_advantages(kl, mask, 0.5, "per_sequence")


def test_groups_with_signal_hand_case():
    # groups of 2: [1, 1] tied, [0, 1] signal, [2, 2] tied, [nan, nan] kept (the non-finite filter names it later)
    scores = torch.tensor([1.0, 1.0, 0.0, 1.0, 2.0, 2.0, float("nan"), float("nan")])
    assert rl.groups_with_signal(scores, 2).tolist() == [False, True, False, True]
    assert rl.groups_with_signal(torch.tensor([0.5, 0.5, 0.5]), 3).tolist() == [False]


def test_overlong_penalty_hand_case():
    # DAPO Eq. 13, L_max 16, L_cache 4: free up to 12 tokens, then linear to -factor at 16
    lengths = torch.tensor([3, 12, 13, 14, 16])
    assert rl.overlong_penalty(lengths, 16, 4, factor=0.5).tolist() == [0.0, 0.0, -0.125, -0.25, -0.5]
    assert rl.overlong_penalty(lengths, 16, 16).tolist() == pytest.approx([-3 / 16, -12 / 16, -13 / 16, -14 / 16, -1])
    for bad in (0, 17):
        with pytest.raises(ValueError, match="overlong buffer"):
            rl.overlong_penalty(lengths, 16, bad)


# ============================================================================================
# Losses
# ============================================================================================


def test_aggregate_hand_case_and_modes_differ():
    # loss [[1, 2, 3], [4, pad, pad]]:
    #   token-mean = 10 / 4 = 2.5 ; seq-mean-token-mean = (2 + 4) / 2 = 3 ; seq-mean-token-sum = (6 + 4) / 2 = 5
    #   seq-mean-token-sum-norm, max_len 4 (Dr. GRPO) = (6 + 4) / (2 * 4) = 1.25
    loss, mask = torch.tensor([[1.0, 2.0, 3.0], [4.0, 99.0, float("nan")]]), torch.tensor([[1, 1, 1], [1, 0, 0]])
    got = [rl.aggregate(loss, mask, m, max_len=4).item() for m in rl.AGGREGATION_MODES]
    assert got == pytest.approx([2.5, 3.0, 5.0, 1.25])
    with pytest.raises(ValueError, match="max_len"):
        rl.aggregate(loss, mask, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError):
        rl.aggregate(loss, mask, "sum")


def test_aggregate_matches_loop_oracle():
    g, mask, x = random_batch(B=6, T=7, seed=17, lengths=[7, 1, 0, 4, 6, 2])
    loss = x()
    for mode in rl.AGGREGATION_MODES:
        got = rl.aggregate(loss, mask, mode, max_len=MAX_LEN).item()
        assert got == pytest.approx(oracle_aggregate(loss, mask, mode), rel=1e-12)


def test_policy_loss_hand_case():
    # token 0: r = 1.5, A = +1: max(-1.5, -1.2) = -1.2 (clipped)
    # token 1: r = 0.5, A = -2: max(1.0, 1.6) = 1.6 (clipped)
    # token 2: r = 4,   A = -1: max(4, 1.2) = 4 ; with dual clip c = 3: min(4, 3) = 3
    # token-mean: (-1.2 + 1.6 + 4) / 3 = 1.466667 ; dual: (-1.2 + 1.6 + 3) / 3 = 1.133333
    lp = torch.log(torch.tensor([[1.5, 0.5, 4.0]]))
    old, adv, mask = torch.zeros(1, 3), torch.tensor([[1.0, -2.0, -1.0]]), torch.ones(1, 3)
    loss, stats = rl.policy_loss(lp, old, adv, mask, clip_ratio=0.2)
    assert loss.item() == pytest.approx(4.4 / 3) and stats["clip_fraction"].item() == pytest.approx(2 / 3)
    loss, stats = rl.policy_loss(lp, old, adv, mask, clip_ratio=0.2, dual_clip=3.0)
    assert loss.item() == pytest.approx(3.4 / 3) and stats["dual_clip_fraction"].item() == pytest.approx(1 / 3)
    # approx_kl = mean((r - 1) - ln r) = (0.5 - ln1.5 + (-0.5) - ln0.5 + 3 - ln4) / 3
    expected_kl = (0.5 - math.log(1.5) - 0.5 - math.log(0.5) + 3 - math.log(4.0)) / 3
    assert stats["approx_kl"].item() == pytest.approx(expected_kl)


@pytest.mark.parametrize("dual_clip", [None, 2.0])
@pytest.mark.parametrize("mode", list(rl.AGGREGATION_MODES))
def test_policy_loss_matches_loop_oracle(dual_clip, mode):
    g, mask, x = random_batch(B=6, T=7, seed=18)
    lp, old, adv = x() * 0.5, x() * 0.5, x()
    loss, stats = rl.policy_loss(lp, old, adv, mask, clip_ratio=0.2, dual_clip=dual_clip,
                                 aggregation=rl.Aggregation(mode, max_len=MAX_LEN))
    per_token, clipped = oracle_policy_loss_per_token(lp, old, adv, 0.2, dual_clip)
    assert loss.item() == pytest.approx(oracle_aggregate(per_token, mask, mode), rel=1e-10)
    assert stats["clip_fraction"].item() == pytest.approx(oracle_mean(clipped, mask), rel=1e-12)
    kl = [math.exp(a - o) - 1 - (a - o) for ra, ro, rm in zip(L(lp), L(old), L(mask)) for a, o, m in zip(ra, ro, rm) if m]
    assert stats["approx_kl"].item() == pytest.approx(sum(kl) / len(kl), rel=1e-10)


def test_policy_loss_equals_unclipped_inside_trust_region():
    g, mask, x = random_batch(seed=19)
    old = x()
    lp = old + (torch.rand(old.shape, generator=g) * 0.3 - 0.15)  # log r in (-0.15, 0.15): r inside (0.86, 1.17) c (0.8, 1.2)
    adv = x()
    loss, stats = rl.policy_loss(lp, old, adv, mask, clip_ratio=0.2, dual_clip=3.0)
    assert loss.item() == pytest.approx(rl.masked_mean(-torch.exp(lp - old) * adv, mask).item(), rel=1e-12)
    assert stats["clip_fraction"].item() == 0.0 and stats["approx_kl"].item() > 0


def test_dual_clip_bounds_loss_for_negative_advantages():
    g = torch.Generator().manual_seed(20)
    n, c = 16, 3.0
    lp, old = torch.randn(1, n, generator=g) * 3, torch.zeros(1, n)
    adv = -torch.rand(1, n, generator=g) - 0.1
    for i in range(n):  # one token at a time: the aggregated loss is that token's loss
        one = torch.zeros(1, n)
        one[0, i] = 1
        bounded = rl.policy_loss(lp, old, adv, one, dual_clip=c)[0].item()
        free = rl.policy_loss(lp, old, adv, one)[0].item()
        assert bounded <= -c * adv[0, i].item() + 1e-12
        assert bounded == pytest.approx(min(free, -c * adv[0, i].item()))
    # dual clip never touches positive advantages
    assert rl.policy_loss(lp, old, -adv, torch.ones(1, n), dual_clip=c)[0] == rl.policy_loss(lp, old, -adv, torch.ones(1, n))[0]


def test_policy_loss_options_change_result():
    g, mask, x = random_batch(B=6, T=7, seed=21, lengths=[7, 1, 3, 5, 2, 6])
    lp, old, adv = x() * 2, x() * 2, x()
    losses = {m: rl.policy_loss(lp, old, adv, mask, aggregation=rl.Aggregation(m, max_len=MAX_LEN))[0].item()
              for m in rl.AGGREGATION_MODES}
    assert len({round(v, 9) for v in losses.values()}) == 4
    base = rl.policy_loss(lp, old, adv, mask)[0]
    assert base != rl.policy_loss(lp, old, adv, mask, dual_clip=1.5)[0]
    assert base != rl.policy_loss(lp, old, adv, mask, clip_ratio=0.1)[0]
    with pytest.raises(ValueError):
        rl.policy_loss(lp, old, adv, mask, dual_clip=0.9)


def test_policy_loss_gradient_flows_only_through_logprobs():
    g, mask, x = random_batch(seed=22)
    lp = x().requires_grad_(True)
    loss, stats = rl.policy_loss(lp, x(), x(), mask)
    loss.backward()
    assert lp.grad is not None and (lp.grad[mask == 0] == 0).all()
    assert all(not v.requires_grad for v in stats.values())


def test_clip_higher_hand_case():
    # r = [1.25, 0.75, 1.35], A = [+1, -1, +1]
    # symmetric eps 0.2:      max(-1.25, -1.2) = -1.2 ; max(0.75, 0.8) = 0.8 ; max(-1.35, -1.2) = -1.2   -> mean -1.6 / 3
    # clip-higher 0.2 / 0.28: max(-1.25, -1.25) = -1.25 (not clipped) ; 0.8 ; max(-1.35, -1.28) = -1.28 -> -1.73 / 3
    # low 0.1, high = clip_ratio 0.2: -1.2 ; max(0.75, 0.9) = 0.9 ; -1.2                                -> -1.5 / 3
    lp = torch.log(torch.tensor([[1.25, 0.75, 1.35]]))
    old, adv, mask = torch.zeros(1, 3), torch.tensor([[1.0, -1.0, 1.0]]), torch.ones(1, 3)
    loss, stats = rl.policy_loss(lp, old, adv, mask, clip_ratio=0.2)
    assert loss.item() == pytest.approx(-1.6 / 3) and stats["clip_fraction"].item() == pytest.approx(1.0)
    loss, stats = rl.policy_loss(lp, old, adv, mask, clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28)
    assert loss.item() == pytest.approx(-1.73 / 3) and stats["clip_fraction"].item() == pytest.approx(2 / 3)
    loss, _ = rl.policy_loss(lp, old, adv, mask, clip_ratio=0.2, clip_ratio_low=0.1)
    assert loss.item() == pytest.approx(-1.5 / 3)
    # dual clip still bounds a negative advantage with clip-higher: r = 4, A = -1 -> max(4, 1.28) = 4 -> min(4, 3) = 3
    one = torch.log(torch.tensor([[4.0]]))
    loss, stats = rl.policy_loss(one, torch.zeros(1, 1), -torch.ones(1, 1), torch.ones(1, 1), clip_ratio_high=0.28,
                                 dual_clip=3.0)
    assert loss.item() == pytest.approx(3.0) and stats["dual_clip_fraction"].item() == 1.0
    with pytest.raises(ValueError, match="clip ratios"):
        rl.policy_loss(lp, old, adv, mask, clip_ratio_low=1.0)


def test_aggregation_over_a_whole_mini_batch_hand_case():
    """Two micro-batches of one mini-batch: [[1, 2, 3]] (3 tokens) and [[4, pad, pad], [pad, pad, pad]] (1 token, one
    empty row). Each divides its own sum by N / 2 (N counted over both, 2 micro-batches); their mean is then the loss of
    the whole mini-batch at once:
        token-mean               N = 4 tokens:    6 / 2 = 3, 4 / 2 = 2          -> 2.5  = 10 / 4   (their own means: 3)
        seq-mean-token-mean      N = 2 sequences: 2 / 1, 4 / 1                  -> 3    = (2 + 4) / 2
        seq-mean-token-sum       N = 2:           6 / 1, 4 / 1                  -> 5    = (6 + 4) / 2
        seq-mean-token-sum-norm  N = 2, max_len 4: 6 / 4, 4 / 4                 -> 1.25 = 10 / (2 * 4)"""
    first, first_mask = torch.tensor([[1.0, 2.0, 3.0]]), torch.ones(1, 3)
    second, second_mask = torch.tensor([[4.0, 9.0, 9.0], [9.0, 9.0, 9.0]]), torch.tensor([[1.0, 0, 0], [0, 0, 0]])
    expected = {"token-mean": 2.5, "seq-mean-token-mean": 3.0, "seq-mean-token-sum": 5.0, "seq-mean-token-sum-norm": 1.25}
    assert set(expected) == set(rl.AGGREGATION_MODES)
    for mode, value in expected.items():
        n = int(rl.aggregation_units(first_mask, mode) + rl.aggregation_units(second_mask, mode))
        assert n == (4 if mode == "token-mean" else 2), mode
        agg = rl.Aggregation(mode, units=n / 2, max_len=4)
        assert (agg(first, first_mask) + agg(second, second_mask)).item() / 2 == pytest.approx(value), mode
    # Each micro-batch on its own (the old token-mean): (6 / 3 + 4 / 1) / 2 = 3, not 2.5.
    assert (rl.aggregate(first, first_mask) + rl.aggregate(second, second_mask)).item() / 2 == pytest.approx(3.0)


def test_dr_grpo_advantages_hand_case():
    """ppo.advantage_estimator dr_grpo: GRPO's group advantage without the std division (Dr. GRPO Sec. 3.2).
    Groups [1, 2, 3] (std 1) and [1, 3, 5] (std 2): grpo -> [-1, 0, 1] twice; dr_grpo -> [-1, 0, 1], [-2, 0, 2]."""
    from rlhf_ray.config import load_config
    from rlhf_ray.experience import compute_advantages

    scores, mask = torch.tensor([1.0, 2.0, 3.0, 1.0, 3.0, 5.0]), torch.tensor([[1.0, 1], [1, 0], [1, 1]] * 2)
    zeros = torch.zeros(6, 2)

    def advantages(estimator: str) -> torch.Tensor:
        p = load_config(None, {"ppo.advantage_estimator": estimator, "generation.n_samples_per_prompt": 3}).ppo
        return compute_advantages(p, 0.0, scores, zeros, zeros, mask, 3).advantages

    expected_grpo = torch.tensor([-1.0, 0, 1, -1, 0, 1])[:, None] * mask
    expected_dr = torch.tensor([-1.0, 0, 1, -2, 0, 2])[:, None] * mask
    assert torch.allclose(advantages("grpo"), expected_grpo, atol=1e-5)
    assert torch.allclose(advantages("dr_grpo"), expected_dr, atol=1e-12)


def test_gspo_loss_hand_case():
    """Two sequences, clip range 0.1 / 0.2 (and then the paper's 3e-4 / 4e-4):
        seq 0: log r = [0.1, 0.3]         -> s_0 = e^0.2  = 1.221403, A = +1: clipped to 1.2      -> L_0 = -1.2
        seq 1: log r = [-0.2, 0.0, -0.1]  -> s_1 = e^-0.1 = 0.904837, A = -2: inside [0.9, 1.2]   -> L_1 = 1.809675
        seq-mean-token-mean: (-1.2 + 1.809675) / 2 = 0.304837 ; clipped tokens 2 of 5
        gradient: seq 0 clipped -> 0 ; seq 1: d/d log pi_t of -A s_1 / 2 = 2 * s_1 / 3 / 2 = 0.301612 per token
        paper's range: s_0 -> 1.0004, L_0 = -1.0004 ; s_1 -> 0.9997 (clipped for A < 0), L_1 = 1.9994 -> 0.4995"""
    old = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 1, 0], [1, 1, 1]])
    lp = torch.tensor([[0.1, 0.3, float("nan")], [-0.2, 0.0, -0.1]], requires_grad=True)
    adv = torch.tensor([[1.0, 1.0, 0.0], [-2.0, -2.0, -2.0]])
    loss, stats = rl.gspo_loss(lp, old, adv, mask, clip_ratio_low=0.1, clip_ratio_high=0.2)
    assert loss.item() == pytest.approx((-1.2 + 2 * math.exp(-0.1)) / 2)
    assert stats["clip_fraction"].item() == pytest.approx(2 / 5)
    assert stats["ratio_mean"].item() == pytest.approx((2 * math.exp(0.2) + 3 * math.exp(-0.1)) / 5)
    loss.backward()
    expected_grad = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]) * math.exp(-0.1) / 3
    assert torch.allclose(lp.grad, expected_grad, atol=1e-7)
    loss, _ = rl.gspo_loss(lp, old, adv, mask)  # the paper's 3e-4 / 4e-4 by default
    assert loss.item() == pytest.approx((-1.0004 + 2 * 0.9997) / 2)
    # Token-level PPO on the same tensors clips token by token: another loss.
    assert rl.policy_loss(lp, old, adv, mask, clip_ratio_low=0.1, clip_ratio_high=0.2,
                          aggregation="seq-mean-token-mean")[0].item() != pytest.approx((-1.2 + 2 * math.exp(-0.1)) / 2)


def test_value_loss_hand_case():
    # V = 1.0, V_old = 0.5, R = 2.0, eps = 0.2: V_clip = 0.7
    # clipped: 0.5 * max((1 - 2)^2, (0.7 - 2)^2) = 0.5 * 1.69 = 0.845 ; unclipped (value_clip=None): 0.5 * 1 = 0.5
    v, old, R, mask = torch.tensor([[1.0, 7.0]]), torch.tensor([[0.5, 7.0]]), torch.tensor([[2.0, 7.0]]), torch.tensor([[1, 0]])
    loss, stats = rl.value_loss(v, old, R, mask, value_clip=0.2)
    assert loss.item() == pytest.approx(0.845) and stats["clip_fraction"].item() == 1.0
    assert rl.value_loss(v, old, R, mask, value_clip=None)[0].item() == pytest.approx(0.5)


@pytest.mark.parametrize("value_clip", [0.2, None])
@pytest.mark.parametrize("mode", list(rl.AGGREGATION_MODES))
def test_value_loss_matches_loop_oracle(value_clip, mode):
    g, mask, x = random_batch(B=6, T=7, seed=23)
    v, old, R = x(), x(), x()
    loss, _ = rl.value_loss(v, old, R, mask, value_clip=value_clip, aggregation=rl.Aggregation(mode, max_len=MAX_LEN))
    assert loss.item() == pytest.approx(0.5 * oracle_aggregate(oracle_value_loss_per_token(v, old, R, value_clip), mask, mode), rel=1e-10)


def test_value_clip_option_changes_result():
    g, mask, x = random_batch(seed=24)
    v, old, R = x(), x(), x()
    assert rl.value_loss(v, old, R, mask, 0.2)[0] != rl.value_loss(v, old, R, mask, None)[0]


def test_entropy_bonus_hand_case():
    # H = [1, 3, pad]: token-mean 2, coef 0.01 -> loss term -0.02 ; coef 0 -> 0
    H, mask = torch.tensor([[1.0, 3.0, 50.0]]), torch.tensor([[1, 1, 0]])
    assert rl.entropy_bonus(H, mask, 0.01).item() == pytest.approx(-0.02)
    assert rl.entropy_bonus(H, mask, 0.0).item() == 0.0
    g, m, x = random_batch(seed=25)
    e = x().abs()
    assert rl.entropy_bonus(e, m, 0.1).item() == pytest.approx(-0.1 * oracle_mean(e, m), rel=1e-12)


# ============================================================================================
# EMA and PTX
# ============================================================================================


def test_ema_hand_case_and_oracle():
    # ema 0, param 1: decay 0.9 -> 0.1 ; again -> 0.9*0.1 + 0.1 = 0.19
    ema = [torch.zeros(2)]
    rl.ema_update(ema, [torch.ones(2)], decay=0.9)
    rl.ema_update(ema, [torch.ones(2)], decay=0.9)
    assert torch.allclose(ema[0], torch.full((2,), 0.19), **TOL)
    g = torch.Generator().manual_seed(26)
    params = [torch.randn(3, 4, generator=g, requires_grad=True), torch.randn(5, generator=g)]
    ema = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]
    expected = [[0.7 * e + 0.3 * p for e, p in zip(L(ea.flatten()), L(pa.detach().flatten()))] for ea, pa in zip(ema, params)]
    rl.ema_update(ema, params, decay=0.7)
    for e, exp in zip(ema, expected):
        assert torch.allclose(e.flatten(), torch.tensor(exp), **TOL)
    assert not ema[0].requires_grad


def test_ema_decay_option_changes_result():
    a, b = [torch.zeros(3)], [torch.zeros(3)]
    rl.ema_update(a, [torch.ones(3)], decay=0.992)
    rl.ema_update(b, [torch.ones(3)], decay=0.5)
    assert a[0][0].item() == pytest.approx(0.008) and b[0][0].item() == pytest.approx(0.5)
    with pytest.raises(ValueError):
        rl.ema_update(a, [torch.ones(3), torch.ones(3)], decay=0.9)  # length mismatch


def test_mix_ptx_loss_hand_case():
    # 1 + 27.8 * 0.5 = 14.9 (InstructGPT / DS-Chat default); coef 0 -> pure RL loss
    assert rl.mix_ptx_loss(torch.tensor(1.0), torch.tensor(0.5)).item() == pytest.approx(14.9)
    assert rl.mix_ptx_loss(torch.tensor(1.0), torch.tensor(0.5), ptx_coef=0.0).item() == 1.0
    assert rl.mix_ptx_loss(torch.tensor(1.0), torch.tensor(0.5), ptx_coef=2.0).item() == 2.0


# ============================================================================================
# Property: padding never changes a result
# ============================================================================================


def test_padding_never_changes_any_result():
    g, mask, x = random_batch(B=6, T=7, seed=27)
    T = mask.shape[1]
    big = extend_mask(mask)
    a, b, c, d = x(), x(), x(), x()
    A, B_, C, D = (garbage_pad(t, mask) for t in (a, b, c, d))
    scores = torch.randn(6, generator=g) * 4
    same = lambda small, large: torch.allclose(small, large[:, :T], **TOL) and (large[:, T:] == 0).all()  # noqa: E731

    for kind in rl.KL_ESTIMATORS:
        assert same(rl.kl_estimate(a, b, kind, mask), rl.kl_estimate(A, B_, kind, big))
        r1, k1 = rl.shape_rewards(scores, a, b, mask, 0.1, 5.0, kind)
        r2, k2 = rl.shape_rewards(scores, A, B_, big, 0.1, 5.0, kind)
        assert same(r1, r2) and same(k1, k2)
    for pair_small, pair_big in zip(rl.gae_advantages(a, b, mask, 0.99, 0.95), rl.gae_advantages(A, B_, big, 0.99, 0.95)):
        assert same(pair_small, pair_big)
    assert same(rl.grpo_advantages(scores, 3, mask), rl.grpo_advantages(scores, 3, big))
    assert same(rl.rloo_advantages(scores, 3, mask), rl.rloo_advantages(scores, 3, big))
    assert same(rl.reinforce_pp_advantages(a, mask, 0.9), rl.reinforce_pp_advantages(A, big, 0.9))
    for shape in rl.KL_REWARD_SHAPES:
        assert same(rl.kl_penalty_for_advantages(a, mask, 0.1, shape), rl.kl_penalty_for_advantages(A, big, 0.1, shape))
    for shift in (True, False):
        assert same(rl.masked_whiten(a, mask, shift), rl.masked_whiten(A, big, shift))
    assert torch.allclose(rl.masked_mean(a, mask), rl.masked_mean(A, big), **TOL)
    assert torch.allclose(rl.masked_var(a, mask), rl.masked_var(A, big), **TOL)
    for mode in (rl.Aggregation(m, max_len=MAX_LEN) for m in rl.AGGREGATION_MODES):
        assert torch.allclose(mode(a, mask), mode(A, big), **TOL)
        l1, s1 = rl.policy_loss(a, b, c, mask, 0.2, 2.0, mode)
        l2, s2 = rl.policy_loss(A, B_, C, big, 0.2, 2.0, mode)
        assert torch.allclose(l1, l2, **TOL) and all(torch.allclose(s1[k], s2[k], **TOL) for k in s1)
        v1 = rl.value_loss(a, b, c, mask, 0.2, mode)[0]
        v2 = rl.value_loss(A, B_, C, big, 0.2, mode)[0]
        assert torch.allclose(v1, v2, **TOL)
    assert torch.allclose(rl.entropy_bonus(d, mask, 0.01), rl.entropy_bonus(D, big, 0.01), **TOL)

    logits = torch.randn(6, T, 9, generator=g)
    tokens = torch.randint(0, 9, (6, T), generator=g)
    big_logits = torch.cat([torch.where(mask.bool()[..., None], logits, float("nan")), torch.full((6, 3, 9), float("nan"))], 1)
    big_tokens = torch.cat([tokens, torch.zeros(6, 3, dtype=torch.long)], 1)
    assert same(rl.logprobs_from_logits(logits, tokens, mask=mask), rl.logprobs_from_logits(big_logits, big_tokens, mask=big).double())
    assert same(rl.entropy_from_logits(logits, mask=mask), rl.entropy_from_logits(big_logits, mask=big).double())


# ============================================================================================
# Off-policy correction (behaviour policy mu = the engines)
# ============================================================================================
# Token ratios rho = pi_old / mu: row 0 = [4, 1, 0.25, pad], row 1 = [3, 3, pad, pad] (padding carries garbage).
_OLD = torch.log(torch.tensor([[0.8, 0.3, 0.1, 0.5], [0.6, 0.3, 0.2, 0.9]]))
_MU = torch.log(torch.tensor([[0.2, 0.3, 0.4, 1e-9], [0.2, 0.1, float("nan"), 0.1]]))
_MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])


def test_off_policy_correction_hand_values():
    weights, stats = rl.off_policy_correction(_OLD, _MU, _MASK, "none")
    assert weights.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]
    assert stats["is_ratio_mean"].item() == pytest.approx((4 + 1 + 0.25 + 3 + 3) / 5)
    assert stats["is_ratio_max"].item() == pytest.approx(4)
    k3 = lambda r: r - 1 - math.log(r)  # noqa: E731
    assert stats["mismatch_kl"].item() == pytest.approx((k3(4) + k3(1) + k3(0.25) + 2 * k3(3)) / 5)
    assert stats["corrected_fraction"].item() == 0
    # TIS, C = 2: min(rho, 2); three of five tokens truncated
    weights, stats = rl.off_policy_correction(_OLD, _MU, _MASK, "tis", cap=2.0)
    assert torch.allclose(weights.double(), torch.tensor([[2, 1, 0.25, 0], [2, 2, 0, 0]]).double())
    assert stats["corrected_fraction"].item() == pytest.approx(3 / 5)
    # IcePop [0.5, 3.5]: rho inside is kept as the weight, 4 and 0.25 are masked
    weights, stats = rl.off_policy_correction(_OLD, _MU, _MASK, "icepop", low=0.5, high=3.5)
    assert torch.allclose(weights.double(), torch.tensor([[0.0, 1, 0, 0], [3, 3, 0, 0]]).double())
    assert stats["corrected_fraction"].item() == pytest.approx(2 / 5)
    # Sequence masking: row 0's geometric mean (4 * 1 * 0.25)^(1/3) = 1, row 1's 3; [0.5, 2] keeps row 0 only
    weights, stats = rl.off_policy_correction(_OLD, _MU, _MASK, "seq_mask", low=0.5, high=2.0)
    assert weights.tolist() == [[1, 1, 1, 0], [0, 0, 0, 0]]
    assert stats["corrected_fraction"].item() == pytest.approx(2 / 5)
    with pytest.raises(ValueError, match="unknown off-policy correction"):
        rl.off_policy_correction(_OLD, _MU, _MASK, "clip")
    with pytest.raises(ValueError, match="0 < low < 1 < high"):
        rl.off_policy_correction(_OLD, _MU, _MASK, "icepop", low=1.5)


def test_policy_loss_weights_scale_each_tokens_term():
    """loss = aggregate(w_t * L_t): at ratio 1 (pi = pi_old) L_t = -A_t, so token-mean gives -sum w A / N."""
    advantages = torch.tensor([[1.0, -2.0, 3.0, 9.0], [0.5, 1.0, 7.0, 7.0]])
    weights, _ = rl.off_policy_correction(_OLD, _MU, _MASK, "tis", cap=2.0)
    loss, _ = rl.policy_loss(_OLD, _OLD, advantages, _MASK, weights=weights)
    assert loss.item() == pytest.approx(-(2 * 1 - 2 + 0.25 * 3 + 2 * 0.5 + 2 * 1) / 5)
    unweighted, _ = rl.policy_loss(_OLD, _OLD, advantages, _MASK)
    assert unweighted.item() == pytest.approx(-(1 - 2 + 3 + 0.5 + 1) / 5)
    gspo, _ = rl.gspo_loss(_OLD, _OLD, advantages, _MASK, weights=torch.zeros(2, 4))
    assert gspo.item() == 0
