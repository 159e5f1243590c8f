"""Rollout generation: N vLLM engines (each tensor_parallel_size workers) hosted by Ray actors, one placement
group per engine, and the learner -> engine weight broadcast (rlhf_ray/weight_sync.py).

    generators = GeneratorGroup(cfg, model_path)
    rollout = generators.generate(prompt_ids)               # samples with token ids, log-probs, finish reasons
    version = generators.sync_weights(policy_group)         # bucketed broadcast, verified in every engine

Engines run in-process inside their actor (VLLM_ENABLE_V1_MULTIPROCESSING=0, set by rlhf_ray.env): faster start,
less memory, and tensors handed to `collective_rpc` reach the worker by reference. On CPU each engine is bound to
its own cores (generation.cpu_cores, default one core per TP worker, engine after engine): TP workers through
VLLM_CPU_OMP_THREADS_BIND, which vLLM applies to the processes it spawns, and an in-process TP=1 engine by pinning
the actor's compute thread; its KV cache is sized by generation.kv_cache_gib. On GPU the bundle's GPU and
gpu_memory_utilization do it.

Dispatch: the prompts of a call are split into one contiguous chunk per live engine and each chunk goes to the
engine with the least outstanding work (prompt tokens + n x max_new_tokens of everything it has in flight, this
call's and earlier asynchronous calls'), not round-robin. Every call passes the group's weight version; an engine
holding another version refuses the work.

Health: engine actors are created with max_restarts. A call that fails because its engine died is noticed here;
the group waits for Ray to restart the actor, re-syncs it from the last source (re-exported, and checked against
the version's recorded checksums: the source must still hold that version) and verifies it before it takes work,
then re-dispatches the lost prompts and counts them in `Rollout.redispatched`. An engine that cannot be restarted
is dropped; the call fails only when no engine is left.
"""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Optional

from rlhf_ray.config import Config, GenerationConfig

log = logging.getLogger(__name__)

WORKER_EXTENSION = "rlhf_ray.vllm_worker_ext.WorkerExtension"
ENGINE_PING_S = 10.0  # an engine that has not answered a ping by then is busy, not dead
WATCH_POLL_S = 0.2  # how often a sync checks its receiving engines while the source pushes


class StaleWeightsError(RuntimeError):
    """An engine was asked to generate with a weight version it does not hold (e.g. it was just restarted)."""


class PromptTooLongError(ValueError):
    """A prompt leaves no room for one new token within the engines' max_model_len."""


@dataclass
class Sample:
    """One generated continuation of one prompt."""

    prompt_index: int
    token_ids: list[int]
    logprobs: list[float]  # vLLM's log-prob of each sampled token: log-softmax(logits / T), T = 1 when greedy
    finish_reason: Optional[str]
    weight_version: int = 0  # of the engine that sampled its first token
    extra: dict[str, Any] = field(default_factory=dict)
    sample_index: int = 0  # which of the prompt's n samples
    engine: int = -1  # index of the engine that generated it (its first token)
    # the weight version that sampled each token: several when a weight sync interrupted it (rollout.mode bounded)
    token_versions: list[int] = field(default_factory=list)


@dataclass
class Sampling:
    """How to sample; `Sampling.from_config(cfg.generation, temperature=0.0)` for greedy."""

    n: int = 1
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False  # exactly max_new_tokens: fixed-length comparisons and benchmarks
    seed: Optional[int] = None  # per-prompt seed = seed + the prompt's index in the call: reproducible anywhere

    @classmethod
    def from_config(cls, gen: GenerationConfig, **overrides) -> "Sampling":
        return replace(cls(n=gen.n_samples_per_prompt, max_new_tokens=gen.max_new_tokens, temperature=gen.temperature,
                           top_p=gen.top_p, top_k=gen.top_k, stop=list(gen.stop),
                           stop_token_ids=list(gen.stop_token_ids), ignore_eos=gen.ignore_eos), **overrides)

    def to_vllm(self, seed: Optional[int] = None):
        from vllm import SamplingParams

        greedy = self.temperature == 0
        return SamplingParams(n=self.n, temperature=self.temperature, top_p=1.0 if greedy else self.top_p,
                              top_k=-1 if greedy else self.top_k, max_tokens=self.max_new_tokens,
                              stop=self.stop or None, stop_token_ids=self.stop_token_ids or None,
                              ignore_eos=self.ignore_eos, logprobs=0, seed=seed)  # logprobs=0: the sampled token's

    def work(self, prompt_len: int) -> int:
        return prompt_len + self.n * self.max_new_tokens


@dataclass
class Rollout:
    """The result of one `generate` call."""

    samples: list[Sample]  # prompt order, then sample order; skipped prompts have none
    weight_version: int
    redispatched: int = 0  # prompts re-sent to another (or the restarted) engine after their engine died
    skipped: list[int] = field(default_factory=list)  # prompts too long for the engines (generation.long_prompt: skip)
    engine_prompts: dict[int, int] = field(default_factory=dict)  # engine index -> prompts it answered
    seconds: float = 0.0


@dataclass
class SyncReport:
    version: int
    transport: str
    seconds: float
    bytes: int
    buckets: int
    max_bucket_bytes: int
    verified: bool
    engines: list[dict] = field(default_factory=list)  # per engine: load / checksum / verify seconds, probe difference
    sender: dict = field(default_factory=dict)  # where the buckets were made: checksum_s, transfer_s, seconds
    checksums: Optional[dict] = field(default=None, repr=False)  # sender's {HF name: (shape, checksum)}
    probe: Optional[tuple] = field(default=None, repr=False)  # (probe ids, source log-probs, tolerance)
    channel: str = ""  # the transfer channel used (gloo, nccl, ipc): the same one sync after sync
    new_channel: bool = False  # this sync opened it (the first sync, an engine restart, another sender)
    steps_s: dict = field(default_factory=dict)  # driver-side wall seconds: start, push, probe, finish
    # Attempts that failed because an engine died mid-sync (each: engine, what happened to it, error, seconds from
    # the attempt's start to its failure); the sync then went on with the engines left (GeneratorGroup.sync_weights).
    engine_failures: list[dict] = field(default_factory=list)

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / max(self.seconds, 1e-9)


