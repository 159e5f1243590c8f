"""Pure-logic tests of the SFT / RM training pieces: DeepSpeed config, schedule, optimizer, dropout, gradient
checkpointing, LoRA, step plan and sharding, the two losses. No Ray, no DeepSpeed engine (fast, no lock)."""
from __future__ import annotations

import dataclasses
import json
import math
import shutil

import pytest
import torch

from rlhf_ray.config import ConfigError, OptimConfig, load_config
from rlhf_ray.train import common, rm, sft
from rlhf_ray.train.deepspeed_config import deepspeed_config


def stage(overrides: dict, prefix: str = "sft"):
    return getattr(load_config(None, {f"{prefix}.{k}": v for k, v in overrides.items()}), prefix)


# ------------------------------------------------------------------------------------- DeepSpeed config
def test_published_opt_sft_recipe_is_expressible():
    """OPT-1.3B SFT: global batch 32, micro-batch 4, ZeRO-2, fp16, clip 1.0 (8 GPUs: no accumulation)."""
    s = stage({"deepspeed.global_batch_size": 32, "deepspeed.micro_batch_size": 4, "deepspeed.zero_stage": 2,
               "deepspeed.precision": "fp16", "optim.grad_clip": 1.0, "num_workers": 8})
    ds = deepspeed_config(s, num_ranks=8, cuda=True)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (32, 4, 1)
    assert ds["zero_optimization"]["stage"] == 2 and ds["gradient_clipping"] == 1.0
    assert ds["fp16"]["enabled"] and not ds["bf16"]["enabled"]
    # The same global batch on 4 GPUs accumulates 2 micro-batches per step.
    assert deepspeed_config(s, num_ranks=4, cuda=True)["gradient_accumulation_steps"] == 2


