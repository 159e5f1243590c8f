"""placement.layout hybrid: the vLLM engine lives in the actor learner's own rank process (veRL's hybrid worker,
DeepSpeed-Chat's Hybrid Engine), so the weight hand-off never leaves the process.

    actor = HybridPolicyGroup(cfg, placement=plan["actor"])   # learner rank + vLLM engine in one Ray actor
    generators = HybridGeneratorGroup(cfg, actor)             # GeneratorGroup dispatching to that actor
    version = generators.sync_weights(actor)                  # in-process hand-off, verified like any sync

One rank: the engine is created in the rank's process after its DeepSpeed engine (in-process engine core,
VLLM_ENABLE_V1_MULTIPROCESSING=0, so `collective_rpc` hands tensors over by reference). A sync walks the learner's
parameters a bucket at a time under `deepspeed.zero.GatheredParameters` (ZeRO-3; a no-op below it) and, while the
gather is held, passes the live tensors (LoRA merged into their base weights) straight to the worker's layerwise
reload (vllm_worker_ext.rlhf_load_bucket), which copies them into the engine's own parameters: no serialisation,
no copy besides the engine's own weights. Verification is the separate layout's (VLLMEngine.finish_weight_update):
the checksums of what the engine's loader received against the learner's, and the probe log-probs; the live
parameters on demand (GeneratorGroup.verify()).

On GPU, with generation.enable_sleep_mode, the engine sleeps at level 2 (KV cache and weights freed) while the
learner scores and trains, and wakes before the sync that reloads its weights. On CPU vLLM's sleep frees nothing.

Not done (refused at config load, config._validate_hybrid): more than one actor rank (vLLM's external_launcher
inside the learners' torch.distributed world), several engines, tensor parallelism, engine restarts (the engine
dies with its rank, and learner ranks are not restarted), another sync transport.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Iterator, Optional

import torch

from rlhf_ray.config import Config, GenerationConfig
from rlhf_ray.generator import GeneratorGroup, SyncReport
from rlhf_ray.learner import PolicyGroup, PolicyLearner, _numel

log = logging.getLogger(__name__)

TRANSPORT = "in_process"
SLEEP_LEVEL = 2  # the weights are reloaded from the learner right after waking: nothing to keep


class HybridPolicyLearner(PolicyLearner):
    """One actor rank that also hosts the rollout engine (`self.vllm`, a generator.VLLMEngine). The engine's methods
    that GeneratorGroup calls are forwarded under their own names (its `describe` as `engine_describe`)."""

    def __init__(self, *args, generation: GenerationConfig, engine_model_path: str, tokenizer: Optional[str] = None,
                 trust_remote_code: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.generation, self.engine_model_path = generation, engine_model_path
        self.engine_tokenizer, self.engine_trust_remote_code = tokenizer, trust_remote_code
        self.vllm = None

    def setup(self) -> None:
        from rlhf_ray.env import PRECISION_DTYPES
        from rlhf_ray.generator import VLLMEngine

        super().setup()  # the DeepSpeed engine first; the vLLM engine joins the process after it
        precision = {dtype: key for key, dtype in PRECISION_DTYPES.items()}[self.dtype_name]  # the learner's own
        self.vllm = VLLMEngine(self.engine_model_path, self.generation, precision=precision, seed=self.seed,
                               tokenizer=self.engine_tokenizer, engine_index=0,
                               trust_remote_code=self.engine_trust_remote_code, transport=TRANSPORT)

    # -- the engine's side, as GeneratorGroup calls it
    def ready(self) -> dict:
        return self.vllm.ready()

    def engine_describe(self) -> dict:
        return self.vllm.describe()

    def generate(self, *args, **kwargs):
        return self.vllm.generate(*args, **kwargs)

    def probe_logprobs(self, token_ids: list[int]) -> list[float]:
        return self.vllm.probe_logprobs(token_ids)

    def verify_weights(self, version: int, expected: dict, probe: Optional[tuple]) -> dict:
        return self.vllm.verify_weights(version, expected, probe)

    def checksums(self) -> dict:
        return self.vllm.checksums()

    def sleep(self, level: int = SLEEP_LEVEL) -> bool:
        return self.vllm.sleep(level)

    def wake_up(self) -> bool:
        return self.vllm.wake_up()

    def engine_rpc(self, method: str, args: tuple = ()) -> list:
        return self.vllm.collective_rpc(method, args)

    # -- the in-process weight hand-off
    def live_buckets(self, bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """(HF name, tensor) buckets of the learner's current parameters in model order, each yielded while its ZeRO-3
        gather is held: the tensors are the parameters themselves (LoRA layers: merged, a new tensor), not copies."""
        import deepspeed

        units = self._export_units()
        bucket, size = [], 0
        for i, unit in enumerate(units):
            bucket.append(unit)
            size += sum(_numel(p) * p.element_size() for _, p in unit)
            if size < bucket_bytes and i + 1 < len(units):
                continue
            with deepspeed.zero.GatheredParameters([p for u in bucket for _, p in u], modifier_rank=None):
                yield self._merge_lora({name: p.data.detach() for u in bucket for name, p in u})
            bucket, size = [], 0

    def load_into_engine(self, bucket: list[tuple[str, torch.Tensor]], dtype: torch.dtype) -> None:
        """In-process, tensors by reference. The worker casts each tensor to the engine's dtype as it loads it: no copy
        where the weights are in that dtype (fp32; GPU bf16); CPU bf16 learners keep fp32 weights under autocast
        (autocast_bf16), and a tensor at a time is cast, checksummed and loaded while it is in the cache."""
        self.vllm.llm.collective_rpc("rlhf_load_bucket", args=(bucket, dtype))

    def sync_engine(self, version: int, verify: bool, probe_ids: Optional[list[int]], probe_atol: float,
                    recorded: Optional[dict], bucket_bytes: int) -> dict:
        """Load this rank's parameters into its own engine and verify them there (every tensor reached the engine's
        loader, checksummed there; with `probe_ids`, probe log-probs of this learner vs the engine's). Returns the
        sync's stats."""
        from rlhf_ray.weight_sync import WeightSyncError

        engine, started = self.vllm, time.perf_counter()
        dtype = getattr(torch, engine.dtype)
        # As in the separate layout, the engine's loader checksums every tensor it receives (rlhf_begin_update). Here
        # those are the learner's own tensors (by reference), so they are the sync's checksums: computed once. Each
        # tensor sent must have reached the loader with its shape. The live parameters (a pass through vLLM's packed
        # CPU kernels, 1.2-1.8 s on SmolLM2 in fp32) are checked on demand: GeneratorGroup.verify().
        engine.begin_weight_update(verify=verify)
        sent: dict[str, tuple] = {}
        buckets = nbytes = max_bucket = 0
        load_s = 0.0
        for bucket in self.live_buckets(bucket_bytes):
            sent.update((name, tuple(t.shape)) for name, t in bucket)
            t0 = time.perf_counter()
            self.load_into_engine(bucket, dtype)
            load_s += time.perf_counter() - t0
            size = sum(t.numel() * dtype.itemsize for _, t in bucket)
            buckets, nbytes, max_bucket = buckets + 1, nbytes + size, max(max_bucket, size)
        checksums = None
        if verify:
            [received] = engine.collective_rpc("rlhf_received_checksums")
            where = f"hybrid engine (pid {os.getpid()}), weight version {version}"
            for name, shape in sent.items():
                if name not in received or tuple(received[name][0]) != shape:
                    engine.weight_version = -1
                    raise WeightSyncError(f"{where}: learner tensor {name} {shape} never reached the engine's loader "
                                          f"(it got {tuple(received[name][0]) if name in received else 'nothing'})")
            checksums = {name: received[name] for name in sent}
        if recorded is not None and checksums != recorded:
            engine.weight_version = -1
            raise WeightSyncError(f"re-sync of the hybrid engine (pid {os.getpid()}) to weight version {version}: the "
                                  f"learner no longer holds that version (its checksums changed since the sync)")
        probe, probe_s = None, 0.0
        if verify and probe_ids:  # before the finish: on a second thread beside it, it competed for the cores
            mine, probe_s = self._timed_probe(probe_ids)
            probe = (probe_ids, mine, probe_atol)
        pushed = time.perf_counter() - started
        report = engine.finish_weight_update(version, TRANSPORT, checksums, probe)  # failing: version -1
        report["load_s"] = load_s
        return {"bytes": nbytes, "buckets": buckets, "max_bucket_bytes": max_bucket, "checksums": checksums,
                "probe": probe, "engine": report,
                "sender": {"seconds": pushed, "checksum_s": 0.0, "transfer_s": load_s, "probe_s": probe_s,
                           "new_group": False}}

    def _timed_probe(self, probe_ids: list[int]) -> tuple[list[float], float]:
        """This learner's probe log-probs at T = 1 (what the engine's must match) and the seconds they took."""
        started, ids = time.perf_counter(), torch.tensor([probe_ids])
        mine = self.logprobs({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, temperature=1.0)
        return mine[0].tolist(), time.perf_counter() - started


class HybridPolicyGroup(PolicyGroup):
    """The actor's rank(s) with the engine inside (placement.actor's placement group; none for the generator)."""

    worker_cls = HybridPolicyLearner

    def __init__(self, cfg: Config, placement=None, **group_kwargs):
        from rlhf_ray.generator import engine_env
        from rlhf_ray.models.loading import resolve_model_path

        gen, actor = cfg.generation, cfg.models.actor
        # The engine computes on the rank's own threads: no core binding unless generation.cpu_cores names one.
        env = engine_env(gen, gen.cpu_cores[0] if gen.cpu_cores else "nobind")
        super().__init__(cfg, placement=placement, env_vars=env, worker_kwargs=dict(
            generation=gen, engine_model_path=resolve_model_path(actor.path), tokenizer=actor.tokenizer,
            trust_remote_code=actor.trust_remote_code), **group_kwargs)


class HybridGeneratorGroup(GeneratorGroup):
    """GeneratorGroup over the engines inside a HybridPolicyGroup's ranks: generation, versions, verification and
    stale-engine checks are GeneratorGroup's; a sync is the in-process hand-off (HybridPolicyLearner.sync_engine)."""

    def __init__(self, cfg: Config, actor: HybridPolicyGroup):
        from rlhf_ray.models.loading import resolve_model_path

        self.actor = actor
        super().__init__(cfg, resolve_model_path(cfg.models.actor.path), hosts=actor.workers)

    def resize(self, engines: int) -> None:
        raise ValueError(f"engines: {engines}; with placement.layout hybrid the engines live in the actor's ranks, "
                         f"one per rank: their number is placement.actor.num_workers, fixed for the run")

    def _push(self, source, targets: list[int], version: int, recorded: Optional[dict] = None,
              with_probe: bool = True) -> SyncReport:
        import ray

        if getattr(source, "group", source) is not self.actor:
            raise ValueError("a hybrid engine is fed only by the learner rank it lives in (its HybridPolicyGroup)")
        gen, started = self.gen, time.perf_counter()
        [got] = ray.get([self.engines[i].sync_engine.remote(
            version, gen.verify_weights, self.probe_ids if with_probe else None, self.probe_atol_for(source), recorded,
            int(gen.sync_bucket_mb * (1 << 20))) for i in targets])
        report = SyncReport(version, TRANSPORT, time.perf_counter() - started, got["bytes"], got["buckets"],
                            got["max_bucket_bytes"], gen.verify_weights, [got["engine"]], got["sender"],
                            got["checksums"], got["probe"])
        log.debug("weight sync v%d in-process (hybrid): %.1f MB in %d bucket(s), %.2fs%s", version, report.bytes / 1e6,
                 report.buckets, report.seconds, ", verified" if gen.verify_weights else "")
        return report

    def sleep(self, level: int = SLEEP_LEVEL) -> list[bool]:
        return super().sleep(level)

    def shutdown(self) -> None:
        self.engines = []  # the actor's ranks: HybridPolicyGroup.shutdown ends them
