"""`rlhf-ray plan CONFIG`: will this run fit its cluster, where does every role go, how long is one PPO iteration?

Pure arithmetic on model config.json files (parameter counts from the architecture, nothing downloaded: hub names
resolve to the configs shipped in rlhf_ray/model_configs/, or give a local folder holding a config.json). No Ray,
torch or GPU is touched, so a 175B plan is checkable on a laptop.

Memory per GPU, per process (Psi parameters, N ranks of the role; ZeRO, Rajbhandari et al. 2020):
    mixed precision Adam (bf16/fp16): weights 2, gradients 2, optimizer 12 (fp32 master + m + v) bytes per parameter
    fp32 Adam:                         weights 4, gradients 4, optimizer 8 (m + v)
    stage 0 keeps all three whole; stage 1 partitions the optimizer over N, stage 2 also the gradients,
    stage 3 also the weights: 16*Psi/N under stage 3, 2*Psi + 14*Psi/N under stage 2.
  + ZeRO-3 gather working set (two layers gathered at once), activations (Korthikanti et al. 2022, 34*s*b*h bytes
    per layer at 16 bit, attention without the s^2 term; 2*s*b*h per layer with gradient checkpointing), logits,
    vLLM's claim (gpu_memory_utilization x GPU memory: weights / TP + KV cache), weight-sync buffers (the largest
    tensor, gathered / received whole), and a per-process CUDA context. Reference and reward scorers hold
    weights only, in their learner's precision, replicated or ZeRO-3-partitioned as scorer.py decides.
  The load peak counts where it exceeds that: under ZeRO-3 a rank loads straight into its partition (plus the
    largest tensor gathered whole); otherwise it loads the whole model in fp32 first, in host memory (the "load"
    column; for GPU processes it counts against the node's host memory).
Where the roles go is simulated the way Ray places the groups of resources.ppo_layout: each group in order,
STRICT_PACK groups (one generator engine) on one node, PACK groups on one node when one has room, else spread;
whole-GPU bundles take free GPUs, fractional bundles share a GPU (Ray packs fractions onto the same device).
Engines with generation.enable_sleep_mode free their GPU memory while the others score and train, so a GPU they
share is counted at its larger phase (_gpu_bytes); `--suggest` searches such colocated layouts beside separate ones.
Time per PPO iteration: generation (prefill by FLOPs, decode by memory bandwidth), experience forward passes,
PPO training (FLOPs plus ZeRO collectives), weight sync; the assumed MFU, bandwidths and interconnect are printed.
"""
from __future__ import annotations

import copy
import functools
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from rlhf_ray.config import (ClusterConfig, Config, ConfigError, PPOLearnerConfig, load_config,
                              old_logprobs_from_engines, ppo_learner, ppo_precision, reuses_train_logprobs, validate)
from rlhf_ray.resources import RoleLayout, ppo_layout
from rlhf_ray.train.deepspeed_config import reduces_once_per_step

