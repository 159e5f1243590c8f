"""PPO learners on real Ray + DeepSpeed (CPU, gloo, 2 ranks, fp32, tiny Llama).

Groups are module-scoped and built once each: ZeRO-2 (PTX on), ZeRO-3 (EMA + gradient checkpointing on),
ZeRO-3 + LoRA, and the critic. Tests that train say what state they start from; order matters only where noted.
"""
from __future__ import annotations

import sys

import pytest
import ray.cloudpickle
import torch

from rlhf_ray.config import Config, ConfigError, load_config
from rlhf_ray.env import precision_dtype
from rlhf_ray.learner import CriticGroup, PolicyGroup, hf_param_name
from rlhf_ray.train.deepspeed_config import deepspeed_config
from rlhf_ray.models.value_head import ValueHeadModel, position_ids_from_mask

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import test modules

B, T, PROMPT = 8, 12, 4


def ppo_config(actor: str, reward: str, **overrides) -> Config:
    """Tiny fast PPO settings: 2 ranks per learner at 0.25 CPU each, micro 2, mini-batch 4 (one micro-batch per
    rank per optimizer step), fp32, constant LR."""
    base = {
        "ray.address": "local", "run.seed": 0,
        "models.actor.path": actor, "models.reward.path": reward,
        "placement.actor": {"num_workers": 2, "cpus_per_worker": 0.25},
        "placement.critic": {"num_workers": 2, "cpus_per_worker": 0.25},
        "placement.reference": {"num_workers": 2, "cpus_per_worker": 0.25},
        "placement.reward": {"num_workers": 1, "cpus_per_worker": 0.25},
        "ppo.mini_batch_size": 4, "ppo.ppo_epochs": 1,
    }
    for learner in ("actor", "critic"):
        base.update({f"ppo.{learner}.deepspeed.micro_batch_size": 2, f"ppo.{learner}.deepspeed.precision": "fp32",
                     f"ppo.{learner}.optim.lr": 1e-3, f"ppo.{learner}.optim.lr_schedule": "constant"})
    return load_config(None, {**base, **overrides})