# --------------------------------------------------------------------------------------------- the actor
class VLLMEngine:
    """Body of one generator actor: a vLLM engine of tensor_parallel_size workers, plus the weight-update steps."""

    def __init__(self, model_path: str, gen: GenerationConfig, precision: str = "auto", seed: int = 0,
                 tokenizer: Optional[str] = None, engine_index: int = 0, trust_remote_code: bool = False,
                 transport: Optional[str] = None):
        """`precision`: the run's one precision setting (config.ppo_precision, or an explicit fp32 / bf16 / fp16);
        device, dtype and weight-sync transport are decided here, in the engine's own process (describe()).
        `transport`: 'in_process' for an engine inside the learner's rank (rlhf_ray/hybrid.py)."""
        from vllm import LLM
        from vllm.platforms import current_platform

        from rlhf_ray.env import precision_dtype
        from rlhf_ray.vllm_worker_ext import prepare_cpu_process
        from rlhf_ray.weight_sync import resolve_transport

        # The device is vLLM's platform in this process (its CUDA build on a GPU node, the CPU build elsewhere): a
        # TP > 1 engine actor holds no GPU itself, its workers do.
        self.device_type = "cuda" if current_platform.is_cuda_alike() else "cpu"
        cuda = self.device_type == "cuda"
        self.dtype = precision_dtype(precision, self.device_type)
        self.gen, self.engine_index = gen, engine_index
        self.weight_version = 0
        self._load_s = 0.0  # seconds spent loading object-store buckets during the current update
        self._channel: Optional[str] = None  # nccl/ipc: the channel vLLM's weight-transfer engine is set up for
        self.transfer_groups = 0  # transfer groups (weight-sync channels) this engine's workers have joined
        self._live_shapes: Optional[dict] = None  # {HF name: shape} of the live parameters, from the first full check
        self.sleep_enabled = gen.enable_sleep_mode and cuda  # vLLM sleep/wake frees nothing on CPU
        kwargs: dict[str, Any] = {}
        self.transport = transport = transport or resolve_transport(gen.sync_transport, cuda)
        if transport in ("nccl", "ipc"):  # vLLM's own weight-transfer engine on every worker
            kwargs["weight_transfer_config"] = {"backend": transport}
        if gen.tensor_parallel_size > 1:  # GPU: workers in this engine's bundles; CPU: processes vLLM binds itself
            kwargs["distributed_executor_backend"] = "ray" if cuda else "mp"
        elif not cuda:
            bind_this_process(os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind"))
        if not cuda:
            prepare_cpu_process()  # AMX permission, vector attention kernel (vllm_worker_ext.prepare_cpu_process)
            # generation.kv_cache_gib decides; an inherited VLLM_CPU_KVCACHE_SPACE would override it in vLLM
            os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
            kwargs["kv_cache_memory_bytes"] = cpu_kv_cache_bytes(gen)
        self.llm = LLM(model=model_path, tokenizer=tokenizer or model_path, dtype=self.dtype,
                       trust_remote_code=trust_remote_code,  # models.actor.trust_remote_code
                       tensor_parallel_size=gen.tensor_parallel_size, max_model_len=engine_max_model_len(gen),
                       enforce_eager=gen.enforce_eager, seed=seed, gpu_memory_utilization=gen.gpu_memory_utilization,
                       enable_sleep_mode=self.sleep_enabled, worker_extension_cls=WORKER_EXTENSION,
                       # sample log-probs of the distribution sampled from, log-softmax(logits / T), as the learners
                       # score them (rl.scoring_temperature); prompt log-probs (the probe) stay at T = 1
                       logprobs_mode="processed_logprobs", **kwargs)
        model_config = self.llm.llm_engine.model_config
        self.max_model_len, self.vocab_size = model_config.max_model_len, model_config.get_vocab_size()
        self.probe_logprobs([0, 1])  # the first request pays seconds of one-time set-up: pay it while starting

    def ready(self) -> dict:
        import ray

        pg = ray.util.get_current_placement_group()
        return {"pid": os.getpid(), "engine": self.engine_index, "weight_version": self.weight_version,
                "placement_group": pg.id.hex() if pg else None, "omp_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND"),
                "pinned_cores": pinned_cores(), "max_model_len": self.max_model_len, "vocab_size": self.vocab_size,
                "dtype": self.dtype, "sleep_enabled": self.sleep_enabled,
                "kv_cache_bytes": self.llm.llm_engine.vllm_config.cache_config.kv_cache_memory_bytes}

    def describe(self) -> dict:
        """What this engine chose in its own process (the driver checks agreement: env.check_agreement)."""
        import ray

        return {"role": "generator", "rank": self.engine_index, "device": self.device_type, "backend": None,
                "dtype": self.dtype, "transport": self.transport, "pid": os.getpid(),
                "node": ray.util.get_node_ip_address()}

    # -- generation
    def generate(self, prompt_token_ids: list[list[int]], sampling: Optional[Sampling] = None, *,
                 prompt_indices: Optional[list[int]] = None, seeds: Optional[list[Optional[int]]] = None,
                 expected_version: Optional[int] = None, greedy: bool = False, n: Optional[int] = None,
                 ignore_eos: Optional[bool] = None) -> list[Sample]:
        """One Sample per (prompt, sample), in prompt order. Without `sampling`, generation.* with the given
        overrides. With `expected_version`, refuses (StaleWeightsError) unless it holds that weight version."""
        if expected_version is not None and expected_version != self.weight_version:
            raise StaleWeightsError(f"engine {self.engine_index} (pid {os.getpid()}) holds weight version "
                                    f"{self.weight_version}, asked for {expected_version}")
        if sampling is None:
            sampling = Sampling.from_config(self.gen, **({"ignore_eos": ignore_eos} if ignore_eos is not None else {}),
                                            **({"n": n} if n else {}),
                                            **({"temperature": 0.0} if greedy else {}))
        indices = prompt_indices if prompt_indices is not None else list(range(len(prompt_token_ids)))
        seeds = seeds or [None if sampling.seed is None else sampling.seed + i for i in indices]
        params = [sampling.to_vllm(seed) for seed in seeds]
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_token_ids], params, use_tqdm=False)
        samples = []
        for index, out in zip(indices, outputs):
            for j, completion in enumerate(out.outputs):
                logprobs = [entry[tok].logprob for tok, entry in zip(completion.token_ids, completion.logprobs or [])]
                samples.append(Sample(index, list(completion.token_ids), logprobs, completion.finish_reason,
                                      self.weight_version, sample_index=j, engine=self.engine_index,
                                      token_versions=[self.weight_version] * len(completion.token_ids)))
        return samples

    def probe_logprobs(self, token_ids: list[int]) -> list[float]:
        """log p(token_ids[t+1] | token_ids[:t+1]) under the live weights at T = 1 (vLLM's prompt log-probs skip the
        sampling processors, temperature included, in every logprobs_mode): the learner's probe scores at 1 too."""
        from vllm import SamplingParams

        [out] = self.llm.generate([{"prompt_token_ids": token_ids}],
                                  SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False),
                                  use_tqdm=False)
        return [entry[tok].logprob for tok, entry in zip(token_ids[1:], out.prompt_logprobs[1:])]

    # -- weight update (see weight_sync.py for the order of the steps)
    def begin_weight_update(self, verify: bool = True) -> None:
        """`verify`: the workers checksum every tensor as it arrives (vllm_worker_ext.rlhf_begin_update)."""
        self.weight_version = -1  # unknown until finish_weight_update verifies the new weights
        self._load_s = 0.0
        self.llm.collective_rpc("rlhf_begin_update", args=(verify,))

    def receive_bucket(self, payload: list) -> int:
        """Object-store transport: one bucket of (name, numpy array, dtype name), loaded into every worker."""
        from rlhf_ray.weight_sync import from_numpy

        started = time.perf_counter()
        bucket = [(name, from_numpy(arr, dtype)) for name, arr, dtype in payload]
        self.llm.collective_rpc("rlhf_load_bucket", args=(bucket,))
        self._load_s += time.perf_counter() - started
        return len(bucket)

    def receive_weights_gloo(self, plan, rank_offset: int) -> int:
        """gloo: every worker joins the plan's channel (or reuses its group) and loads the buckets it receives."""
        self.begin_weight_update(plan.verify)
        plan = replace(plan, engines=[])  # actor handles mean nothing inside vLLM's (non-Ray) worker processes
        workers = self.llm.collective_rpc("rlhf_receive_gloo", args=(plan, rank_offset))
        self.transfer_groups += any(w["new_group"] for w in workers)
        return workers[0]["buckets"]

    def init_weight_transfer(self, plan, rank_offset: int) -> None:
        """GPU transports: vLLM's weight-transfer engine on every worker, set up once per channel (NCCL: the workers
        join the sender's group here) and kept across syncs, then a weight update starts."""
        self.weight_version = -1
        if plan.channel != self._channel:
            if not plan.new_channel:
                from rlhf_ray.weight_sync import WeightSyncError

                raise WeightSyncError(f"engine {self.engine_index} (pid {os.getpid()}): transfer channel "
                                      f"{plan.channel} is not open here; the next sync opens a new one")
            self.close_weight_transfer()
            if plan.transport == "nccl":
                info = {"master_address": plan.host, "master_port": plan.port, "rank_offset": rank_offset,
                        "world_size": plan.world_size}
            else:
                info = {}
            self.llm.collective_rpc("init_weight_transfer_engine", args=(info,))
            self._channel = plan.channel
            self.transfer_groups += 1
        try:
            self.llm.collective_rpc("start_weight_update")
        except BaseException:
            self.close_weight_transfer()
            raise

    def update_weights(self, update_info: dict) -> None:
        try:
            self.llm.collective_rpc("update_weights", args=(update_info,))
        except BaseException:  # the group is in an unknown state: the next sync opens a new channel
            self.close_weight_transfer()
            raise

    def close_weight_transfer(self) -> None:
        """Release vLLM's weight-transfer engine (NCCL: leave the group) if one is set up."""
        if self._channel is not None:
            self._channel = None
            try:
                self.llm.collective_rpc("shutdown_weight_transfer_engine")
            except Exception as e:  # a broken group: init_weight_transfer_engine replaces it anyway
                log.warning("engine %d: releasing the weight-transfer engine: %s", self.engine_index, e)

    def finish_weight_update(self, version: int, transport: str, expected: Optional[dict],
                             probe: Optional[tuple]) -> dict:
        """Finish the update and verify it: the checksums of what every worker received (computed as the buckets
        arrived: gloo, object store, in-process) or of the live parameters (nccl, ipc: vLLM's transfer engine receives
        them) against `expected`, and the probe. A probe without reference log-probs ((ids, None, atol)) returns
        this engine's under "probe_logprobs": the driver compares them with the source's, scored meanwhile (a
        mismatch then calls reject_weights)."""
        started = time.perf_counter()
        if transport in ("nccl", "ipc"):
            self.llm.collective_rpc("finish_weight_update")  # the transfer engine stays up for the next sync
        else:
            self.llm.collective_rpc("rlhf_finish_update")
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        report = {"engine": self.engine_index, "finish_s": time.perf_counter() - started,
                  "load_s": self._load_s, "transfer_groups": self.transfer_groups}
        if expected is not None:
            received = transport not in ("nccl", "ipc")
            report.update(self.verify_weights(version, expected, probe, received=received))
            if received:  # the workers' checksums of what arrived, inside load_s (gloo: inside the transfer)
                report["receive_checksum_s"] = max(self.llm.collective_rpc("rlhf_receive_checksum_s"))
        self.weight_version = version
        return report

    def verify_weights(self, version: int, expected: dict, probe: Optional[tuple], received: bool = False) -> dict:
        """Checksums (HF names) == the sender's, and probe log-probs within tolerance. The checksums are those of the
        live parameters, or with `received` those every worker recorded while receiving this update (the same
        tensors, checksummed before loading: no pass over the engine's weights; the names and shapes must still be
        every live parameter's, known from this engine's first sync, which checks the live parameters in full)."""
        from rlhf_ray.weight_sync import WeightSyncError, compare_checksums, compare_probe

        where = f"engine {self.engine_index} (pid {os.getpid()}), weight version {version}"
        started = time.perf_counter()
        out = {}
        try:
            if received and self._live_shapes is not None:
                compare_checksums({name: (shape, 0) for name, (shape, _) in expected.items()},
                                  {name: (shape, 0) for name, shape in self._live_shapes.items()}, where)
                for worker in self.llm.collective_rpc("rlhf_received_checksums"):
                    compare_checksums(expected, worker, where)
            else:
                live = self.checksums()
                compare_checksums(expected, live, where)
                self._live_shapes = {name: shape for name, (shape, _) in live.items()}
            checksum_s = time.perf_counter() - started
            if probe is not None:  # none between probes (generation.verify_probe_every): no probe_max_diff
                token_ids, reference, atol = probe
                mine = self.probe_logprobs(token_ids)
                if reference is None:
                    out["probe_logprobs"] = mine
                else:
                    out["probe_max_diff"] = compare_probe(mine, reference, atol, where)
        except WeightSyncError:
            self.weight_version = -1
            raise
        return {"verify_s": time.perf_counter() - started, "checksum_s": checksum_s, **out}

    def reject_weights(self) -> None:
        """The driver found this engine's probe off the source's: it holds no verified version."""
        self.weight_version = -1

    def checksums(self) -> dict:
        from rlhf_ray.weight_sync import combine_pieces

        return combine_pieces(p for worker in self.llm.collective_rpc("rlhf_checksum_pieces") for p in worker)

    # -- misc
    def collective_rpc(self, method, args: tuple = (), kwargs: Optional[dict] = None) -> list:
        return self.llm.collective_rpc(method, args=args, kwargs=kwargs)

    def sleep(self, level: int = 1) -> bool:
        """GPU: free weights / KV cache while learners use the GPU. CPU: nothing to free, returns False."""
        if not self.sleep_enabled:
            return False
        self.llm.sleep(level=level)
        return True

    def wake_up(self) -> bool:
        if not self.sleep_enabled:
            return False
        self.llm.wake_up()
        return True


