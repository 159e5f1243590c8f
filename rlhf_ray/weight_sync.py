"""Weight broadcast learner -> vLLM generator engines: one interface, transports chosen by device.

    source = LearnerSource(policy_group)          # or ModelSource(transformers_model) without a learner
    report = generators.sync_weights(source)      # rlhf_ray.generator.GeneratorGroup drives the steps below

A sync, driven by the generator group:
  1. every target engine starts a weight update (vLLM's layerwise reload: a layer is processed once all its
     tensors have arrived, so a fused qkv_proj may straddle two buckets);
  2. the source streams buckets of (HF name, full tensor) into a `BucketSender` where they are produced (learner
     rank 0 through `export_params(callback=...)`, or the driver for a ModelSource); the sender casts each tensor
     to the engine dtype, checksums it and ships it over the transport:
       object_store  numpy arrays `ray.put` per bucket (zero-copy `ray.get` in the engine actor), each bucket
                     loaded by every engine before the next is put: peak extra memory ~ one bucket
       gloo          a standalone gloo group (TCPStore + ProcessGroupGloo; no global torch.distributed state) of
                     the sender and every engine worker; bucket metadata travels through the store as JSON (data
                     only: the store has no authentication, so nothing read from it is unpickled)
       nccl          GPU: vLLM's NCCL weight-transfer engine on the workers (`weight_transfer_config`), the
                     sender's PyNcclCommunicator from `vllm.distributed.weight_transfer.nccl_common`; a GPU
                     learner's buckets stay on its device and are checksummed there
       ipc           GPU, sender and engine on the same GPU: CUDA IPC handles, vLLM's IPC weight-transfer engine
     The gloo / NCCL group (and vLLM's transfer engine) is a TransferChannel: created by the first sync, reused by
     the next ones, rebuilt only when an engine restarts, the engine set or the sending process changes, or a sync
     on it fails (vLLM's documented lifecycle: init_weight_transfer_engine once, then start / update / finish);
  3. every engine finishes the update, resets its prefix cache and verifies: the checksums its workers computed on
     every tensor as it arrived (checksum_received; the sender computes its own while the bucket is in flight) equal
     the sender's, the names and shapes are every live parameter's, and its log-probs on a short fixed probe
     sequence equal the source's (scored by the source meanwhile) within a tolerance. An engine's first sync, and
     `GeneratorGroup.verify()` at any time, check the checksum of its *live* parameters instead, mapped back to HF
     names (fused q/k/v and gate/up split, TP shards reassembled; see vllm_worker_ext): on CPU that reads every
     packed kernel back, 1.4 s of a 2.3 s sync on SmolLM2-135M (benchmarks/results/phase_overheads.md). GPU
     transports (vLLM's transfer engine receives the tensors) check the live parameters every time.

Checksum: sum over k of word_k * (k * G + 1) mod 2^32, where word_k is the k-th 32-bit little-endian word of the
full HF tensor's raw bytes (the tensor in the engine's dtype, in flat order; a last partial word zero-padded): an
fp32 element is one word, a bf16 pair one, an 8-byte element two. Exact, sensitive to position (a swapped shard or
transposed block changes it), and additive over slices, so every TP worker checksums its own shard in place and the
engine adds the parts: no tensor is moved to verify. 32 bits, not 64: int32 words (one int32 dot product per chunk
on CPU) cost a fifth of int64 lanes per element, and a changed tensor still goes unnoticed with probability 2^-32.
"""
from __future__ import annotations

import math
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Iterable, Iterator, Optional, Protocol

import numpy as np
import torch

Bucket = list[tuple[str, torch.Tensor]]
TRANSPORTS = ("object_store", "gloo", "nccl", "ipc")
HOST_TRANSPORTS = ("object_store", "gloo")  # send from host memory; nccl and ipc send from the GPU where buckets are
CHECKSUM_MASK = (1 << 32) - 1  # checksums are 32-bit: int32 words cost a fifth of int64 lanes on CPU
ABORT_POLL_S = 1.0  # a gloo party blocked in an operation checks this often whether the driver aborted the sync
CHECKSUM_CHUNK = 1 << 19  # words per dot (bench_checksum.py --chunks, bf16: 2^18 0.033 s, 2^19-2^21 0.027 s)
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)  # odd 64-bit multiplier (only its low 32 bits matter), as a signed int64
_CHUNK_VECTORS: dict[tuple[bool, str], torch.Tensor] = {}  # (ones, device) -> _chunk_vector's cache
_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class WeightSyncError(RuntimeError):
    """A weight sync or its verification failed; the message names the engine, the version and the tensor."""


# ---------------------------------------------------------------------------------------------- checksums
def checksum_slice(t: torch.Tensor, full_shape: Iterable[int], dim: int = 0, start: int = 0,
                   chunk_elems: int = CHECKSUM_CHUNK) -> int:
    """Checksum contribution of `t`, the slice [start, start + t.shape[dim]) along `dim` of a tensor of
    `full_shape` (dim 0 for any rank, dim 1 for matrices). The whole tensor: `checksum_slice(t, t.shape)`."""
    return int(checksum_on_device(t, full_shape, dim, start, chunk_elems)) & CHECKSUM_MASK