def make_batch(pad_id: int, vocab: int, seed: int = 0, rows: int = B) -> dict:
    """Rows 0-1 left-padded (2), rows 2-3 right-padded (3), the rest full; PROMPT real tokens of prompt each."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, T), generator=g)
    mask = torch.ones(rows, T, dtype=torch.long)
    mask[0:2, :2] = 0
    mask[2:4, -3:] = 0
    ids[mask == 0] = pad_id
    real_index = mask.cumsum(1) - 1  # 0-based index among real tokens
    is_response = (real_index >= PROMPT) & (mask == 1)
    return {"input_ids": ids, "attention_mask": mask, "action_mask": is_response[:, 1:].long()}


def transformers_logprobs(model, batch) -> torch.Tensor:
    mask = batch["attention_mask"]
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=mask,
                       position_ids=position_ids_from_mask(mask)).logits[:, :-1]
    lp = torch.log_softmax(logits.float(), -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return lp * mask[:, 1:]


def assert_scored_like(ours: torch.Tensor, expected: torch.Tensor, batch: dict, atol: float = 1e-5) -> None:
    """Every action column equals `expected`; a column before its micro-batch's first action is not scored (0,
    logits_to_keep), any other column equals `expected` too."""
    act = batch["action_mask"].bool()
    torch.testing.assert_close(ours[act], expected[act], rtol=0, atol=atol)
    scored = ~act & (ours != 0)
    torch.testing.assert_close(ours[scored], expected[scored], rtol=0, atol=atol)


def experience(batch, old_logprobs, advantage: float) -> dict:
    act = batch["action_mask"].float()
    return {**batch, "old_logprobs": old_logprobs, "advantages": advantage * act}


def fresh_model_with(path: str, named: list[tuple[str, torch.Tensor]]):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.load_state_dict(dict(named), strict=True)
    return model.eval()


def exported(group: PolicyGroup, **kwargs) -> list[tuple[str, torch.Tensor]]:
    import ray

    return [item for ref in group.export_params(**kwargs) for item in ray.get(ref)]


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tok(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


@pytest.fixture(scope="module")
def batch(tok):
    return make_batch(tok.pad_token_id, len(tok))


@pytest.fixture(scope="module")
def hf_model(tiny_llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


def _group(request, factory):
    group = factory()
    request.addfinalizer(group.shutdown)
    return group


@pytest.fixture(scope="module")
def zero2(ray_cluster, tiny_llama, tiny_value_model, request):
    cfg = ppo_config(tiny_llama, tiny_value_model, **{"ppo.actor.deepspeed.zero_stage": 2, "ppo.ptx_coef": 1.0,
                                            "data.ptx": [{"path": "ptx-rows-are-passed-directly"}]})
    return _group(request, lambda: PolicyGroup(cfg))


@pytest.fixture(scope="module")
def zero3_cfg(tiny_llama, tiny_value_model):
    return ppo_config(tiny_llama, tiny_value_model, **{"ppo.actor.deepspeed.zero_stage": 3, "ppo.ema_decay": 0.9,
                                             "ppo.actor.deepspeed.gradient_checkpointing": True})


@pytest.fixture(scope="module")
def zero3(ray_cluster, zero3_cfg, request):
    return _group(request, lambda: PolicyGroup(zero3_cfg))


# ------------------------------------------------------------------------------------------------ pure
@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_the_lm_head_reads_contiguous_hidden_states_and_scores_like_the_whole_sequence(family, tiny_models):
    """With logits_to_keep the LM head gets a contiguous (B, k, H) input. A slice of the hidden states (the int
    form) made torch's matmul copy the head's weight once per row: a bf16 SmolLM2 reference forward took 2x as
    long on CPU. The kept columns score as over the whole sequence."""
    from transformers import AutoModelForCausalLM

    from rlhf_ray.learner import causal_logprobs

    model = AutoModelForCausalLM.from_pretrained(tiny_models[family]).eval()
    batch = make_batch(pad_id=0, vocab=model.config.vocab_size)
    contiguous = []
    model.get_output_embeddings().register_forward_pre_hook(lambda m, args: contiguous.append(args[0].is_contiguous()))
    with torch.no_grad():
        kept = causal_logprobs(model, batch, position_ids=True, logits_to_keep=True)[0]
        whole = causal_logprobs(model, batch, position_ids=True, logits_to_keep=False)[0]
    assert contiguous == [True, True]
    start = int(batch["action_mask"].bool().any(dim=0).nonzero()[0])
    assert start > 0 and kept[:, :start].eq(0).all()  # columns before the first action: not scored
    torch.testing.assert_close(kept[:, start:], whole[:, start:], rtol=0, atol=1e-5)


def test_deepspeed_config_from_stage_config(tiny_llama):
    """PPO learners share the SFT/RM builder (rlhf_ray.train.deepspeed_config) with the mini-batch as step batch."""
    cfg = ppo_config(tiny_llama, "", **{"ppo.actor.deepspeed.zero_stage": 3, "ppo.actor.optim.grad_clip": 0.5,
                                        "ppo.actor.deepspeed.precision": "auto"})
    ds = deepspeed_config(cfg.ppo.actor, 2, cuda=False, train_batch_size=8)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == 0.5
    bf16 = precision_dtype("auto", "cpu") == "bfloat16"  # auto: this CPU decides; its bf16 is autocast (fp32 weights)
    assert ds.get("torch_autocast", {}).get("enabled", False) == bf16 and not ds["bf16"]["enabled"]
    offload = ppo_config(tiny_llama, "", **{"ppo.actor.deepspeed.offload_optimizer": True})
    gpu = deepspeed_config(offload.ppo.actor, 2, cuda=True, train_batch_size=8)
    assert gpu["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    with pytest.raises(ConfigError, match="need a GPU"):  # offload on CPU is a config error, not ignored
        deepspeed_config(offload.ppo.actor, 2, cuda=False, train_batch_size=8)
    with pytest.raises(ConfigError, match="must be a multiple"):
        deepspeed_config(cfg.ppo.actor, 2, cuda=False, train_batch_size=6)
    assert hf_param_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight") == \
        "model.layers.0.self_attn.q_proj.weight"


def test_config_checks_ppo_batch_sizes_and_scorer_options(tiny_llama):
    from rlhf_ray.config import ConfigError

    with pytest.raises(ConfigError, match=r"ppo.mini_batch_size \(6\) must be a multiple of "
                                          r"ppo.actor.deepspeed.micro_batch_size \(2\) x placement.actor.num_workers"):
        ppo_config(tiny_llama, "", **{"ppo.mini_batch_size": 6})
    with pytest.raises(ConfigError, match="ppo.scorer_zero_stage: expected one of 0, 3"):
        ppo_config(tiny_llama, "", **{"ppo.scorer_zero_stage": 2})
    with pytest.raises(ConfigError, match="'replace' needs ppo.reward_functions"):
        ppo_config(tiny_llama, "", **{"ppo.reward_function_mode": "replace"})


# ------------------------------------------------------------------------------------------------ actor
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_logprobs_equal_plain_transformers(stage, request, batch, hf_model):
    group = request.getfixturevalue(stage)
    ours = group.logprobs(batch)
    assert ours.shape == (B, T - 1)
    expected = transformers_logprobs(hf_model, batch)
    assert_scored_like(ours, expected, batch)
    assert (ours[batch["attention_mask"][:, 1:] == 0] == 0).all()
    # Prompt columns before any action are not scored (logits_to_keep), though their tokens are real ...
    first = int(batch["action_mask"].bool().any(0).nonzero()[0])
    assert first > 0 and (ours[:, :first] == 0).all() and (expected[:, :first] != 0).any()
    # ... and without an action_mask every column is.
    without_actions = {k: v for k, v in batch.items() if k != "action_mask"}
    torch.testing.assert_close(group.logprobs(without_actions), expected, rtol=0, atol=1e-5)
    # Uneven rows (5 over 2 ranks): padded for the split, dropped from the result.
    five = {k: v[:5] for k, v in batch.items()}
    assert_scored_like(group.logprobs(five), ours[:5], five, atol=1e-6)


def test_ptx_loss_trains_on_pretraining_rows(zero2, batch, tok):
    """Runs on a fresh optimizer: with zero advantages the RL loss has zero gradient, so only PTX can move weights."""
    ptx = {k: v for k, v in make_batch(tok.pad_token_id, len(tok), seed=7).items() if k != "action_mask"}
    lp = zero2.logprobs(batch)
    zero2.train(experience(batch, lp, advantage=0.0))
    assert torch.equal(zero2.logprobs(batch), lp)  # no PTX batch: nothing moves
    before = zero2.lm_loss(ptx)
    stats = zero2.train(experience(batch, lp, advantage=0.0), ptx=ptx)
    after = zero2.lm_loss(ptx)
    assert stats["ptx_loss"] > 0 and stats["optimizer_steps"] == 2
    assert after < before - 0.05, (before, after)


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_ppo_steps_raise_logprobs_of_positive_advantage_tokens(stage, request, batch):
    group = request.getfixturevalue(stage)
    act = batch["action_mask"].bool()
    start = group.logprobs(batch)
    lp = start
    for _ in range(3):
        stats = group.train(experience(batch, lp, advantage=1.0))
        lp = group.logprobs(batch)
    assert stats["optimizer_steps"] == 2  # 8 rows / mini-batch 4
    gain = (lp - start)[act]
    assert gain.mean() > 0.1 and (gain > 0).float().mean() > 0.9, gain


def test_two_cpu_ranks_all_reduce_through_the_shm_kernel_and_leave_no_shm_name(zero2):
    """PPO learners join their world as SFT / RM workers do (train.common.init_deepspeed_world): on CPU, ZeRO's
    all-reduce goes through DeepSpeed's shared-memory kernel, and its /dev/shm names are gone once mapped (the
    learning tests above then train through it)."""
    import glob
    import os

    assert [r["allreduce"] for r in zero2.reports] == ["shm", "shm"]
    # deepspeed.grad_reduction auto on CPU: ZeRO-2 reduces once per optimizer step (tests/test_accumulation.py)
    assert [r["grad_reduction"] for r in zero2.reports] == ["per_step", "per_step"]
    addr, port = zero2.apply(lambda w: (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]))[0]
    assert glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_*") == []


def test_gradient_checkpointing_recomputes_layers(zero3, batch):
    """With checkpointing each decoder layer runs forward twice per training micro-batch (recomputed in backward)."""
    def hook_layer(worker):
        worker.calls = 0

        def count(*_):
            worker.calls += 1
        layer = worker.module.model.layers[0]
        worker.hook = layer.register_forward_pre_hook(count)  # the recompute stops early: post-hooks never fire

    def read_and_unhook(worker):
        worker.hook.remove()
        return worker.calls

    zero3.apply(hook_layer)
    four = {k: v[:4] for k, v in batch.items()}
    zero3.train(experience(four, zero3.logprobs(four), advantage=1.0))  # logprobs: 1 eval forward per rank
    assert zero3.apply(read_and_unhook) == [1 + 2, 1 + 2]  # 1 micro-batch per rank: forward + recompute


def test_zero3_export_reproduces_engine_eval_loss(zero3, batch, tiny_llama, tmp_path):
    full = {k: v[4:] for k, v in batch.items() if k != "action_mask"}  # unpadded rows
    lp = zero3.logprobs(batch)
    zero3.train(experience(batch, lp, advantage=1.0))
    assert zero3.run("global_steps")[0] >= 2
    # ZeRO-3 really partitions: each rank owns half of every weight (tensors this small, under DeepSpeed's
    # stage3_param_persistence_threshold, also stay gathered between forwards).
    shapes = zero3.apply(lambda w: [(p.ds_tensor.numel(), p.ds_numel) for p in w.module.parameters()])
    assert all(part == -(-full_n // 2) for rank in shapes for part, full_n in rank)
    engine_loss = zero3.lm_loss(full)
    named = exported(zero3, bucket_bytes=64 << 10)
    fresh = fresh_model_with(tiny_llama, named)  # strict load: every HF name present, nothing extra
    assert [n for n, _ in named] == [n for n, _ in fresh.named_parameters()]
    labels = full["input_ids"].masked_fill(full["attention_mask"] == 0, -100)
    with torch.no_grad():
        fresh_loss = float(fresh(input_ids=full["input_ids"], attention_mask=full["attention_mask"], labels=labels,
                                 position_ids=position_ids_from_mask(full["attention_mask"]), use_cache=False).loss)
    assert fresh_loss == engine_loss
    # Buckets: 64 KiB holds a few tensors each; the whole export arrives in several object-store refs.
    assert len(zero3.export_params(bucket_bytes=64 << 10)) > 3
    # Or each bucket goes to a callback on rank 0 (a transport): here it appends the names to a file.
    log_file = tmp_path / "buckets.txt"

    def write_names(bucket):
        with open(log_file, "a") as f:
            f.write(",".join(name for name, _ in bucket) + "\n")

    assert zero3.export_params(bucket_bytes=64 << 10, callback=write_names) == []
    lines = log_file.read_text().splitlines()
    assert len(lines) > 3 and ",".join(lines).split(",") == [n for n, _ in named]
    # HF export of the same weights.
    from transformers import AutoModelForCausalLM

    out = zero3.save_pretrained(str(tmp_path / "hf"))
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert_scored_like(zero3.logprobs(batch), transformers_logprobs(saved, batch), batch)
    assert (tmp_path / "hf" / "tokenizer.json").is_file()


def test_ema_weights_follow_the_decay(zero3, batch):
    """ema_1 = d * ema_0 + (1 - d) * theta_1 for one optimizer step (d = ppo.ema_decay = 0.9)."""
    ema0 = dict(exported(zero3, ema=True))
    four = {k: v[:4] for k, v in batch.items()}
    stats = zero3.train(experience(four, zero3.logprobs(four), advantage=1.0))
    assert stats["optimizer_steps"] == 1
    live1, ema1 = dict(exported(zero3)), dict(exported(zero3, ema=True))
    for name in live1:
        torch.testing.assert_close(ema1[name], 0.9 * ema0[name] + 0.1 * live1[name], rtol=0, atol=1e-6)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(ema1[name], live1[name]) and not torch.equal(ema1[name], ema0[name])


def test_checkpoint_restores_logprobs_and_optimizer_state_after_kill(zero3, zero3_cfg, batch, tmp_path):
    """Last user of the zero3 group: kills it."""
    tag = zero3.save_checkpoint(str(tmp_path / "ckpt"))
    lp, optim = zero3.logprobs(batch), zero3.run("optimizer_state")
    ema = exported(zero3, ema=True)
    steps = zero3.run("global_steps")[0]
    zero3.shutdown()  # kill every rank and free the placement group
    rebuilt = PolicyGroup(zero3_cfg)
    try:
        assert not torch.equal(rebuilt.logprobs(batch), lp)  # fresh weights differ before the load
        assert rebuilt.load_checkpoint(str(tmp_path / "ckpt")) == tag
        assert torch.equal(rebuilt.logprobs(batch), lp)
        assert rebuilt.run("global_steps")[0] == steps
        for before, after in zip(optim, rebuilt.run("optimizer_state")):
            assert before.keys() == after.keys() and len(before) > 0
            assert all(torch.equal(before[k], after[k]) for k in before)
        assert all(torch.equal(a[1], b[1]) for a, b in zip(ema, exported(rebuilt, ema=True)))
    finally:
        rebuilt.shutdown()


def test_lora_trains_only_adapters_and_exports_merged_hf_weights(ray_cluster, tiny_llama, tiny_value_model, batch, hf_model):
    cfg = ppo_config(tiny_llama, tiny_value_model, **{"ppo.actor.deepspeed.zero_stage": 3, "ppo.actor.lora.dim": 4,
                                            "ppo.actor.lora.module_names": ["q_proj", "v_proj"]})
    group = PolicyGroup(cfg)
    try:
        trainable = group.apply(lambda w: [n for n, _ in w._trainable()])[0]
        assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
        lp = group.logprobs(batch)  # lora_B starts at 0: the base model's log-probs
        assert_scored_like(lp, transformers_logprobs(hf_model, batch), batch)
        for _ in range(2):
            group.train(experience(batch, lp, advantage=1.0))
        named = exported(group)
        base = dict(hf_model.named_parameters())
        assert [n for n, _ in named] == list(base)  # plain HF names, no peft wrappers or adapters
        merged = dict(named)
        assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"],
                               base["model.layers.0.self_attn.q_proj.weight"])
        assert torch.equal(merged["model.layers.0.self_attn.k_proj.weight"],
                           base["model.layers.0.self_attn.k_proj.weight"])  # not a LoRA target: frozen
        assert_scored_like(group.logprobs(batch), transformers_logprobs(fresh_model_with(tiny_llama, named), batch),
                           batch)
    finally:
        group.shutdown()


# ------------------------------------------------------------------------------------------------ critic
def test_critic_starts_from_reward_model_and_moves_toward_returns(ray_cluster, tiny_llama, tiny_value_model, batch, tmp_path):
    """ZeRO-2 critic with LoRA adapters on its backbone (the value head trains fully, as DeepSpeed-Chat does)."""
    cfg = ppo_config(tiny_llama, tiny_value_model, **{"ppo.critic.deepspeed.zero_stage": 2, "ppo.ppo_epochs": 4,
                                            "ppo.critic.lora.dim": 8})
    critic = CriticGroup(cfg)
    try:
        trainable = critic.apply(lambda w: [n for n, _ in w._trainable()])[0]
        assert "v_head.weight" in trainable and all(".lora_" in n for n in trainable if n != "v_head.weight")
        values = critic.values(batch)
        rm = ValueHeadModel.from_pretrained(tiny_value_model).eval()
        with torch.no_grad():
            expected = rm(batch["input_ids"], batch["attention_mask"])[:, :-1] * batch["attention_mask"][:, 1:]
        torch.testing.assert_close(values, expected, rtol=0, atol=1e-5)  # DeepSpeed-Chat: critic = reward model

        act = batch["action_mask"].bool()
        returns = torch.full_like(values, 2.0) * act
        error = [(values - returns)[act].abs().mean()]
        for _ in range(3):  # PPO iterations: old_values are the values the rollout saw (value_clip 0.2 around them)
            stats = critic.train({**batch, "old_values": values, "returns": returns})
            values = critic.values(batch)
            error.append((values - returns)[act].abs().mean())
        assert stats["optimizer_steps"] == 8 and "value_loss" in stats
        assert error[3] < error[2] < error[1] < error[0] and error[3] < 0.6 * error[0], error

        out = critic.save_pretrained(str(tmp_path / "critic"))
        reloaded = ValueHeadModel.from_pretrained(out).eval()
        with torch.no_grad():
            again = reloaded(batch["input_ids"], batch["attention_mask"])[:, :-1] * batch["attention_mask"][:, 1:]
        torch.testing.assert_close(again, critic.values(batch), rtol=0, atol=1e-5)
    finally:
        critic.shutdown()


def _precision_state(worker, moments: bool = False) -> dict:
    """The dtypes the model holds, every trainable parameter's fp32 value (DeepSpeed's documented accessor: the
    weight itself under autocast) and, after a step (the optimizer state exists from then on), the dtypes of the Adam
    moments the optimizer keeps."""
    from deepspeed.utils import safe_get_full_fp32_param

    params = worker._trainable()
    state = worker.engine.optimizer.optimizer.state.values() if moments else []  # the torch AdamW under ZeRO
    moments = {str(v.dtype) for st in state for k, v in st.items() if k in ("exp_avg", "exp_avg_sq")}
    return {"module": {str(p.dtype) for _, p in params}, "moments": moments,
            "master": {hf_param_name(n): safe_get_full_fp32_param(p).detach().cpu().clone() for n, p in params}}


def _computed_in(worker, batch) -> tuple[str, str, str]:
    """(layer 0 q_proj's weight dtype, its output dtype, the residual stream's dtype after layer 0) over one forward
    of the learner's engine."""
    seen = {}
    layer = worker.module.model.layers[0]
    hooks = [layer.self_attn.q_proj.register_forward_hook(
                 lambda m, i, o: seen.setdefault("q", (str(m.weight.dtype), str(o.dtype))) and None),
             layer.register_forward_hook(
                 lambda m, i, o: seen.setdefault("residual", str((o[0] if isinstance(o, tuple) else o).dtype)) and None)]
    try:
        worker.logprobs(batch)
    finally:
        for h in hooks:
            h.remove()
    return (*seen["q"], seen["residual"])


