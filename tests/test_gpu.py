"""GPU paths (skipped without CUDA; run with `pytest tests -m gpu` on a GPU machine). See README "GPU paths"."""
import pytest
import torch

pytestmark = pytest.mark.gpu


def test_cuda_stack_imports():
    import vllm  # the CUDA build from the [gpu] extra
    from deepspeed.accelerator import get_accelerator

    assert torch.cuda.is_available() and torch.version.cuda
    assert get_accelerator().device_name() == "cuda"
    assert vllm.__version__


def test_auto_dtype_is_bf16_on_gpu():
    from rlhf_ray.models import resolve_dtype

    assert resolve_dtype("auto") == torch.bfloat16


def test_vllm_engine_on_gpu(ray_cluster, tiny_llama):
    import ray
    from ray.util.placement_group import remove_placement_group

    from rlhf_ray.config import GenerationConfig
    from rlhf_ray.generator import start_engine
    from rlhf_ray.resources import ready_placement_group

    gen = GenerationConfig(max_new_tokens=8, gpu_memory_utilization=0.2)
    pg = ready_placement_group("generator", [{"CPU": 1, "GPU": 1}], timeout_s=60)
    engine = start_engine(tiny_llama, gen, placement_group=pg, gpus=1)
    try:
        [sample] = ray.get(engine.generate.remote([[5, 6, 7]], greedy=True, ignore_eos=True))
        assert len(sample.token_ids) == 8
    finally:
        ray.kill(engine)
        remove_placement_group(pg)


def test_colocated_layout_trains_with_every_role_on_one_gpu(tmp_path, tiny_llama, tiny_value_model):
    """The launchers' colocated layout (README "Colocated layouts") on one GPU: actor, reference, critic, reward and
    the engine share it through the fractions 0.6 / 0.3 / 0.1, the engine sleeps while the others score and train,
    wakes for the sync, and the verified weights reach it every iteration."""
    from test_ppo import ppo_config

    from rlhf_ray.ppo import PPOTrainer

    cfg = ppo_config(tmp_path, tiny_llama, tiny_value_model, **{
        "generation.enable_sleep_mode": True, "generation.gpu_memory_utilization": 0.2, "generation.num_engines": 1,
        "placement.generator.gpus_per_worker": 0.1, "placement.actor.num_workers": 1,
        "placement.actor.gpus_per_worker": 0.6, "placement.critic.num_workers": 1,
        "placement.critic.gpus_per_worker": 0.3, "placement.colocate_actor_reference": True,
        "placement.colocate_critic_reward": True, "ppo.num_iterations": 2})
    trainer = PPOTrainer(cfg)
    try:
        assert trainer.engines_sleep
        assert {r["device"] for r in trainer.worker_reports()} == {"cuda"}
        for version in (1, 2):
            stats = trainer.step()
            trainer.iteration += 1
            assert stats["weight_version"] == version
    finally:
        trainer.shutdown()


def _quantized_zero_rank(rank: int, world: int, port: int, queue) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    try:
        import deepspeed

        from rlhf_ray.config import load_config
        from rlhf_ray.train.deepspeed_config import deepspeed_config

        torch.cuda.set_device(rank)
        deepspeed.init_distributed(dist_backend="nccl")
        cfg = load_config(None, {"ppo.actor.deepspeed.zero_stage": 3, "ppo.actor.deepspeed.zero_quantized_weights": True,
                                 "ppo.actor.deepspeed.zero_quantized_gradients": True,
                                 "placement.actor.num_workers": world, "ppo.mini_batch_size": 2 * world,
                                 "ppo.actor.deepspeed.micro_batch_size": 2, "placement.critic.num_workers": 1})
        ds = deepspeed_config(cfg.ppo.actor, world, cuda=True, train_batch_size=2 * world)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1))
        # lr 1e-4: AdamW's default 1e-3 overshoots this net's minimum on its second step (0.050 -> 0.274 in plain torch)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
        x = torch.randn(2, 256, generator=torch.Generator().manual_seed(rank)).to(engine.device, torch.bfloat16)
        losses = []
        for _ in range(3):
            loss = engine(x).float().pow(2).mean()
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        zero = ds["zero_optimization"]
        queue.put((rank, (zero["zero_quantized_weights"], zero["zero_quantized_gradients"]), losses))
    except Exception as e:  # reported to the test instead of hanging it
        queue.put((rank, None, repr(e)))


def test_zero_plus_plus_quantized_weights_and_gradients_train_on_gpus():
    """ZeRO++ qwZ / qgZ (the 176B and 66B launchers use them): DeepSpeed's CUDA quantizer on up to two GPUs."""
    from helpers import run_ranks

    for rank, flags, losses in run_ranks(_quantized_zero_rank, min(2, torch.cuda.device_count()), timeout_s=600):
        assert flags == (True, True), losses
        assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], (rank, losses)
