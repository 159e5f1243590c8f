"""SFT as real Ray Train jobs (2 CPU workers, gloo) with real DeepSpeed ZeRO engines on a tiny Llama, in precision
auto (bf16 on a CPU with native bf16): outputs are checked against transformers in the dtype the workers chose.

Two fits, shared by the tests below: ZeRO-3 with LoRA + gradient checkpointing + accumulation + warm-up/cosine;
ZeRO-2 full fine-tuning with a worker SIGKILLed mid-run (FailureConfig restart from the last checkpoint).
Run under the heavy lock: flock /tmp/rlhf_ray_heavy.lock .venv/bin/python -m pytest tests/test_train_sft.py
"""
from __future__ import annotations

import glob
import math
import os

import pytest
import torch

from rlhf_ray.config import load_config
from rlhf_ray.env import precision_dtype
from rlhf_ray.train import read_metrics, run_sft

pytestmark = pytest.mark.timeout(600)

STEPS, LR, LORA_LR, WARMUP = 8, 3e-3, 1e-2, 2


def sft_config(tmp_path, model: str, **overrides):
    return load_config(None, {
        "ray.address": "local", "run.output_dir": str(tmp_path), "run.seed": 0, "models.actor.path": model,
        "data.max_prompt_len": 64, "data.max_answer_len": 32, "data.cache_dir": str(tmp_path / "data_cache"),
        "sft.num_workers": 2, "sft.deepspeed.micro_batch_size": 2, "sft.deepspeed.global_batch_size": 8,
        "sft.max_steps": STEPS, "sft.optim.lr": LR, "sft.optim.warmup_steps": WARMUP, "sft.optim.lr_schedule": "cosine",
        "sft.log_every": 1, "sft.eval_every": 4, "sft.checkpoint_every": 4, **overrides})


def eval_rows(cfg):
    from rlhf_ray.data import load_stage_dataset
    from rlhf_ray.models.loading import load_tokenizer

    return load_stage_dataset(cfg, "sft", load_tokenizer(cfg.models.actor), split="eval").to_list()


def hf_eval_loss(path: str, rows: list[dict], dtype: str = "float32") -> float:
    """Token-mean response loss with plain transformers (its own shifted labels loss), one row at a time. bf16 as the
    run computes it on CPU: fp32 weights under bf16 autocast (deepspeed_config.autocast_bf16)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    nll, tokens = 0.0, 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        for r in rows:
            labels = torch.tensor([r["labels"]])
            count = int((labels[0, 1:] != -100).sum())
            if count:
                nll += model(input_ids=torch.tensor([r["input_ids"]]), labels=labels).loss.item() * count
                tokens += count
    return nll / tokens


def reports(result) -> list[dict]:
    return [r for r in read_metrics(result.metrics_file) if r["event"] == "report"]


def run_dtype(result) -> str:
    """The dtype the workers reported computing in (precision auto, decided in each worker)."""
    return next(r for r in read_metrics(result.metrics_file) if r["event"] == "start")["workers"][0]["dtype"]


def expected_lr(step: int, lr: float) -> float:
    """Warm-up then cosine to 0, written out independently of transformers' scheduler."""
    if step < WARMUP:
        return lr * step / WARMUP
    return lr * 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / (STEPS - WARMUP)))


@pytest.fixture(scope="module")
def zero3(ray_cluster, tiny_llama, tmp_path_factory):
    cfg = sft_config(tmp_path_factory.mktemp("sft_zero3"), tiny_llama, **{
        "sft.deepspeed.zero_stage": 3, "sft.deepspeed.gradient_checkpointing": True, "sft.optim.lr": LORA_LR,
        "sft.lora.dim": 8, "sft.lora.module_names": ["q_proj", "v_proj"]})
    return cfg, run_sft(cfg)


@pytest.fixture(scope="module")
def killed(ray_cluster, tiny_llama, tmp_path_factory):
    """Rank 1 SIGKILLs itself before step 7, once; the last checkpoint is at step 4. (Ray Train's controller
    registers a reported checkpoint at its next poll of every worker; two reports later it surely has.)"""
    tmp = tmp_path_factory.mktemp("sft_killed")
    cfg = sft_config(tmp, tiny_llama, **{"sft.deepspeed.zero_stage": 2, "sft.max_failures": 1})
    fault = {"RLHF_RAY_FAULT_KILL_STEP": "7", "RLHF_RAY_FAULT_RANK": "1", "RLHF_RAY_FAULT_MARKER": str(tmp / "killed")}
    os.environ.update(fault)
    try:
        result = run_sft(cfg)
    finally:
        for key in fault:
            os.environ.pop(key)
    assert (tmp / "killed").exists(), "the fault was never injected"
    return cfg, result