def _attention_dtypes(worker, batch) -> dict[str, set]:
    """How and in which dtype the attention computed, in the learner's training forward (autograd on) and in its
    log-prob pass (no_grad): spies around models/attention.py's matmul path and torch's sdpa in the rank's process."""
    import torch.nn.functional as F

    import rlhf_ray.models.attention as attention
    from rlhf_ray.learner import to_device

    seen = {"train": set(), "logprobs": set()}
    originals = F.scaled_dot_product_attention, attention.matmul_attention
    phase = "train"

    def sdpa_spy(query, key, value, *args, **kwargs):
        cast = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        seen[phase].add(f"sdpa {torch.bfloat16 if cast else query.dtype}")
        return originals[0](query, key, value, *args, **kwargs)

    def matmul_spy(module, query, *args, **kwargs):
        seen[phase].add(f"matmul {query.dtype}")
        return originals[1](module, query, *args, **kwargs)

    F.scaled_dot_product_attention, attention.matmul_attention = sdpa_spy, matmul_spy
    try:
        worker.engine.train()
        with torch.enable_grad():  # the forward decides; its graph (dropped here) would run the backward in fp32
            worker._forward(to_device(batch, worker.device))
        phase = "logprobs"
        worker.logprobs(batch)
    finally:
        F.scaled_dot_product_attention, attention.matmul_attention = originals
    return seen