def parse_cores(spec: str) -> list[int]:
    """'0-2,5' -> [0, 1, 2, 5]."""
    cores: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        cores += range(int(lo), int(hi or lo) + 1)
    return cores


def bind_this_process(spec: str) -> None:
    """Pin this (in-process, TP=1) engine's compute threads to the cores in `spec`. vLLM applies
    VLLM_CPU_OMP_THREADS_BIND only to the worker processes it spawns for TP > 1; an in-process worker computes on
    this thread and the OpenMP threads it starts later, which inherit this affinity."""
    if spec in ("nobind", "auto") or not hasattr(os, "sched_setaffinity"):
        return
    import torch

    cores = parse_cores(spec)
    os.sched_setaffinity(0, cores)
    torch.set_num_threads(len(cores))


def pinned_cores() -> list[int]:
    """Cores that threads of this process are pinned to (narrower than all the node's cores): where vLLM's OpenMP
    binding put the engine's compute threads. Empty without binding or off Linux."""
    if not hasattr(os, "sched_getaffinity") or not os.path.isdir("/proc/self/task"):
        return []
    everything = set(range(os.cpu_count() or 1))
    pinned: set[int] = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            cores = os.sched_getaffinity(int(tid))
        except OSError:  # the thread ended meanwhile
            continue
        if cores < everything:
            pinned |= cores
    return sorted(pinned)


