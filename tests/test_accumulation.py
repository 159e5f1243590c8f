"""deepspeed.grad_reduction: ZeRO-2's gradient reduced in every micro-batch's backward or once per optimizer step
(train.accumulation.StepWindow over DeepSpeed's coalesce_grad_reduction), on two real CPU ranks of DeepSpeed."""
from __future__ import annotations

import pytest

from rlhf_ray.config import load_config
from rlhf_ray.train.deepspeed_config import reduces_once_per_step

MICRO, STEPS = 3, 2  # micro-batches per optimizer step, optimizer steps


def _stage(mode: str, zero_stage: int = 2):
    return load_config(None, {"sft.deepspeed.grad_reduction": mode, "sft.deepspeed.zero_stage": zero_stage}).sft


def test_auto_reduces_once_per_step_on_cpu_and_per_micro_batch_on_gpu():
    assert reduces_once_per_step(_stage("auto").deepspeed, 2, cuda=False)
    assert not reduces_once_per_step(_stage("auto").deepspeed, 2, cuda=True)
    assert reduces_once_per_step(_stage("per_step").deepspeed, 2, cuda=True)
    assert not reduces_once_per_step(_stage("per_micro_batch").deepspeed, 2, cuda=False)
    # only ZeRO-2 over several ranks has the choice: one rank runs stage 0, ZeRO-1 reduces per step anyway, ZeRO-3 per
    # micro-batch (auto there; per_step with ZeRO-3 is refused at load: tests/test_config.py)
    assert not reduces_once_per_step(_stage("per_step").deepspeed, 1, cuda=False)
    assert not reduces_once_per_step(_stage("per_step", 1).deepspeed, 2, cuda=False)
    assert not reduces_once_per_step(_stage("auto", 3).deepspeed, 2, cuda=False)


def _rank(rank: int, world: int, port: int, queue) -> None:
    import os

    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    try:
        import deepspeed

        from rlhf_ray.train.accumulation import StepWindow
        from rlhf_ray.train.deepspeed_config import deepspeed_config

        deepspeed.init_distributed(dist_backend="gloo")
        results = {}
        for precision, mode in [(p, m) for p in ("fp32", "bf16") for m in ("per_micro_batch", "per_step")]:
            # bf16 on CPU: autocast over fp32 weights (deepspeed_config.autocast_bf16), DeepSpeed's torch_autocast
            cfg = load_config(None, {"sft.deepspeed.grad_reduction": mode, "sft.deepspeed.precision": precision,
                                     "sft.deepspeed.micro_batch_size": 2, "sft.num_workers": world,
                                     "sft.deepspeed.global_batch_size": 2 * MICRO * world,
                                     "sft.optim.grad_clip": 1.0})
            ds = deepspeed_config(cfg.sft, world, cuda=False)
            ds["zero_optimization"]["reduce_bucket_size"] = 2000  # several buckets per backward, as on a real model
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
            initial = [p.detach().clone() for p in model.parameters()]
            engine, *_ = deepspeed.initialize(model=model, config=ds,
                                              optimizer=torch.optim.SGD(model.parameters(), lr=0.5))
            reductions = 0
            reduce = engine.optimizer.reduce_ipg_grads

            def counted(*args, **kwargs):  # observes DeepSpeed's reductions; they run unchanged
                nonlocal reductions
                reductions += 1
                return reduce(*args, **kwargs)

            engine.optimizer.reduce_ipg_grads = counted
            g = torch.Generator().manual_seed(100 + rank)
            for _ in range(STEPS):
                with StepWindow(engine, once_per_step=mode == "per_step") as window:
                    for i in range(MICRO):
                        x = torch.randn(2, 32, generator=g)
                        window.backward(engine(x).pow(2).mean(), last=i == MICRO - 1)
                engine.step()
            results[precision, mode] = {"reductions": reductions, "steps": engine.global_steps,
                                        "params": [p.detach().clone() for p in engine.module.parameters()]}
            engine.destroy()
        out = {}
        for precision in ("fp32", "bf16"):
            a, b = results[precision, "per_micro_batch"]["params"], results[precision, "per_step"]["params"]
            out[precision] = {"diff": max(float((x - y).abs().max()) for x, y in zip(a, b)),
                              "moved": max(float((x - y).abs().max()) for x, y in zip(b, initial)),
                              **{m: (results[precision, m]["reductions"], results[precision, m]["steps"])
                                 for m in ("per_micro_batch", "per_step")}}
        queue.put((rank, out))
    except Exception as e:  # reported to the test instead of hanging it
        queue.put((rank, repr(e)))


def test_once_per_step_reduces_once_and_updates_as_per_micro_batch():
    from helpers import run_ranks

    for rank, out in run_ranks(_rank, 2):
        assert isinstance(out, dict), (rank, out)
        for precision, got in out.items():
            (hooks, hook_steps), (coalesced, coalesced_steps) = got["per_micro_batch"], got["per_step"]
            assert hook_steps == coalesced_steps == STEPS, got  # one optimizer step per window, both ways
            # every backward reduces its buckets; coalesced, only the step's last closing does (2000-element buckets)
            assert hooks >= STEPS * MICRO and coalesced < hooks, got
            # the same update: the micro-batches' summed gradients, reduced once instead of one by one (SGD: the
            # update is the gradient; bf16: autocast gradients are reduced in bf16 and the weights differ by ~1 ulp)
            tolerance = 1e-6 if precision == "fp32" else 2 ** -6 * got["moved"]  # a micro-batch left out: ~1/3
            assert got["moved"] > 1e-3 and got["diff"] < tolerance, (rank, precision, got)