def _train_pass_logprobs(worker, batch) -> torch.Tensor:
    """The log-probs of the learner's training forward (autograd on, train mode), over the micro-batches its
    logprobs() pass uses."""
    from rlhf_ray.learner import micro_batches, to_device

    worker.engine.train()
    with torch.enable_grad():
        out = [worker._forward(to_device(mb, worker.device))[0].detach().float().cpu()
               for mb in micro_batches(batch, worker.stage.deepspeed.micro_batch_size)]
    worker.engine.eval()
    return torch.cat(out)


def test_bf16_training_pass_scores_like_the_old_logprob_pass_and_the_reference(ray_cluster, tiny_llama,
                                                                                tiny_value_model, batch):
    """CPU bf16 (autocast, what auto is on a CPU with native bf16): the training forward gives, bit for bit, the
    log-probs of the learner's no-grad pass (PPO's old log-probs) and of the reference scorer. Else the PPO ratio of an
    unchanged policy is not 1 and its KL to the reference not 0: attention once ran in fp32 under autograd only (0.1
    nats apart on this model; a k3 KL of 0.047 per sequence before any update on SmolLM2)."""
    from rlhf_ray.config import DeepSpeedConfig, ModelConfig
    from rlhf_ray.scorer import ReferenceScorer

    cfg = ppo_config(tiny_llama, tiny_value_model, **{"placement.actor": {"num_workers": 1, "cpus_per_worker": 1},
                                                      "placement.critic.num_workers": 1, "ppo.mini_batch_size": 2,
                                                      "ppo.actor.deepspeed.precision": "bf16",
                                                      "ppo.critic.deepspeed.precision": "bf16"})
    group = PolicyGroup(cfg)
    try:
        [train_pass] = group.apply(_train_pass_logprobs, batch)
        old = group.logprobs(batch)
    finally:
        group.shutdown()
    reference = ReferenceScorer("reference", 0, 1, model=ModelConfig(path=tiny_llama),
                                deepspeed=DeepSpeedConfig(precision="bf16", micro_batch_size=2))
    reference.setup()
    act = batch["action_mask"].bool()
    assert (train_pass[act] - old[act]).abs().max() == 0
    assert (train_pass[act] - reference.logprobs(batch)[act]).abs().max() == 0