def engine_cores(gen: GenerationConfig, engine_index: int, ncpu: Optional[int] = None) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for one engine: generation.cpu_cores[i], else its TP ranks on cores
    i*tp .. i*tp+tp-1 (modulo the node's cores), "|" between ranks."""
    if gen.cpu_cores:
        return gen.cpu_cores[engine_index]
    ncpu = ncpu or os.cpu_count() or 1
    tp = gen.tensor_parallel_size
    return "|".join(str((engine_index * tp + rank) % ncpu) for rank in range(tp))


def engine_max_model_len(gen: GenerationConfig) -> int:
    """vLLM's max_model_len for generation.max_model_len: the key when set; unset, -1, vLLM's auto-fit (the model's own
    limit, cut to the longest context the KV cache holds). Without it a small cache failed at start: the built-in demo
    (kv_cache_gib 0.25) on a CPU without bf16 runs SmolLM2 in fp32, whose 8192 tokens need 0.35 GiB of KV cache."""
    return gen.max_model_len if gen.max_model_len is not None else -1


def cpu_kv_cache_bytes(gen: GenerationConfig) -> int:
    """A CPU engine's KV cache (generation.kv_cache_gib), passed to vLLM as kv_cache_memory_bytes: any size, where
    VLLM_CPU_KVCACHE_SPACE takes whole GiB (vLLM zero-fills it at start, so all of it is resident)."""
    return int(gen.kv_cache_gib * 2**30)


def engine_env(gen: GenerationConfig, cpu_cores: Optional[str] = None, engine_index: int = 0) -> dict[str, str]:
    """Per-engine environment: on CPU, which cores its OpenMP threads are bound to (the KV cache size is an engine
    argument: cpu_kv_cache_bytes)."""
    return {"VLLM_CPU_OMP_THREADS_BIND": cpu_cores or engine_cores(gen, engine_index)}


def _engine_actor(model_path: str, gen: GenerationConfig, *, placement_group, bundle_index: int = 0,
                  cpus: float = 1.0, gpus: float = 0.0, precision: str = "auto", seed: int = 0,
                  cpu_cores: Optional[str] = None, max_restarts: int = 0, engine_index: int = 0,
                  tokenizer: Optional[str] = None, trust_remote_code: bool = False):
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from rlhf_ray.env import worker_env_vars

    if gpus and gen.tensor_parallel_size > 1:
        gpus = 0  # vLLM's Ray executor places the TP workers on the bundles' GPUs
    return ray.remote(VLLMEngine).options(
        num_cpus=cpus, num_gpus=gpus, max_restarts=max_restarts, max_task_retries=0,
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group, placement_group_bundle_index=bundle_index,
                                                             placement_group_capture_child_tasks=True),
        runtime_env={"env_vars": {**worker_env_vars(), **engine_env(gen, cpu_cores, engine_index)}},
    ).remote(model_path, gen, precision=precision, seed=seed, tokenizer=tokenizer, engine_index=engine_index,
             trust_remote_code=trust_remote_code)


def start_engine(model_path: str, gen: GenerationConfig, *, placement_group, bundle_index: int = 0,
                 cpus: float = 1.0, gpus: float = 0.0, precision: str = "auto", seed: int = 0,
                 cpu_cores: Optional[str] = None, max_restarts: int = 0, engine_index: int = 0):
    """Start one engine actor in `placement_group` and wait until its engine is up. `precision` is resolved by the
    engine on its own device ('auto': env.auto_precision)."""
    import ray

    actor = _engine_actor(model_path, gen, placement_group=placement_group, bundle_index=bundle_index, cpus=cpus,
                          gpus=gpus, precision=precision, seed=seed, cpu_cores=cpu_cores, max_restarts=max_restarts,
                          engine_index=engine_index)
    ray.get(actor.ready.remote())
    return actor


