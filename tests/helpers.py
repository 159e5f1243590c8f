"""Helpers shared by test modules (plain functions; fixtures live in conftest.py)."""
import torch


def perturbed(path: str, seed: int, scale: float = 0.05):
    """The fixture model with every weight moved: a new version whose greedy output differs."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def run_ranks(target, world: int, timeout_s: float = 180.0) -> list:
    """`target(rank, world, port, queue)` in `world` spawned processes (one torch.distributed rank each, rendezvous on
    a free local port); returns what each put on the queue, sorted (put (rank, ...) tuples)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(rank, world, port, queue)) for rank in range(world)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=timeout_s) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    return results