def test_auto_on_a_bf16_cpu_computes_in_bf16_over_fp32_weights(ray_cluster, tiny_llama, tiny_value_model, batch):
    """precision auto on a CPU with native bf16: the learner's matmuls run in bf16 under torch.autocast while its
    weights, residual stream and Adam moments stay fp32 (deepspeed_config.autocast_bf16; DeepSpeed's bf16 mode, bf16
    weights, stalled GRPO on this CPU). A step far below bf16's resolution (lr 1e-6) moves every fp32 weight and is
    exported as such (the weight sync rounds it to the engines' bf16)."""
    from rlhf_ray.env import NATIVE_BF16_CPU_FLAGS, cpu_flags

    if not cpu_flags() & set(NATIVE_BF16_CPU_FLAGS):
        pytest.skip("this CPU has no native bf16 matmul: auto is fp32 here (the choice is tested as logic)")
    cfg = ppo_config(tiny_llama, tiny_value_model, **{  # 2 ranks, ZeRO-2: DeepSpeed's ZeRO optimizer, bf16 autocast
        "ppo.actor.optim.lr": 1e-6, "ppo.actor.deepspeed.precision": "auto", "ppo.critic.deepspeed.precision": "auto"})
    group = PolicyGroup(cfg)
    try:
        assert group.dtype == "bfloat16"
        assert group.apply(lambda w: (w.ds_config["torch_autocast"], w.ds_config["bf16"]["enabled"]))[0] == (
            {"enabled": True, "dtype": "bfloat16"}, False)
        assert group.apply(_computed_in, batch)[0] == ("torch.float32", "torch.bfloat16", "torch.float32")
        # attention on these short rows: bf16 matmuls with autograd and without it (models/attention.py)
        assert group.apply(_attention_dtypes, batch)[0] == {"train": {"matmul torch.bfloat16"},
                                                            "logprobs": {"matmul torch.bfloat16"}}
        before = group.apply(_precision_state)[0]
        stats = group.train(experience(batch, group.logprobs(batch), advantage=1.0))
        assert stats["optimizer_steps"] == 2  # 8 rows, mini-batches of 4
        after = group.apply(_precision_state, True)[0]
        sent = dict(exported(group))
    finally:
        group.shutdown()
    assert before["module"] == after["module"] == {"torch.float32"} and after["moments"] == {"torch.float32"}
    moved = rounded_away = total = 0
    for name, weight in after["master"].items():
        assert torch.equal(sent[name], weight), name  # exported as trained; the sender casts to the engines' dtype
        if "embed_tokens" in name:
            continue  # rows of tokens absent from the batch get no gradient
        moved += int((weight != before["master"][name]).sum())
        rounded_away += int((weight.to(torch.bfloat16) == before["master"][name].to(torch.bfloat16)).sum())
        total += weight.numel()
    assert moved > 0.9 * total  # every weight took the small (Adam: ~lr) step in fp32 ...
    assert rounded_away > 0.9 * total  # ... which bf16 weights would have lost for almost all of them


