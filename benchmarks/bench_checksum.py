"""Time the weight-sync checksums (rlhf_ray.weight_sync.checksum_received) over SmolLM2-135M's state dict (fp32: 538
MB, bf16: 269 MB, 272 tensors), against the previous formulation of the same checksum, in one process, alternating:

  current    per chunk of 2^19 int32 words, the dot product against the index weights plus, for a chunk not at the
             tensor's start, its offset times the chunk's sum (a second dot product, against ones: the chunk is in
             the cache then), both int32 lanes that wrap, summed as Python ints
  previous   per chunk of 2^18 words, one int32 dot product against the index weights shifted by the chunk's offset
             (a new shifted copy of the weights per chunk), summed as int64 tensors

Both must give the same checksums (checked); prints the best of --repeats for each and the ratio previous / current.

    flock /tmp/rlhf_ray_heavy.lock .venv/bin/python benchmarks/bench_checksum.py [--dtype bfloat16] [--repeats 5]
        [--chunks 17,18,19,20,21]   # also: the current formulation's best time per chunk size (words per dot)

Not a test.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlhf_ray import weight_sync  # noqa: E402


def previous_checksum(t: torch.Tensor, chunk: int = 1 << 18) -> int:
    """The whole-tensor checksum as computed before (whole words: fp32 one per element, bf16 two)."""
    words = t.detach().contiguous().reshape(-1).view(torch.int32)
    total = torch.zeros((), dtype=torch.int64)
    for s in range(0, words.numel(), chunk):
        b = words[s:s + chunk]
        shift = s * weight_sync._GOLDEN & weight_sync.CHECKSUM_MASK
        w = weight_sync._index_weights(b.numel(), b.device) + (shift - (1 << 32) if shift >= 1 << 31 else shift)
        total += torch.dot(b, w).to(torch.int64)
    return int(total) & weight_sync.CHECKSUM_MASK


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunks", default="", help="comma-separated log2 chunk sizes to time the current checksum at")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="the engines' dtype (what a sync checksums)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    from rlhf_ray.models.smollm2 import smollm2_path

    model = AutoModelForCausalLM.from_pretrained(str(smollm2_path()), dtype=getattr(torch, args.dtype))
    named = [(name, p.detach()) for name, p in model.named_parameters()]
    nbytes = sum(t.numel() * t.element_size() for _, t in named)
    current = weight_sync.checksum_received(named, {})
    assert current == {name: (tuple(t.shape), previous_checksum(t)) for name, t in named}, "checksums differ"
    best = {"current": float("inf"), "previous": float("inf")}
    for _ in range(args.repeats):
        for side in best:
            started = time.perf_counter()
            if side == "current":
                weight_sync.checksum_received(named, {})
            else:
                for _, t in named:
                    previous_checksum(t)
            best[side] = min(best[side], time.perf_counter() - started)
    print(f"SmolLM2-135M {args.dtype}, {len(named)} tensors, {nbytes / 1e6:.0f} MB, {torch.get_num_threads()} threads, "
          f"best of {args.repeats}:")
    for side, seconds in best.items():
        print(f"  {side}: {seconds:.3f} s ({nbytes / seconds / 1e9:.1f} GB/s)")
    print(f"ratio previous / current: {best['previous'] / best['current']:.2f}")
    for log2 in [int(c) for c in args.chunks.split(",") if c]:
        seconds = float("inf")
        for _ in range(args.repeats):
            started = time.perf_counter()
            for _, t in named:
                weight_sync.checksum_slice(t, t.shape, chunk_elems=1 << log2)
            seconds = min(seconds, time.perf_counter() - started)
        print(f"  current, chunks of 2^{log2} words: {seconds:.3f} s")


if __name__ == "__main__":
    main()