# --------------------------------------------------------------------------------------------- the group
class GeneratorGroup:
    """N engines (generation.num_engines, each generation.tensor_parallel_size workers), each in its own placement
    group (one bundle per TP worker, STRICT_PACK: a TP group never spans nodes). Size is independent of the
    learners'."""

    def __init__(self, cfg: Config, model_path: str, *, plan: Optional[dict] = None, precision: Optional[str] = None,
                 start_timeout_s: float = 900.0, hosts: Optional[list] = None):
        """`plan`: groups.placement_plan(cfg)'s roles, whose 'generator[i]' placement groups the engines take;
        without it the group creates (and later removes) its own. `hosts`: actors that already run one engine each
        (placement.layout hybrid: the actor's ranks, rlhf_ray/hybrid.py), adopted instead of started. `precision`:
        default the run's one precision (config.ppo_precision); each engine resolves it on its own device and
        reports its dtype and weight-sync transport (`reports`), which this group then uses."""
        import ray

        from rlhf_ray.config import ppo_precision
        from rlhf_ray.env import check_agreement

        self.cfg, self.gen, self.model_path = cfg, cfg.generation, model_path
        self.precision = precision or ppo_precision(cfg)
        self.start_timeout_s = start_timeout_s
        self.placements, self.engines = [], list(hosts or [])
        self._owned: set[int] = set()  # ids of the placement groups this group created (and removes)
        try:  # any failure from here on kills the engines started so far and removes the placement groups we made
            for i in range(0 if hosts else self.gen.num_engines):  # one by one: a failure at engine i releases 0..i-1
                self.placements.append(plan[f"generator[{i}]"].placement_group if plan else _own_placement_group(cfg, i))
                if not plan:
                    self._owned.add(id(self.placements[-1]))
            for i, pg in enumerate(self.placements):
                self.engines.append(self._new_engine(pg, i))
            self.info = ray.get([e.ready.remote() for e in self.engines], timeout=start_timeout_s)
            self.reports: list[dict] = ray.get([(e.engine_describe if hosts else e.describe).remote()
                                                for e in self.engines], timeout=start_timeout_s)
            check_agreement(self.reports)
        except BaseException:
            self.shutdown()
            raise
        # What the engines chose in their own processes: device, the dtype buckets are cast to, the transport they
        # were built for (generation.sync_transport resolved on their device).
        first = self.reports[0]
        self.device_type, self.dtype, self.transport = first["device"], first["dtype"], first["transport"]
        self.alive = [True] * len(self.engines)
        self.restarts = [0] * len(self.engines)
        self.max_model_len = min(i["max_model_len"] for i in self.info)
        self.weight_version = 0
        self.last_sync: Optional[SyncReport] = None
        self._channel = None  # the weight-sync transfer channel (weight_sync.TransferChannel), kept across syncs
        self._source = None  # what the current version came from (re-syncs restarted engines)
        self._expected: Optional[dict] = None  # the version's sender checksums
        self._probe_ref: Optional[tuple] = None  # (probe ids, the source's log-probs, tolerance)
        self._unprobed_syncs: Optional[int] = None  # syncs since the last probed one (None: none probed yet)
        self._load = [0] * len(self.engines)  # outstanding work per engine
        self._inflight: dict = {}  # ObjectRef -> (engine index, work)
        # rollout.mode one_step / bounded: the engines generate while the learners train, so the learners may already
        # hold the next step's weights; an engine restarted then cannot be re-synced to the current version from
        # them and takes no work until the next sync (its prompts go to the others).
        self.source_moves_ahead = cfg.rollout.mode != "off"
        self.awaiting_sync: set[int] = set()
        from rlhf_ray.weight_sync import probe_token_ids

        self.probe_ids = probe_token_ids(self.info[0]["vocab_size"],
                                         min(self.gen.verify_probe_len, self.max_model_len - 1))

    def _new_engine(self, placement_group, index: int):
        """Engine actor number `index` in `placement_group` (not waited for: its ready() says when it is up)."""
        cfg, gen, res = self.cfg, self.gen, self.cfg.placement.generator
        return _engine_actor(self.model_path, gen, placement_group=placement_group, cpus=res.cpus_per_worker,
                             gpus=res.gpus_per_worker, precision=self.precision, seed=cfg.run.seed,
                             max_restarts=gen.max_restarts, engine_index=index, tokenizer=cfg.models.actor.tokenizer,
                             trust_remote_code=cfg.models.actor.trust_remote_code)

    @property
    def num_engines(self) -> int:
        return len(self.engines)

    @property
    def probe_atol(self) -> float:
        """Tolerance of the probe check against the current source (generation.verify_probe_atol, or by dtype)."""
        return self.probe_atol_for(self._source)

    def probe_atol_for(self, source) -> float:
        """generation.verify_probe_atol, else by the dtypes really in use: the engines' (reported) and the source's
        (a learner group's reported dtype; unknown counts as 16-bit)."""
        from rlhf_ray.weight_sync import default_probe_atol

        atol = self.gen.verify_probe_atol
        return atol if atol is not None else default_probe_atol(self.dtype, getattr(source, "dtype", None))

    # -- generation
    def generate(self, prompts: list[list[int]], sampling: Optional[Sampling] = None,
                 seeds: Optional[list[int]] = None) -> Rollout:
        """Samples for token-id prompts (generation.* sampling unless `sampling` is given; `seeds`: one per prompt)."""
        return self.generate_async(prompts, sampling, seeds).result()

    def generate_async(self, prompts: list[list[int]], sampling: Optional[Sampling] = None,
                       seeds: Optional[list[int]] = None) -> "PendingRollout":
        """Dispatch now, collect with `.result()`: other calls meanwhile see these engines as busy."""
        sampling = sampling or Sampling.from_config(self.gen)
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"generate: {len(seeds)} seeds for {len(prompts)} prompts")
        keep, skipped = [], []
        for i, p in enumerate(prompts):
            if len(p) < self.max_model_len:
                keep.append(i)
            elif self.gen.long_prompt == "skip":
                skipped.append(i)
            else:
                raise PromptTooLongError(
                    f"prompt {i} has {len(p)} tokens; the engines hold at most {self.max_model_len} (generation."
                    f"max_model_len) including one new token. Shorten it, raise max_model_len, or set "
                    f"generation.long_prompt: skip")
        if skipped:
            log.warning("generate: skipped %d prompt(s) longer than max_model_len %d: %s", len(skipped),
                        self.max_model_len, skipped[:10])
        pending = PendingRollout(self, prompts, sampling, seeds, skipped)
        live = max(1, sum(self.alive))
        size = -(-len(keep) // live) if keep else 0
        for start in range(0, len(keep), max(size, 1)):
            pending.dispatch(keep[start:start + size])
        return pending

    def _pick_engine(self) -> int:
        """The live engine with the least outstanding work (finished calls no longer count)."""
        import ray

        if self._inflight:
            done, _ = ray.wait(list(self._inflight), num_returns=len(self._inflight), timeout=0)
            for ref in done:
                self._release(ref)
        live = [i for i, ok in enumerate(self.alive) if ok and i not in self.awaiting_sync]
        if not live and self.awaiting_sync:
            raise RuntimeError(f"generator group: engine(s) {sorted(self.awaiting_sync)} restarted while generating "
                               f"ahead (rollout.mode {self.cfg.rollout.mode}) and no other engine holds weight version "
                               f"{self.weight_version}: the learners have moved past it, so they cannot re-sync it. "
                               f"Run more than one engine (generation.num_engines) to survive an engine death in "
                               f"this mode, or resume from the last checkpoint")
        if not live:
            raise RuntimeError("generator group: every engine is dead (generation.max_restarts exhausted)")
        return min(live, key=lambda i: self._load[i])

    def _release(self, ref) -> None:
        engine, work = self._inflight.pop(ref, (None, 0))
        if engine is not None:
            self._load[engine] -= work

    def _recover(self, engine: int, error: BaseException, resync: bool = True) -> str:
        """After a call failed on `engine`: wait for Ray to restart it and (`resync`) re-sync it to the current
        version, or mark it dead. Returns what happened: "restarted", "dead" or "alive" (same process)."""
        import ray
        from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

        log.warning("engine %d failed (%s: %s); waiting for its restart", engine, type(error).__name__,
                    str(error).splitlines()[0] if str(error) else "")
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            try:
                info = ray.get(self.engines[engine].ready.remote(), timeout=max(1.0, deadline - time.monotonic()))
                break
            except ActorUnavailableError:  # restarting: Ray is bringing it back
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
            except (RayActorError, GetTimeoutError) as e:  # dead for good (max_restarts used up) or stuck
                log.error("engine %d is gone (%s); continuing with %d engine(s)", engine, type(e).__name__,
                          sum(self.alive) - 1)
                self.alive[engine] = False
                return "dead"
        restarted = info["pid"] != self.info[engine]["pid"]
        if restarted:
            self.restarts[engine] += 1
            self.info[engine] = info
        if resync and info["weight_version"] != self.weight_version and self.source_moves_ahead:
            self.awaiting_sync.add(engine)  # the next sync brings it back (sync_weights syncs every live engine)
            log.warning("engine %d restarted while generating ahead: it takes work again after the next weight sync",
                        engine)
        elif resync and info["weight_version"] != self.weight_version:
            if self._source is None:
                raise RuntimeError(f"engine {engine} holds weight version {info['weight_version']}, the group "
                                   f"{self.weight_version}, and there is no source to re-sync it from")
            self._push(self._source, [engine], self.weight_version, self._expected)
            log.info("engine %d restarted and re-synced to weight version %d", engine, self.weight_version)
        return "restarted" if restarted else "alive"

    def _failed_engines(self, targets: list[int]) -> list[int]:
        """Which of `targets` died (their actor fails a ping) or came back as a new process since we last saw them.
        An engine busy with a call is neither."""
        import ray
        from ray.exceptions import RayActorError

        pings = {i: self.engines[i].ready.remote() for i in targets}
        ray.wait(list(pings.values()), num_returns=len(pings), timeout=ENGINE_PING_S)
        failed = []
        for i, ping in pings.items():
            try:
                if ray.get(ping, timeout=0)["pid"] != self.info[i]["pid"]:
                    failed.append(i)
            except RayActorError:  # dead, or being restarted (ActorUnavailableError)
                failed.append(i)
            except Exception:  # GetTimeoutError: busy, alive
                pass
        return failed

    # -- weights
    def sync_weights(self, source, version: Optional[int] = None) -> int:
        """Broadcast the source's weights (a WeightSource, or a learner group with export_params) to every engine,
        verify them (generation.verify_weights) and return the new weight version (default: current + 1).
        An engine that dies mid-sync fails the attempt within seconds (_push watches the receivers); it is restarted
        (generation.max_restarts) or dropped, and the sync starts again on the engines left. A failure with every
        engine alive (the source's, a verification's) is raised."""
        from rlhf_ray.weight_sync import LearnerSource

        if not hasattr(source, "push"):
            source = LearnerSource(source)
        version = self.weight_version + 1 if version is None else version
        failures: list[dict] = []
        while True:
            targets = [i for i, ok in enumerate(self.alive) if ok]
            if not targets:
                raise RuntimeError("generator group: every engine is dead (generation.max_restarts exhausted)")
            started = time.perf_counter()
            try:
                report = self._push(source, targets, version, with_probe=self._probe_due(bool(failures)))
                break
            except Exception as error:
                seconds = time.perf_counter() - started  # from the attempt's start to its failure
                failed = self._failed_engines(targets)
                if not failed:
                    raise
                for i in failed:  # its restart is synced by the next attempt, with the others
                    failures.append({"engine": i, "outcome": self._recover(i, error, resync=False),
                                     "error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}",
                                     "seconds": seconds})
                log.warning("weight sync v%d: engine(s) %s failed after %.1fs (%s); syncing again to engine(s) %s",
                            version, failed, seconds, ", ".join(f["outcome"] for f in failures[-len(failed):]),
                            [i for i, ok in enumerate(self.alive) if ok])
        report.engine_failures = failures
        self.awaiting_sync.clear()  # every live engine took this version
        self.last_sync, self.weight_version, self._source = report, version, source
        self._expected, self._probe_ref = report.checksums, report.probe  # verify(): no probe if this sync had none
        self._unprobed_syncs = 0 if report.probe is not None else (self._unprobed_syncs or 0) + 1
        return version

    def _probe_due(self, engine_restarted: bool) -> bool:
        """Whether this sync scores the probe (generation.verify_probe_every): on the group's first sync, on one that
        brings back an engine that restarted, and every N-th sync. Re-syncs of one engine (_push with `recorded`:
        restart, resize) always do."""
        if engine_restarted or self.awaiting_sync or self._unprobed_syncs is None:
            return True
        return self._unprobed_syncs + 1 >= self.gen.verify_probe_every

    def _push(self, source, targets: list[int], version: int, recorded: Optional[dict] = None,
              with_probe: bool = True) -> SyncReport:
        """Sync `targets` to `version` from `source`. `recorded`: the version's checksums from its first sync (a
        re-sync must reproduce them). `with_probe`: with generation.verify_weights, score the probe too (else
        checksums only)."""
        import ray

        from rlhf_ray.weight_sync import BucketSender, SyncPlan, WeightSyncError, resolve_transport

        gen, tp = self.gen, self.gen.tensor_parallel_size
        # On the engines' device (their reports), never the driver's: 'auto' is the transport they chose.
        transport = resolve_transport(gen.sync_transport, self.device_type == "cuda")
        engines = [self.engines[i] for i in targets]
        offsets = [1 + k * tp for k in range(len(engines))]  # sender is rank 0, then each engine's TP workers
        plan = SyncPlan(version, transport, self.dtype, int(gen.sync_bucket_mb * (1 << 20)), engines=engines,
                        world_size=1 + tp * len(engines), timeout_s=gen.sync_timeout_s, verify=gen.verify_weights)
        sender = BucketSender(plan, verify=gen.verify_weights)
        started = time.perf_counter()
        channel = None if transport == "object_store" else self._transfer_channel(source, targets, transport)
        try:
            if channel is not None:
                channel.attach(plan)
            if transport == "gloo":
                receiving = [e.receive_weights_gloo.remote(plan, off) for e, off in zip(engines, offsets)]
            elif transport == "object_store":
                ray.get([e.begin_weight_update.remote(gen.verify_weights) for e in engines])
                receiving = []
            else:
                receiving = [e.init_weight_transfer.remote(plan, off) for e, off in zip(engines, offsets)]
                if transport == "ipc":
                    ray.get(receiving)
                    receiving = []
            steps = {"start": time.perf_counter() - started}
            stats = self._watched_push(source, sender, plan.bucket_bytes, receiving)
            ray.get(receiving)
            steps["push"] = time.perf_counter() - started - steps["start"]
        except BaseException:
            self._close_channel()  # its group is in an unknown state; receivers waiting on its store fail at once
            settle(receiving)
            raise
        if channel is not None:
            channel.sync_done(plan, stats["buckets"])
        expected = None
        probe = None
        if gen.verify_weights:
            expected = stats["checksums"]
            if recorded is not None and expected != recorded:
                raise WeightSyncError(f"re-sync of engines {targets} to weight version {version}: the source no "
                                      f"longer holds that version (its checksums changed since the sync)")
            if with_probe:
                probe = (self.probe_ids, None, self.probe_atol_for(source))
        finish_started = time.perf_counter()
        # The engines finish, check their checksums and score the probe while the source scores it.
        finishing = [e.finish_weight_update.remote(version, transport, expected, probe) for e in engines]
        if probe is not None:
            try:
                probe = (probe[0], source.probe_logprobs(probe[0]), probe[2])
            except BaseException:  # nothing to check the engines against: they hold no verified version
                ray.wait(finishing, num_returns=len(finishing), timeout=gen.sync_timeout_s)
                ray.get([e.reject_weights.remote() for e in engines])
                raise
            steps["probe"] = time.perf_counter() - finish_started
        reports = ray.get(finishing)
        steps["finish"] = time.perf_counter() - finish_started
        if probe is not None:
            self._compare_probes(targets, version, reports, probe)
        report = SyncReport(version, transport, time.perf_counter() - started, stats["bytes"], stats["buckets"],
                            stats["max_bucket_bytes"], gen.verify_weights, reports,
                            {k: stats[k] for k in ("seconds", "checksum_s", "transfer_s", "new_group")}, expected,
                            probe, channel=channel.id if channel else "",
                            new_channel=bool(channel) and plan.new_channel, steps_s=steps)
        log.debug("weight sync v%d over %s to %d engine(s): %.1f MB in %d bucket(s), %.2fs (%.0f MB/s)%s", version,
                 transport, len(engines), report.bytes / 1e6, report.buckets, report.seconds, report.mb_per_s,
                 ", verified" if gen.verify_weights else "")
        return report

    def _watched_push(self, source, sender, bucket_bytes: int, receiving: list) -> dict:
        """source.push while watching the engines' receiving calls: when one fails (its engine died), the channel's
        rendezvous store is dropped, so a sender or receiver waiting on the dead peer fails at once instead of after
        generation.sync_timeout_s. (Peers already connected see its sockets close.)"""
        import ray

        if not receiving:
            return source.push(sender, bucket_bytes)
        with ThreadPoolExecutor(1, thread_name_prefix="weight-push") as pool:
            pushing = pool.submit(source.push, sender, bucket_bytes)
            watched = list(receiving)
            while watched and not pushing.done():
                done, watched = ray.wait(watched, num_returns=1, timeout=WATCH_POLL_S)
                for ref in done:
                    try:
                        ray.get(ref)
                    except Exception as e:
                        log.warning("weight sync: a receiving engine failed (%s: %s); aborting the transfer",
                                    type(e).__name__, str(e).strip().splitlines()[-1] if str(e).strip() else "")
                        if self._channel is not None:
                            self._channel.abort()
                        watched = []
            return pushing.result()

    def _compare_probes(self, targets: list[int], version: int, reports: list[dict], probe: tuple) -> None:
        """Each engine's probe log-probs (its report's "probe_logprobs") against the source's; an engine off by more
        than the tolerance gives up the version (reject_weights) and the sync fails naming it."""
        import ray

        from rlhf_ray.weight_sync import WeightSyncError, compare_probe

        _, reference, atol = probe
        failed = []
        for i, report in zip(targets, reports):
            where = f"engine {i} (pid {self.info[i]['pid']}), weight version {version}"
            try:
                report["probe_max_diff"] = compare_probe(report.pop("probe_logprobs"), reference, atol, where)
            except WeightSyncError as e:
                failed.append((i, e))
        if failed:
            ray.get([self.engines[i].reject_weights.remote() for i, _ in failed])
            raise failed[0][1]

    def _transfer_channel(self, source, targets: list[int], transport: str):
        """The open transfer channel to `targets`, or a new one (replacing the old) when anything it was built for
        changed: transport or timeout, the engines or their processes (a restart), the sending process."""
        from rlhf_ray.weight_sync import TransferChannel

        key = (transport, self.gen.sync_timeout_s, tuple((i, self.info[i]["pid"]) for i in targets),
               source.sender_key())
        if self._channel is None or self._channel.key != key:
            self._close_channel()
            self._channel = TransferChannel.open(key, source, transport, self.gen.sync_timeout_s)
            log.debug("weight sync: new %s transfer channel %s to engines %s", transport, self._channel.id, targets)
        return self._channel

    def _close_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def verify(self) -> list[dict]:
        """Re-check every live engine against the current version: the checksums of its live parameters, and the
        probe when the version's sync scored one (generation.verify_probe_every); raises WeightSyncError."""
        import ray

        if self._expected is None:
            raise RuntimeError("verify: no verified sync yet (generation.verify_weights off, or never synced)")
        return ray.get([self.engines[i].verify_weights.remote(self.weight_version, self._expected, self._probe_ref)
                        for i, ok in enumerate(self.alive) if ok])

    def engine_versions(self) -> list[int]:
        import ray

        return [info["weight_version"] for info in ray.get([e.ready.remote() for e in self.engines])]

    # -- elastic size (rlhf_ray/control.py: `rlhf-ray engines CONFIG --set N`)
    def resize(self, engines: int) -> None:
        """Grow or shrink to `engines` live engines, between iterations. A new engine starts in a placement group of
        its own, takes the current weights from the current source and passes verification before it joins (before
        it can take work); a grow that cannot be placed (ray.placement_timeout_s) or started raises and leaves the
        group as it was. A shrink removes the highest-numbered engines once their outstanding calls have returned;
        an engine in a placement group of the run's plan leaves its bundles reserved until the run ends."""
        import ray

        if engines < 1:
            raise ValueError(f"engines: {engines}; a run needs at least 1")
        while sum(self.alive) > engines:
            i = max(i for i, ok in enumerate(self.alive) if ok)
            mine = [ref for ref, (engine, _) in self._inflight.items() if engine == i]
            settle(mine, timeout_s=None)  # its work is finished (or failed) before it goes
            for ref in mine:
                self._release(ref)
            self._drop_tail(i)
        if sum(self.alive) < engines:
            self._add_engines(engines - sum(self.alive))

    def _add_engines(self, count: int) -> None:
        """All or nothing: every new engine's placement group is placed first (a grow the cluster cannot hold fails
        after ray.placement_timeout_s, before any engine starts), then they start together, and the current version
        is pushed to them and verified; a failure anywhere removes all of them."""
        import ray
        from ray.util.placement_group import remove_placement_group

        from rlhf_ray.env import check_agreement

        first = len(self.engines)
        placements, engines = [], []
        try:
            for k in range(count):
                placements.append(_own_placement_group(self.cfg, first + k))  # PlacementError naming what is missing
            engines = [self._new_engine(pg, first + k) for k, pg in enumerate(placements)]
            infos = ray.get([e.ready.remote() for e in engines], timeout=self.start_timeout_s)
            reports = ray.get([e.describe.remote() for e in engines], timeout=self.start_timeout_s)
            check_agreement(self.reports + reports)
        except BaseException:
            for engine in engines:
                ray.kill(engine, no_restart=True)
            for pg in placements:
                remove_placement_group(pg)
            raise
        self.engines += engines
        self.placements += placements
        self._owned |= {id(pg) for pg in placements}
        self.info += infos
        self.reports += reports
        self.alive += [True] * count
        self.restarts += [0] * count
        self._load += [0] * count
        try:
            if self._source is not None:  # the version every other engine holds, checked against its checksums
                self._push(self._source, list(range(first, first + count)), self.weight_version, self._expected)
        except BaseException:
            self._drop_tail(first)
            raise
        log.info("engine(s) %s added at weight version %d; %d engine(s)", list(range(first, first + count)),
                 self.weight_version, sum(self.alive))

    def _drop_tail(self, i: int) -> None:
        """Remove engine i and every entry after it (dead engines) from the group."""
        import ray
        from ray.util.placement_group import remove_placement_group

        while len(self.engines) > i:
            pg = self.placements.pop() if len(self.placements) == len(self.engines) else None  # hybrid: none
            engine = self.engines.pop()
            for entries in (self.alive, self.restarts, self.info, self.reports, self._load):
                entries.pop()
            ray.kill(engine, no_restart=True)
            if pg is not None and id(pg) in self._owned:
                self._owned.discard(id(pg))
                remove_placement_group(pg)
        log.info("engine(s) from %d on removed; %d engine(s)", i, sum(self.alive))

    # -- GPU sharing
    def sleep(self, level: int = 1) -> list[bool]:
        """GPU with generation.enable_sleep_mode: engines release weights / KV cache; False where nothing happened."""
        import ray

        return ray.get([e.sleep.remote(level) for e, ok in zip(self.engines, self.alive) if ok])

    def wake_up(self) -> list[bool]:
        import ray

        return ray.get([e.wake_up.remote() for e, ok in zip(self.engines, self.alive) if ok])

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        if getattr(self, "_channel", None) is not None:
            self._close_channel()  # the sender's end of the weight-sync group
        for e in getattr(self, "engines", []):
            ray.kill(e, no_restart=True)
        self.engines = []
        for pg in getattr(self, "placements", []):
            if id(pg) in self._owned:
                remove_placement_group(pg)
        self.placements, self._owned = [], set()


def settle(refs: list, timeout_s: Optional[float] = ENGINE_PING_S) -> None:
    """Wait (up to `timeout_s`; None: until all are done) for calls whose errors are seen another way (a failed
    sync's own, an engine being removed), and collect their outcome so Ray does not report them as unhandled."""
    import ray

    done, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    for ref in done:
        try:
            ray.get(ref)
        except Exception:
            pass


def _own_placement_group(cfg: Config, engine: int):
    """One engine's placement group: a bundle per TP worker, STRICT_PACK. Named 'generator[i]' like the PPO layout's;
    a suffix keeps it unique when another group (or placement_plan) already holds that name."""
    import ray

    from rlhf_ray.resources import ready_placement_group, role_bundles

    role = f"generator[{engine}]"
    try:
        ray.util.get_placement_group(f"rlhf_ray:{role}")
        role = f"{role}#{os.urandom(3).hex()}"
    except ValueError:
        pass
    return ready_placement_group(role, role_bundles(cfg.placement.generator, cfg.generation.tensor_parallel_size),
                                 "STRICT_PACK", cfg.ray.placement_timeout_s)


class PendingRollout:
    """Chunks of one generate call in flight; `result()` waits, recovering from engine failures."""

    def __init__(self, group: GeneratorGroup, prompts, sampling: Sampling, seeds, skipped: list[int]):
        self.group, self.prompts, self.sampling, self.seeds = group, prompts, sampling, seeds
        self.skipped, self.redispatched = skipped, 0
        self.started = time.perf_counter()
        self.chunks: dict = {}  # ObjectRef -> (engine, prompt indices, attempts)
        self.samples: list[Sample] = []

    def dispatch(self, indices: list[int], attempts: int = 0) -> None:
        g, s = self.group, self.sampling
        engine = g._pick_engine()
        work = sum(s.work(len(self.prompts[i])) for i in indices)
        seeds = [self.seeds[i] for i in indices] if self.seeds is not None else None
        ref = g.engines[engine].generate.remote([self.prompts[i] for i in indices], s, prompt_indices=indices,
                                                seeds=seeds, expected_version=g.weight_version)
        g._inflight[ref] = (engine, work)
        g._load[engine] += work
        self.chunks[ref] = (engine, indices, attempts)

    def result(self) -> Rollout:
        import ray
        from ray.exceptions import RayActorError

        g = self.group
        while self.chunks:
            [ref], _ = ray.wait(list(self.chunks), num_returns=1)
            engine, indices, attempts = self.chunks.pop(ref)
            g._release(ref)
            try:
                self.samples += ray.get(ref)
                continue
            except (RayActorError, StaleWeightsError) as e:
                if attempts > g.gen.max_restarts:
                    raise RuntimeError(f"prompts {indices[:5]}...: engine failures on {attempts + 1} attempts") from e
                g._recover(engine, e)
            self.redispatched += len(indices)
            self.dispatch(indices, attempts + 1)
        samples = sorted(self.samples, key=lambda s: (s.prompt_index, s.sample_index))
        served: dict[int, int] = {}
        for s in samples:
            if s.sample_index == 0:
                served[s.engine] = served.get(s.engine, 0) + 1
        return Rollout(samples, g.weight_version, self.redispatched, self.skipped, served,
                       time.perf_counter() - self.started)
