"""Value-head model, model loading and the locally built fixtures (pure torch / transformers, no Ray)."""
import json

import pytest
import torch

from rlhf_ray.config import ModelConfig
from rlhf_ray.io import atomic_directory
from rlhf_ray.models import ValueHeadModel, load_causal_lm, load_tokenizer, resolve_dtype, resolve_model_path
from rlhf_ray.models.value_head import last_token_index


def test_last_token_index_left_and_right_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 4, 4, 1]


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_value_head_scores_last_real_token_under_any_padding(tiny_models, family):
    torch.manual_seed(0)
    model = ValueHeadModel.from_causal_lm(tiny_models[family]).eval()
    ids = torch.tensor([[5, 17, 42, 9]])
    pad = 0
    right = torch.tensor([[5, 17, 42, 9, pad, pad]]), torch.tensor([[1, 1, 1, 1, 0, 0]])
    left = torch.tensor([[pad, pad, 5, 17, 42, 9]]), torch.tensor([[0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        plain = model.score(ids, torch.ones_like(ids))
        values = model(ids, torch.ones_like(ids))
        assert torch.allclose(model.score(*right), plain, atol=1e-5)
        assert torch.allclose(model.score(*left), plain, atol=1e-5)
    assert plain.item() == pytest.approx(values[0, -1].item())
    assert values.shape == (1, 4)
    # scores differ across positions: the test would catch a score taken at the wrong token
    assert (values[0, :-1] - values[0, -1]).abs().max() > 1e-4


def test_value_head_save_load_round_trip(tiny_llama, tmp_path):
    model = ValueHeadModel.from_causal_lm(tiny_llama).eval()
    tok = load_tokenizer(ModelConfig(path=tiny_llama))
    model.save_pretrained(tmp_path / "rm", tokenizer=tok)
    meta = json.loads((tmp_path / "rm" / "value_head.json").read_text())
    assert meta["format"] == "rlhf_ray.value_head/1"
    again = ValueHeadModel.from_pretrained(tmp_path / "rm").eval()
    ids = torch.tensor([[3, 8, 21, 7], [4, 4, 9, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    with torch.no_grad():
        assert torch.equal(model(ids, mask), again(ids, mask))
    # a state_dict (ZeRO-3's gathered copy) overrides the live weights
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["v_head.weight"] += 1.0
    model.save_pretrained(tmp_path / "rm2", state_dict=state)
    shifted = ValueHeadModel.from_pretrained(tmp_path / "rm2")
    assert torch.allclose(shifted.v_head.weight, model.v_head.weight + 1.0)


def test_value_head_refuses_a_causal_lm_folder(tiny_llama):
    with pytest.raises(FileNotFoundError, match="not a value-head model folder"):
        ValueHeadModel.from_pretrained(tiny_llama)


def test_atomic_directory_never_leaves_a_partial_folder(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_directory(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "a").write_text("2")
            raise RuntimeError("crash mid-write")
    assert (target / "a").read_text() == "1"  # the old complete folder survives
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary left behind


def test_resolve_model_path_and_dtype(tmp_path, monkeypatch):
    from rlhf_ray import env

    assert resolve_model_path("facebook/opt-1.3b") == "facebook/opt-1.3b"  # hub names pass through untouched
    with pytest.raises(ValueError, match="unknown built-in model 'builtin:nope'"):
        resolve_model_path("builtin:nope")
    assert resolve_dtype("auto", cuda=True) == torch.bfloat16
    monkeypatch.setattr(env, "cpu_flags", lambda: frozenset({"avx512f"}))  # a CPU without native bf16
    assert resolve_dtype("auto", cuda=False) == torch.float32
    monkeypatch.setattr(env, "cpu_flags", lambda: frozenset({"amx_bf16"}))  # one with
    assert resolve_dtype("auto", cuda=False) == torch.bfloat16
    assert resolve_dtype("bfloat16") == torch.bfloat16


def test_tiny_fixtures_have_vllm_friendly_shapes_and_a_chat_template(tiny_models):
    for family, path in tiny_models.items():
        model = load_causal_lm(ModelConfig(path=path))
        cfg = model.config
        assert cfg.hidden_size // cfg.num_attention_heads in (32, 64), family  # vLLM CPU rejects 16
        tok = load_tokenizer(ModelConfig(path=path))
        ids = tok.apply_chat_template([{"role": "user", "content": "What is 2 plus 3?"}],
                                      add_generation_prompt=True, tokenize=True, return_dict=False)
        assert tok.decode(ids).endswith("<|im_start|>assistant\n")
        assert tok.eos_token == "<|im_end|>" and tok.pad_token_id is not None


def test_cpu_attention_long_keys_compute_sdpa_in_fp32_on_bf16_with_and_without_autograd(tiny_models):
    """models/attention.py, keys longer than MATH_MAX_KEYS: under CPU bf16 autocast the attention is fp32 sdpa (its
    result rounded to bf16, gradients flowing to q, k, v), with autograd and without it alike (the training forward
    and the no-grad log-prob passes must agree bit for bit); in fp32 it is transformers' sdpa exactly."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from rlhf_ray.models.attention import MATH_MAX_KEYS, cpu_attention

    torch.manual_seed(0)
    model = load_causal_lm(ModelConfig(path=tiny_models["llama"]), dtype=torch.float32)
    module = model.model.layers[0].self_attn
    t = MATH_MAX_KEYS[torch.bfloat16] + 1
    q, k, v = (torch.randn(2, module.config.num_attention_heads, t, module.head_dim, requires_grad=True)
               for _ in range(3))
    mask = torch.ones(t, t, dtype=torch.bool).tril()[None, None].expand(2, 1, t, t)
    with torch.no_grad():
        exact = sdpa_attention_forward(module, q, k, v, mask)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = cpu_attention(module, q, k, v, mask)[0]
        with torch.no_grad():
            plain_bf16 = sdpa_attention_forward(module, q, k, v, mask)[0]
            ours_no_grad = cpu_attention(module, q, k, v, mask)[0]
    assert ours.dtype == plain_bf16.dtype == torch.bfloat16
    assert torch.equal(ours, exact.to(torch.bfloat16))  # fp32 attention, rounded once
    assert not torch.equal(plain_bf16, ours)  # what bf16 attention gives instead (if ignored, this fails)
    assert torch.equal(ours_no_grad, ours)  # no-grad passes (old log-probs, the reference) compute alike
    ours.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in (q, k, v))
    assert torch.equal(cpu_attention(module, q, k, v, mask)[0], sdpa_attention_forward(module, q, k, v, mask)[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cpu_attention_short_keys_are_matmuls_matching_eager_attention(dtype, monkeypatch):
    """models/attention.py, keys up to MATH_MAX_KEYS: q k^T, an fp32 softmax and p v in the compute dtype (bf16 under
    autocast), grouped-query heads without repeated k, v. It equals transformers' eager attention (repeat_kv and an
    additive mask) on left-padded causal masks, in fp32 to rounding and in bf16 bit for bit, except that a query with
    no key to attend to gets 0, as from sdpa; with and without autograd alike; gradients reach q, k, v; sdpa is not
    called."""
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.llama.modeling_llama import eager_attention_forward

    from rlhf_ray.models.attention import MATH_MAX_KEYS, cpu_attention

    torch.manual_seed(0)
    t, heads, kv_heads, dim = min(MATH_MAX_KEYS.values()), 6, 2, 8
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal, module.training = heads // kv_heads, True, False
    q = torch.randn(3, heads, t, dim, requires_grad=True)
    k, v = (torch.randn(3, kv_heads, t, dim, requires_grad=True) for _ in range(2))
    pad = torch.tensor([0, 5, t - 1])  # left padding per row: the last row has one real token
    keys = torch.arange(t)[None, :] >= pad[:, None]
    mask = torch.ones(t, t, dtype=torch.bool).tril()[None, None] & keys[:, None, None, :]

    calls = []
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    with autocast:
        ours = cpu_attention(module, q, k, v, mask, scaling=dim ** -0.5)[0]
        with torch.no_grad():
            ours_no_grad = cpu_attention(module, q, k, v, mask, scaling=dim ** -0.5)[0]
            causal_none = cpu_attention(module, q, k, v, None, scaling=dim ** -0.5)[0]
    assert not calls and ours.dtype == dtype and torch.isfinite(ours).all()
    assert torch.equal(ours_no_grad, ours)
    cast = [x.detach().to(dtype) for x in (q, k, v)]
    additive = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)  # eager's mask
    eager = eager_attention_forward(module, *cast, additive, scaling=dim ** -0.5)[0]
    keyless = ~mask.any(-1)[:, 0]  # (B, T): left-padding queries that may attend to no key
    assert keyless.any() and (ours[keyless] == 0).all()  # as sdpa gives them (eager: the mean of every value)
    if dtype == torch.bfloat16:
        assert torch.equal(ours[~keyless], eager[~keyless])
    else:
        torch.testing.assert_close(ours[~keyless], eager[~keyless])
    monkeypatch.undo()
    with torch.no_grad():
        full = sdpa_attention_forward(module, *cast, torch.ones(t, t, dtype=torch.bool).tril()[None, None])[0]
    torch.testing.assert_close(causal_none.float(), full.float(), atol=3e-2 if dtype == torch.bfloat16 else 1e-5,
                               rtol=0)  # no mask: causal, as sdpa's is_causal
    ours.float().sum().backward()
    assert all(x.grad is not None and x.grad.dtype == torch.float32 and x.grad.abs().sum() > 0 for x in (q, k, v))


def test_cpu_trainers_switch_sdpa_models_and_saved_configs_keep_no_trace(tiny_models, tmp_path):
    """SFT / RM workers (train.common.build_stage_model) switch on CPU, not on GPU; an eager model keeps eager; the
    HF folder written afterwards names no attention implementation."""
    from rlhf_ray.config import load_config
    from rlhf_ray.models.attention import NAME, use_cpu_attention
    from rlhf_ray.train.common import build_stage_model, stage_task
    from rlhf_ray.train.deepspeed_config import deepspeed_config

    cfg = load_config(None, {"ray.address": "local", "run.output_dir": str(tmp_path), "run.seed": 0,
                             "models.actor.path": tiny_models["llama"], "models.reward.path": tiny_models["llama"]})
    for stage in ("sft", "rm"):
        ds_config = deepspeed_config(getattr(cfg, stage), 1, cuda=False)
        for cuda, expected in ((False, NAME), (True, "sdpa")):
            model = build_stage_model(stage_task(stage), cfg, getattr(cfg, stage), ds_config, cuda=cuda)
            assert getattr(model, "backbone", model).config._attn_implementation == expected, (stage, cuda)
    model = load_causal_lm(ModelConfig(path=tiny_models["llama"]), dtype=torch.float32)
    assert use_cpu_attention(model)
    model.save_pretrained(tmp_path / "saved")
    assert "attn_implementation" not in (tmp_path / "saved" / "config.json").read_text()
    eager = load_causal_lm(ModelConfig(path=tiny_models["llama"]), dtype=torch.float32, attn_implementation="eager")
    assert not use_cpu_attention(eager) and eager.config._attn_implementation == "eager"