def _chunk_vector(ones: bool, n: int, device: torch.device) -> torch.Tensor:
    """The first n words of a cached int32 vector (per device, at least a chunk long): the index weights
    (j * G + 1) mod 2^32, or with `ones` n ones (a chunk's sum mod 2^32 as a wrapping dot product)."""
    key = (ones, str(device))
    v = _CHUNK_VECTORS.get(key)
    if v is None or v.numel() < n:
        size = max(n, CHECKSUM_CHUNK)
        if ones:
            v = torch.ones(size, dtype=torch.int32, device=device)
        else:
            j = torch.arange(size, dtype=torch.int64, device=device)
            v = ((j * _GOLDEN + 1) & CHECKSUM_MASK).to(torch.int32)  # wraps into int32
        _CHUNK_VECTORS[key] = v
    return v[:n]


def _index_weights(n: int, device: torch.device) -> torch.Tensor:
    """(j * G + 1) mod 2^32 for j < n, as int32 (cached per device: the weights of one chunk)."""
    return _chunk_vector(False, n, device)


def _shifted_dot32(b: torch.Tensor, w: torch.Tensor, shift: int) -> torch.Tensor:
    """sum(b * (w + shift)) mod 2^32 (as int64) of two int32 vectors and a shift in [0, 2^32), off the CPU: CUDA has
    no integer dot, so the products wrap in int32 and their sum is exact in int64, plus b's sum times the shift.
    (On CPU checksum_on_device uses int32 dot products: torch's int32 sum first copies to int64, 60% of a checksum
    under torch.profiler.)"""
    return (b * w).sum() + b.sum() * shift


