"""Process environment every rlhf_ray process shares (cache folders, library switches), and the device choice each
worker makes for itself.

`apply_process_defaults` (called by rlhf_ray/__init__.py in every process) sets folder and library defaults, also
passed to Ray actors through their runtime_env (`worker_env_vars`). Nothing about the device is decided there or
shipped from the driver: the driver of a KubeRay / `ray up` cluster runs on a CPU head while learners and engines
sit on GPU nodes. Every worker calls `choose_device()` first thing in its own process (learner and scorer ranks,
vLLM engine actors, Ray Train workers), resolves its precision with `resolve_precision`, and reports what it chose
(`describe()`); the driver only checks that the reports agree (`check_agreement`).
"""
from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path
from typing import Optional


def cache_root() -> Path:
    """Where converted models, tiny fixtures, tokenized data and compiled ops are kept (RLHF_RAY_CACHE)."""
    return Path(os.environ.get("RLHF_RAY_CACHE", Path.home() / ".cache" / "rlhf_ray")).expanduser()


def _process_defaults() -> dict[str, str]:
    return {
        # DeepSpeed JIT-builds a small shared-memory comm op at every init_distributed on CPU; one known folder
        # means it is built once per machine (setup.sh does it) instead of once per test or per worker.
        "TORCH_EXTENSIONS_DIR": str(cache_root() / "torch_extensions"),
        # In-process vLLM engine core: faster start, less memory, tensors reach workers by reference.
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_DEDUP_LOGS": "0",
        # glibc malloc: by default every freed block above a sliding threshold goes back to the kernel, so each
        # training step's logits, activations and gradients (tens to hundreds of MB) come back as fresh pages the
        # kernel must zero: ~0.5-1.2M page faults per PPO step on SmolLM2. A fixed mmap threshold, a large top pad
        # and no trimming keep the heap: the fp32 train phase went 11.7 -> 9.3 s (benchmarks/results/learner_speed.md).
        # glibc caps that threshold at 32 MiB, so blocks above it (the logits and their softmax, the embedding's and
        # LM head's gradients: ~300k faults a step left) were still mmapped afresh each step; no mmap at all keeps
        # them in the heap too: 0 faults a step after the first, a bare bf16 PPO step 1.08x faster (bench_malloc.py).
        "MALLOC_MMAP_THRESHOLD_": str(32 << 20),
        "MALLOC_MMAP_MAX_": "0",
        "MALLOC_TOP_PAD_": str(256 << 20),
        "MALLOC_TRIM_THRESHOLD_": str(64 << 30),
    }


def apply_process_defaults() -> None:
    for key, value in _process_defaults().items():
        os.environ.setdefault(key, value)


def worker_env_vars() -> dict[str, str]:
    """Environment for Ray actors and Ray Train workers (runtime_env['env_vars']): never a device choice."""
    apply_process_defaults()
    return {key: os.environ[key] for key in _process_defaults()}


# Ray Train's PlacementGroupCleaner asks Ray's State API every few seconds whether the train controller still lives.
# A private local cluster (resources.init_ray) runs without the dashboard that serves that API, so every SFT / RM
# stage printed "Failed to query Ray Train Controller actor state ..." every few seconds. The stages remove their
# placement groups themselves; local clusters drop that one line in every worker (worker_process_setup_hook).
PG_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
STATE_API_WARNING = "Failed to query Ray Train Controller actor state"


class _DropStateApiWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return STATE_API_WARNING not in record.getMessage()


QUIET_STATE_API_ENV = "RLHF_RAY_QUIET_STATE_API"  # "1" in the runtime_env of local clusters below DEBUG


def quiet_state_api_warning() -> None:
    """In every worker of a private local cluster (console.setup_worker_process), unless the driver logs at DEBUG."""
    if os.environ.get(QUIET_STATE_API_ENV) == "1":
        logging.getLogger(PG_CLEANER_LOGGER).addFilter(_DropStateApiWarning())


