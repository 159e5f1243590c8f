"""One typed config tree for every stage: YAML in, dotted command-line overrides, validated with clear errors.

    cfg = load_config("launchers/cpu_demo.yaml", overrides=["--ppo.kl_coef", "0.05"])

Every section is a dataclass; field types are enforced at load time. An unknown key fails naming the key
and the closest valid one; a wrong type fails naming the key, the expected type and the value given.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key."""


# ----------------------------------------------------------------------------------------------- sections
@dataclass
class RunConfig:
    name: str = "rlhf"
    output_dir: str = "runs/rlhf"  # every stage writes below this folder
    seed: int = 42


@dataclass
class RayConfig:
    # The cluster to attach to ("host:port", "ray://...", or "auto": whatever Ray finds on this machine). None: the
    # RAY_ADDRESS variable if set (`ray job submit` sets it), else a private local cluster; "local": always private.
    address: Optional[str] = None
    # Logical CPUs a *local* cluster declares (None: enough for every bundle of the layout, see resources.py).
    local_num_cpus: Optional[int] = None
    # Placement groups that cannot be placed within this many seconds fail with the role and the resources named.
    placement_timeout_s: float = 120.0


@dataclass
class ModelConfig:
    """Where a model comes from: a local folder or a hub name (loaded with from_pretrained)."""

    path: str = ""
    tokenizer: Optional[str] = None  # default: same as path
    gguf_file: Optional[str] = None  # a GGUF file inside `path` (de-quantised to float on load)
    # auto: follows ppo.actor.deepspeed.precision (PPO) and resolves per worker (env.auto_precision)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False


@dataclass
class ModelsConfig:
    actor: ModelConfig = field(default_factory=ModelConfig)  # SFT input / PPO actor initialisation
    reward: ModelConfig = field(default_factory=ModelConfig)  # RM input backbone / PPO reward model
    critic: Optional[ModelConfig] = None  # None: initialised from the reward model (DeepSpeed-Chat)
    reference: Optional[ModelConfig] = None  # None: a frozen copy of the actor's initial weights


@dataclass
class DatasetSource:
    # Hub name, local file (json/jsonl/parquet/arrow/csv/txt, globs allowed), a folder of such files, a
    # save_to_disk folder, or builtin:tasks / builtin:text / builtin:demo / builtin:demo-eval (rlhf_ray/data/builtin.py).
    path: str = ""
    # Adapter (rlhf_ray/data/adapters.py), or "auto" to detect from columns (logged).
    format: Literal["auto", "rm-static", "pairwise", "hh-rlhf", "webgpt", "shp", "chat", "prompt", "sft",
                    "text"] = "auto"
    weight: float = 1.0  # row multiplier when mixing: 0.5 = a seeded half of its rows, 2.0 = every row twice
    split: str = "train"  # the source's split; slices like "train[:1000]" work for hub names and files


@dataclass
class DataConfig:
    datasets: list[DatasetSource] = field(default_factory=list)  # empty: the built-in data set
    sft_only: list[DatasetSource] = field(default_factory=list)  # single-response data, never fed to RM/PPO
    ptx: list[DatasetSource] = field(default_factory=list)  # plain-text pretraining data for the PTX loss
    data_split: str = "2,4,4"  # SFT,RM,PPO shares of one data set (DeepSpeed-Chat)
    eval_fraction: float = 0.1  # of each stage's part, held out as its eval split
    seed: int = 1234  # data_split, eval split and mixing are seeded by this alone
    max_prompt_len: int = 256  # tokens, chat template included
    max_answer_len: int = 256  # tokens, EOS included; PTX blocks are max_prompt_len + max_answer_len long
    long_prompt: Literal["truncate_left", "drop"] = "truncate_left"
    long_answer: Literal["truncate", "drop"] = "truncate"  # truncate keeps the answer's first tokens
    use_chat_template: bool = True  # when the tokenizer has one; else "\n\nHuman: ...\n\nAssistant:" text
    max_bad_fraction: float = 0.5  # fail when a data set loses more than this fraction of rows
    cache_dir: Optional[str] = None  # tokenized-data cache; None: $RLHF_RAY_CACHE/data (~/.cache/rlhf_ray/data)
    rebuild_cache: bool = False


@dataclass
class LoraConfig:
    dim: int = 0  # 0 disables LoRA (DeepSpeed-Chat --lora_dim)
    alpha: float = 16.0
    dropout: float = 0.0
    module_names: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    only_optimize_lora: bool = True


@dataclass
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "linear", "cosine"] = "cosine"
    grad_clip: float = 1.0


@dataclass
class DeepSpeedConfig:
    """One DeepSpeed engine (PPO learners, and the scorers that follow them). A PPO learner's optimizer step is
    ppo.mini_batch_size samples, so it has no global batch of its own."""

    zero_stage: Literal[0, 1, 2, 3] = 2
    # auto: bf16 on GPU and on CPUs with AMX / AVX-512 BF16, else fp32, decided by each worker on its own device
    # (env.auto_precision). ppo.actor's decides every PPO model (learners, scorers, engines: config.ppo_precision);
    # sft / rm decide their own stage.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    offload_optimizer: bool = False  # GPU only: ZeRO-Offload of optimizer states to CPU
    offload_params: bool = False  # GPU only, ZeRO-3: parameters offloaded to CPU
    gradient_checkpointing: bool = False
    micro_batch_size: int = 2  # per rank
    # When ZeRO-2 reduces the gradient over the ranks. per_micro_batch: in every micro-batch's backward (each rank
    # then keeps only its partition of the gradient); per_step: once per optimizer step, after the last micro-batch
    # (DeepSpeed's coalesce_grad_reduction: each rank holds a whole gradient until then, ZeRO-1's gradient memory).
    # auto: per_step on CPU, where a reduction cannot overlap the backward, per_micro_batch on GPU; decided by each
    # worker on its own device. Other stages: ZeRO-0/1 reduce once per step anyway, ZeRO-3 per micro-batch (per_step
    # with zero_stage 3 is refused at load).
    grad_reduction: Literal["auto", "per_micro_batch", "per_step"] = "auto"
    # ZeRO++ (Wang et al. 2023, arXiv 2306.10209; DeepSpeed zero_optimization keys), ZeRO-3 only, also for the
    # scorers that follow this learner. hpz_partition_size: a second copy of the weights partitioned over this many
    # ranks (a node's GPUs) so gathers after the first forward of a step stay inside the node; quantized_weights:
    # int8 weight gathers (half the bytes, GPU only); quantized_gradients: int4 gradient reduce (GPU only).
    zero_hpz_partition_size: int = 1
    zero_quantized_weights: bool = False
    zero_quantized_gradients: bool = False


