"""Process environment every rlhf_ray process shares: cache folders and CPU-vs-GPU library switches.

Set before deepspeed/vllm are imported (rlhf_ray/__init__.py calls `apply_process_defaults`) and passed to Ray
actors through their runtime_env (`worker_env_vars`), so the driver, Ray Train workers and actors agree.
"""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """Where converted models, tiny fixtures, tokenized data and compiled ops are kept (RLHF_RAY_CACHE)."""
    return Path(os.environ.get("RLHF_RAY_CACHE", Path.home() / ".cache" / "rlhf_ray")).expanduser()


def has_cuda() -> bool:
    """True when this process sees a CUDA device; decides NCCL vs gloo, bf16 vs fp32, GPU-only features."""
    import torch

    return torch.cuda.is_available()


def _process_defaults() -> dict[str, str]:
    env = {
        # DeepSpeed JIT-builds a small shared-memory comm op at every init_distributed on CPU; one known folder
        # means it is built once per machine (setup.sh does it) instead of once per test or per worker.
        "TORCH_EXTENSIONS_DIR": str(cache_root() / "torch_extensions"),
        # In-process vLLM engine core: faster start, less memory, tensors reach workers by reference.
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_DEDUP_LOGS": "0",
    }
    if not Path("/dev/nvidiactl").exists() and not os.environ.get("CUDA_VISIBLE_DEVICES"):
        # No GPU driver: DeepSpeed must use its CPU accelerator (gloo backend), decided before it is imported.
        env["DS_ACCELERATOR"] = "cpu"
    return env


def apply_process_defaults() -> None:
    for key, value in _process_defaults().items():
        os.environ.setdefault(key, value)


def worker_env_vars() -> dict[str, str]:
    """Environment for Ray actors and Ray Train workers (runtime_env['env_vars'])."""
    apply_process_defaults()
    return {key: os.environ[key] for key in _process_defaults()}