@pytest.fixture(scope="module")
def resumed(killed):
    """A new run from the killed run's final checkpoint (sft.resume_from), planned 2 steps longer."""
    cfg, result = killed
    cfg2 = load_config(None, {"ray.address": "local", "run.output_dir": str(result.output_dir.parent / "resumed"),
                              "models.actor.path": cfg.models.actor.path, "data.cache_dir": cfg.data.cache_dir,
                              "data.max_prompt_len": 64, "data.max_answer_len": 32,
                              "sft.deepspeed.global_batch_size": 8, "sft.max_steps": STEPS + 2, "sft.log_every": 1,
                              "sft.eval_every": 0, "sft.resume_from": result.checkpoint})
    return cfg2, run_sft(cfg2)


def check_output_matches_reports(cfg, result, base_model: str) -> None:
    rows = eval_rows(cfg)
    dtype = run_dtype(result)
    reloaded = hf_eval_loss(str(result.output_dir), rows, dtype)
    initial = hf_eval_loss(base_model, rows, dtype)
    # fp32: equal to 1e-4. bf16 matmuls round per token (8 significant bits); the run evaluates padded micro-batches
    tol = 1e-4 if dtype == "float32" else 2e-2
    assert abs(reloaded - result.metrics["eval_loss"]) < tol, (reloaded, result.metrics["eval_loss"])
    assert reloaded < initial - 0.1
    assert abs(reports(result)[0]["eval_loss"] - initial) < tol  # the step-0 report is the initial model


def test_zero3_lora_output_reloads_with_the_reported_eval_loss(zero3, tiny_llama):
    cfg, result = zero3
    check_output_matches_reports(cfg, result, tiny_llama)
    assert result.metrics["eval_perplexity"] == pytest.approx(math.exp(result.metrics["eval_loss"]), rel=1e-6)


def test_schedule_and_gradient_accumulation_from_the_reports(zero3):
    _, result = zero3
    steps = [r for r in reports(result) if r["step"] > 0]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))  # log_every 1
    # lr after step s is the schedule's value for step s: warm-up then cosine (a constant lr would fail).
    assert [r["lr"] for r in steps] == pytest.approx([expected_lr(s, LORA_LR) for s in range(1, STEPS + 1)], abs=1e-9)
    # global batch 8 = micro 2 x 2 ranks x 2 accumulated micro-batches: DeepSpeed steps once per 2 micro-batches.
    assert all(r["optimizer_steps"] == r["step"] and r["samples"] == 8 * r["step"] for r in steps)
    assert result.plan.accumulation == 2
    assert all(r["tokens_per_s"] > 0 and r["eta_s"] >= 0 for r in steps)
    assert [r["step"] for r in steps if "eval_loss" in r] == [4, 8]
    # every worker chose its device, backend and dtype in its own process (nothing shipped from the driver)
    [start] = [r for r in read_metrics(result.metrics_file) if r["event"] == "start"]
    dtype = precision_dtype("auto", "cpu")  # what auto is on this machine's CPU
    assert [(w["rank"], w["device"], w["backend"], w["dtype"]) for w in start["workers"]] == [
        (0, "cpu", "gloo", dtype), (1, "cpu", "gloo", dtype)]
    assert start["grad_reduction"] == "deepspeed"  # ZeRO-3: per micro-batch, grad_reduction has no say


def test_zero3_output_loads_in_vllm(zero3, ray_cluster):
    import ray
    from ray.util.placement_group import remove_placement_group
    from transformers import AutoModelForCausalLM

    from rlhf_ray.generator import start_engine
    from rlhf_ray.resources import ready_placement_group

    cfg, result = zero3
    row = eval_rows(cfg)[0]
    prompt = row["input_ids"][:next(i for i, label in enumerate(row["labels"]) if label != -100)]
    gen = load_config(None, {"generation.max_new_tokens": 6, "generation.max_model_len": 256}).generation
    pg = ready_placement_group("generator", [{"CPU": 1}])
    engine = start_engine(str(result.output_dir), gen, placement_group=pg, precision="fp32")  # == the fp32 oracle
    try:
        sample = ray.get(engine.generate.remote([prompt], greedy=True))[0]
    finally:
        ray.kill(engine)
        remove_placement_group(pg)
    model = AutoModelForCausalLM.from_pretrained(str(result.output_dir), dtype=torch.float32).eval()
    ids = list(prompt)
    with torch.no_grad():
        for _ in sample.token_ids:
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert sample.token_ids and sample.token_ids == ids[len(prompt):]


def test_lora_trains_only_the_named_modules_and_saves_them_merged(zero3, tiny_llama):
    from safetensors.torch import load_file

    _, result = zero3
    out = result.output_dir
    assert not (out / "adapter_config.json").exists()  # a plain merged folder, no peft adapter
    trained, base = load_file(str(out / "model.safetensors")), load_file(os.path.join(tiny_llama, "model.safetensors"))
    assert trained.keys() == base.keys()
    for name, tensor in base.items():
        if "q_proj" in name or "v_proj" in name:
            assert not torch.equal(trained[name], tensor), name
        else:
            # frozen: bit-exact (bf16 on CPU holds fp32 weights under autocast; the saved dtype is the held one)
            assert torch.equal(trained[name], tensor.to(trained[name].dtype)), name