@dataclass
class StageDeepSpeedConfig(DeepSpeedConfig):
    """SFT / RM (Ray Train): the optimizer-step batch is the stage's own."""

    global_batch_size: int = 8  # across ranks; gradient accumulation = global / (micro * ranks)


@dataclass
class PPOLearnerConfig:
    """A PPO learner (ppo.actor, ppo.critic). Its ranks and resources are placement.actor / placement.critic; it
    steps on ppo.mini_batch_size samples; the PPO controller decides iterations, checkpoints and output folders."""

    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    disable_dropout: bool = True


@dataclass
class TrainStageConfig(PPOLearnerConfig):
    """SFT and reward-model training (Ray Train + DeepSpeed): a learner plus the Ray Train job's own settings."""

    deepspeed: StageDeepSpeedConfig = field(default_factory=StageDeepSpeedConfig)
    output_dir: str = ""  # default: <run.output_dir>/<stage>
    num_workers: int = 2
    epochs: int = 1
    max_steps: int = -1  # -1: epochs decide
    eval_every: int = 50
    log_every: int = 10
    checkpoint_every: int = 100
    max_failures: int = 1  # Ray Train FailureConfig: restarts from the last checkpoint
    resume_from: Optional[str] = None  # an explicit Ray Train checkpoint folder
    use_gpu: Optional[bool] = None  # Ray Train workers on GPUs (one each); None: when the cluster has GPUs
    cpus_per_worker: float = 1.0  # Ray CPUs each Ray Train worker asks for


@dataclass
class GenerationConfig:
    num_engines: int = 1
    tensor_parallel_size: int = 1
    max_new_tokens: int = 64
    temperature: float = 1.0  # PPO scores log-probs, KL and entropy at this T too (0, greedy: at 1)
    top_p: float = 1.0  # PPO needs 1.0 and top_k <= 0: the learners do not reproduce the truncation (validate_ppo)
    top_k: int = -1  # -1 or 0: off
    n_samples_per_prompt: int = 1
    stop: list[str] = field(default_factory=list)
    max_model_len: Optional[int] = None  # None: the model config's own limit, or less if the KV cache holds less
    kv_cache_gib: float = 1.0  # CPU engines only: vLLM kv_cache_memory_bytes (fractions allowed, e.g. 0.25)
    gpu_memory_utilization: float = 0.5  # GPU engines only: their share of the GPU, KV cache included
    enforce_eager: bool = True
    long_prompt: Literal["error", "skip"] = "error"  # a prompt >= max_model_len: fail naming it, or skip and count
    enable_sleep_mode: bool = False  # GPU only: frees KV cache while learners train on the same GPUs
    stop_token_ids: list[int] = field(default_factory=list)  # besides EOS (which stops unless ignored)
    ignore_eos: bool = False  # every response exactly max_new_tokens long: fixed-work benchmarks, not training
    cpu_cores: list[str] = field(default_factory=list)  # CPU: per engine VLLM_CPU_OMP_THREADS_BIND ("0", "0|1",
    # "nobind"); empty: engine i's TP workers on cores i*tp .. i*tp+tp-1 of its node
    max_restarts: int = 3  # Ray restarts of a dead engine actor (re-synced before it takes work)
    # Weight sync learner -> engines (rlhf_ray/weight_sync.py). auto: nccl on GPU, gloo on CPU.
    sync_transport: Literal["auto", "object_store", "gloo", "nccl", "ipc"] = "auto"
    sync_bucket_mb: float = 256.0  # tensors per transfer; bounds the extra memory a sync needs
    sync_timeout_s: float = 600.0
    verify_weights: bool = True  # after each sync: live-parameter checksums and probe log-probs vs the learner's
    verify_probe_len: int = 16  # tokens of the fixed probe sequence
    # probe on every N-th sync (always on an engine's first sync after it starts, restarts or joins); the checksums
    # check every sync. On CPU the two 16-token forwards are ~1/3 of a small model's in-process sync
    verify_probe_every: int = 1
    verify_probe_atol: Optional[float] = None  # max |engine - learner| probe log-prob; None: PROBE_ATOL[dtype]