# ------------------------------------------------------------------------------------ worker-side choice
def ray_gpu_ids() -> Optional[list]:
    """The GPUs Ray assigned to this process when it is a Ray worker (actor or task); None in a driver."""
    if "ray" not in sys.modules:
        return None
    import ray

    if not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        return None
    return ray.get_gpu_ids()


def choose_device() -> str:
    """'cuda' or 'cpu' for THIS process, from its own torch.cuda.is_available(), and DS_ACCELERATOR set to match.

    Call it in the process that uses the device, first thing in an actor's __init__ or a Ray Train loop: not at
    import (Ray loads an actor's class before it sets CUDA_VISIBLE_DEVICES), and before deepspeed is imported here
    (DeepSpeed reads DS_ACCELERATOR once, at import). A Ray worker without a GPU of its own uses the CPU: Ray 2.60
    leaves CUDA_VISIBLE_DEVICES alone for zero-GPU actors, so they would otherwise see, and use, every GPU of their
    node. Any inherited DS_ACCELERATOR (a local cluster's workers inherit the driver's environment) is replaced."""
    import torch

    gpus = ray_gpu_ids()
    device = "cuda" if (gpus is None or len(gpus) > 0) and torch.cuda.is_available() else "cpu"
    real = sys.modules.get("deepspeed.accelerator.real_accelerator")
    chosen = getattr(getattr(real, "ds_accelerator", None), "_name", None)
    if chosen is not None and chosen != device:
        raise RuntimeError(f"deepspeed was imported in this process (pid {os.getpid()}) before its device was chosen "
                           f"and uses the {chosen} accelerator, but this process runs on {device}")
    os.environ["DS_ACCELERATOR"] = device
    return device


PRECISION_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

# x86 CPU flags of native bf16 matmul: AMX (Sapphire Rapids and later) and AVX-512 BF16 (Cooper Lake, Zen 4 and
# later). Without them torch still runs bf16 (mkldnn emulates it on any AVX-512 CPU), but slower than fp32.
NATIVE_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def parse_cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The flags of /proc/cpuinfo's first 'flags' line (x86 Linux; other systems have none: empty)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def auto_precision(device: str, cpu_flags: frozenset[str]) -> str:
    """What 'auto' means for a worker on `device` whose CPU has `cpu_flags`: bf16 on GPU and on a CPU with native
    bf16 matmul (mixed precision: DeepSpeed keeps fp32 master weights and optimizer states), fp32 otherwise."""
    if device == "cuda" or any(flag in cpu_flags for flag in NATIVE_BF16_CPU_FLAGS):
        return "bf16"
    return "fp32"


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """This machine's CPU flags, read in the worker itself. /proc/cpuinfo lists only what the kernel enabled (AMX
    needs kernel support to be usable), unlike torch.backends.mkldnn's bf16 check (true on any AVX-512 CPU, where
    bf16 is emulated) or get_cpu_capability() (says AVX512, not whether it has bf16). Unreadable: no flags, fp32."""
    try:
        return parse_cpu_flags(Path("/proc/cpuinfo").read_text())
    except OSError:
        return frozenset()


# Linux asks a process to request AMX tile state before it may execute AMX instructions (the kernel's
# Documentation/arch/x86/xstate.rst: arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)). oneDNN does so before its
# own AMX kernels; vLLM's CPU attention kernel uses AMX for bf16 without asking, and where no oneDNN call asked first
# the engine dies of SIGILL in its first forward (seen 2026-12-03 on kernel 6.18: "SIGILL ... cpu_attention::
# AttentionMainLoop"). The permission is per process and inherited by forked children.
ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA, SYS_ARCH_PRCTL_X86_64 = 0x1023, 18, 158