def test_killed_worker_resumes_from_the_last_checkpoint(killed, tiny_llama):
    cfg, result = killed
    records = read_metrics(result.metrics_file)
    starts = [i for i, r in enumerate(records) if r["event"] == "start"]
    assert len(starts) == 2  # the first attempt, then one restart
    assert records[starts[1]]["start_step"] == 4 and records[starts[1]]["restored_from"]
    first_attempt = [r["step"] for r in records[starts[0]:starts[1]] if r["event"] == "report"]
    resumed = [r["step"] for r in records[starts[1]:] if r["event"] == "report"]
    assert first_attempt == [0, 1, 2, 3, 4, 5, 6]  # rank 1 died before step 7
    assert resumed[0] == 4 + 1 and resumed == list(range(5, STEPS + 1))
    assert result.plan.total_steps == STEPS and result.metrics["step"] == STEPS
    check_output_matches_reports(cfg, result, tiny_llama)


def test_resume_from_a_given_checkpoint_continues_the_run(killed, resumed):
    _, first = killed
    _, result = resumed
    records = read_metrics(result.metrics_file)
    assert records[0]["event"] == "start" and records[0]["start_step"] == STEPS
    assert records[0]["restored_from"] == first.checkpoint
    assert [r["step"] for r in records if r["event"] == "report"] == [STEPS + 1, STEPS + 2]  # no step-0 eval either
    assert result.metrics["loss"] < reports(first)[1]["loss"]  # continues trained weights, not the initial ones


def test_zero2_on_two_cpu_workers_trains_like_one_worker(ray_cluster, tiny_llama, tmp_path):
    """Two CPU workers at ZeRO-2 (gradients all-reduced through DeepSpeed's shared-memory kernel, in place, fused AdamW
    on the partitions) make the same updates as one worker (no ZeRO, fused AdamW): same rows per step, same averaged
    gradients, so the same losses and trained weights, up to float summation order. fp32, 4 steps."""
    from safetensors.torch import load_file

    common = {"sft.deepspeed.precision": "fp32", "sft.deepspeed.zero_stage": 2, "sft.max_steps": 4,
              "sft.optim.warmup_steps": 0, "sft.eval_every": 0, "sft.checkpoint_every": 0}
    shm_names = lambda: set(glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*"))  # noqa: E731
    before = shm_names()
    two = run_sft(sft_config(tmp_path / "two", tiny_llama, **common))
    assert shm_names() <= before  # the kernel's buffers left nothing behind in /dev/shm (RAM)
    one = run_sft(sft_config(tmp_path / "one", tiny_llama, **common, **{"sft.num_workers": 1}))
    [start] = [r for r in read_metrics(two.metrics_file) if r["event"] == "start"]
    assert [w["allreduce"] for w in start["workers"]] == ["shm", "shm"]  # ZeRO's all-reduces took the kernel
    assert start["grad_reduction"] == "per_step"  # auto on CPU: once per step, coalesced (tests/test_accumulation.py)
    assert (two.plan.accumulation, one.plan.accumulation) == (2, 4)
    losses = lambda result: [r["loss"] for r in reports(result) if r["step"] > 0]  # noqa: E731
    assert losses(two) == pytest.approx(losses(one), rel=1e-5)
    a, b = load_file(str(two.output_dir / "model.safetensors")), load_file(str(one.output_dir / "model.safetensors"))
    base = load_file(os.path.join(tiny_llama, "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert not torch.equal(a[name], base[name]) or "norm" in name, name  # trained
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=2e-5, msg=name)


@pytest.mark.gpu
def test_sft_on_gpus_with_bf16_and_optimizer_offload(ray_cluster, tiny_llama, tmp_path):
    """GPU path: NCCL process group, bf16 ('auto'), ZeRO-2 with DeepSpeedCPUAdam optimizer offload."""
    ranks = min(2, torch.cuda.device_count())
    cfg = sft_config(tmp_path, tiny_llama, **{
        "sft.num_workers": ranks, "sft.deepspeed.global_batch_size": 4 * ranks, "sft.deepspeed.zero_stage": 2,
        "sft.deepspeed.offload_optimizer": True})
    result = run_sft(cfg)
    assert result.plan.num_ranks == ranks and result.metrics["step"] == STEPS
    rows = eval_rows(cfg)
    assert hf_eval_loss(str(result.output_dir), rows) < hf_eval_loss(tiny_llama, rows) - 0.1


def test_a_finished_stage_leaves_no_ray_train_controller_alive(zero3):
    """Ray Train's Ctrl-C handler holds its run's controller actor; run_stage puts the previous handler back, so
    the controller (and the actors it owns) go with the run, not with this long-lived driver."""
    import time

    from ray._private import state

    deadline = time.monotonic() + 20
    while (alive := [a["ActorClassName"] for a in state.actors().values() if a["State"] != "DEAD"
                     and a["ActorClassName"] in ("TrainController", "DatasetManager")]) and time.monotonic() < deadline:
        time.sleep(0.25)
    assert alive == []