@dataclass
class PPOConfig:
    # dr_grpo: GRPO's group advantage without the division by the group's std (Dr. GRPO, arXiv 2503.20783); pair it
    # with loss_aggregation seq-mean-token-sum-norm for the paper's whole recipe (seq-mean-token-mean is rejected).
    advantage_estimator: Literal["gae", "grpo", "dr_grpo", "rloo", "reinforce_pp"] = "gae"
    num_iterations: int = 10
    rollout_batch_size: int = 8  # prompts per iteration
    ppo_epochs: int = 1
    mini_batch_size: int = 8  # samples per optimizer step
    # DeepSpeed-Chat defaults: kl 0.1, clip 0.2, reward clip 5, gamma 1.0, lambda 0.95.
    kl_coef: float = 0.1
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    # reward: -kl_coef * KL_t shapes the rewards / advantages (InstructGPT, DeepSpeed-Chat); loss: kl_coef * KL is
    # added to the actor's loss (GRPO paper, veRL use_kl_loss, TRL). With "loss", ppo_epochs 1 and one mini-batch
    # per iteration, the training pass's own log-probs serve as the old ones: no separate actor forward.
    # k1's gradient is zero in expectation, so "loss" needs k2 or k3 (checked at load).
    kl_penalty: Literal["reward", "loss"] = "reward"
    adaptive_kl: bool = False
    kl_target: float = 6.0  # Ziegler et al. adaptive controller
    kl_horizon: int = 10000
    clip_ratio: float = 0.2
    # The ratio's clip range [1 - clip_ratio_low, 1 + clip_ratio_high]; null: clip_ratio (policy_loss gspo: 3e-4 / 4e-4,
    # the GSPO paper's). DAPO's clip-higher: 0.2 / 0.28.
    clip_ratio_low: Optional[float] = None
    clip_ratio_high: Optional[float] = None
    dual_clip: Optional[float] = None
    # ppo: token-level importance ratios (PPO); gspo: one length-normalised ratio per sequence, clipped per sequence
    # (GSPO, arXiv 2507.18071; needs loss_aggregation seq-mean-token-mean).
    policy_loss: Literal["ppo", "gspo"] = "ppo"
    # Correction of the policy loss for tokens the engines sampled (behaviour policy mu: vLLM's kernels and precision)
    # against pi_old, per token rho = pi_old / mu (rl.off_policy_correction): none; tis: weight min(rho, is_cap)
    # (truncated importance sampling, Yao et al. 2025); icepop: weight rho inside [is_mask_low, is_mask_high], 0
    # outside (IcePop, arXiv 2510.18855); seq_mask: a sequence whose geometric-mean rho lies outside that range is
    # left out of the loss (Liu, Li et al. 2025). Metrics off_policy/*.
    off_policy_correction: Literal["none", "tis", "icepop", "seq_mask"] = "none"
    is_cap: float = 2.0
    is_mask_low: float = 0.5
    is_mask_high: float = 5.0
    value_clip: float = 0.2
    reward_clip: float = 5.0
    gamma: float = 1.0
    lam: float = 0.95
    entropy_coef: float = 0.0
    # Over each whole mini-batch (all its micro-batches and ranks): token-mean divides the summed token losses by the
    # mini-batch's response tokens (DAPO, veRL); seq-mean-* by its sequences; seq-mean-token-sum-norm also by
    # generation.max_new_tokens (Dr. GRPO). The actor's and the critic's losses and the KL / entropy terms alike.
    loss_aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                              "seq-mean-token-sum-norm"] = "token-mean"
    whiten_advantages: bool = True
    # grpo / rloo with kl_penalty "reward": per_token subtracts kl_coef * KL_t from token t's advantage; return_to_go
    # subtracts kl_coef * sum_{j>=t} KL_j (OpenRLHF). per_token by default: it keeps the earlier behaviour and a
    # penalty that does not grow with the response length.
    kl_reward_shape: Literal["per_token", "return_to_go"] = "per_token"
    # DAPO dynamic sampling: drop prompt groups whose scores all tie (no signal) and generate more prompts, at most
    # dynamic_sampling_max_rounds extra rounds; still short then: filled with the last round's tied groups.
    dynamic_sampling: bool = False
    dynamic_sampling_max_rounds: int = 4
    # DAPO overlong handling: overlong_mask takes samples cut at max_new_tokens (finish_reason 'length') out of the
    # loss; overlong_buffer > 0 adds the soft penalty, 0 to -overlong_penalty over the last overlong_buffer tokens.
    overlong_mask: bool = False
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0
    ema_decay: Optional[float] = None  # DeepSpeed-Chat --enable_ema (0.992)
    ptx_coef: float = 0.0  # InstructGPT's pretraining mix; needs data.ptx
    actor: PPOLearnerConfig = field(default_factory=PPOLearnerConfig)
    critic: PPOLearnerConfig = field(default_factory=PPOLearnerConfig)
    reward_functions: list[str] = field(default_factory=list)  # dotted paths or http(s) URLs
    reward_function_mode: Literal["add", "replace"] = "add"
    reward_http_timeout_s: float = 10.0
    reward_http_retries: int = 2  # more attempts after a timeout, a connection error, a 5xx, 408 or 429
    # The NAME of an environment variable (in the reward actors' environment) holding a token sent as
    # "Authorization: Bearer <token>"; never the token itself. None: no Authorization header.
    reward_http_token_env: Optional[str] = None
    # Optimizer steps in a row skipped for a non-finite loss or gradient norm (on any rank) before the run stops.
    max_nonfinite_steps: int = 3
    # a learner or scorer rank that dies (SIGKILL, OOM, a lost node) is replaced in its placement group, and after a
    # learner death the run goes back to its latest checkpoint (rlhf_ray/recovery.py); this many times per run
    max_learner_restarts: int = 3
    # Reference / reward scorers: 0 = a full replica per rank, 3 = ZeRO-3 partitions across the role's ranks;
    # None: 3 when the model's weight files exceed scorer_replica_max_gib (and the role has > 1 rank), else 0.
    scorer_zero_stage: Optional[Literal[0, 3]] = None
    scorer_replica_max_gib: float = 4.0


@dataclass
class RoleResources:
    num_workers: int = 1  # ranks for learners, engines for the generator
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0


@dataclass
class PlacementConfig:
    actor: RoleResources = field(default_factory=lambda: RoleResources(num_workers=2))
    critic: RoleResources = field(default_factory=lambda: RoleResources(num_workers=2))
    reference: RoleResources = field(default_factory=RoleResources)
    reward: RoleResources = field(default_factory=RoleResources)
    # per tensor-parallel worker; engines: generation.num_engines (num_workers stays 1)
    generator: RoleResources = field(default_factory=RoleResources)
    colocate_actor_reference: bool = False
    colocate_critic_reward: bool = False
    # The reference scored by the actor's own ranks as its base model with the LoRA adapters disabled (TRL's and
    # veRL's way with LoRA): no reference group, no second copy of the weights. Needs ppo.actor.lora.dim > 0 with
    # only_optimize_lora (the base stays the initial weights) and models.reference unset; placement.reference unused.
    reference_in_actor: bool = False
    # separate: every engine in a placement group of its own (generation.num_engines); hybrid: one vLLM engine inside
    # the actor learner's rank process (rlhf_ray/hybrid.py), fed from the learner's parameters in-process
    layout: Literal["separate", "hybrid"] = "separate"


