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
