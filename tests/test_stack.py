"""The real stack on the fixtures: vLLM (in a Ray actor) agrees with transformers, DeepSpeed trains them.

Acceptance of the foundation: each tiny fixture gives identical greedy ids in transformers and vLLM and takes a
DeepSpeed optimizer step; the converted SmolLM2 folder gives the same first 16 greedy tokens of a fixed chat
prompt in transformers and vLLM (float32).
"""
import sys

import pytest
import ray
import torch
from ray.util.placement_group import remove_placement_group

from rlhf_ray.config import GenerationConfig, ModelConfig
from rlhf_ray.generator import start_engine
from rlhf_ray.models import load_causal_lm, load_tokenizer
from rlhf_ray.resources import ready_placement_group

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # test-local actor classes travel by value


def transformers_greedy(path: str, prompt_ids: list[int], n_tokens: int) -> list[int]:
    """Oracle: a plain argmax loop in transformers, EOS not special (as vLLM with ignore_eos)."""
    model = load_causal_lm(ModelConfig(path=path), dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        for _ in range(n_tokens):
            next_id = model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    return ids[0, len(prompt_ids):].tolist()


def vllm_greedy(path: str, prompts: list[list[int]], n_tokens: int) -> list[list[int]]:
    """Greedy ids from a real vLLM engine hosted by a Ray actor in its own placement group."""
    gen = GenerationConfig(max_new_tokens=n_tokens, kv_cache_gib=1)
    pg = ready_placement_group("generator", [{"CPU": 1}], timeout_s=60)
    engine = start_engine(path, gen, placement_group=pg, precision="fp32")  # the oracle is transformers in fp32
    try:
        samples = ray.get(engine.generate.remote(prompts, greedy=True, ignore_eos=True), timeout=300)
    finally:
        ray.kill(engine)
        remove_placement_group(pg)
    return [s.token_ids for s in sorted(samples, key=lambda s: s.prompt_index)]


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_tiny_fixture_greedy_ids_equal_in_transformers_and_vllm(ray_cluster, tiny_models, family):
    path = tiny_models[family]
    tok = load_tokenizer(ModelConfig(path=path))
    prompts = [tok("What is 3 plus 4?")["input_ids"],
               tok.apply_chat_template([{"role": "user", "content": "hello world"}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False)]
    got = vllm_greedy(path, prompts, 16)  # EOS ignored on both sides: exactly 16 tokens each
    for prompt, vllm_ids in zip(prompts, got):
        assert vllm_ids == transformers_greedy(path, prompt, 16)


def test_smollm2_first_16_greedy_tokens_equal_in_transformers_and_vllm(ray_cluster, smollm2_dir):
    tok = load_tokenizer(ModelConfig(path=smollm2_dir))
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, tokenize=True, return_dict=False)
    expected = transformers_greedy(smollm2_dir, prompt, 16)
    assert "Paris" in tok.decode(expected)  # a real pretrained chat model, not random weights
    [got] = vllm_greedy(smollm2_dir, [prompt], 16)
    assert got == expected


class OneStepTrainer:
    """A single-rank DeepSpeed engine in a Ray actor: one AdamW step on a fixed batch."""

    def step(self, path: str, zero_stage: int) -> dict:
        import os

        from rlhf_ray.env import choose_device

        choose_device()  # in this actor's process, before deepspeed is imported (as every rlhf_ray worker does)
        import deepspeed
        from transformers import AutoModelForCausalLM

        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
        deepspeed.init_distributed(dist_backend="gloo")
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
            config={"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                    "zero_optimization": {"stage": zero_stage}, "gradient_clipping": 1.0})
        ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(1))
        losses = []
        for _ in range(2):
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        changed = sum(int(not torch.equal(before[n], p.detach())) for n, p in engine.module.named_parameters())
        return {"losses": losses, "changed": changed, "total": len(before), "steps": engine.global_steps}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_deepspeed_takes_an_optimizer_step_on_each_fixture(ray_cluster, tiny_models, family):
    from rlhf_ray.env import worker_env_vars

    trainer = ray.remote(OneStepTrainer).options(num_cpus=1, runtime_env={"env_vars": worker_env_vars()}).remote()
    try:
        result = ray.get(trainer.step.remote(tiny_models[family], 2), timeout=300)
    finally:
        ray.kill(trainer)
    assert result["steps"] == 2
    assert result["changed"] == result["total"]  # every parameter moved
    assert result["losses"][1] < result["losses"][0]
