"""Benchmark the learner -> generator weight sync on SmolLM2-135M (fp32, 538 MB): seconds and MB/s per transport.

    flock /tmp/rlhf_ray_heavy.lock .venv/bin/python benchmarks/bench_sync.py [--model builtin:smollm2]
        [--bucket-mb 256] [--repeats 2] [--no-learner]

Not a test. One engine actor (core 0) receives every sync; the checksums and the probe are verified each time
(generation.verify_weights, on by default) and their share is printed separately. Senders:
  model    a transformers model in the driver (ModelSource)
  learner  a 2-rank ZeRO-3 DeepSpeed learner group (PolicyGroup): both ranks gather each bucket, rank 0 sends
for the object_store and gloo transports. Best of --repeats. MB/s counts the fp32 bytes sent per wall second of
the whole sync (start, transfer, vLLM reload, verification).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlhf_ray.config import load_config  # noqa: E402
from rlhf_ray.generator import GeneratorGroup  # noqa: E402
from rlhf_ray.models.loading import resolve_model_path  # noqa: E402
from rlhf_ray.weight_sync import LearnerSource, ModelSource  # noqa: E402


def measure(group: GeneratorGroup, source, transport: str, bucket_mb: float, repeats: int) -> dict:
    from dataclasses import replace

    group.gen = replace(group.gen, sync_transport=transport, sync_bucket_mb=bucket_mb)
    best = None
    for _ in range(repeats):
        group.sync_weights(source)
        r = group.last_sync
        if best is None or r.seconds < best.seconds:
            best = r
    engine = best.engines[0]
    return {"seconds": best.seconds, "mb_per_s": best.mb_per_s, "mb": best.bytes / 1e6, "buckets": best.buckets,
            "sender_checksum_s": best.sender["checksum_s"], "transfer_s": best.sender["transfer_s"],
            "checksum_s": engine.get("checksum_s", 0.0),
            "probe_s": engine.get("verify_s", 0.0) - engine.get("checksum_s", 0.0)}


def main() -> None:
    import ray

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="builtin:smollm2")
    ap.add_argument("--bucket-mb", type=float, default=256.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-learner", action="store_true", help="skip the ZeRO-3 learner sender")
    args = ap.parse_args()
    path = resolve_model_path(args.model)
    ray.init(num_cpus=6, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    cfg = load_config(None, {"ray.address": "local", "models.actor.path": path, "generation.max_model_len": 256,
                             "generation.cpu_cores": ["0"],
                             "placement.actor": {"num_workers": 2, "cpus_per_worker": 1}, "ppo.mini_batch_size": 4,
                             "ppo.actor.deepspeed.zero_stage": 3, "ppo.actor.deepspeed.micro_batch_size": 2,
                             "ppo.actor.deepspeed.precision": "fp32"})
    group = GeneratorGroup(cfg, path, precision="fp32")
    rows = []
    try:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        for transport in ("object_store", "gloo"):
            rows.append(("model", transport, measure(group, ModelSource(model), transport, args.bucket_mb,
                                                      args.repeats)))
        del model
        if not args.no_learner:
            from rlhf_ray.learner import PolicyGroup

            started = time.perf_counter()
            learner = PolicyGroup(cfg)
            print(f"(2-rank ZeRO-3 learner up in {time.perf_counter() - started:.0f}s)")
            try:
                for transport in ("object_store", "gloo"):
                    rows.append(("learner", transport, measure(group, LearnerSource(learner), transport,
                                                                args.bucket_mb, args.repeats)))
            finally:
                learner.shutdown()
    finally:
        group.shutdown()
    print(f"{args.model}, bucket {args.bucket_mb:g} MB, 1 engine, verification on")
    print("sync s: the whole sync; of it: sender checksums, transfer (until the engine has loaded every bucket),\n"
          "engine checksums (live weights read back and mapped to HF names) and the probe forward pass")
    print(f"{'sender':8} {'transport':13} {'sync s':>7} {'MB/s':>6} {'MB':>5} {'buckets':>7} {'sender cks':>10} "
          f"{'transfer':>8} {'engine cks':>10} {'probe':>6}")
    for sender, transport, r in rows:
        print(f"{sender:8} {transport:13} {r['seconds']:7.2f} {r['mb_per_s']:6.0f} {r['mb']:5.0f} {r['buckets']:7d} "
              f"{r['sender_checksum_s']:10.2f} {r['transfer_s']:8.2f} {r['checksum_s']:10.2f} {r['probe_s']:6.2f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