GIB = 1024**3
MODEL_CONFIGS = Path(__file__).parent / "model_configs"
BUILTIN_CONFIGS = {"builtin:smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}

# Stated assumptions (printed with every plan).
HOST_GIB_PER_GPU_PROCESS = 4.0  # host memory of a process driving a GPU (torch, CUDA, Ray worker)
HOST_GIB_PER_CPU_PROCESS = 1.0  # CPU nodes, apart from model state (STACK.md measured 0.5-1.7 GiB)
RAY_HEAD_GIB = 1.5  # GCS, raylet, dashboard on the head node (STACK.md: 1.3-1.6 GB idle)
ENGINE_WORKSPACE_GIB = 1.0  # vLLM activations / sampler inside its claim on a GPU
CPU_ENGINE_WORKSPACE_GIB = 0.5
VLLM_MAX_NUM_SEQS = 256  # vLLM's default cap on sequences decoded at once
COLLECTIVE_LATENCY_S = 10e-6  # per TP all-reduce while decoding
ADAM_STEP_BYTES = 32  # per trainable parameter and step: fp32 weights, m, v read and written, the gradient read
CPU_GLOO_GBS = 1.3  # CPU ranks: gloo broadcast between processes (STACK.md: 380 MB in ~0.3 s)


# ----------------------------------------------------------------------------------------- model shapes
@dataclass(frozen=True)
class ModelShape:
    """What the planner needs of a causal LM, derived from its config.json."""

    name: str
    family: str
    params: int
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_positions: Optional[int]
    layer_params: int
    largest_tensor: int  # parameters in the largest single tensor (sent whole during weight sync)
    lm_head_params: int  # an untied output projection (dropped by value-head models)
    linears: tuple[tuple[str, int, int], ...]  # per-layer linear modules: (path inside a layer, in, out)
    file_bytes_per_param: int = 4  # the checkpoint's dtype (config.json torch_dtype), for scorer_replica_max_gib

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes

    def lora_params(self, dim: int, module_names: list[str]) -> int:
        """LoRA A and B matrices (dim x in + out x dim) on every matching linear of every layer (peft matches a
        target name against the end of the module path)."""
        if dim == 0:
            return 0
        hits = [(i, o) for path, i, o in self.linears
                if any(path == m or path.endswith("." + m) for m in module_names)]
        if not hits:
            raise ConfigError(f"lora.module_names {module_names} match no linear layer of {self.name} "
                              f"(its layers have: {', '.join(p for p, _, _ in self.linears)})")
        return self.layers * sum(dim * (i + o) for i, o in hits)

    def value_model(self) -> "ModelShape":
        """The same backbone with a scalar value head instead of the LM head (reward model, critic)."""
        return ModelShape(**{**self.__dict__, "params": self.params - self.lm_head_params + self.hidden,
                             "lm_head_params": 0})


def _get(cfg: dict, *keys: str, default: Any = None) -> Any:
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


def shape_from_config(cfg: dict, name: str) -> ModelShape:
    """Count parameters exactly as transformers builds the model (checked against meta-device models in tests)."""
    family = cfg.get("model_type")
    try:
        h = int(_get(cfg, "hidden_size", "n_embed", "n_embd", "d_model"))
        layers = int(_get(cfg, "num_hidden_layers", "n_layer"))
        heads = int(_get(cfg, "num_attention_heads", "n_head"))
        vocab = int(cfg["vocab_size"])
    except (TypeError, KeyError) as e:
        raise ConfigError(f"{name}: config.json lacks a size field ({e}); cannot plan model_type {family!r}") from None
    tied = bool(cfg.get("tie_word_embeddings", family != "llama"))
    if family == "opt":
        ffn, proj = cfg["ffn_dim"], cfg.get("word_embed_proj_dim") or h
        max_pos = cfg["max_position_embeddings"]
        linears = (("self_attn.q_proj", h, h), ("self_attn.k_proj", h, h), ("self_attn.v_proj", h, h),
                   ("self_attn.out_proj", h, h), ("fc1", h, ffn), ("fc2", ffn, h))
        layer = 4 * (h * h + h) + (h * ffn + ffn) + (ffn * h + h) + 4 * h
        final_norm = 2 * h if cfg.get("do_layer_norm_before", True) and not cfg.get("_remove_final_layer_norm") else 0
        embed, pos = vocab * proj, (max_pos + 2) * h  # OPT's learned positions carry an offset of 2
        head = 0 if tied else vocab * proj
        params = embed + pos + (2 * h * proj if proj != h else 0) + layers * layer + final_norm + head
        kv_heads, head_dim, largest = heads, h // heads, max(embed, pos, h * ffn)
    elif family == "bloom":
        max_pos = cfg.get("seq_length")  # ALiBi: no learned positions
        linears = (("self_attention.query_key_value", h, 3 * h), ("self_attention.dense", h, h),
                   ("mlp.dense_h_to_4h", h, 4 * h), ("mlp.dense_4h_to_h", 4 * h, h))
        layer = 12 * h * h + 13 * h
        embed = vocab * h
        head = 0 if tied else embed
        params = embed + 2 * h + layers * layer + 2 * h + head
        kv_heads, head_dim, largest = heads, h // heads, max(embed, 4 * h * h)
    elif family == "llama":
        ffn, max_pos = cfg["intermediate_size"], cfg.get("max_position_embeddings")
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or h // heads)
        q, kv = heads * head_dim, kv_heads * head_dim
        linears = (("self_attn.q_proj", h, q), ("self_attn.k_proj", h, kv), ("self_attn.v_proj", h, kv),
                   ("self_attn.o_proj", q, h), ("mlp.gate_proj", h, ffn), ("mlp.up_proj", h, ffn),
                   ("mlp.down_proj", ffn, h))
        layer = sum(i * o for _, i, o in linears) + 2 * h
        if cfg.get("attention_bias"):
            layer += q + 2 * kv + h
        if cfg.get("mlp_bias"):
            layer += 2 * ffn + h
        embed = vocab * h
        head = 0 if tied else embed
        params = embed + layers * layer + h + head
        largest = max(embed, h * ffn)
    elif family == "gpt2":
        inner, max_pos = cfg.get("n_inner") or 4 * h, cfg.get("n_positions")
        linears = (("attn.c_attn", h, 3 * h), ("attn.c_proj", h, h), ("mlp.c_fc", h, inner), ("mlp.c_proj", inner, h))
        layer = 4 * h + (3 * h * h + 3 * h) + (h * h + h) + (h * inner + inner) + (inner * h + h)
        embed = vocab * h
        head = 0 if tied else embed
        params = embed + max_pos * h + layers * layer + 2 * h + head
        kv_heads, head_dim, largest = heads, h // heads, max(embed, h * inner)
    else:
        raise ConfigError(f"{name}: model_type {family!r} is not known to the planner (opt, bloom, llama, gpt2)")
    file_dtype = cfg.get("torch_dtype") or cfg.get("dtype")
    return ModelShape(name, family, params, layers, h, heads, kv_heads, head_dim, vocab, max_pos, layer,
                      largest, head, linears, 2 if file_dtype in ("float16", "bfloat16") else 4)


@functools.lru_cache(maxsize=None)
def model_shape(path: str) -> ModelShape:
    """A model's shape from a local folder's config.json, a shipped config (hub name), or a builtin: name."""
    if path.startswith("builtin:tiny-"):
        from rlhf_ray.models.tiny import tiny_model_path  # built once and cached, offline

        return model_shape(str(tiny_model_path(path[len("builtin:tiny-"):])))
    name = BUILTIN_CONFIGS.get(path, path)
    local = Path(name).expanduser()
    candidates = [local / "config.json", local] if local.exists() else []
    candidates.append(MODEL_CONFIGS / name.replace("/", "--") / "config.json")
    for file in candidates:
        if file.is_file():
            try:
                return shape_from_config(json.loads(file.read_text()), path)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{file}: not valid JSON: {e}") from None
    shipped = sorted(p.name.replace("--", "/") for p in MODEL_CONFIGS.iterdir() if (p / "config.json").is_file())
    raise ConfigError(f"model {path!r}: no config.json found (not a local folder with one, and not a shipped config: "
                      f"{', '.join(shipped)}); nothing is downloaded, so point the path at a local folder")


# ------------------------------------------------------------------------------------- memory formulas
def adam_bytes(mixed: bool) -> tuple[int, int, int]:
    """Bytes per parameter of weights, gradients and Adam states."""
    return (2, 2, 12) if mixed else (4, 4, 8)


def zero_model_state_bytes(params: float, stage: int, ranks: int, mixed: bool = True,
                           trainable: Optional[float] = None) -> dict[str, float]:
    """Per-GPU model states under ZeRO `stage` with `ranks` data-parallel ranks (the ZeRO paper's accounting)."""
    trainable = params if trainable is None else trainable
    wb, gb, ob = adam_bytes(mixed)
    return {"weights": params * wb / (ranks if stage >= 3 else 1),
            "grads": trainable * gb / (ranks if stage >= 2 else 1),
            "optimizer": trainable * ob / (ranks if stage >= 1 else 1)}


def activation_bytes(shape: ModelShape, micro: int, seq: int, act_bytes: int, checkpointing: bool,
                     lm_logits: bool, training: bool = True) -> float:
    sbh = seq * micro * shape.hidden
    full_layer = 17 * sbh * act_bytes  # 34*s*b*h bytes at 16 bit
    if not training:
        stored = full_layer  # one layer's working set at a time
    elif checkpointing:
        stored = shape.layers * sbh * act_bytes + full_layer  # layer inputs + one layer recomputed
    else:
        stored = shape.layers * full_layer
    logits = seq * micro * shape.vocab * (act_bytes + (8 if training else 4)) if lm_logits else 0  # fp32 log-softmax
    return stored + logits


@dataclass
class Memory:
    """One process's memory on its device (a GPU, or host memory for CPU processes), in bytes."""

    weights: float = 0.0
    grads: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    gather: float = 0.0  # ZeRO-3: gathered layers beyond the local shard
    kv_cache: float = 0.0  # vLLM: its claim beyond the weights (KV blocks + workspace)
    sync: float = 0.0  # weight-sync buffer (not at the same time as training activations)
    overhead: float = 0.0
    offloaded: float = 0.0  # host memory: offloaded optimizer states / parameters
    load: float = 0.0  # while the model loads, before any training state exists (load_bytes)
    host_load: float = 0.0  # GPU processes: host memory while loading (a model loaded whole on the CPU first)

    @property
    def peak(self) -> float:
        steady = (self.weights + self.grads + self.optimizer + self.kv_cache
                  + max(self.activations + self.gather, self.sync))
        return self.overhead + max(steady, self.load)

    @property
    def resident(self) -> float:
        """What stays allocated between steps: model states, the KV cache, the process's own; plus the weight-sync
        buffer (the sync runs while the engines are awake). Activations and gathered layers exist only in a pass."""
        return self.overhead + self.weights + self.grads + self.optimizer + self.kv_cache + self.sync

    @property
    def host(self) -> float:
        """Host memory of a GPU process beyond its fixed share: offloaded states, or the load if larger."""
        return max(self.offloaded, self.host_load)


# --------------------------------------------------------------------------------------------- the plan
@dataclass
class Proc:
    """One process of a role: a learner rank, a frozen-model rank, or one tensor-parallel worker of an engine."""

    role: str
    rank: int
    group: int  # index into Plan.groups
    bundle: int
    memory: Memory
    node: int = -1
    gpus: tuple[int, ...] = ()


@dataclass
class Plan:
    cluster: ClusterConfig
    models: dict[str, ModelShape]
    groups: list[RoleLayout]
    procs: list[Proc]
    gpu_used: dict[tuple[int, int], float] = field(default_factory=dict)  # (node, gpu) -> bytes
    host_used: dict[int, float] = field(default_factory=dict)  # node -> bytes
    problems: list[str] = field(default_factory=list)
    times: dict[str, float] = field(default_factory=dict)
    parts: dict[str, dict[str, float]] = field(default_factory=dict)  # phase -> term -> seconds
    stages: dict[str, tuple[int, float, bool]] = field(default_factory=dict)  # SFT/RM: ranks, GiB per rank, fits
    engines_sleep: bool = False  # GPU engines with generation.enable_sleep_mode (see _account)

    @property
    def fits(self) -> bool:
        return not self.problems

    @property
    def gpus_used(self) -> int:
        return len(self.gpu_used)

    def gpu_seconds_per_1k_samples(self, samples: int) -> float:
        """What an iteration costs per 1000 samples: every GPU the plan uses, for the whole iteration."""
        return self.gpus_used * self.times["total"] / samples * 1000

    def role_peak_gib(self, role: str) -> float:
        """The largest per-process memory of a role (GiB)."""
        return max(p.memory.peak for p in self.procs if p.role == role) / GIB

    def max_gpu_gib(self) -> float:
        return max(self.gpu_used.values(), default=0.0) / GIB

    def max_host_gib(self) -> float:
        return max(self.host_used.values(), default=0.0) / GIB


def _precision_mixed(stage_cfg: PPOLearnerConfig, on_gpu: bool) -> bool:
    p = stage_cfg.deepspeed.precision
    return p in ("bf16", "fp16") or (p == "auto" and on_gpu)


def _dtype_bytes(precision: str, on_gpu: bool) -> int:
    return 4 if precision == "fp32" or (precision == "auto" and not on_gpu) else 2


def _process_gib(on_gpu: bool, c: ClusterConfig) -> float:
    """A process's own memory on its device: cluster.gpu_context_gib on a GPU, else its share of host memory."""
    return c.gpu_context_gib if on_gpu else HOST_GIB_PER_CPU_PROCESS


def _learner_memory(shape: ModelShape, s: PPOLearnerConfig, ranks: int, seq: int, on_gpu: bool, lm: bool,
                    sends_weights: bool, c: ClusterConfig, micro: Optional[int] = None) -> Memory:
    ds = s.deepspeed
    mixed = _precision_mixed(s, on_gpu)
    lora = shape.lora_params(s.lora.dim, s.lora.module_names)
    total = shape.params + lora
    trainable = lora if (lora and s.lora.only_optimize_lora) else total
    states = zero_model_state_bytes(total, ds.zero_stage, ranks, mixed, trainable)
    if reduces_once_per_step(ds, ranks, on_gpu):  # ZeRO-2 coalesced: a whole gradient per rank until the step
        states["grads"] = trainable * adam_bytes(mixed)[1]
    wb = adam_bytes(mixed)[0]
    m = Memory(**states)
    gathered = min(2 * shape.layer_params, total) * wb
    if ds.zero_stage == 3:
        m.gather = gathered * (1 - 1 / ranks)
        m.sync = shape.largest_tensor * wb * (1 - 1 / ranks) if sends_weights else 0.0
        m.weights += _hpz_copy_bytes(total, ds, wb)
    if ds.offload_optimizer and on_gpu:  # ZeRO-Offload (Ren et al. 2021, sec. 4): gradients and optimizer states
        # live in host memory (fp32 gradient partitions), the GPU keeps the 16-bit weights and passes' buffers
        m.offloaded += m.optimizer + trainable * 4 / (ranks if ds.zero_stage >= 1 else 1)
        m.optimizer = m.grads = 0.0
    if ds.offload_params and ds.zero_stage == 3 and on_gpu:
        m.offloaded += m.weights
        m.weights, m.gather = 0.0, gathered  # only the gathered layers live on the GPU
        m.sync = shape.largest_tensor * wb if sends_weights else 0.0
    m.activations = activation_bytes(shape, micro or ds.micro_batch_size, seq, wb, ds.gradient_checkpointing, lm)
    m.overhead = _process_gib(on_gpu, c) * GIB
    _set_load(m, shape, total, ds.zero_stage == 3, ranks, wb, on_gpu, ds.offload_params)
    return m


def _hpz_copy_bytes(params: float, ds, wb: int) -> float:
    """ZeRO++ hpZ: the second copy of the weights, partitioned over zero_hpz_partition_size ranks."""
    h = ds.zero_hpz_partition_size
    return params * wb / h if h > 1 else 0.0


def load_bytes(params: float, largest_tensor: float, zero3: bool, ranks: int, wb: int, on_gpu: bool) -> float:
    """Memory one rank needs while it loads its model. ZeRO-3 (train.common.build_partitioned, scorer.py) loads
    straight into partitions: its partition plus the largest tensor gathered whole while rank 0 fills it (twice
    over on CPU, where gloo's all-gather goes through a second flat buffer: measured). Otherwise the whole model in
    the load dtype, fp32 (learners and scorers load fp32; DeepSpeed or .to() cast afterwards), in host memory."""
    if zero3:
        return params * wb / ranks + largest_tensor * wb * (1 if on_gpu else 2)
    return params * 4


def _set_load(m: Memory, shape: ModelShape, params: float, zero3: bool, ranks: int, wb: int, on_gpu: bool,
              offload_params: bool = False) -> None:
    """m.load on the process's device, m.host_load on the host of a GPU process (see load_bytes)."""
    full = load_bytes(params, shape.largest_tensor, zero3, ranks, wb, on_gpu)
    if not on_gpu:
        m.load = full
    elif not zero3:
        m.host_load = full  # loaded on the CPU, cast, then moved to the GPU whole (within the steady weights)
    elif offload_params:  # zero.Init puts the partitions where offload_param says: host memory
        m.host_load, m.load = params * wb / ranks, shape.largest_tensor * wb
    else:
        m.load = full


def _scorer_sharded(cfg: Config, shape: ModelShape, ranks: int) -> bool:
    """As scorer.py decides: ppo.scorer_zero_stage, or ZeRO-3 when the weight files exceed scorer_replica_max_gib."""
    if cfg.ppo.scorer_zero_stage is not None:
        return cfg.ppo.scorer_zero_stage == 3
    return ranks > 1 and shape.params * shape.file_bytes_per_param / GIB > cfg.ppo.scorer_replica_max_gib


def _frozen_memory(shape: ModelShape, learner: PPOLearnerConfig, ranks: int, sharded: bool, seq: int,
                   on_gpu: bool, lm: bool, c: ClusterConfig) -> Memory:
    """Reference / reward scorer: weights only, in its learner's precision, replicated or ZeRO-3-partitioned."""
    wb = adam_bytes(_precision_mixed(learner, on_gpu))[0]
    micro = learner.deepspeed.micro_batch_size
    n = ranks if sharded else 1
    m = Memory(weights=shape.params * wb / n)
    if sharded and ranks > 1:
        m.gather = min(2 * shape.layer_params, shape.params) * wb * (1 - 1 / ranks)
        m.weights += _hpz_copy_bytes(shape.params, learner.deepspeed, wb)
    m.activations = activation_bytes(shape, micro, seq, wb, False, lm, training=False)
    m.overhead = _process_gib(on_gpu, c) * GIB
    _set_load(m, shape, shape.params, sharded, n, wb, on_gpu)
    return m


def _engine_memory(cfg: Config, shape: ModelShape, on_gpu: bool, problems: list[str]) -> Memory:
    gen = cfg.generation
    tp = gen.tensor_parallel_size
    wb = _dtype_bytes(ppo_precision(cfg), on_gpu)  # engines follow the run's one precision
    weights = shape.params * wb / tp
    seq = cfg.data.max_prompt_len + gen.max_new_tokens
    one_seq = seq * shape.kv_bytes_per_token(wb) / tp
    if on_gpu:
        claim = gen.gpu_memory_utilization * cfg.cluster.gpu_memory_gib * GIB
        if weights > claim:
            problems.append(f"generator: weights {weights / GIB:.1f} GiB per GPU exceed vLLM's claim "
                            f"(generation.gpu_memory_utilization {gen.gpu_memory_utilization} x "
                            f"{cfg.cluster.gpu_memory_gib:g} GiB = {claim / GIB:.1f} GiB); raise "
                            f"generation.tensor_parallel_size or gpu_memory_utilization")
        kv = max(0.0, claim - weights)
        kv_blocks = kv - ENGINE_WORKSPACE_GIB * GIB
        overhead = cfg.cluster.gpu_context_gib * GIB
        weights_fit = weights <= claim
    else:
        kv_blocks = gen.kv_cache_gib * GIB  # kv_cache_memory_bytes (generator.cpu_kv_cache_bytes)
        kv = kv_blocks + CPU_ENGINE_WORKSPACE_GIB * GIB
        overhead = HOST_GIB_PER_CPU_PROCESS * GIB
        weights_fit = True
    if weights_fit and kv_blocks < one_seq:
        problems.append(f"generator: KV cache {max(kv_blocks, 0) / GIB:.2f} GiB per GPU holds less than one "
                        f"{seq}-token sequence ({one_seq / GIB:.2f} GiB); raise generation.gpu_memory_utilization "
                        f"or tensor_parallel_size")
    # vLLM sleep level 1 (what ppo.py asks for) copies the weights to pinned host memory and drops the KV cache.
    asleep_on_host = weights if on_gpu and gen.enable_sleep_mode else 0.0
    return Memory(weights=weights, kv_cache=kv, sync=shape.largest_tensor * wb, overhead=overhead,
                  offloaded=asleep_on_host)


def _role_models(cfg: Config) -> dict[str, ModelShape]:
    def shape(role: str) -> ModelShape:
        try:
            return model_shape(getattr(cfg.models, role).path)
        except ConfigError as e:
            raise ConfigError(f"models.{role}.path: {e}") from None

    m = cfg.models
    actor = shape("actor")
    reward = shape("reward").value_model()
    critic = shape("critic").value_model() if m.critic else reward
    reference = shape("reference") if m.reference else actor
    return {"actor": actor, "critic": critic, "reference": reference, "reward": reward, "generator": actor}


def _check_cluster(c: ClusterConfig) -> None:
    if c.nodes < 1:
        raise ConfigError("cluster.nodes must be >= 1")
    if c.gpus_per_node < 0:
        raise ConfigError("cluster.gpus_per_node must be >= 0")
    for key in ("gpu_memory_gib", "cpu_memory_gib", "gpu_tflops", "gpu_memory_bandwidth_gbs", "cpu_tflops",
                "cpu_memory_bandwidth_gbs", "intra_node_gbs", "inter_node_gbs", "pcie_gbs"):
        if getattr(c, key) <= 0:
            raise ConfigError(f"cluster.{key} must be > 0")
    if not (0 < c.mfu <= 1 and 0 < c.mbu <= 1):
        raise ConfigError("cluster.mfu and cluster.mbu must be in (0, 1]")
    if c.decode_step_overhead_s < 0 or c.gpu_context_gib < 0:
        raise ConfigError("cluster.decode_step_overhead_s and cluster.gpu_context_gib must be >= 0")


def _role_procs(cfg: Config, models: dict[str, ModelShape], layout: list[RoleLayout], on_gpu: dict[str, bool],
                problems: list[str]) -> list[Proc]:
    """Every process of the layout with its memory, assigned to a group and bundle."""
    p, gen = cfg.placement, cfg.generation
    seq = cfg.data.max_prompt_len + gen.max_new_tokens
    procs: list[Proc] = []
    for gi, group in enumerate(layout):
        n_bundles = len(group.bundles)
        for role in group.role.split("+"):
            base = role.split("[")[0]
            if base == "generator":
                mem = _engine_memory(cfg, models["actor"], on_gpu[group.role], problems)
                procs += [Proc(group.role, t, gi, t, copy.copy(mem)) for t in range(n_bundles)]
                continue
            ranks = getattr(p, base).num_workers
            g = on_gpu[group.role]
            if base in ("actor", "critic"):
                s = ppo_learner(cfg, base)  # the run's one precision (config.ppo_precision)
                mem = _learner_memory(models[base], s, ranks, seq, g, lm=base == "actor", sends_weights=base == "actor",
                                      c=cfg.cluster)
            else:
                learner = ppo_learner(cfg, "actor" if base == "reference" else "critic")
                mem = _frozen_memory(models[base], learner, ranks, _scorer_sharded(cfg, models[base], ranks), seq,
                                     g, lm=base == "reference", c=cfg.cluster)
            if ranks > n_bundles:  # groups.py puts rank r into bundle r of the (shared) group
                problems.append(f"placement.{base}.num_workers={ranks} exceeds the {n_bundles} bundle(s) of the "
                                f"'{group.role}' group it is colocated in")
            procs += [Proc(base, r, gi, r % n_bundles, copy.copy(mem)) for r in range(ranks)]
    return procs


def _place(plan: Plan, layout: list[RoleLayout]) -> None:
    """Simulate Ray's placement of the groups, in order, onto nodes x GPUs; fill in node and GPU ids."""
    c = plan.cluster
    free = {(n, g): 1.0 for n in range(c.nodes) for g in range(c.gpus_per_node)}
    eps = 1e-9

    def fit_bundle(node: int, need: float, state: dict) -> Optional[tuple[int, ...]]:
        if need <= 0:
            return ()
        gpus = [g for g in range(c.gpus_per_node)]
        if need >= 1:
            whole = [g for g in gpus if state[(node, g)] >= 1 - eps][:int(round(need))]
            return tuple(whole) if len(whole) == int(round(need)) else None
        usable = [g for g in gpus if state[(node, g)] >= need - eps]  # best fit: the fullest GPU that still fits
        return (min(usable, key=lambda g: (state[(node, g)], g)),) if usable else None

    def take(node: int, bundles: list[float], state: dict) -> Optional[list[tuple[int, ...]]]:
        trial, out = dict(state), []
        for need in bundles:
            ids = fit_bundle(node, need, trial)
            if ids is None:
                return None
            for g in ids:
                trial[(node, g)] -= min(need, 1.0)
            out.append(ids)
        state.update(trial)
        return out

    placed: dict[int, list[tuple[int, tuple[int, ...]]]] = {}
    for gi, group in enumerate(layout):
        needs = [b.get("GPU", 0.0) if c.gpus_per_node else 0.0 for b in group.bundles]
        where = None
        for node in range(c.nodes):  # one node holding the whole group first (PACK and STRICT_PACK)
            ids = take(node, needs, free)
            if ids is not None:
                where = [(node, i) for i in ids]
                break
        if where is None and group.strategy != "STRICT_PACK":  # PACK spreads when no single node has room
            trial, where = dict(free), []
            for need in needs:
                spot = next(((n, ids) for n in range(c.nodes) if (ids := fit_bundle(n, need, trial)) is not None), None)
                if spot is None:
                    where = None
                    break
                for g in spot[1]:
                    trial[(spot[0], g)] -= min(need, 1.0)
                where.append(spot)
            if where is not None:
                free.update(trial)
        if where is None:
            total = sum(needs)
            plan.problems.append(
                f"placement group '{group.role}' ({len(needs)} bundle(s), {total:g} GPU(s), {group.strategy}) does "
                f"not fit the GPUs left on {c.nodes} node(s) x {c.gpus_per_node} GPU(s)")
            where = [(-1, ())] * len(needs)
        placed[gi] = where
    for proc in plan.procs:
        proc.node, proc.gpus = placed[proc.group][proc.bundle]


def _gpu_bytes(procs: list[Proc], engines_sleep: bool) -> float:
    """Memory of the processes sharing one GPU. Awake engines and learners both at their peak, unless the engines
    sleep (generation.enable_sleep_mode): then the GPU holds the larger of the two phases, generating or syncing
    (engines at their peak, the others' resident states) and scoring or training (the others at their peak, the
    sleeping engines' CUDA context only)."""
    engines = [p.memory for p in procs if p.role.startswith("generator")]
    others = [p.memory for p in procs if not p.role.startswith("generator")]
    if not engines_sleep:
        return sum(m.peak for m in engines + others)
    awake = sum(m.peak for m in engines) + sum(m.resident for m in others)
    asleep = sum(m.overhead for m in engines) + sum(m.peak for m in others)
    return max(awake, asleep)


def _account(plan: Plan) -> None:
    """Sum process memory per GPU and host memory per node; record what does not fit."""
    c = plan.cluster
    plan.host_used = {n: 0.0 for n in range(c.nodes)}
    plan.host_used[0] += RAY_HEAD_GIB * GIB
    on_gpu: dict[tuple[int, int], list[Proc]] = {}
    for proc in plan.procs:
        if proc.node < 0:
            continue
        m = proc.memory
        if proc.gpus:
            for g in proc.gpus:  # a rank with one GPU (multi-GPU ranks are rejected before)
                on_gpu.setdefault((proc.node, g), []).append(proc)
            plan.host_used[proc.node] += HOST_GIB_PER_GPU_PROCESS * GIB + m.host
        else:
            plan.host_used[proc.node] += m.peak + m.offloaded
    plan.gpu_used = {gpu: _gpu_bytes(procs, plan.engines_sleep) for gpu, procs in on_gpu.items()}
    cap = c.gpu_memory_gib * GIB
    for (node, gpu), used in sorted(plan.gpu_used.items()):
        if used > cap:
            roles = sorted({p.role for p in plan.procs if p.node == node and gpu in p.gpus})
            plan.problems.append(f"node {node} GPU {gpu}: {used / GIB:.1f} GiB needed > {c.gpu_memory_gib:g} GiB "
                                 f"({', '.join(roles)})")
    for node, used in plan.host_used.items():
        if used > c.cpu_memory_gib * GIB:
            plan.problems.append(f"node {node} host memory: {used / GIB:.1f} GiB needed > {c.cpu_memory_gib:g} GiB "
                                 f"(cluster.cpu_memory_gib)")


def _stage_plans(cfg: Config, plan: Plan) -> None:
    """SFT and reward-model training (Ray Train): every worker takes one GPU when the cluster has GPUs."""
    c = cfg.cluster
    on_gpu = c.gpus_per_node > 0
    seq = cfg.data.max_prompt_len + cfg.data.max_answer_len
    for name, s, shape, lm, pairs in (("sft", cfg.sft, model_shape(cfg.models.actor.path), True, 1),
                                      ("rm", cfg.rm, model_shape(cfg.models.reward.path).value_model(), False, 2)):
        stage_gpu = on_gpu if s.use_gpu is None else s.use_gpu and on_gpu
        mem = _learner_memory(shape, s, s.num_workers, seq, stage_gpu, lm, False, c,
                              micro=s.deepspeed.micro_batch_size * pairs)  # RM: chosen + rejected
        if stage_gpu:
            per_node_host = HOST_GIB_PER_GPU_PROCESS * GIB + mem.host
            fits = (mem.peak <= c.gpu_memory_gib * GIB and s.num_workers <= c.nodes * c.gpus_per_node
                    and per_node_host * min(s.num_workers, c.gpus_per_node) <= c.cpu_memory_gib * GIB)
        else:
            fits = (mem.peak + mem.offloaded) * math.ceil(s.num_workers / c.nodes) <= c.cpu_memory_gib * GIB
        plan.stages[name] = (s.num_workers, mem.peak / GIB, fits)
        if not fits:
            plan.problems.append(f"{name}: {s.num_workers} worker(s) of {mem.peak / GIB:.1f} GiB each do not fit "
                                 f"the cluster ({name}.num_workers, {name}.deepspeed.*)")


# --------------------------------------------------------------------------------------------- timing
def _rates(c: ClusterConfig, on_gpu: bool) -> tuple[float, float]:
    """(FLOP/s, memory bytes/s) one process of a role achieves."""
    if on_gpu:
        return c.gpu_tflops * 1e12 * c.mfu, c.gpu_memory_bandwidth_gbs * 1e9 * c.mbu
    return c.cpu_tflops * 1e12 * c.mfu, c.cpu_memory_bandwidth_gbs * 1e9 * c.mbu


def _link_gbs(plan: Plan, procs: list[Proc]) -> float:
    """Bytes/s per rank for a collective among `procs`: NVLink within a node, the node's network share across."""
    c = plan.cluster
    nodes = {p.node for p in procs}
    if not any(p.gpus for p in procs):
        return min(CPU_GLOO_GBS, c.inter_node_gbs if len(nodes) > 1 else CPU_GLOO_GBS) * 1e9
    if len(nodes) <= 1:
        return c.intra_node_gbs * 1e9
    return min(c.intra_node_gbs, c.inter_node_gbs / max(1, c.gpus_per_node)) * 1e9


def _gather_seconds(plan: Plan, procs: list[Proc], params: float, wb: int, ds, gathers: int, cross: int) -> float:
    """ZeRO-3 parameter all-gathers of a role: `gathers` full-model gathers, of which `cross` (the first forward
    after the weights change) must use the primary partition over every rank. ZeRO++ (arXiv 2306.10209): hpZ
    serves the others from a copy partitioned inside zero_hpz_partition_size ranks (NVLink when that fits a node);
    quantized weights move int8 instead of 16-bit values."""
    n, h = len(procs), ds.zero_hpz_partition_size
    if n <= 1 or gathers <= 0:
        return 0.0
    size = params * wb * (0.5 if ds.zero_quantized_weights and procs[0].gpus else 1)
    link = _link_gbs(plan, procs)
    if h <= 1:
        return gathers * size * (n - 1) / n / link
    local = plan.cluster.intra_node_gbs * 1e9 if procs[0].gpus and h <= plan.cluster.gpus_per_node else link
    cross = min(cross, gathers)
    return cross * size * (n - 1) / n / link + (gathers - cross) * size * (h - 1) / h / local


def _parallel(procs: list[Proc]) -> int:
    """How many processes compute at once: every GPU rank, but CPU ranks on one node share its cores."""
    return len(procs) if procs[0].gpus else len({p.node for p in procs})


def _estimate_time(cfg: Config, plan: Plan) -> None:
    """Seconds per PPO iteration, per phase and per term (plan.parts): the phases run one after the other."""
    c, gen, ppo = cfg.cluster, cfg.generation, cfg.ppo
    by_role = {r: [p for p in plan.procs if p.role == r] for r in {p.role for p in plan.procs}}
    actor, actors = plan.models["actor"], by_role["actor"]
    a, cr = ppo.actor.deepspeed, ppo.critic.deepspeed
    seqs = ppo.rollout_batch_size * gen.n_samples_per_prompt
    prompt, new = cfg.data.max_prompt_len, gen.max_new_tokens
    ctx = prompt + new
    tokens = seqs * ctx
    parts: dict[str, dict[str, float]] = {"generation": {}, "experience": {}, "training": {}, "weight_sync": {}}

    def add(phase: str, term: str, seconds: float) -> None:
        parts[phase][term] = parts[phase].get(term, 0.0) + seconds

    # Generation: prefill is compute bound, decoding reads every weight (and the KV cache) once per step.
    # hybrid_engine (DeepSpeed-Chat): the actor's own ranks generate in groups of tensor_parallel_size, each GPU
    # a micro-batch of sequences at a time, after one ZeRO-3 gather of the actor per generation batch.
    hybrid = c.timing_layout == "hybrid_engine"
    tp = gen.tensor_parallel_size
    engines = [r for r in by_role if r.startswith("generator")]
    eng = actors[0] if hybrid else by_role[engines[0]][0]
    n_engines = max(1, len(actors) // tp) if hybrid else len(engines)
    flops, hbm = _rates(c, bool(eng.gpus))
    wb = _dtype_bytes(ppo_precision(cfg), bool(eng.gpus))
    kv_token = actor.kv_bytes_per_token(wb) / tp
    per_engine = math.ceil(seqs / n_engines)
    if hybrid:
        concurrent = max(1, min(per_engine, tp * a.micro_batch_size))
    else:
        workspace = (ENGINE_WORKSPACE_GIB if eng.gpus else CPU_ENGINE_WORKSPACE_GIB) * GIB
        kv_free = max(eng.memory.kv_cache - workspace, kv_token * ctx)
        concurrent = max(1, min(per_engine, VLLM_MAX_NUM_SEQS, int(kv_free // (kv_token * ctx))))
    waves = math.ceil(per_engine / concurrent)
    add("generation", "compute", per_engine * prompt * 2 * actor.params / (tp * flops))
    read = (actor.params * wb / tp + concurrent * (prompt + new / 2) * kv_token) / hbm
    math_ = 2 * actor.params / tp * concurrent / flops
    add("generation", "decode bandwidth" if read >= math_ else "compute", waves * new * max(read, math_))
    add("generation", "decode overhead", waves * new * c.decode_step_overhead_s)
    if tp > 1:
        add("generation", "tensor-parallel all-reduce", waves * new * 2 * actor.layers * (
            concurrent * actor.hidden * wb * 2 * (tp - 1) / tp / (c.intra_node_gbs * 1e9) + COLLECTIVE_LATENCY_S))

    # Experience: forward passes of actor (old log-probs), reference, critic (values), reward over every token.
    def forward(role: str, ds, learner: bool) -> None:
        procs = by_role.get(role, [])
        if not procs:
            return
        shape, n = plan.models[role], len(procs)
        f, _ = _rates(c, bool(procs[0].gpus))
        add("experience", "compute", 2 * shape.params * tokens / (_parallel(procs) * f))
        stage3 = ds.zero_stage == 3 if learner else _scorer_sharded(cfg, shape, n)
        if stage3:
            add("experience", "gather bandwidth", _gather_seconds(
                plan, procs, shape.params, 2 if procs[0].gpus else 4, ds, math.ceil(seqs / (n * ds.micro_batch_size)),
                cross=1 if learner else 0))  # frozen scorers keep their hpZ copy for the whole run

    # else the training pass (experience.py) or the engines (asynchronous rollouts) supply the old log-probs
    if not (reuses_train_logprobs(cfg) or old_logprobs_from_engines(cfg)):
        forward("actor", a, True)
    if cfg.placement.reference_in_actor:  # the actor's ranks, adapters disabled: a second actor forward
        forward("actor", a, True)
    else:
        forward("reference", a, False)
    forward("critic", cr, True)
    forward("reward", cr, False)

    # Training: forward + backward (+ recompute) FLOPs and the ZeRO collectives, per PPO epoch.
    def train(role: str, s: PPOLearnerConfig) -> None:
        procs = by_role.get(role, [])
        if not procs:
            return
        shape, n, ds = plan.models[role], len(procs), s.deepspeed
        f, _ = _rates(c, bool(procs[0].gpus))
        lora = shape.lora_params(s.lora.dim, s.lora.module_names)
        trainable = lora if (lora and s.lora.only_optimize_lora) else shape.params + lora
        per_token = 4 * shape.params + 2 * trainable + (2 * shape.params if ds.gradient_checkpointing else 0)
        add("training", "compute", ppo.ppo_epochs * tokens * per_token / (_parallel(procs) * f))
        steps = ppo.ppo_epochs * math.ceil(seqs / ppo.mini_batch_size)  # a PPO learner steps on mini-batches
        micro_steps = ppo.mini_batch_size // (ds.micro_batch_size * n)
        wb = 2 if procs[0].gpus else 4
        if n > 1:
            if ds.zero_stage == 3:  # forward and backward gather every micro-batch
                add("training", "gather bandwidth",
                    _gather_seconds(plan, procs, shape.params, wb, ds, steps * micro_steps * 2, cross=steps))
            # ZeRO (Rajbhandari et al. 2020, sec. 7): stages 0-1 all-reduce the accumulated gradients once per step
            # (2 x the gradient bytes); stages 2-3 reduce-scatter them in every micro-step's backward, stage 2 then
            # all-gathers the updated weights (stage 3 gathers them in the next forward, counted above).
            quantized = 0.25 if ds.zero_quantized_gradients and procs[0].gpus else 1.0  # ZeRO++ qgZ: int4
            # deepspeed.grad_reduction per_step (auto on CPU): ZeRO-2 reduces once per step, as stages 0-1 do.
            once = ds.zero_stage <= 1 or reduces_once_per_step(ds, n, bool(procs[0].gpus))
            passes = 2 if once else micro_steps * quantized + (1 if ds.zero_stage == 2 else 0)
            add("training", "gradient reduce", steps * passes * trainable * wb * (n - 1) / n / _link_gbs(plan, procs))
        if ds.offload_optimizer and procs[0].gpus:  # gradients down, updated weights up, every step
            add("training", "offload (PCIe)", steps * trainable * (4 + wb) / n / (c.pcie_gbs * 1e9))
        else:  # Adam reads and writes the fp32 master weights, m and v and reads the gradients: memory bound
            _, bandwidth = _rates(c, bool(procs[0].gpus))
            add("training", "optimizer step", steps * trainable * ADAM_STEP_BYTES / (n if ds.zero_stage >= 1 else 1)
                / (_parallel(procs) / n * bandwidth))

    train("actor", ppo.actor)
    train("critic", ppo.critic)

    # Weight sync: gather (ZeRO-3) on the actor, then one broadcast from actor rank 0 to every engine; the hybrid
    # engine instead gathers the actor on every rank once per generation batch.
    wb = 2 if actors[0].gpus else 4
    gather = actor.params * wb * (1 - 1 / len(actors)) / _link_gbs(plan, actors) if a.zero_stage == 3 else 0.0
    if hybrid:
        add("weight_sync", "sync", waves * gather)
    else:
        engine_procs = [p for r in engines for p in by_role[r]]
        add("weight_sync", "sync", gather + actor.params * wb / _link_gbs(plan, [actors[0]] + engine_procs))
        if plan.engines_sleep:  # level 1: each engine GPU's weights go to host memory and come back (PCIe)
            add("weight_sync", "sleep/wake (PCIe)", 2 * engine_procs[0].memory.weights / (c.pcie_gbs * 1e9))
    plan.parts = parts
    plan.times = {phase: sum(terms.values()) for phase, terms in parts.items()}
    plan.times["total"] = sum(plan.times.values())


def dominant_terms(p: Plan) -> dict[str, tuple[str, float]]:
    """Per phase, the term that takes the most time and its share of the phase (what to change to speed it up)."""
    out = {}
    for phase, terms in p.parts.items():
        if terms and p.times[phase] > 0:
            term = max(terms, key=terms.get)
            out[phase] = (term, terms[term] / p.times[phase])
    return out


# ------------------------------------------------------------------------------------------- planning
def plan(cfg: Config) -> Plan:
    """Memory per process and per GPU, placement, fit and time per PPO iteration for `cfg` on `cfg.cluster`."""
    c = cfg.cluster
    _check_cluster(c)
    models = _role_models(cfg)
    layout = ppo_layout(cfg)
    out = Plan(c, models, layout, [])
    on_gpu = {}
    for group in layout:
        gpu = group.bundles[0].get("GPU", 0.0)
        base = group.role.split("+")[0].split("[")[0]
        if gpu > 1:
            out.problems.append(f"placement.{base}.gpus_per_worker={gpu:g}: a process uses one GPU; use "
                                f"num_workers (learners) or generation.tensor_parallel_size (engines) instead")
        if gpu > 0 and c.gpus_per_node == 0:
            out.problems.append(f"placement.{base}.gpus_per_worker={gpu:g} but cluster.gpus_per_node is 0")
        on_gpu[group.role] = gpu > 0 and c.gpus_per_node > 0
    tp = cfg.generation.tensor_parallel_size
    actor = models["actor"]
    if actor.heads % tp or actor.kv_heads % tp and tp % actor.kv_heads:
        out.problems.append(f"generation.tensor_parallel_size={tp} does not divide {actor.name}'s "
                            f"{actor.heads} attention heads")
    seq = cfg.data.max_prompt_len + cfg.generation.max_new_tokens
    limit = cfg.generation.max_model_len or actor.max_positions
    if limit and seq > limit:
        out.problems.append(f"data.max_prompt_len + generation.max_new_tokens = {seq} exceeds {actor.name}'s "
                            f"context of {limit} tokens")
    out.procs = _role_procs(cfg, models, layout, on_gpu, out.problems)
    for learner, roles in (("actor", ("actor", "reference")), ("critic", ("critic", "reward"))):
        h = getattr(cfg.ppo, learner).deepspeed.zero_hpz_partition_size
        for role in roles:
            ranks = sum(1 for proc in out.procs if proc.role == role)
            if h > 1 and ranks > 1 and ranks % h:
                out.problems.append(f"ppo.{learner}.deepspeed.zero_hpz_partition_size={h} does not divide the "
                                    f"{ranks} {role} rank(s)")
    out.engines_sleep = cfg.generation.enable_sleep_mode and any(
        on_gpu[g.role] for g in layout if g.role.startswith("generator"))
    _place(out, layout)
    _account(out)
    _stage_plans(cfg, out)
    _estimate_time(cfg, out)
    return out


def with_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    new = copy.deepcopy(cfg)
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = new
        for part in parents:
            node = getattr(node, part)
        setattr(node, leaf, value)
    return new


def _divides(cfg: Config, learner: str, ranks: int) -> bool:
    return cfg.ppo.mini_batch_size % (getattr(cfg.ppo, learner).deepspeed.micro_batch_size * ranks) == 0


def placement_given(cfg: Config) -> bool:
    """A GPU placement is given when some role asks for GPUs (or the cluster has none to place)."""
    p = cfg.placement
    return cfg.cluster.gpus_per_node == 0 or any(
        getattr(p, r).gpus_per_worker > 0 for r in ("actor", "critic", "reference", "reward", "generator"))


def suggest_placement(cfg: Config) -> tuple[dict[str, Any], Plan]:
    """Search GPU splits (actor, critic, engines x TP; reference with the actor, reward with the critic) and return
    the overrides of the fastest layout that fits, or of the least overfull one, with its plan. The candidates
    depend on the cluster shape only, never on its memory."""
    c = cfg.cluster
    total = c.nodes * c.gpus_per_node
    if total == 0:
        raise ConfigError("cluster.gpus_per_node is 0: nothing to place (CPU plans use the configured placement)")
    critic = cfg.ppo.advantage_estimator == "gae"
    heads = model_shape(cfg.models.actor.path).heads
    candidates: list[dict[str, Any]] = []
    if total == 1:  # everything shares one GPU: fractions decide how Ray packs, memory decides the fit
        for util in (0.2, 0.3, 0.4, 0.5):
            rest = round(1 - util, 2)
            for share in (0.5, 0.6, 0.7):
                a = round(rest * share, 2)
                cand = {"placement.layout": "separate",  # the engine on a GPU slice of its own
                        "generation.num_engines": 1, "generation.tensor_parallel_size": 1,
                        "generation.gpu_memory_utilization": util, "placement.generator.gpus_per_worker": util,
                        "placement.actor.num_workers": 1, "placement.actor.gpus_per_worker": a,
                        "placement.reference.num_workers": 1, "placement.colocate_actor_reference": True,
                        "placement.critic.num_workers": 1, "placement.reward.num_workers": 1}
                if critic:  # the reward model shares the critic's slice
                    cand |= {"placement.critic.gpus_per_worker": round(rest - a, 2),
                             "placement.colocate_critic_reward": True}
                else:
                    cand["placement.reward.gpus_per_worker"] = round(rest - a, 2)
                candidates.append(cand)
    else:
        sizes = _gpu_counts(c)
        tps = [t for t in (1, 2, 4, 8) if t <= c.gpus_per_node and heads % t == 0]
        for a in sizes:
            for cr in sizes:  # critic + reward, or the reward model alone (GRPO, RLOO, ...)
                for tp in tps:
                    engines = (total - a - cr) // tp
                    if engines < 1 or not _divides(cfg, "actor", a) or critic and not _divides(cfg, "critic", cr):
                        continue
                    cand = {"placement.layout": "separate",  # the engines on GPUs of their own
                            "generation.num_engines": engines, "generation.tensor_parallel_size": tp,
                            "generation.gpu_memory_utilization": 0.9, "placement.generator.gpus_per_worker": 1.0,
                            "placement.actor.num_workers": a, "placement.actor.gpus_per_worker": 1.0,
                            "placement.reference.num_workers": a, "placement.colocate_actor_reference": True}
                    if critic:  # the reward model shares the critic's GPUs
                        cand |= {"placement.critic.num_workers": cr, "placement.critic.gpus_per_worker": 1.0,
                                 "placement.reward.num_workers": cr, "placement.colocate_critic_reward": True}
                    else:
                        cand |= {"placement.reward.num_workers": cr, "placement.reward.gpus_per_worker": 1.0}
                    candidates.append(cand)
    candidates += _colocated_candidates(cfg, critic)
    if cfg.placement.reference_in_actor:  # no reference group to size or colocate: the actor's ranks score it
        candidates = [{k: v for k, v in cand.items()
                       if k not in ("placement.reference.num_workers", "placement.colocate_actor_reference")}
                      for cand in candidates]
    if not candidates:
        raise ConfigError(f"no GPU split of {total} GPU(s) keeps ppo.mini_batch_size a multiple of "
                          f"ppo.actor/ppo.critic deepspeed.micro_batch_size x ranks; adjust the batch sizes")
    scored = []
    for cand in candidates:
        try:
            p = plan(validate(with_overrides(cfg, cand)))
        except ConfigError:  # only layouts validation accepts
            continue
        scored.append((_rank(p), cand, p))
    best = min(scored, key=lambda s: s[0])
    # Then the learners' own options, one learner at a time, on the best splits of each family (separate GPUs,
    # colocated): a split that misses by a little may fit with the optimizer offloaded.
    for colocated in (False, True):
        family = sorted((s for s in scored if ("generation.enable_sleep_mode" in s[1]) == colocated),
                        key=lambda s: s[0])
        for key, base, _ in family[:SEARCH_BASES]:
            for learner in ("actor", "critic") if critic else ("actor",):
                improved = base
                for variant in _learner_variants(with_overrides(cfg, base), learner):
                    cand = {**base, **variant}
                    try:
                        p = plan(validate(with_overrides(cfg, cand)))
                    except ConfigError:
                        continue
                    if (rank := _rank(p)) < key:
                        key, improved = rank, cand
                        best = min(best, (key, cand, p), key=lambda s: s[0])
                base = improved
    return best[1], best[2]


# Colocated: every role on the same GPUs, engines asleep (vLLM sleep level 1) while the others score and train.
# The fractions only steer Ray's packing (best fit: fractions share a GPU until it is full): the actor (> 0.5) takes
# a GPU of its own, the critic (or the reward model) the next 0.3 of it, one tensor-parallel worker the last 0.1.
COLOCATED_FRACTIONS = {"actor": 0.6, "critic": 0.3, "generator": 0.1}
SEARCH_BASES = 2  # splits per family whose learner options are searched


def _colocated_candidates(cfg: Config, critic: bool) -> list[dict[str, Any]]:
    """Layouts where actor, reference, critic, reward and the engines share each of n GPUs (OpenRLHF's
    --colocate_all_models with --vllm_enable_sleep): engines generate on every GPU, then sleep while the learners
    use the whole GPU; vLLM's claim (gpu_memory_utilization) must leave room for the learners' resident states."""
    c, f = cfg.cluster, COLOCATED_FRACTIONS
    actor, wb = model_shape(cfg.models.actor.path), _dtype_bytes(ppo_precision(cfg), True)
    out = []
    for n, tp, util in itertools.product(_gpu_counts(c), (1, 2, 4, 8), (0.3, 0.4, 0.5, 0.55, 0.6, 0.65, 0.7, 0.8)):
        micros = {learner: _fitting_micro(cfg, learner, n) for learner in ("actor", "critic") if critic or
                  learner == "actor"}
        claim_holds_weights = actor.params * wb / tp + ENGINE_WORKSPACE_GIB * GIB < util * c.gpu_memory_gib * GIB
        if tp > min(n, c.gpus_per_node) or n % tp or actor.heads % tp or None in micros.values() \
                or not claim_holds_weights:
            continue
        cand = {f"ppo.{learner}.deepspeed.micro_batch_size": m for learner, m in micros.items()
                if m != getattr(cfg.ppo, learner).deepspeed.micro_batch_size}
        cand |= {"placement.layout": "separate", "generation.enable_sleep_mode": True,
                "generation.num_engines": n // tp, "generation.tensor_parallel_size": tp,
                "generation.gpu_memory_utilization": util, "placement.generator.gpus_per_worker": f["generator"],
                "placement.actor.num_workers": n, "placement.actor.gpus_per_worker": f["actor"],
                "placement.reference.num_workers": n, "placement.colocate_actor_reference": True}
        if critic:
            cand |= {"placement.critic.num_workers": n, "placement.critic.gpus_per_worker": f["critic"],
                     "placement.reward.num_workers": n, "placement.colocate_critic_reward": True}
        else:
            cand |= {"placement.reward.num_workers": n, "placement.reward.gpus_per_worker": f["critic"]}
        out.append(cand)
    return out


def _gpu_counts(c: ClusterConfig) -> list[int]:
    """GPU counts a role group may take: powers of two up to the cluster, and whole nodes."""
    total = c.nodes * c.gpus_per_node
    return sorted({2**i for i in range(12) if 2**i <= total} | {k * c.gpus_per_node for k in range(1, c.nodes + 1)})


def _fitting_micro(cfg: Config, learner: str, ranks: int) -> Optional[int]:
    """The learner's micro-batch, halved until ppo.mini_batch_size splits over `ranks` ranks (None if never)."""
    micro = getattr(cfg.ppo, learner).deepspeed.micro_batch_size
    while micro >= 1 and cfg.ppo.mini_batch_size % (micro * ranks):
        micro //= 2
    return micro or None


def _rank(p: Plan) -> tuple[bool, float]:
    """Fitting plans by time, the others by how overfull they are."""
    c = p.cluster
    overfull = max(p.max_gpu_gib() / c.gpu_memory_gib, p.max_host_gib() / c.cpu_memory_gib)
    return not p.fits, p.times["total"] if p.fits else overfull


def _learner_variants(cfg: Config, learner: str) -> list[dict[str, Any]]:
    """Micro-batch, gradient checkpointing, optimizer offload and, under ZeRO-3, ZeRO++ (hpZ inside a node,
    quantized weights and gradients) for ppo.<learner>; only keys that differ from cfg's."""
    ds, c = getattr(cfg.ppo, learner).deepspeed, cfg.cluster
    ranks, key = getattr(cfg.placement, learner).num_workers, f"ppo.{learner}.deepspeed."
    micros = [m for m in (ds.micro_batch_size, 2 * ds.micro_batch_size, 4 * ds.micro_batch_size)
              if cfg.ppo.mini_batch_size % (m * ranks) == 0]
    hpz = [1] + ([c.gpus_per_node] if ds.zero_stage == 3 and 1 < c.gpus_per_node < ranks
                 and ranks % c.gpus_per_node == 0 else [])
    quant = [False, True] if ds.zero_stage == 3 else [False]
    out = []
    for micro, ckpt, offload, h, qw, qg in itertools.product(micros, (True, False), (False, True), hpz, quant, quant):
        values = {"micro_batch_size": micro, "gradient_checkpointing": ckpt, "offload_optimizer": offload,
                  "zero_hpz_partition_size": h, "zero_quantized_weights": qw, "zero_quantized_gradients": qg}
        changed = {key + k: v for k, v in values.items() if getattr(ds, k) != v}
        if changed:
            out.append(changed)
    return out


# -------------------------------------------------------------------------------------------- report
def _gpu_list(procs: list[Proc]) -> str:
    by_node: dict[int, list[int]] = {}
    for p in procs:
        by_node.setdefault(p.node, []).extend(p.gpus)
    parts = []
    for node, gpus in sorted(by_node.items()):
        if node < 0:
            parts.append("unplaced")
            continue
        ids = sorted(set(gpus))
        if not ids:
            parts.append(f"n{node}:cpu")
            continue
        runs, start = [], ids[0]
        for prev, cur in zip(ids, ids[1:] + [None]):
            if cur != prev + 1:
                runs.append(f"{start}" if start == prev else f"{start}-{prev}")
                start = cur
        parts.append(f"n{node}:g{','.join(runs)}")
    return " ".join(parts)


def format_plan(cfg: Config, p: Plan, source: str = "") -> str:
    c = p.cluster
    gib = lambda b: f"{b / GIB:7.1f}"  # noqa: E731
    device = (f"{c.nodes} node(s) x {c.gpus_per_node} GPU(s) x {c.gpu_memory_gib:g} GiB, {c.cpu_memory_gib:g} GiB host "
              f"per node" if c.gpus_per_node else f"{c.nodes} CPU node(s) x {c.cpu_memory_gib:g} GiB (no GPU)")
    lines = [f"plan{' for ' + source if source else ''}: {device}"]
    seen: dict[str, list[str]] = {}
    present = {proc.role.split("[")[0] for proc in p.procs}
    for role, shape in p.models.items():
        if role in present:
            seen.setdefault(shape.name, []).append(role)
    lines.append("models: " + "; ".join(f"{'/'.join(r)} {name} {p.models[r[0]].params / 1e9:.2f}B params"
                                        for name, r in seen.items()))
    lines.append(f"GiB per process   {'procs':>5}{'weights':>8}{'grads':>8}{'optim':>8}{'activ':>8}{'gather':>8}"
                 f"{'kv':>8}{'sync':>8}{'load':>8}{'proc':>8}{'peak':>8}{'offload':>8}  GPUs (node:gpu)")
    roles = []
    for proc in p.procs:
        if proc.role not in roles:
            roles.append(proc.role)
    for role in roles:
        procs = [q for q in p.procs if q.role == role]
        m = max((q.memory for q in procs), key=lambda x: x.peak)
        lines.append(f"{role:<18}{len(procs):>5} {gib(m.weights)}{gib(m.grads)}{gib(m.optimizer)}"
                     f"{gib(m.activations)}{gib(m.gather)}{gib(m.kv_cache)}{gib(m.sync)}"
                     f"{gib(max(m.load, m.host_load))}{gib(m.overhead)}"
                     f"{gib(m.peak)}{gib(m.offloaded)}  {_gpu_list(procs)}")
    if p.gpu_used:
        worst = max(p.gpu_used, key=p.gpu_used.get)
        lines.append(f"busiest GPU: node {worst[0]} GPU {worst[1]} {p.gpu_used[worst] / GIB:.1f} of "
                     f"{c.gpu_memory_gib:g} GiB; GPUs used {len(p.gpu_used)} of {c.nodes * c.gpus_per_node}")
    lines.append(f"busiest host: {p.max_host_gib():.1f} of {c.cpu_memory_gib:g} GiB per node")
    for name, (ranks, peak, ok) in p.stages.items():
        lines.append(f"{name} stage: {ranks} worker(s), {peak:.1f} GiB each: {'fits' if ok else 'DOES NOT FIT'}")
    t = p.times
    lines.append(f"time per PPO iteration ~{t['total']:.1f} s: generation {t['generation']:.1f} s, experience "
                 f"{t['experience']:.1f} s, training {t['training']:.1f} s, weight sync {t['weight_sync']:.1f} s "
                 f"({cfg.ppo.rollout_batch_size} prompts x {cfg.generation.n_samples_per_prompt} samples, "
                 f"{cfg.data.max_prompt_len}+{cfg.generation.max_new_tokens} tokens"
                 + (", timed as DeepSpeed-Chat's hybrid engine" if c.timing_layout == "hybrid_engine" else "") + ")")
    if p.gpus_used:
        samples = cfg.ppo.rollout_batch_size * cfg.generation.n_samples_per_prompt
        lines.append(f"cost: {p.gpu_seconds_per_1k_samples(samples):,.0f} GPU-seconds per 1000 samples ({p.gpus_used} "
                     f"GPU(s) x {t['total']:.1f} s / {samples} samples)")
    lines.append("dominant terms: " + "; ".join(f"{phase} {term} ({share:.0%})"
                                                for phase, (term, share) in dominant_terms(p).items()))
    lines.append(f"assumptions: MFU {c.mfu:g}, decode bandwidth use {c.mbu:g}, decode step overhead "
                 f"{c.decode_step_overhead_s * 1e3:g} ms, "
                 + (f"{c.gpu_tflops:g} TFLOPS and {c.gpu_memory_bandwidth_gbs:g} GB/s HBM per GPU, NVLink "
                    f"{c.intra_node_gbs:g} GB/s per GPU, network {c.inter_node_gbs:g} GB/s per node, PCIe "
                    f"{c.pcie_gbs:g} GB/s; " if c.gpus_per_node else
                    f"{c.cpu_tflops:g} TFLOPS and {c.cpu_memory_bandwidth_gbs:g} GB/s per CPU node; ")
                 + f"CUDA context {c.gpu_context_gib:g} GiB per GPU process, host {HOST_GIB_PER_GPU_PROCESS:g} GiB per "
                   f"GPU process, vLLM workspace {ENGINE_WORKSPACE_GIB:g} GiB; answers run to max_new_tokens; "
                   f"activations per Korthikanti et al. 2022 with memory-efficient attention")
    lines.append("FITS" if p.fits else "DOES NOT FIT:\n  " + "\n  ".join(_summarised(p.problems)))
    return "\n".join(lines)


def _summarised(problems: list[str], per_kind: int = 4) -> list[str]:
    """Each distinct problem once; of the per-GPU and per-node ones the first few and a count of the rest."""
    out, seen, counts = [], set(), {}
    for msg in problems:
        kind = "gpu" if " GPU " in msg.split(":")[0] else "host" if msg.startswith("node ") else None
        if msg in seen:
            continue
        seen.add(msg)
        counts[kind] = counts.get(kind, 0) + 1
        if kind is None or counts[kind] <= per_kind:
            out.append(msg)
    out += [f"... and {n - per_kind} more {'GPU(s)' if kind == 'gpu' else 'node(s)'} like the above"
            for kind, n in counts.items() if kind and n > per_kind]
    return out


def overrides_as_flags(overrides: dict[str, Any]) -> str:
    return " ".join(f"--{k} {str(v).lower() if isinstance(v, bool) else v}" for k, v in overrides.items())


def cmd_plan(args) -> int:
    """`rlhf-ray plan [--suggest] CONFIG [overrides]`: exit 0 when the run fits, 1 when it does not."""
    cfg = load_config(args.config, args.overrides)
    if getattr(args, "suggest", False) or not placement_given(cfg):
        overrides, result = suggest_placement(cfg)
        print(f"suggested placement for {cfg.cluster.nodes * cfg.cluster.gpus_per_node} GPU(s) "
              f"(append to the command line, or put into the YAML):\n  {overrides_as_flags(overrides)}\n")
        cfg = validate(with_overrides(cfg, overrides))
    else:
        result = plan(cfg)
    print(format_plan(cfg, result, str(args.config)))
    return 0 if result.fits else 1