def checksum_on_device(t: torch.Tensor, full_shape: Iterable[int], dim: int = 0, start: int = 0,
                       chunk_elems: int = CHECKSUM_CHUNK) -> torch.Tensor:
    """checksum_slice as an int64 scalar on t's device, congruent to the checksum mod 2^32 (computed there; read it
    with `int(x) & CHECKSUM_MASK` when needed: a sender on GPU reads all its checksums once, at the end of a sync).
    A slice that is a word-aligned run of the full tensor's bytes (whole rows, the usual case) is read as int32 words:
    per chunk, one int32 dot product against cached index weights shifted by the chunk's offset (on GPU: against the
    weights, plus the chunk's sum times its offset; benchmarks/results/phase_overheads.md: int32 lanes cost a fifth
    of int64 ones on CPU). Other slices (TP column shards, odd-sized 16-bit rows) weigh each element by its word and
    its place in it."""
    full = tuple(int(s) for s in full_shape)
    t = t.detach()
    if t.dim() <= 1:
        rows, cols, cols_full, row0, col0 = 1, t.numel(), full[0] if full else 1, 0, start
    elif dim == 0:
        rows, cols = t.shape[0], t.numel() // max(t.shape[0], 1)
        cols_full, row0, col0 = cols, start, 0
    elif dim == 1 and t.dim() == 2:
        rows, cols, cols_full, row0, col0 = t.shape[0], t.shape[1], full[1], 0, start
    else:
        raise ValueError(f"checksum_slice: slices along dim {dim} of a {t.dim()}-d tensor are not supported")
    dev = t.device
    total = torch.zeros((), dtype=torch.int64, device=dev)
    if t.numel() == 0:
        return total
    size = t.element_size()
    bits = t.contiguous().reshape(-1).view(_BITS[min(size, 4)])  # flat first: a 0-d tensor cannot change width
    if size >= 4:  # elements are whole words (8-byte ones: two)
        unit = size // 4
        cols, cols_full, col0 = cols * unit, cols_full * unit, col0 * unit
        per = 1
    else:
        per = 4 // size  # elements per word
    base = row0 * cols_full + col0  # flat index of the slice's first element (or word)
    if cols == cols_full and base % per == 0 and bits.numel() % per == 0:  # whole words in the full tensor's order
        flat = bits.reshape(-1)
        try:
            words = flat.view(torch.int32)
        except RuntimeError:  # a view starting inside a word of its storage
            words = flat.clone().view(torch.int32)
        base //= per
        if dev.type == "cpu":  # Python ints: per chunk only its dot products (int32 lanes, wrapping), no temporaries
            acc = 0
            for s in range(0, words.numel(), chunk_elems):
                b = words[s:s + chunk_elems]
                # word j of the chunk has index base + s + j: weight (j*G + 1) + shift, shift = (base + s)*G, so its
                # sum is dot(b, w) + shift * sum(b), with sum(b) mod 2^32 as a dot against ones (b is in cache then)
                acc += int(torch.dot(b, _index_weights(b.numel(), dev)))
                shift = (base + s) * _GOLDEN & CHECKSUM_MASK
                if shift:
                    acc += shift * int(torch.dot(b, _chunk_vector(True, b.numel(), dev)))
            return torch.tensor(acc & CHECKSUM_MASK, dtype=torch.int64)
        for s in range(0, words.numel(), chunk_elems):
            b = words[s:s + chunk_elems]
            total += _shifted_dot32(b, _index_weights(b.numel(), dev), (base + s) * _GOLDEN & CHECKSUM_MASK)
        return total
    bits = bits.reshape(rows, cols)
    if per == 1:
        col_weight = ((torch.arange(cols, dtype=torch.int64, device=dev) * _GOLDEN) & CHECKSUM_MASK).to(torch.int32)
    step = max(1, chunk_elems // cols)
    for r in range(0, rows, step):
        b = bits[r:r + step].to(torch.int32)
        offsets = (torch.arange(r, r + b.shape[0], dtype=torch.int64, device=dev) + row0) * cols_full + col0
        if per == 1:
            # index of word (r, c) = offset_r + c: sum b * (c*G) + sum_r rowsum_r * (offset_r * G + 1), mod 2^32
            total += (b * col_weight).sum() + (b.sum(1) * (offsets * _GOLDEN + 1)).sum()
        else:
            # element i sits in word i // per at bit 8 * size * (i % per), its raw bits unsigned
            idx = offsets[:, None] + torch.arange(cols, dtype=torch.int64, device=dev)
            weight = (((idx // per) * _GOLDEN + 1) << (8 * size * (idx % per))) & CHECKSUM_MASK
            total += ((b & ((1 << 8 * size) - 1)) * weight.to(torch.int32)).sum()
    return total


def tensor_checksum(t: torch.Tensor, dtype: Optional[torch.dtype] = None) -> int:
    """Checksum of a whole tensor, cast to `dtype` (the engine's) first."""
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    return checksum_slice(t, t.shape)


def checksum_received(named: Iterable[tuple[str, torch.Tensor]], into: dict) -> dict:
    """Record {HF name: (shape, checksum)} of whole tensors as a receiver gets them (before or while it loads them),
    in the form the sender's checksums take: a sync compares the two with compare_checksums, with no second pass over
    the engine's weights. Used by every receiving path (gloo, object store, an in-process hand-off)."""
    for name, t in named:
        into[name] = (tuple(t.shape), checksum_slice(t, t.shape))
    return into


def combine_pieces(pieces: Iterable[dict]) -> dict[str, tuple[tuple[int, ...], int]]:
    """Per-worker slice checksums -> {HF name: (full shape, checksum)}. Replicated slices (a norm on every TP rank,
    KV heads shared by several ranks) count once; the slices of a name must tile its full length exactly."""
    by_name: dict[str, dict[tuple, dict]] = {}
    for p in pieces:
        by_name.setdefault(p["name"], {})[(p["dim"], p["start"], p["length"])] = p
    out = {}
    for name, slices in by_name.items():
        parts = sorted(slices.values(), key=lambda p: (p["dim"], p["start"]))
        dims = {p["dim"] for p in parts}
        full = tuple(parts[0]["full_shape"])
        if len(dims) != 1:
            raise WeightSyncError(f"{name}: engine shards split it along several dims {sorted(dims)}")
        (dim,) = dims
        covered = 0
        for p in parts:
            if p["start"] != covered:
                raise WeightSyncError(f"{name}: engine shards leave a gap or overlap at {covered} along dim {dim}")
            covered += p["length"]
        if covered != (full[dim] if full else 1):
            raise WeightSyncError(f"{name}: engine shards cover {covered} of {full[dim]} along dim {dim}")
        out[name] = (full, sum(p["checksum"] for p in parts) & CHECKSUM_MASK)
    return out


def compare_checksums(expected: dict[str, tuple], live: dict[str, tuple], where: str) -> None:
    """Raise WeightSyncError naming the first tensor (in the sender's order) whose shape or checksum differs."""
    for name, (shape, checksum) in expected.items():
        if name not in live:
            raise WeightSyncError(f"{where}: learner tensor {name} has no engine parameter "
                                  f"(engine names look like {sorted(live)[:3]})")
        if tuple(live[name][0]) != tuple(shape):
            raise WeightSyncError(f"{where}: {name} has shape {tuple(live[name][0])} in the engine, "
                                  f"{tuple(shape)} in the learner")
        if live[name][1] != checksum:
            raise WeightSyncError(f"{where}: checksum mismatch in {name} (engine {live[name][1]:#010x}, "
                                  f"learner {checksum:#010x})")
    extra = sorted(set(live) - set(expected))
    if extra:
        raise WeightSyncError(f"{where}: engine parameters with no learner tensor: {extra[:5]}")


def compare_probe(mine: list[float], reference: list[float], atol: float, where: str) -> float:
    """The largest |engine - learner| probe log-prob difference; raise WeightSyncError past `atol`. A NaN or inf on
    either side is a mismatch (a plain `diff > atol` is False for NaN, and max() of a list with NaN is unreliable)."""
    if len(mine) != len(reference):
        raise WeightSyncError(f"{where}: {len(mine)} probe log-probs from the engine, {len(reference)} from the "
                              f"learner")
    for i, (a, b) in enumerate(zip(mine, reference)):
        if not (math.isfinite(a) and math.isfinite(b)):
            raise WeightSyncError(f"{where}: probe log-prob at position {i + 1} is not finite (engine {a}, "
                                  f"learner {b})")
    diffs = [abs(a - b) for a, b in zip(mine, reference)]
    diff = max(diffs, default=0.0)
    if not diff <= atol:
        raise WeightSyncError(f"{where}: probe log-probs differ from the learner's by {diff:.3g} at position "
                              f"{diffs.index(diff) + 1} (tolerance {atol:g})")
    return diff


# ------------------------------------------------------------------------------------------- wire format
def to_numpy(t: torch.Tensor) -> tuple[np.ndarray, str]:
    """A CPU numpy view of `t` (bf16 travels as int16 bits) and the torch dtype name to restore it."""
    t = t.detach().cpu().contiguous()
    name = str(t.dtype).removeprefix("torch.")
    if t.dtype in (torch.bfloat16,) or name.startswith("float8"):
        return t.view(_BITS[t.element_size()]).numpy(), name
    return t.numpy(), name


def from_numpy(arr: np.ndarray, dtype_name: str) -> torch.Tensor:
    import warnings

    with warnings.catch_warnings():  # arrays from the object store are read-only; vLLM copies out of them
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(arr)
    dtype = getattr(torch, dtype_name)
    return t if t.dtype == dtype else t.view(dtype)


def iter_buckets(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[Bucket]:
    """Group (name, tensor) pairs into buckets of about `bucket_bytes` (one tensor larger than that is its own
    bucket)."""
    bucket: Bucket = []
    size = 0
    for name, t in named:
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += nbytes
    if bucket:
        yield bucket


def bucket_meta(bucket: Optional[Bucket]) -> bytes:
    """What the gloo receivers need to allocate one bucket, as JSON (data only: the store it travels through has no
    authentication, so nothing read from it may run code): {"tensors": [[name, shape, dtype name], ...]}. `None`:
    the end of the sync."""
    if bucket is None:
        return json.dumps({"end": True}).encode()
    return json.dumps({"tensors": [[name, list(t.shape), str(t.dtype).removeprefix("torch.")]
                                   for name, t in bucket]}).encode()


def parse_bucket_meta(raw: bytes, where: str) -> Optional[list[tuple[str, list[int], torch.dtype]]]:
    """bucket_meta's inverse: [(name, shape, dtype)], or None at the end. Anything else (not JSON, other keys, a
    dtype name that is not a torch dtype) is refused with WeightSyncError; nothing is ever unpickled."""
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise WeightSyncError(f"{where}: bucket metadata is not JSON ({raw[:16]!r}...); refused") from None
    if meta == {"end": True}:
        return None

    def entry(item) -> tuple[str, list[int], torch.dtype]:
        name, shape, dtype_name = item
        dtype = getattr(torch, dtype_name, None) if isinstance(dtype_name, str) else None
        if not (isinstance(name, str) and isinstance(dtype, torch.dtype) and isinstance(shape, list)
                and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise ValueError(item)
        return name, shape, dtype

    try:
        if not (isinstance(meta, dict) and list(meta) == ["tensors"] and isinstance(meta["tensors"], list)):
            raise ValueError(meta)
        return [entry(item) for item in meta["tensors"]]
    except (TypeError, ValueError):
        raise WeightSyncError(f"{where}: malformed bucket metadata {raw[:80]!r}; refused") from None


def meta_key(sync_id: str, bucket: int) -> str:
    """Store key of a sync's bucket metadata (bucket = the count of buckets: the end marker)."""
    return f"{sync_id}/b{bucket}"


# -------------------------------------------------------------------------------------------------- plan
@dataclass
class SyncPlan:
    """Everything a sender and the receiving engines must agree on for one sync (picklable)."""

    version: int
    transport: str
    dtype: str  # the engines' dtype: tensors are cast to it before checksum and transfer
    bucket_bytes: int
    engines: list = field(default_factory=list)  # actor handles of the target engines (object_store, nccl, ipc)
    world_size: int = 1  # 1 sender + every worker of every target engine (gloo, nccl)
    host: str = ""  # gloo: the driver's TCPStore; nccl: the sender's rendezvous address
    port: int = 0
    timeout_s: float = 600.0
    sync_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    channel: str = ""  # gloo, nccl, ipc: the transfer group this sync uses (TransferChannel.id), kept across syncs
    new_channel: bool = True  # every party creates its end of the channel in this sync (else: reuses it)
    verify: bool = True  # receivers checksum what they receive (generation.verify_weights)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def resolve_transport(name: str, cuda: bool) -> str:
    """'auto' -> nccl on GPU, gloo on CPU. GPU transports on a CPU machine are an error, not a silent fallback."""
    if name == "auto":
        return "nccl" if cuda else "gloo"
    if name not in TRANSPORTS:
        raise ValueError(f"unknown weight-sync transport {name!r}; choose auto or one of {', '.join(TRANSPORTS)}")
    if name in ("nccl", "ipc") and not cuda:
        raise ValueError(f"weight-sync transport {name!r} needs CUDA; use 'gloo' or 'object_store' on CPU")
    return name


def gloo_group(host: str, port: int, rank: int, world_size: int, channel: str, timeout_s: float):
    """A standalone gloo process group and its key-value store (a client of the driver's TCPStore). It touches no
    global torch.distributed state, so it coexists with DeepSpeed's world and vLLM's own groups."""
    import torch.distributed as dist

    timeout = timedelta(seconds=timeout_s)
    store = dist.PrefixStore(f"rlhf_sync/{channel}/", dist.TCPStore(host, port, None, False, timeout=timeout))
    return dist.ProcessGroupGloo(dist.PrefixStore("pg/", store), rank, world_size, timeout), store


def wait_unless_aborted(work, store, timeout_s: float) -> None:
    """Wait for a gloo operation, checking between short slices that the channel's store (the driver's) still
    answers: the driver drops it to abort a sync (a party died), and a live party blocked in an operation with a peer
    that gave up (its sockets still open) then fails within a slice instead of at the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            work.wait(timedelta(seconds=ABORT_POLL_S))
            return
        except RuntimeError as e:
            if "timed out" not in str(e).lower() or time.monotonic() > deadline:
                raise
        store.check(["aborted"])  # raises once the driver has dropped the store


# ------------------------------------------------------------------------------------------------ channels
_CHANNELS: dict[str, Any] = {}  # per process: its end of each open transfer channel (gloo (pg, store), NCCL comm)
_RECEIVING: set[str] = set()  # the channels this process receives on (an engine worker: one at a time)
_PARKED: list[tuple[float, Any]] = []  # (when their posted operations have timed out, end) of broken channels


def channel_end(plan: SyncPlan, create: Callable[[], Any], receiver: bool = False) -> tuple[Any, bool]:
    """This process's end of plan.channel, and whether this call created it. A plan that opens a channel creates it
    (a `receiver` closes its end of the channel it received on before: the driver replaced that one); a plan that
    reuses one finds it here, or fails naming it."""
    end = _CHANNELS.get(plan.channel)
    if end is not None:
        return end, False
    if not plan.new_channel:
        raise WeightSyncError(f"process {os.getpid()}: transfer channel {plan.channel} is not open here (the process "
                              f"was restarted, or an earlier sync failed); the next sync opens a new one")
    if receiver:
        for other in list(_RECEIVING):
            close_channel(other)
        _RECEIVING.add(plan.channel)
    end = _CHANNELS[plan.channel] = create()
    return end, True


def close_channel(channel: str, broken_timeout_s: Optional[float] = None) -> bool:
    """Release this process's end of `channel` (False: it held none). A broken one (`broken_timeout_s`: an operation
    on it failed or was aborted, others may still be posted) is parked instead: destroying a gloo group waits until
    its posted operations time out, which would keep this process (an engine actor) from its next call."""
    now = time.monotonic()
    _PARKED[:] = [(until, end) for until, end in _PARKED if until > now]  # timed out by now: dropped at once
    _RECEIVING.discard(channel)
    end = _CHANNELS.pop(channel, None)
    if broken_timeout_s is not None and end is not None:
        _PARKED.append((now + broken_timeout_s + 5.0, end))
        return True
    destroy = getattr(end, "destroy", None)  # vLLM's PyNcclCommunicator; a gloo group closes when dropped
    if callable(destroy):
        destroy()
    return end is not None


@dataclass
class TransferChannel:
    """The driver's record of one transfer group (the sender and every worker of the target engines). It is opened
    once and used by every sync until its key changes (another transport or timeout, other engines, an engine that
    restarted: a new process, another sending process) or a sync on it fails; each party keeps its end across syncs.
    gloo: the driver hosts the rendezvous TCPStore, which also carries the bucket metadata, while the channel lives."""

    key: tuple
    source: Any  # the WeightSource whose process holds the sender's end
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    store: Any = None
    host: str = ""
    port: int = 0
    syncs: int = 0

    @classmethod
    def open(cls, key: tuple, source, transport: str, timeout_s: float) -> "TransferChannel":
        channel = cls(key, source)
        if transport == "gloo":
            import torch.distributed as dist

            channel.store = dist.TCPStore(local_ip(), 0, None, True, wait_for_workers=False,
                                          timeout=timedelta(seconds=timeout_s))
            channel.host, channel.port = local_ip(), channel.store.port
        elif transport == "nccl":
            channel.host, channel.port = source.endpoint()  # the sender's node: it hosts the NCCL rendezvous
        return channel

    def attach(self, plan: SyncPlan) -> None:
        """Point a sync's plan at this channel (the first sync creates every end)."""
        plan.channel, plan.new_channel, plan.host, plan.port = self.id, self.syncs == 0, self.host, self.port
        self.syncs += 1

    def sync_done(self, plan: SyncPlan, buckets: int) -> None:
        """Every receiver has read the sync's metadata: drop it from the store."""
        if self.store is not None:
            for n in range(buckets + 1):
                self.store.delete_key(f"rlhf_sync/{self.id}/{meta_key(plan.sync_id, n)}")

    def abort(self) -> None:
        """A party died mid-sync: drop the rendezvous store now, so everyone still waiting on it (a new group's
        rendezvous, the next bucket's metadata) fails at once. close() follows once the sender has returned."""
        self.store = None

    def close(self) -> None:
        """Release the sender's end and the store (receivers still waiting on it fail at once instead of after the
        timeout). Engines drop their end when the next channel opens, or with their process."""
        self.store = None
        try:
            self.source.close_channel(self.id)
        except Exception as e:  # the sender's process may be gone; nothing of the channel is used again
            import logging

            logging.getLogger(__name__).warning("closing transfer channel %s on the sender: %s", self.id, e)


# ------------------------------------------------------------------------------------------------ sender
_SENDERS: dict[str, "_SenderState"] = {}  # per process: the live state of each sync this process sends


@dataclass
class _SenderState:
    plan: SyncPlan
    started: float = field(default_factory=time.perf_counter)
    buckets: int = 0
    bytes: int = 0
    max_bucket_bytes: int = 0
    checksum_s: float = 0.0  # computing the sender-side checksums
    transfer_s: float = 0.0  # handing buckets to the transport until the engines have them
    checksums: dict[str, tuple[tuple[int, ...], Any]] = field(default_factory=dict)  # checksum: on the tensors' device
    channel: Any = None  # this process's end of plan.channel: gloo (pg, store); nccl: communicator
    new_group: bool = False  # this sync created it


class BucketSender:
    """Callable run where buckets are produced (learner rank 0, or the driver): `sender(bucket)` per bucket, then
    `close_sender(plan.sync_id)` in the same process for the stats and the sender-side checksums."""

    def __init__(self, plan: SyncPlan, verify: bool = True):
        self.plan, self.verify = plan, verify

    def __call__(self, bucket: Bucket) -> None:
        state = _SENDERS.get(self.plan.sync_id)
        if state is None:
            state = _SENDERS[self.plan.sync_id] = _SenderState(self.plan)
        dtype = self.plan.torch_dtype
        bucket = [(name, t.detach().to(dtype)) for name, t in bucket]
        started = time.perf_counter()
        # Host transports return while the bucket is in flight (gloo's threads send it, the engines load it): the
        # checksums are computed meanwhile. GPU transports checksum on the device first (kernels queued in order).
        try:
            pending = getattr(self, f"_send_{self.plan.transport}")(state, bucket)
            sent = time.perf_counter()
            if self.verify:  # on the tensors' device (a GPU learner's buckets stay there); read once, in close_sender
                for name, t in bucket:
                    state.checksums[name] = (tuple(t.shape), checksum_on_device(t, t.shape))
            checked = time.perf_counter()
            if pending is not None:
                pending()
        except BaseException:  # a receiver died, or the driver aborted the sync: this group is not used again
            close_channel(self.plan.channel, broken_timeout_s=self.plan.timeout_s)
            raise
        nbytes = sum(t.numel() * t.element_size() for _, t in bucket)
        state.checksum_s += checked - sent
        state.transfer_s += (sent - started) + (time.perf_counter() - checked)
        state.buckets += 1
        state.bytes += nbytes
        state.max_bucket_bytes = max(state.max_bucket_bytes, nbytes)

    def _send_object_store(self, state: _SenderState, bucket: Bucket) -> Callable[[], None]:
        import ray

        ref = ray.put([(name, *to_numpy(t)) for name, t in bucket])
        loading = [engine.receive_bucket.remote(ref) for engine in self.plan.engines]
        return lambda: ray.get(loading)  # one bucket in flight: the caller waits before making the next

    def _send_gloo(self, state: _SenderState, bucket: Bucket) -> Callable[[], None]:
        plan = self.plan
        if state.channel is None:
            state.channel, state.new_group = channel_end(
                plan, lambda: gloo_group(plan.host, plan.port, 0, plan.world_size, plan.channel, plan.timeout_s))
        pg, store = state.channel
        bucket = [(name, t.cpu().contiguous()) for name, t in bucket]
        store.set(meta_key(plan.sync_id, state.buckets), bucket_meta(bucket))
        works = [pg.broadcast(t, 0) for _, t in bucket]  # queued on the group's threads, sent in order
        return lambda: [wait_unless_aborted(w, store, plan.timeout_s) for w in works]

    def _send_nccl(self, state: _SenderState, bucket: Bucket) -> None:
        import ray
        from vllm.distributed.weight_transfer.nccl_common import trainer_init

        plan = self.plan
        if state.channel is None:  # a new channel: the workers join in init_weight_transfer_engine (VLLMEngine)
            state.channel, state.new_group = channel_end(plan, lambda: trainer_init(
                {"master_address": plan.host, "master_port": plan.port, "world_size": plan.world_size}))
        info = {"names": [n for n, _ in bucket], "shapes": [list(t.shape) for _, t in bucket],
                "dtype_names": [str(t.dtype).removeprefix("torch.") for _, t in bucket]}
        receiving = [engine.update_weights.remote(info) for engine in plan.engines]  # receive while we broadcast
        for _, t in bucket:  # a GPU learner's buckets are already on its device: no copy
            state.channel.broadcast(t.cuda().contiguous(), src=0, stream=torch.cuda.current_stream())
        torch.cuda.current_stream().synchronize()
        ray.get(receiving)

    def _send_ipc(self, state: _SenderState, bucket: Bucket) -> None:
        import ray
        from torch.multiprocessing.reductions import reduce_tensor

        uuid_ = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
        keep = [t.cuda().contiguous() for _, t in bucket]  # alive until every engine has loaded them
        info = {"names": [n for n, _ in bucket], "dtype_names": [str(t.dtype).removeprefix("torch.") for t in keep],
                "shapes": [list(t.shape) for t in keep], "ipc_handles": [{uuid_: reduce_tensor(t)[1]} for t in keep]}
        torch.cuda.synchronize()
        ray.get([engine.update_weights.remote(info) for engine in self.plan.engines])
        del keep


def close_sender(sync_id: str) -> dict:
    """End a sync in the sending process: tell gloo receivers there are no more buckets and return the stats and the
    sender-side checksums ({} when the source sent nothing). The channel stays open for the next sync."""
    state = _SENDERS.pop(sync_id, None)
    if state is None:
        return {"buckets": 0, "bytes": 0, "max_bucket_bytes": 0, "checksums": {}, "seconds": 0.0,
                "checksum_s": 0.0, "transfer_s": 0.0, "new_group": False}
    if state.plan.transport == "gloo" and state.channel is not None:
        state.channel[1].set(meta_key(sync_id, state.buckets), bucket_meta(None))
    values = torch.stack([c for _, c in state.checksums.values()]).tolist() if state.checksums else []  # one read
    checksums = {name: (shape, v & CHECKSUM_MASK) for (name, (shape, _)), v in zip(state.checksums.items(), values)}
    return {"buckets": state.buckets, "bytes": state.bytes, "max_bucket_bytes": state.max_bucket_bytes,
            "checksums": checksums, "seconds": time.perf_counter() - state.started,
            "checksum_s": state.checksum_s, "transfer_s": state.transfer_s, "new_group": state.new_group}


# ------------------------------------------------------------------------------------------------ receiver
def gloo_receive(plan: SyncPlan, rank: int, load: Callable[[Bucket], Any],
                 on_arrival: Optional[Callable[[Bucket], Any]] = None) -> dict:
    """Receiver side of the gloo transport (runs inside a vLLM worker): join the channel's group as `rank` (or reuse
    it), receive every bucket the sender announces in the store and hand it to `load`. `on_arrival` gets each tensor
    as soon as it has arrived, while the rest of its bucket is still coming (the worker checksums it there:
    checksum_received). Returns the number of buckets and whether this sync created the group. A failure closes
    this end: the next sync opens a new channel."""
    where = f"sync {plan.sync_id}, receiver rank {rank} (pid {os.getpid()})"
    try:
        (pg, store), created = channel_end(plan, lambda: gloo_group(plan.host, plan.port, rank, plan.world_size,
                                                                    plan.channel, plan.timeout_s), receiver=True)
        n = 0
        while (meta := parse_bucket_meta(store.get(meta_key(plan.sync_id, n)), where)) is not None:
            bucket = [(name, torch.empty(shape, dtype=dtype)) for name, shape, dtype in meta]
            works = [pg.broadcast(t, 0) for _, t in bucket]  # all posted: gloo's threads receive in order
            for item, work in zip(bucket, works):
                wait_unless_aborted(work, store, plan.timeout_s)
                if on_arrival is not None:
                    on_arrival([item])
            load(bucket)
            n += 1
        return {"buckets": n, "new_group": created}
    except BaseException:
        close_channel(plan.channel, broken_timeout_s=plan.timeout_s)
        raise


# ------------------------------------------------------------------------------------------------ sources
class WeightSource(Protocol):
    """What a generator group syncs from."""

    def push(self, sender: BucketSender, bucket_bytes: int) -> dict:
        """Stream every weight into `sender` in buckets, then return close_sender()'s stats from where it ran."""

    def probe_logprobs(self, token_ids: list[int]) -> list[float]:
        """log p(token_ids[t+1] | token_ids[:t+1]) under the source's current weights at temperature 1, as vLLM's
        prompt log-probs (VLLMEngine.probe_logprobs) whatever generation.temperature is (len(token_ids) - 1 values)."""

    def endpoint(self) -> tuple[str, int]:
        """An address and a free port on the node where the sender runs (NCCL rendezvous)."""

    def sender_key(self) -> tuple:
        """Which process sends (its end of a transfer channel lives there): another key opens another channel."""

    def close_channel(self, channel: str) -> None:
        """Release the sending process's end of a transfer channel."""


def lora_merged_parameters(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) of a transformers model, peft LoRA layers merged into their base weights, tied weights
    once. Nothing in `model` changes."""
    lora_modules = {name: m for name, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if ".lora_" in name or id(p) in seen:
            continue
        seen.add(id(p))
        t = p.detach()
        if ".base_layer." in name:
            mod_name = name.split(".base_layer.")[0]
            module = lora_modules[mod_name]
            if name.endswith(".weight"):
                for adapter in module.active_adapters:
                    t = t + module.get_delta_weight(adapter).to(t.dtype)
            name = name.replace(".base_layer.", ".")
        yield name.replace("base_model.model.", "", 1), t


class ModelSource:
    """A transformers model in this process as the source (tests, tools, learner-less setups)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    @property
    def dtype(self) -> str:
        """What the probe log-probs are computed in (the probe tolerance follows it)."""
        return str(next(self.model.parameters()).dtype).removeprefix("torch.")

    def push(self, sender: BucketSender, bucket_bytes: int) -> dict:
        try:
            for bucket in iter_buckets(lora_merged_parameters(self.model), bucket_bytes):
                sender(bucket)
        except BaseException:
            close_sender(sender.plan.sync_id)
            raise
        return close_sender(sender.plan.sync_id)

    @torch.no_grad()
    def probe_logprobs(self, token_ids: list[int]) -> list[float]:
        ids = torch.tensor([token_ids])
        logits = self.model(input_ids=ids).logits[0, :-1].float()
        return torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None])[:, 0].tolist()

    def endpoint(self) -> tuple[str, int]:
        import socket

        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def sender_key(self) -> tuple:
        return ("process", os.getpid())  # push runs here

    def close_channel(self, channel: str) -> None:
        close_channel(channel)


def _close_on_worker(worker, sync_id: str) -> dict:
    return close_sender(sync_id)


def _close_channel_on_worker(worker, channel: str) -> bool:
    return close_channel(channel)


class LearnerSource:
    """A learner group (rlhf_ray.learner.PolicyGroup) as the source: every ZeRO rank gathers, rank 0 sends."""

    def __init__(self, group):
        self.group = group

    @property
    def dtype(self) -> Optional[str]:
        """What the learner ranks reported computing in (the probe tolerance follows it)."""
        return getattr(self.group, "dtype", None)

    def push(self, sender: BucketSender, bucket_bytes: int) -> dict:
        import ray

        try:  # GPU transports send from the device: buckets are not copied to the host (nor checksummed there)
            self.group.run("export_params", bucket_bytes, False, sender,
                           to_cpu=sender.plan.transport in HOST_TRANSPORTS)
        finally:
            stats = ray.get(self.group.workers[0].apply.remote(_close_on_worker, sender.plan.sync_id))
        return stats

    def probe_logprobs(self, token_ids: list[int]) -> list[float]:
        ids = torch.tensor([token_ids])
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        return self.group.logprobs(batch, temperature=1.0)[0].tolist()  # T = 1, as the engines' prompt log-probs

    def endpoint(self) -> tuple[str, int]:
        import ray

        rank0 = self.group.workers[0]
        (_, ip), port = ray.get([rank0.node_info.remote(), rank0.pick_master_port.remote()])
        return ip, port

    def sender_key(self) -> tuple:
        return ("actor", self.group.workers[0]._actor_id.hex())  # rank 0 sends

    def close_channel(self, channel: str) -> None:
        import ray

        if self.group.workers:  # a learner group already shut down took its end with it
            ray.get(self.group.workers[0].apply.remote(_close_channel_on_worker, channel), timeout=60)


def probe_token_ids(vocab_size: int, length: int, seed: int = 1234) -> list[int]:
    """The fixed probe sequence every version is checked on (ids drawn once from a seeded generator)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (length,), generator=g).tolist()


# Engine vs learner probe log-prob tolerance by dtype. Different kernels agree to ~2e-5 in fp32. bf16 logits keep 8
# significant bits (a logit near 20 rounds to 0.125), so the error grows with |log-prob| (random probe tokens: 7-30
# nats). Measured (bf16 engine, bf16 source, 16-64 token probe): tiny Llama 0.03 fresh, 0.11 after 14 PPO steps;
# SmolLM2-135M 0.23-0.31 (0.42 from an fp32 source), while an engine one version behind (weights 0.01 apart) is off
# by 1.65 (tiny) and 4.9 (SmolLM2). fp16 keeps 3 bits more.
PROBE_ATOL = {"float32": 1e-3, "float16": 0.1, "bfloat16": 1.0}


def default_probe_atol(*dtypes: Optional[str]) -> float:
    """Engine vs learner log-prob tolerance for the dtypes in use on both ends (as the workers reported them): the
    loosest of theirs (PROBE_ATOL; an unknown dtype, None, counts as bf16)."""
    return max(PROBE_ATOL.get(d or "bfloat16", PROBE_ATOL["bfloat16"]) for d in dtypes)


def local_ip() -> str:
    import ray

    return ray.util.get_node_ip_address() if ray.is_initialized() else os.environ.get("MASTER_ADDR", "127.0.0.1")
