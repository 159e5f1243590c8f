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