# ------------------------------------------------------------------------------------------------ GPU
# ppo_config pins fp32 on both learners, and a restated precision decides the run's one (config.ppo_precision): 'auto'
# on both, so that the GPU ranks resolve it (bf16)
AUTO_PRECISION = {"ppo.actor.deepspeed.precision": "auto", "ppo.critic.deepspeed.precision": "auto"}


@pytest.mark.gpu
def test_policy_on_gpu_bf16_zero3_offload(ray_cluster, tiny_llama, tiny_value_model, batch, hf_model):
    cfg = ppo_config(tiny_llama, tiny_value_model, **{
        "placement.actor": {"num_workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 1},
        "placement.critic": {"num_workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 1},
        "ppo.mini_batch_size": 2, "ppo.actor.deepspeed.zero_stage": 3, **AUTO_PRECISION,
        "ppo.actor.deepspeed.offload_optimizer": True, "ppo.actor.deepspeed.gradient_checkpointing": True})
    group = PolicyGroup(cfg)
    try:
        assert group.apply(lambda w: str(next(w.module.parameters()).dtype))[0] == "torch.bfloat16"
        lp = group.logprobs(batch)
        act = batch["action_mask"].bool()  # the scored columns (logits_to_keep: earlier ones are 0)
        assert (lp - transformers_logprobs(hf_model, batch))[act].abs().mean() < 0.1  # bf16 vs fp32
        start = lp
        for _ in range(3):
            group.train(experience(batch, lp, advantage=1.0))
            lp = group.logprobs(batch)
        assert (lp - start)[act].mean() > 0
        assert len(exported(group)) == len(list(hf_model.parameters()))
    finally:
        group.shutdown()


@pytest.mark.gpu
def test_lora_actor_scores_the_reference_with_its_adapters_disabled_under_zero3_on_gpu(ray_cluster, tiny_llama,
                                                                                          tiny_value_model, batch):
    """placement.reference_in_actor on a GPU rank with ZeRO-3 and bf16: the adapters-off forward gathers the frozen
    base like any forward, gives the reference's log-probs before training and exactly those after it, while the
    adapters-on log-probs of the same rank have moved."""
    cfg = ppo_config(tiny_llama, tiny_value_model, **{
        "placement.actor": {"num_workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 1},
        "placement.critic": {"num_workers": 1, "cpus_per_worker": 1}, "placement.reference_in_actor": True,
        "ppo.actor.lora.dim": 4, "ppo.actor.lora.module_names": ["q_proj", "v_proj"], "ppo.actor.optim.lr": 1e-2,
        "ppo.mini_batch_size": 2,
        "ppo.actor.deepspeed.zero_stage": 3, **AUTO_PRECISION})
    group = PolicyGroup(cfg)
    try:
        assert group.apply(lambda w: (w.device.type, str(next(w.module.parameters()).dtype))) == [
            ("cuda", "torch.bfloat16")]
        reference = lambda: group.run_sharded("reference_logprobs", batch)  # noqa: E731
        before, lp = reference(), group.logprobs(batch)
        act = batch["action_mask"].bool()
        assert torch.equal(before[act], lp[act])  # lora_B starts at 0: adapters on or off, the base model
        start = lp
        for _ in range(3):
            group.train(experience(batch, lp, advantage=1.0))
            lp = group.logprobs(batch)
        assert (lp - start)[act].mean() > 0  # the adapters trained ...
        assert torch.equal(reference()[act], before[act])  # ... and the reference is still the base
    finally:
        group.shutdown()


def test_one_rank_learner_steps_like_a_bare_torch_loop(ray_cluster, tiny_llama, tiny_value_model, batch, hf_model):
    """One rank runs no ZeRO-1/2 machinery (stage 0, no all-reduce with itself, torch's fused AdamW on CPU), and its
    step equals the same PPO loss, accumulated over the same micro-batches, clipped and stepped by hand."""
    from rlhf_ray import rl
    from rlhf_ray.learner import causal_logprobs, policy_objective

    cfg = ppo_config(tiny_llama, tiny_value_model, **{"placement.actor": {"num_workers": 1, "cpus_per_worker": 0.25}})
    group = PolicyGroup(cfg)  # ZeRO-2 asked (the default), micro-batch 2, mini-batch 4: 2 micro-batches per step
    try:
        engine = group.apply(lambda w: (w.engine.zero_optimization_stage(), w.engine.enable_backward_allreduce,
                                        w.engine.optimizer.defaults.get("fused")))[0]
        assert engine == (0, False, True)
        rows = {k: v[:4] for k, v in batch.items()}
        exp = experience(rows, group.logprobs(rows), advantage=1.0)
        group.train(exp)
        after = group.logprobs(rows)
    finally:
        group.shutdown()

    import copy

    from rlhf_ray.models.attention import use_cpu_attention

    model = copy.deepcopy(hf_model).train()
    use_cpu_attention(model)  # the attention the CPU learner computes with (equal to sdpa's to fp32 rounding)
    optim = cfg.ppo.actor.optim
    optimizer = torch.optim.AdamW(model.parameters(), lr=optim.lr, betas=tuple(optim.betas),
                                  weight_decay=optim.weight_decay)
    units = float(rl.aggregation_units(exp["action_mask"], cfg.ppo.loss_aggregation))
    for half in (slice(0, 2), slice(2, 4)):
        mb = {k: v[half] for k, v in exp.items()}
        lp, ent = causal_logprobs(model, mb, True, "detached", True, cfg.generation.temperature)
        loss, _ = policy_objective(cfg.ppo, lp, ent, mb, 0.0, rl.Aggregation(cfg.ppo.loss_aggregation, units=units))
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
    optimizer.step()
    model.eval()
    with torch.no_grad():
        expected = causal_logprobs(model, rows, True, logits_to_keep=True, temperature=cfg.generation.temperature)[0]
    assert (after - exp["old_logprobs"]).abs().max() > 1e-3  # the step moved the weights
    assert_scored_like(after, expected, rows, atol=1e-5)  # (columns before a micro-batch's first action: 0)