@dataclass
class RolloutConfig:
    """When generation runs relative to training (rlhf_ray/rollout/)."""

    # off: generate -> score -> train -> sync, one after the other. one_step: the engines generate batch k+1 (weights
    # of step k) while the learners score and train on batch k, so every sample trained on is one step old.
    # bounded: batches k+1 .. k+max_staleness are in flight at once, each generated in max_staleness chunks of
    # max_new_tokens / max_staleness tokens, one chunk per iteration; a weight sync interrupts them and they continue
    # from their prefix under the new weights, so a sample's oldest token is max_staleness steps old when trained
    # (rlhf_ray/rollout/pipeline.py). In both async modes the PPO ratio is taken against the engines' log-probs (or,
    # with ppo.off_policy_correction, against the learner's recomputed ones, weighted by the correction).
    mode: Literal["off", "one_step", "bounded"] = "off"
    # bounded: how many learner steps a sample's oldest token may be behind the learners that train on it (>= 1;
    # 1 is one_step). Only bounded reads it.
    max_staleness: int = 2
    # Lineage: every samples_every-th trained sample's record (prompt id, engine, weight version, staleness,
    # generation and training times, prompt, response, reward) is appended to <output_dir>/ppo/samples.jsonl; 0: none.
    samples_every: int = 0


@dataclass
class ClusterConfig:
    """The cluster `rlhf-ray plan` checks a run against: shape, memory, speeds and assumed efficiencies.

    Planning only; Ray's own resource counts decide where things really run. gpus_per_node 0 means CPU nodes.
    """

    nodes: int = 1
    gpus_per_node: int = 0
    gpu_memory_gib: float = 80.0
    cpu_memory_gib: float = 24.0  # host memory per node
    gpu_tflops: float = 312.0  # dense bf16 peak per GPU (A100: 312, H100 SXM: 989)
    gpu_memory_bandwidth_gbs: float = 2039.0  # HBM GB/s per GPU (A100-80GB: 2039, H100 SXM: 3350)
    cpu_tflops: float = 0.1  # CPU nodes: peak fp32 TFLOPS of the whole node
    cpu_memory_bandwidth_gbs: float = 20.0  # CPU nodes: DRAM GB/s
    intra_node_gbs: float = 300.0  # GPU-to-GPU within a node, GB/s per GPU (NVLink 3: 300)
    inter_node_gbs: float = 25.0  # network per node, GB/s (one 200 Gb/s InfiniBand NIC: 25; DGX A100, 8 NICs: 200)
    pcie_gbs: float = 25.0  # GPU-host copies (offload), GB/s per GPU
    # Per process on a GPU beyond its tensors: the CUDA context (PyTorch forum "What is the reason for pytorch's GPU
    # memory floor?": 723 MiB after the first CUDA call), NCCL buffers and allocator slack. Colocated layouts hold
    # five processes per GPU: 1.5 instead of 1.0 moves the 176B launcher's best plan from 543 s to 669 s.
    gpu_context_gib: float = 1.0
    # mfu and decode_step_overhead_s are fitted (least squares in log time) to 5 of DeepSpeed-Chat's 10 published
    # step-3 times (DeepSpeedExamples applications/DeepSpeed-Chat/README.md, Table 1) and checked on the other 5
    # within 1.5x: tests/test_plan.py::test_calibration_against_deepspeed_chat_table_1.
    mfu: float = 0.2  # model-FLOPs utilisation: training, forward passes, prefill (fitted, see above)
    mbu: float = 0.6  # HBM utilisation while decoding; assumed, not fitted (0.4-0.8 moves those 10 points < 10%)
    # Per decoding step of an engine beyond its weight and KV reads (kernel launches, sampling, scheduling); fitted
    # to DeepSpeed-Chat's Hybrid Engine (HF generate); vLLM's CUDA graphs likely need less (generation conservative).
    decode_step_overhead_s: float = 0.012
    # Timing only: "separate" times our layout (engines on their own GPUs, weights broadcast after each step);
    # "hybrid_engine" times DeepSpeed-Chat's Hybrid Engine (DeepSpeedExamples applications/DeepSpeed-Chat README):
    # the actor's own ranks generate in tensor-parallel groups of generation.tensor_parallel_size, each GPU
    # ppo.actor.deepspeed.micro_batch_size sequences at a time, after one ZeRO-3 gather of the actor per batch.
    timing_layout: Literal["separate", "hybrid_engine"] = "separate"


@dataclass
class LoggingConfig:
    log_every: int = 1  # PPO iterations between metric records (JSONL, TensorBoard, W&B, console); the last always
    metrics_file: str = "metrics.jsonl"
    tensorboard: bool = True
    wandb_project: Optional[str] = None
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"  # the CLI's --log-level wins when given