def request_amx(flags: Optional[frozenset[str]] = None) -> bool:
    """Request AMX tile state for this process when the CPU lists it (x86-64 Linux); True when granted."""
    import ctypes
    import platform

    flags = cpu_flags() if flags is None else flags
    if "amx_tile" not in flags or sys.platform != "linux" or platform.machine() != "x86_64":
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    granted = libc.syscall(SYS_ARCH_PRCTL_X86_64, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0
    if not granted:
        logging.getLogger(__name__).warning("AMX tile state not granted (errno %d): vLLM's bf16 CPU attention may "
                                            "fail; use precision fp32", ctypes.get_errno())
    return granted


def resolve_precision(precision: str, device: str) -> str:
    """The one place 'auto' is decided, in the worker with its own device and CPU (auto_precision). Learners,
    scorers and engines of a PPO run all resolve ppo.actor.deepspeed.precision (config.ppo_precision) here."""
    if precision == "auto":
        return auto_precision(device, frozenset() if device == "cuda" else cpu_flags())
    if precision not in PRECISION_DTYPES:
        raise ValueError(f"unknown precision {precision!r}; choose auto or one of {', '.join(PRECISION_DTYPES)}")
    return precision


def precision_dtype(precision: str, device: str) -> str:
    """The torch dtype name ('float32', 'bfloat16', 'float16') a worker on `device` computes in."""
    return PRECISION_DTYPES[resolve_precision(precision, device)]


# ------------------------------------------------------------------------------------- driver-side check
class DeviceMismatchError(RuntimeError):
    """Workers of one run chose devices, precisions or transports that cannot work together."""


def _ranks(reports: list[dict]) -> str:
    return ", ".join(f"{r['role']}[{r.get('rank', 0)}]" for r in reports)


def check_agreement(reports: list[dict], sender_role: str = "actor") -> str:
    """Check what the workers chose (their describe() dicts: role, rank, device, backend, dtype, transport for
    engines) and return a one-line summary. Raises DeviceMismatchError naming the roles that disagree:
    - every model computes in one dtype (one precision for learners, scorers and engines);
    - the ranks of one role share one device and one torch.distributed backend;
    - the engines share one weight-sync transport, and a GPU transport (nccl, ipc) has a GPU sender
      (`sender_role` rank 0)."""
    dtypes: dict[str, list[dict]] = {}
    for r in reports:
        if r.get("dtype") is not None:
            dtypes.setdefault(r["dtype"], []).append(r)
    if len(dtypes) > 1:
        raise DeviceMismatchError("workers compute in different dtypes: " + "; ".join(
            f"{dtype}: {_ranks(rs)}" for dtype, rs in dtypes.items()) + ". One precision serves every model: set "
            "ppo.actor.deepspeed.precision explicitly (auto is bf16 on GPU and on CPUs with AMX or AVX-512 BF16, "
            "fp32 elsewhere, decided by each worker)")
    by_role: dict[str, list[dict]] = {}
    for r in reports:
        by_role.setdefault(r["role"], []).append(r)
    for role, rs in by_role.items():
        for key in ("device", "backend"):
            values = {r.get(key) for r in rs}
            if len(values) > 1:
                raise DeviceMismatchError(f"the ranks of {role} disagree on {key}: " + "; ".join(
                    f"{r.get(key)}: {_ranks([r])}" for r in rs))
    engines = [r for r in reports if r.get("transport") is not None]
    transports = {r["transport"] for r in engines}
    if len(transports) > 1:
        raise DeviceMismatchError("engines chose different weight-sync transports: " + "; ".join(
            f"{t}: {_ranks([r for r in engines if r['transport'] == t])}" for t in sorted(transports)))
    sender = next((r for r in reports if r["role"] == sender_role and r.get("rank", 0) == 0), None)
    if transports & {"nccl", "ipc"} and sender is not None and sender["device"] != "cuda":
        raise DeviceMismatchError(
            f"engines ({_ranks(engines)}) chose weight-sync transport {transports.pop()}, which needs a GPU on both "
            f"ends, but the sender {sender_role}[0] is on {sender['device']}: set generation.sync_transport to gloo "
            f"or object_store, or give placement.{sender_role} GPUs")
    return "; ".join(f"{role} x{len(rs)} " + "/".join(str(v) for v in (
        rs[0].get("device"), rs[0].get("backend") or rs[0].get("transport"), rs[0].get("dtype")) if v is not None)
        for role, rs in by_role.items())