def test_bf16_training_is_autocast_over_fp32_weights_on_cpu_and_deepspeed_bf16_on_gpu():
    """autocast_bf16 decides bf16's mode by device, for SFT and RM (this config's stage) as for PPO's learners: on
    CPU DeepSpeed's torch.autocast section over fp32 weights (its bf16 mode lost SFT's small updates: 6 SFT steps of
    the demo reached eval loss 1.38 with it, 0.77 with autocast, 0.66 in fp32; RM accuracy 0.40 vs 0.81), on GPU its
    bf16 mode. torch_autocast=True/False overrides the device's default."""
    from rlhf_ray.train.deepspeed_config import autocast_bf16

    assert autocast_bf16("bf16", cuda=False) and not autocast_bf16("bf16", cuda=True)
    assert not autocast_bf16("fp32", cuda=False) and not autocast_bf16("fp16", cuda=True)
    s = stage({"deepspeed.precision": "bf16", "deepspeed.global_batch_size": 4, "deepspeed.micro_batch_size": 2})
    cpu = deepspeed_config(s, num_ranks=2, cuda=False)  # what train_loop builds for SFT / RM on CPU
    assert cpu["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and not cpu["bf16"]["enabled"]
    gpu = deepspeed_config(s, num_ranks=2, cuda=True)
    assert "torch_autocast" not in gpu and gpu["bf16"]["enabled"]
    weights = deepspeed_config(s, num_ranks=2, cuda=False, torch_autocast=False)
    assert "torch_autocast" not in weights and weights["bf16"]["enabled"]
    fp32 = deepspeed_config(stage({"deepspeed.precision": "fp32", "deepspeed.global_batch_size": 4,
                                   "deepspeed.micro_batch_size": 2}), num_ranks=2, cuda=False, torch_autocast=True)
    assert "torch_autocast" not in fp32 and not fp32["bf16"]["enabled"]  # autocast is a bf16 mode only


def test_deepspeed_config_by_device_and_options(monkeypatch):
    from rlhf_ray import env

    s = stage({"deepspeed.zero_stage": 3, "deepspeed.global_batch_size": 8, "deepspeed.micro_batch_size": 2})
    monkeypatch.setattr(env, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert deepspeed_config(s, num_ranks=2, cuda=False)["torch_autocast"]["enabled"]  # auto: bf16 on a CPU with it
    monkeypatch.setattr(env, "cpu_flags", lambda: frozenset({"avx512f"}))
    cpu = deepspeed_config(s, num_ranks=2, cuda=False)
    assert not cpu["bf16"]["enabled"] and not cpu["fp16"]["enabled"]  # auto: fp32 on a CPU without
    assert cpu["gradient_accumulation_steps"] == 2
    assert cpu["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
    assert deepspeed_config(s, 2, cuda=True)["bf16"]["enabled"]  # auto: bf16 on GPU
    off = stage({"deepspeed.zero_stage": 3, "deepspeed.offload_optimizer": True, "deepspeed.offload_params": True})
    zero = deepspeed_config(off, 2, cuda=True)["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    with pytest.raises(ConfigError, match="offload"):
        deepspeed_config(off, 2, cuda=False)
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        deepspeed_config(stage({"deepspeed.precision": "fp16"}), 2, cuda=False)
    with pytest.raises(ConfigError, match="multiple of micro_batch_size"):
        deepspeed_config(s, num_ranks=3, cuda=False)
    assert deepspeed_config(stage({"optim.grad_clip": 0.0}), 2, False)["gradient_clipping"] == 0.0
    z2 = stage({"deepspeed.zero_stage": 2})  # CPU ZeRO-1/2: the gradient bucket all-reduced in place, no copies
    assert deepspeed_config(z2, 2, cuda=False)["zero_optimization"]["reduce_scatter"] is False
    assert deepspeed_config(z2, 2, cuda=False)["zero_optimization"]["reduce_bucket_size"] == 20_000_000
    assert not {"reduce_scatter", "reduce_bucket_size"} & deepspeed_config(z2, 2, cuda=True)["zero_optimization"].keys()
    assert "reduce_scatter" not in cpu["zero_optimization"]  # ZeRO-3 keeps its own
    ppo = deepspeed_config(s, num_ranks=2, cuda=False, train_batch_size=16)  # a PPO learner's mini-batch
    assert (ppo["train_batch_size"], ppo["gradient_accumulation_steps"]) == (16, 4)


def test_one_rank_runs_without_zero_1_2():
    """One rank has nothing for ZeRO-1/2 to partition: stage 0 (the client optimizer on the parameters, as a bare
    loop); ZeRO-3 and offload keep their stage; more ranks keep the stage asked."""
    zero = lambda overrides, ranks, cuda=False: deepspeed_config(stage(overrides), ranks, cuda)["zero_optimization"]  # noqa: E731
    assert zero({"deepspeed.zero_stage": 2}, 1)["stage"] == 0
    assert zero({"deepspeed.zero_stage": 1}, 1, cuda=True)["stage"] == 0
    assert zero({"deepspeed.zero_stage": 3}, 1)["stage"] == 3
    assert zero({"deepspeed.zero_stage": 2, "deepspeed.offload_optimizer": True}, 1, cuda=True)["stage"] == 2
    assert zero({"deepspeed.zero_stage": 2}, 2)["stage"] == 2


def test_cpu_optimizer_is_torch_fused_adamw_with_the_same_update(tiny_llama):
    """fused=True (what the CPU workers ask for) is torch's one-pass AdamW: the same update as the default one."""
    from transformers import AutoModelForCausalLM

    optim = OptimConfig(lr=1e-2, weight_decay=0.1)
    models = [AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32) for _ in range(2)]
    optimizers = [common.build_optimizer(m, optim, fused=f) for m, f in zip(models, (False, True))]
    assert [o.defaults["fused"] for o in optimizers] == [None, True]
    ids = torch.randint(3, 100, (2, 8))
    for model, optimizer in zip(models, optimizers):
        for _ in range(2):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        # the same update up to float rounding (the fused kernel orders its operations differently): 1e-5 of lr 1e-2
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_stage_config_validation_names_the_key():
    with pytest.raises(ConfigError, match="rm.log_every"):
        load_config(None, {"rm.log_every": 0})
    with pytest.raises(ConfigError, match="sft.deepspeed.global_batch_size"):
        load_config(None, {"sft.deepspeed.global_batch_size": 6})


# -------------------------------------------------------------------------------- schedule, optimizer
def lrs(optim: OptimConfig, total: int) -> list[float]:
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=optim.lr)
    sched = common.build_lr_scheduler(opt, optim, total)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_lr_schedule_warmup_then_decay():
    cosine = lrs(OptimConfig(lr=1.0, warmup_steps=4, lr_schedule="cosine"), 12)
    assert cosine[:5] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert cosine[8] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    linear = lrs(OptimConfig(lr=1.0, warmup_steps=0, lr_schedule="linear"), 10)
    assert linear == pytest.approx([1 - i / 10 for i in range(10)])
    assert lrs(OptimConfig(lr=1.0, warmup_steps=2, lr_schedule="constant"), 6) == pytest.approx([0, 0.5, 1, 1, 1, 1])


def test_weight_decay_applies_to_weights_not_norms_or_biases(tiny_llama):
    cfg = load_config(None, {"models.actor.path": tiny_llama})
    model = sft.build_model(cfg, cfg.sft)
    opt = common.build_optimizer(model, OptimConfig(lr=0.1, weight_decay=0.5))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.5 and no_decay["weight_decay"] == 0.0
    q = model.model.layers[0].self_attn.q_proj.weight
    norm = model.model.layers[0].input_layernorm.weight
    before_q, before_norm = q.detach().clone(), norm.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # zero gradients: only decoupled weight decay moves a parameter
    assert torch.allclose(q, before_q * (1 - 0.1 * 0.5))
    assert torch.equal(norm, before_norm)


# ------------------------------------------------------------------------ model options (fail if ignored)
def test_disable_dropout(tiny_models, tmp_path):
    path = tmp_path / "opt_dropout"
    shutil.copytree(tiny_models["opt"], path)
    config = json.loads((path / "config.json").read_text())
    config.update(dropout=0.3, attention_dropout=0.3)
    (path / "config.json").write_text(json.dumps(config))
    ids = torch.arange(3, 19).unsqueeze(0)

    def two_train_forwards(disable: bool):
        cfg = load_config(None, {"models.actor.path": str(path), "sft.disable_dropout": disable})
        model = sft.build_model(cfg, cfg.sft).train()
        return model, model(ids).logits, model(ids).logits

    model, a, b = two_train_forwards(True)
    assert torch.equal(a, b) and model.config.dropout == 0.0
    _, a, b = two_train_forwards(False)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("task", [sft, rm], ids=["sft", "rm"])
def test_gradient_checkpointing_recomputes_layers_in_backward(tiny_llama, task):
    name = task.__name__.rsplit(".", 1)[-1]
    for enabled, expected_calls in ((False, 1), (True, 2)):
        cfg = load_config(None, {"models.actor.path": tiny_llama, "models.reward.path": tiny_llama,
                                 f"{name}.deepspeed.gradient_checkpointing": enabled})
        model = task.build_model(cfg, getattr(cfg, name)).train()
        layers = model.model.layers if task is sft else model.backbone.layers
        calls = []
        handle = layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
        ids = torch.arange(3, 19).view(2, 8)
        loss, _ = task.train_loss(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
        loss.backward()
        handle.remove()
        assert len(calls) == expected_calls  # checkpointing runs each layer's forward again in backward


def test_lora_adapts_only_named_modules_and_merges(tiny_llama):
    cfg = load_config(None, {"models.actor.path": tiny_llama, "sft.lora.dim": 4,
                             "sft.lora.module_names": ["q_proj", "v_proj"]})
    torch.manual_seed(0)
    model = sft.build_model(cfg, cfg.sft)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("q_proj.lora_A" in n for n in trainable) and not any("k_proj" in n for n in trainable)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(std=0.5)  # a trained adapter (B starts at zero)
    ids = torch.arange(3, 19).unsqueeze(0)
    with torch.no_grad():
        adapted = model(ids).logits
        merged = sft.merge_lora(model)
        assert torch.allclose(merged(ids).logits, adapted, atol=1e-4)
    plain = load_config(None, {"models.actor.path": tiny_llama})
    base = sft.build_model(plain, plain.sft)
    layer, base_layer = merged.model.layers[0].self_attn, base.model.layers[0].self_attn
    assert not torch.allclose(layer.q_proj.weight, base_layer.q_proj.weight)
    assert torch.equal(layer.k_proj.weight, base_layer.k_proj.weight)

    everything = load_config(None, {"models.actor.path": tiny_llama, "sft.lora.dim": 4,
                                    "sft.lora.only_optimize_lora": False})
    assert all(p.requires_grad for p in sft.build_model(everything, everything.sft).parameters())
    bad = load_config(None, {"models.actor.path": tiny_llama, "sft.lora.dim": 4, "sft.lora.module_names": ["nope"]})
    with pytest.raises(ConfigError, match="sft.lora.module_names"):
        sft.build_model(bad, bad.sft)


def test_rm_lora_keeps_value_head_trainable_and_saves_merged(tiny_llama, tmp_path):
    from rlhf_ray.models import ValueHeadModel

    cfg = load_config(None, {"models.reward.path": tiny_llama, "rm.lora.dim": 4})
    torch.manual_seed(0)
    model = rm.build_model(cfg, cfg.rm)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert "v_head.weight" in trainable and all("lora_" in n or n == "v_head.weight" for n in trainable)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(std=0.5)
    ids = torch.arange(3, 19).view(2, 8)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        adapted = model.score(ids, mask)
        rm.save_model(rm.merge_lora(model), tmp_path / "rm", tokenizer=None)
        reloaded = ValueHeadModel.from_pretrained(tmp_path / "rm").score(ids, mask)
    assert torch.allclose(reloaded, adapted, atol=1e-4)


# --------------------------------------------------------------------------------- plan and sharding
def test_plan_accumulation_and_epochs():
    s = stage({"deepspeed.global_batch_size": 8, "deepspeed.micro_batch_size": 2, "epochs": 2})
    plan = common.make_plan(s, num_rows=35, num_ranks=2, seed=3)
    assert (plan.accumulation, plan.steps_per_epoch, plan.total_steps, plan.global_batch_size) == (2, 4, 8, 8)
    assert common.make_plan(dataclasses.replace(s, max_steps=5), 35, 2, 3).total_steps == 5
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        common.make_plan(s, num_rows=7, num_ranks=2, seed=3)
    for step in range(plan.total_steps):
        rows = [i for micro in range(2) for rank in range(2) for i in common.micro_batch_indices(plan, step, micro, rank)]
        assert len(rows) == 8 and len(set(rows)) == 8  # one global batch, no row twice
    epoch0 = {i for step in range(4) for m in range(2) for r in range(2) for i in common.micro_batch_indices(plan, step, m, r)}
    assert len(epoch0) == 32  # an epoch sees 4 x 8 distinct rows (3 dropped)
    assert common.micro_batch_indices(plan, 0, 0, 0) != common.micro_batch_indices(plan, 4, 0, 0)  # reshuffled
    assert common.micro_batch_indices(plan, 5, 1, 1) == common.micro_batch_indices(plan, 5, 1, 1)  # deterministic


def test_eval_batches_cover_rows_once_with_equal_counts():
    shards = [common.eval_batches(11, rank, 2, batch_size=4) for rank in range(2)]
    assert [len(s) for s in shards] == [2, 2]
    rows = [i for s in shards for b in s for i in b if i >= 0]
    assert sorted(rows) == list(range(11)) and sum(i < 0 for s in shards for b in s for i in b) == 1


# ------------------------------------------------------------------------------------------- losses
def test_sft_loss_counts_response_tokens_only():
    torch.manual_seed(0)
    logits = torch.randn(1, 6, 10)
    labels = torch.tensor([[-100, -100, -100, 4, 5, 6]])
    nll, count = sft.token_nll(logits, labels)
    assert count == 3
    expected = -sum(torch.log_softmax(logits[0, t - 1], -1)[labels[0, t]] for t in (3, 4, 5))
    assert nll.item() == pytest.approx(expected.item(), rel=1e-6)
    changed = logits.clone()
    changed[0, :2] += 7.0  # predictions of prompt tokens do not count
    assert sft.token_nll(changed, labels)[0].item() == pytest.approx(nll.item(), rel=1e-6)


def test_rm_scores_last_real_token_and_ranking_loss(tiny_llama):
    cfg = load_config(None, {"models.reward.path": tiny_llama})
    torch.manual_seed(0)
    model = rm.build_model(cfg, cfg.rm).eval()
    chosen, rejected = [5, 6, 7, 8, 9], [5, 6, 7]
    ids = torch.tensor([chosen, rejected + [0, 0]])
    mask = torch.tensor([[1] * 5, [1, 1, 1, 0, 0]])
    with torch.no_grad():
        c, r = rm.pair_scores(model, {"input_ids": ids, "attention_mask": mask})
        alone = model.score(torch.tensor([rejected]), torch.ones(1, 3, dtype=torch.long))
        ids[1, 3:] = 42  # whatever sits in the padding is ignored
        c2, r2 = rm.pair_scores(model, {"input_ids": ids, "attention_mask": mask})
    assert r.item() == pytest.approx(alone.item(), abs=1e-5) and r2.item() == pytest.approx(r.item(), abs=1e-6)
    assert rm.ranking_loss(torch.tensor([2.0]), torch.tensor([0.0])).item() == pytest.approx(-math.log(1 / (1 + math.exp(-2))))
    m = rm.eval_metrics({"pairs": 4, "correct": 3, "chosen": 2.0, "rejected": -2.0, "loss": 1.0})
    assert m == {"accuracy": 0.75, "chosen_score": 0.5, "rejected_score": -0.5, "loss": 0.25}