@dataclass
class CheckpointConfig:
    every: int = 0  # iterations between checkpoints; 0 disables
    keep_last: int = 2
    resume: bool = False
    # where PPO checkpoints go (rlhf_ray/checkpoint.py): a local or NFS folder, or an object store URI read through
    # pyarrow.fs (s3://bucket/prefix, gs://...; pyarrow's query parameters, e.g. ?endpoint_override=host:port&scheme=
    # http, pass through). Multi-node runs need storage every node sees. Default: <run.output_dir>/ppo/checkpoints
    storage: Optional[str] = None


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: TrainStageConfig = field(default_factory=TrainStageConfig)
    rm: TrainStageConfig = field(default_factory=TrainStageConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


# ------------------------------------------------------------------------------------ typed construction
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return repr(tp).replace("typing.", "")
    return "null" if tp is type(None) else getattr(tp, "__name__", repr(tp))


_FLOAT_LITERAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(value: Any, tp: Any, key: str, base: Any = None) -> Any:
    """Check `value` against the annotation `tp` and build nested dataclasses; raise ConfigError naming `key`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key, base)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if len(errors) == 1 else ConfigError(
            f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if origin is Literal:
        if value in args and not (isinstance(value, bool) and not any(isinstance(a, bool) for a in args)):
            return value
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping (section {tp.__name__}), got {value!r}")
        return build(tp, value, prefix=key, base=base if isinstance(base, tp) else None)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r} ({type(value).__name__})")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} items, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # YAML writes 1 for 1.0
    if tp is float and isinstance(value, str) and _FLOAT_LITERAL.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads 1e-5 (no dot) as a string
    if tp in (int, float) and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return value


def _unknown_key_error(cls: type, key: str, prefix: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    full = f"{prefix}.{key}" if prefix else key
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    hint = f"; did you mean '{(prefix + '.') if prefix else ''}{close[0]}'?" if close else ""
    return ConfigError(f"unknown key '{full}'{hint} (valid keys here: {', '.join(names)})")


def build(cls: type, data: dict, prefix: str = "", base: Any = None) -> Any:
    """Build dataclass `cls` from a plain mapping, type-checking every key. Keys not given keep the value of
    `base` (the enclosing default, e.g. placement.actor's num_workers=2), not the class's bare default."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    base = base if base is not None else cls()
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown_key_error(cls, str(key), prefix)
        kwargs[key] = _coerce(value, hints[key], f"{prefix}.{key}" if prefix else key, getattr(base, key))
    return dataclasses.replace(base, **kwargs)


def to_dict(cfg: Any) -> dict:
    """Plain-data form of a config (tuples as lists), ready for YAML or JSON."""
    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(cfg)


# ------------------------------------------------------------------------------------------- overrides
def parse_overrides(argv: list[str]) -> dict[str, Any]:
    """`["--ppo.kl_coef", "0.05", "--run.name=x"]` -> {"ppo.kl_coef": 0.05, "run.name": "x"} (values as YAML)."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"override '{arg}': expected --section.key VALUE or --section.key=VALUE")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"override '{arg}' has no value")
            key, raw = arg[2:], argv[i + 1]
            i += 2
        out[key] = yaml.safe_load(raw) if raw != "" else ""
    return out


def apply_overrides(data: dict, overrides: dict[str, Any]) -> dict:
    """Set dotted keys in the nested mapping `data` (unknown keys are caught later by `build`)."""
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node = data
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{dotted}': '{'.'.join(parts[:depth + 1])}' is not a section")
            node = child
        node[parts[-1]] = value
    return data


# ------------------------------------------------------------------------------------------ validation
def validate(cfg: Config) -> Config:
    """Cross-field rules; each message names the keys involved."""
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    need(cfg.ray.placement_timeout_s > 0, "ray.placement_timeout_s must be > 0")
    need(cfg.ray.local_num_cpus is None or cfg.ray.local_num_cpus >= 1, "ray.local_num_cpus must be >= 1")
    g = cfg.generation
    need(g.num_engines >= 1, "generation.num_engines must be >= 1")
    need(g.tensor_parallel_size >= 1, "generation.tensor_parallel_size must be >= 1")
    need(g.max_new_tokens >= 1, "generation.max_new_tokens must be >= 1")
    need(g.temperature >= 0, "generation.temperature must be >= 0")
    need(0 < g.top_p <= 1, "generation.top_p must be in (0, 1]")
    need(g.n_samples_per_prompt >= 1, "generation.n_samples_per_prompt must be >= 1")
    need(g.kv_cache_gib > 0, "generation.kv_cache_gib must be > 0")
    need(0 < g.gpu_memory_utilization <= 1, "generation.gpu_memory_utilization must be in (0, 1]")
    need(not g.cpu_cores or len(g.cpu_cores) == g.num_engines,
         f"generation.cpu_cores lists {len(g.cpu_cores)} bindings for {g.num_engines} engine(s) (generation.num_engines)")
    need(all(c == "nobind" or len(c.split("|")) == g.tensor_parallel_size for c in g.cpu_cores),
         "generation.cpu_cores: each entry needs one core list per TP worker, '|'-separated (or 'nobind')")
    need(g.max_restarts >= 0, "generation.max_restarts must be >= 0")
    need(g.sync_bucket_mb > 0 and g.sync_timeout_s > 0, "generation.sync_bucket_mb and sync_timeout_s must be > 0")
    need(g.verify_probe_len >= 2, "generation.verify_probe_len must be >= 2")
    need(g.verify_probe_every >= 1, "generation.verify_probe_every must be >= 1 (1: probe every sync)")
    need(g.verify_probe_atol is None or g.verify_probe_atol >= 0, "generation.verify_probe_atol must be >= 0")
    p = cfg.ppo
    need(p.kl_coef >= 0, "ppo.kl_coef must be >= 0")
    need(0 < p.clip_ratio < 1, "ppo.clip_ratio must be in (0, 1)")
    need(p.clip_ratio_low is None or 0 < p.clip_ratio_low < 1, "ppo.clip_ratio_low must be in (0, 1) (or null: "
         "ppo.clip_ratio)")
    need(p.clip_ratio_high is None or p.clip_ratio_high > 0,
         "ppo.clip_ratio_high must be > 0 (or null: ppo.clip_ratio)")
    need(p.policy_loss != "gspo" or p.loss_aggregation == "seq-mean-token-mean",
         f"ppo.policy_loss gspo needs ppo.loss_aggregation seq-mean-token-mean, got '{p.loss_aggregation}': GSPO's "
         f"loss is the mean over sequences of each sequence's clipped objective (each token of a sequence carries "
         f"1/|y_i| of it); another aggregation weighs sequences by their length")
    need(not (p.advantage_estimator == "dr_grpo" and p.loss_aggregation == "seq-mean-token-mean"),
         "ppo.advantage_estimator dr_grpo with ppo.loss_aggregation seq-mean-token-mean puts back the 1/|o_i| "
         "per-sequence length normalisation that Dr. GRPO removes; use seq-mean-token-sum-norm (Dr. GRPO's), "
         "token-mean or seq-mean-token-sum")
    need(p.dual_clip is None or p.dual_clip > 1, "ppo.dual_clip must be > 1 (or null to disable)")
    need(p.is_cap > 0, f"ppo.is_cap must be > 0, got {p.is_cap}")
    need(0 < p.is_mask_low < 1 < p.is_mask_high, f"ppo.is_mask_low and ppo.is_mask_high must satisfy 0 < low < 1 < "
         f"high, got {p.is_mask_low} and {p.is_mask_high}")
    need(0 <= p.gamma <= 1 and 0 <= p.lam <= 1, "ppo.gamma and ppo.lam must be in [0, 1]")
    need(p.reward_clip > 0, "ppo.reward_clip must be > 0")
    need(p.ema_decay is None or 0 < p.ema_decay < 1, "ppo.ema_decay must be in (0, 1) (or null to disable)")
    need(p.ptx_coef >= 0, "ppo.ptx_coef must be >= 0")
    need(p.ptx_coef == 0 or cfg.data.ptx, "ppo.ptx_coef > 0 needs pretraining data in data.ptx")
    need(p.rollout_batch_size >= 1 and p.mini_batch_size >= 1, "ppo.rollout_batch_size and ppo.mini_batch_size must be >= 1")
    for learner in ("actor", "critic") if p.advantage_estimator == "gae" else ("actor",):
        micro, ranks = getattr(p, learner).deepspeed.micro_batch_size, getattr(cfg.placement, learner).num_workers
        need(p.mini_batch_size % (micro * ranks) == 0,
             f"ppo.mini_batch_size ({p.mini_batch_size}) must be a multiple of ppo.{learner}.deepspeed.micro_batch_size "
             f"({micro}) x placement.{learner}.num_workers ({ranks})")
    samples = p.rollout_batch_size * g.n_samples_per_prompt  # the learners reject a partial mini-batch
    need(samples % p.mini_batch_size == 0,
         f"ppo.rollout_batch_size ({p.rollout_batch_size}) x generation.n_samples_per_prompt "
         f"({g.n_samples_per_prompt}) = {samples} samples per iteration must be a multiple of ppo.mini_batch_size "
         f"({p.mini_batch_size})")
    need(p.scorer_replica_max_gib > 0, "ppo.scorer_replica_max_gib must be > 0")
    need(p.reward_http_timeout_s > 0 and p.reward_http_retries >= 0,
         "ppo.reward_http_timeout_s must be > 0 and ppo.reward_http_retries >= 0")
    need(not p.reward_http_token_env or re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", p.reward_http_token_env),
         "ppo.reward_http_token_env must be the NAME of an environment variable holding the token (e.g. "
         "REWARD_API_TOKEN), not the token itself")
    need(p.max_nonfinite_steps >= 1, "ppo.max_nonfinite_steps must be >= 1")
    need(p.max_learner_restarts >= 0, "ppo.max_learner_restarts must be >= 0")
    need(not (p.kl_penalty == "loss" and p.kl_estimator == "k1"),
         "ppo.kl_penalty 'loss' with ppo.kl_estimator 'k1' does nothing: k1's gradient is zero in expectation under "
         "the policy; use ppo.kl_estimator k3 (unbiased, GRPO) or k2")
    need(p.reward_function_mode == "add" or bool(p.reward_functions),
         "ppo.reward_function_mode 'replace' needs ppo.reward_functions")
    if p.advantage_estimator in ("grpo", "dr_grpo", "rloo"):
        need(g.n_samples_per_prompt >= 2,
             f"ppo.advantage_estimator={p.advantage_estimator} needs generation.n_samples_per_prompt >= 2")
    need(p.kl_reward_shape == "per_token"
         or (p.advantage_estimator in ("grpo", "dr_grpo", "rloo") and p.kl_penalty == "reward"),
         f"ppo.kl_reward_shape return_to_go shapes the KL reward of grpo / rloo with ppo.kl_penalty 'reward'; with "
         f"ppo.advantage_estimator {p.advantage_estimator} and ppo.kl_penalty '{p.kl_penalty}' it would do nothing "
         f"(gae and reinforce_pp already sum the per-token KL reward into their returns)")
    need(not p.dynamic_sampling or g.n_samples_per_prompt >= 2,
         "ppo.dynamic_sampling drops groups whose scores tie: it needs generation.n_samples_per_prompt >= 2 (a group "
         "of one always ties)")
    need(not p.dynamic_sampling or p.advantage_estimator != "gae",
         "ppo.dynamic_sampling with ppo.advantage_estimator gae: the critic's advantages still carry signal when a "
         "group's scores tie, so dropping those groups discards data; use grpo, rloo or reinforce_pp")
    need(p.dynamic_sampling_max_rounds >= 0, "ppo.dynamic_sampling_max_rounds must be >= 0")
    need(0 <= p.overlong_buffer < g.max_new_tokens,
         f"ppo.overlong_buffer ({p.overlong_buffer}) must be >= 0 and below generation.max_new_tokens "
         f"({g.max_new_tokens})")
    need(p.overlong_penalty >= 0, "ppo.overlong_penalty must be >= 0")
    need(not (p.overlong_mask and g.ignore_eos),
         "ppo.overlong_mask with generation.ignore_eos: every sample runs to max_new_tokens, so all would be masked")
    for name in ("sft", "rm"):
        _validate_stage(getattr(cfg, name), name, need)
    _validate_learner(p.actor, "ppo.actor", need)
    _validate_learner(p.critic, "ppo.critic", need)
    for learner, roles in (("actor", ("actor", "reference")), ("critic", ("critic", "reward"))):
        h = getattr(p, learner).deepspeed.zero_hpz_partition_size  # ZeRO++ groups within each engine's ranks
        for role in roles if learner == "actor" or p.advantage_estimator == "gae" else ("reward",):
            n = getattr(cfg.placement, role).num_workers
            need(n == 1 or n % h == 0, f"ppo.{learner}.deepspeed.zero_hpz_partition_size ({h}) must divide "
                             f"placement.{role}.num_workers ({n})")
    for role in ("actor", "critic", "reference", "reward", "generator"):
        r = getattr(cfg.placement, role)
        need(r.num_workers >= 1, f"placement.{role}.num_workers must be >= 1")
        need(r.cpus_per_worker >= 0 and r.gpus_per_worker >= 0,
             f"placement.{role}: cpus_per_worker and gpus_per_worker must be >= 0")
    need(cfg.placement.generator.num_workers == 1,
         "placement.generator.num_workers: engines are counted by generation.num_engines, each with "
         "generation.tensor_parallel_size workers of placement.generator's resources; leave it 1")
    _validate_hybrid(cfg, need)
    _validate_reference_in_actor(cfg, need)
    need(cfg.checkpoint.every >= 0 and cfg.checkpoint.keep_last >= 1,
         "checkpoint.every must be >= 0 and checkpoint.keep_last >= 1")
    need(cfg.logging.log_every >= 1, "logging.log_every must be >= 1")
    # The critic and the reference read the actor's token ids, and the critic is a value-head folder (no GGUF).
    critic, reference = cfg.models.critic, cfg.models.reference
    need(critic is None or not (critic.tokenizer or critic.gguf_file),
         "models.critic.tokenizer / models.critic.gguf_file: the critic is a value-head folder scoring the actor's "
         "token ids; leave both unset")
    need(reference is None or not reference.tokenizer,
         "models.reference.tokenizer: the reference scores the actor's token ids (models.actor's tokenizer); "
         "leave it unset")
    d = cfg.data
    shares = d.data_split.split(",")
    need(len(shares) == 3 and all(s.strip().replace(".", "", 1).isdigit() for s in shares)
         and sum(float(s) for s in shares) > 0,
         f"data.data_split must be three non-negative numbers like '2,4,4', got '{d.data_split}'")
    need(0 <= d.eval_fraction < 1, "data.eval_fraction must be in [0, 1)")
    need(0 <= d.max_bad_fraction <= 1, "data.max_bad_fraction must be in [0, 1]")
    need(d.max_prompt_len >= 1 and d.max_answer_len >= 1, "data.max_prompt_len and data.max_answer_len must be >= 1")
    for i, src in enumerate(d.datasets + d.sft_only + d.ptx):
        need(bool(src.path), f"data: dataset entry {i} has an empty 'path'")
        need(src.weight > 0, f"data: dataset '{src.path}' needs weight > 0")
    need(cfg.rollout.max_staleness >= 1, f"rollout.max_staleness must be >= 1, got {cfg.rollout.max_staleness}")
    need(cfg.rollout.mode == "bounded" or cfg.rollout.max_staleness == RolloutConfig.max_staleness,
         f"rollout.max_staleness is {cfg.rollout.max_staleness} but rollout.mode is {cfg.rollout.mode}: only "
         f"bounded reads it (one_step is always 1 step)")
    need(cfg.rollout.samples_every >= 0, f"rollout.samples_every must be >= 0 (0: no samples.jsonl), got "
         f"{cfg.rollout.samples_every}")
    ppo_precision(cfg)  # conflicting explicit precisions / dtypes fail at load, naming both keys
    return cfg


def reuses_train_logprobs(cfg: Config) -> bool:
    """Whether the actor's training pass supplies the old log-probs (no separate actor forward while scoring).

    Exact when the KL penalty sits in the loss (advantages then need no actor log-probs) and each iteration makes
    one optimizer step over the whole rollout (ppo_epochs 1, one mini-batch): the weights that sampled the rollout
    are the weights of the training pass, so old = current.detach() and the ratio is 1, as in TRL and veRL."""
    p = cfg.ppo
    return (p.kl_penalty == "loss" and p.ppo_epochs == 1 and cfg.rollout.mode == "off"  # never for stale samples
            and p.mini_batch_size == p.rollout_batch_size * cfg.generation.n_samples_per_prompt)


def old_logprobs_from_engines(cfg: Config) -> bool:
    """Whether the PPO ratio is taken against the engines' own sampling log-probs (no actor forward while scoring):
    asynchronous rollouts without an off-policy correction (which would take it against the learner's recomputed
    log-probs, a proximal policy, and weigh the tokens by the correction)."""
    return cfg.rollout.mode != "off" and cfg.ppo.off_policy_correction == "none"


def _validate_reference_in_actor(cfg: Config, need) -> None:
    if not cfg.placement.reference_in_actor:
        return
    lora, why = cfg.ppo.actor.lora, "placement.reference_in_actor scores the reference as the actor's base model " \
                                    "with its LoRA adapters disabled"
    need(lora.dim > 0, f"ppo.actor.lora.dim is 0: {why}; train the actor with LoRA (lora.dim > 0), or set "
                       f"placement.reference_in_actor false (full-weight training moves the base: the reference "
                       f"needs its own copy)")
    need(lora.only_optimize_lora, f"ppo.actor.lora.only_optimize_lora is false: {why}, which must stay the initial "
                                  f"weights; set it true or placement.reference_in_actor false")
    need(cfg.models.reference is None or cfg.models.reference == cfg.models.actor,
         f"models.reference is {cfg.models.reference and cfg.models.reference.path}: {why} (models.actor); unset "
         f"models.reference or set placement.reference_in_actor false")
    need(not cfg.placement.colocate_actor_reference, f"placement.colocate_actor_reference is true: {why}, so there "
                                                     f"is no reference group to colocate; set one of them false")


def _validate_hybrid(cfg: Config, need) -> None:
    """placement.layout hybrid: what the one-rank hybrid (rlhf_ray/hybrid.py) does not do is refused here."""
    if cfg.placement.layout != "hybrid":
        return
    g, why = cfg.generation, "placement.layout hybrid runs one vLLM engine inside the actor's one learner rank"
    need(cfg.placement.actor.num_workers == 1,
         f"placement.actor.num_workers is {cfg.placement.actor.num_workers}: {why}; more ranks (vLLM's "
         f"external_launcher inside the learners' world) are not supported yet: set it to 1, or use "
         f"placement.layout separate")
    need(g.num_engines == 1, f"generation.num_engines is {g.num_engines}: {why}; set it to 1 or use placement.layout "
         f"separate")
    need(g.tensor_parallel_size == 1, f"generation.tensor_parallel_size is {g.tensor_parallel_size}: {why} (TP 1); "
         f"set it to 1 or use placement.layout separate")
    need(g.max_restarts == 0, f"generation.max_restarts is {g.max_restarts}: {why}, so the engine is replaced with "
         f"the actor's ranks (ppo.max_learner_restarts), never on its own; set generation.max_restarts 0")
    need(g.sync_transport == "auto", f"generation.sync_transport is {g.sync_transport}: {why}, which loads the "
         f"learner's own tensors in-process (transport in_process); leave it auto")


def _validate_learner(s: PPOLearnerConfig, name: str, need) -> None:
    ds = s.deepspeed
    need(ds.micro_batch_size >= 1, f"{name}.deepspeed.micro_batch_size must be >= 1")
    need(not ds.offload_params or ds.zero_stage == 3, f"{name}.deepspeed.offload_params needs zero_stage 3")
    need(ds.zero_hpz_partition_size >= 1, f"{name}.deepspeed.zero_hpz_partition_size must be >= 1")
    need(ds.grad_reduction != "per_step" or ds.zero_stage != 3,
         f"{name}.deepspeed.grad_reduction per_step needs zero_stage 0-2: ZeRO-3 partitions the gradient as each "
         f"micro-batch's backward makes it (leave it auto)")
    need(ds.zero_stage == 3 or (ds.zero_hpz_partition_size == 1 and not ds.zero_quantized_weights
                                and not ds.zero_quantized_gradients),
         f"{name}.deepspeed.zero_hpz_partition_size / zero_quantized_weights / zero_quantized_gradients (ZeRO++) "
         f"need zero_stage 3")
    need(s.optim.lr > 0, f"{name}.optim.lr must be > 0")
    need(s.optim.grad_clip >= 0, f"{name}.optim.grad_clip must be >= 0")
    need(s.optim.warmup_steps >= 0 and s.optim.weight_decay >= 0, f"{name}.optim: warmup_steps and weight_decay must be >= 0")
    need(s.lora.dim >= 0, f"{name}.lora.dim must be >= 0")
    need(s.lora.dim == 0 or bool(s.lora.module_names), f"{name}.lora.module_names is empty while lora.dim > 0")


def _validate_stage(s: TrainStageConfig, name: str, need) -> None:
    _validate_learner(s, name, need)
    ds, ranks = s.deepspeed, s.num_workers
    need(s.num_workers >= 1, f"{name}.num_workers must be >= 1")
    need(s.num_workers % max(1, ds.zero_hpz_partition_size) == 0,
         f"{name}.deepspeed.zero_hpz_partition_size ({ds.zero_hpz_partition_size}) must divide {name}.num_workers "
         f"({s.num_workers})")
    need(ds.global_batch_size % (ds.micro_batch_size * ranks) == 0,
         f"{name}.deepspeed.global_batch_size ({ds.global_batch_size}) must be a multiple of micro_batch_size "
         f"({ds.micro_batch_size}) x ranks ({ranks})")
    need(s.epochs >= 1 and (s.max_steps == -1 or s.max_steps >= 1), f"{name}: epochs must be >= 1, max_steps -1 or >= 1")
    need(s.log_every >= 1, f"{name}.log_every must be >= 1")
    need(s.eval_every >= 0 and s.checkpoint_every >= 0, f"{name}.eval_every and checkpoint_every must be >= 0 (0: only at the end)")
    need(s.max_failures >= -1, f"{name}.max_failures must be >= -1 (-1: unlimited)")
    need(s.cpus_per_worker > 0, f"{name}.cpus_per_worker must be > 0")


def validate_ppo(cfg: Config) -> Config:
    """Rules for a config that trains PPO (`rlhf-ray ppo`, `pipeline`), checked before anything starts. Not part of
    `validate`: `rlhf-ray generate` samples with the same generation.* keys, and top-p / top-k are fine there."""
    g = cfg.generation
    why = ("under PPO the learners and the reference score log-probs of the full softmax(logits / "
           "generation.temperature) and do not reproduce the engines' truncation, so the PPO ratio and the KL would "
           "be of another distribution than the one sampled")
    if g.top_p < 1:
        raise ConfigError(f"generation.top_p is {g.top_p}: PPO needs 1.0 ({why}); top_p < 1 is only for "
                          f"`rlhf-ray generate`")
    if g.top_k > 0:
        raise ConfigError(f"generation.top_k is {g.top_k}: PPO needs -1 or 0 (off) ({why}); top_k > 0 is only for "
                          f"`rlhf-ray generate`")
    mode = cfg.rollout.mode
    overlap = f"rollout.mode {mode} generates the next batch while the learners train"
    for bad, message in (
            (cfg.placement.layout == "hybrid", f"{overlap}, but placement.layout hybrid generates and trains in one "
                                                f"process, one after the other; use placement.layout separate"),
            (g.enable_sleep_mode, f"{overlap}, but generation.enable_sleep_mode puts the engines to sleep while the "
                                  f"learners train; set it false"),
            (cfg.ppo.dynamic_sampling, f"{overlap}; ppo.dynamic_sampling (scored while generating) is not supported "
                                       f"with it yet: set one of them off"),
            (mode == "bounded" and bool(g.stop), f"rollout.mode bounded continues interrupted samples in a new request, "
                                                 f"and vLLM matches generation.stop strings within one request's "
                                                 f"output, so a stop string across an interruption would be missed: "
                                                 f"use generation.stop_token_ids, or rollout.mode one_step")):
        if mode != "off" and bad:
            raise ConfigError(message)
    return cfg


_DTYPE_PRECISION = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def ppo_precision(cfg: Config) -> str:
    """The one precision of a PPO run's learners, reference and reward scorers and vLLM engines:
    ppo.actor.deepspeed.precision ('auto': bf16 on GPU or a CPU with native bf16, else fp32, resolved by each worker,
    env.resolve_precision). ppo.critic.deepspeed.precision and models.{actor,critic,reference,reward}.dtype stay
    'auto' to follow it or restate it (with the actor's key 'auto', a restated value decides); two explicit values
    that differ are a ConfigError naming both keys."""
    settings = [("ppo.actor.deepspeed.precision", cfg.ppo.actor.deepspeed.precision),
                ("ppo.critic.deepspeed.precision", cfg.ppo.critic.deepspeed.precision)]
    for role in ("actor", "critic", "reference", "reward"):
        mc = getattr(cfg.models, role)
        if mc is not None:
            settings.append((f"models.{role}.dtype", mc.dtype))
    explicit = [(key, raw, _DTYPE_PRECISION.get(raw, raw)) for key, raw in settings if raw != "auto"]
    for key, raw, value in explicit[1:]:
        first_key, first_raw, first = explicit[0]
        if value != first:
            raise ConfigError(f"{key} is {raw} but {first_key} is {first_raw}: one precision serves every PPO model "
                              f"(learners, reference, reward, engines); set ppo.actor.deepspeed.precision and leave "
                              f"{key} 'auto'")
    return explicit[0][2] if explicit else "auto"


def ppo_learner(cfg: Config, role: str) -> PPOLearnerConfig:
    """ppo.<role> (actor, critic) with the run's one precision setting (ppo_precision, still 'auto' or explicit:
    every rank resolves it on its own device), as the learner ranks, the scorers and `rlhf-ray plan` use it."""
    learner = getattr(cfg.ppo, role)
    return dataclasses.replace(learner, deepspeed=dataclasses.replace(learner.deepspeed, precision=ppo_precision(cfg)))


# ------------------------------------------------------------------------------------------- loading
def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str] | dict[str, Any]] = None) -> Config:
    """Load YAML (or defaults when `path` is None), apply dotted overrides, type-check and validate."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    if overrides:
        parsed = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides)
        data = apply_overrides(data, parsed)
    try:
        return validate(build(Config, data))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path is not None else str(e)) from None


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)
