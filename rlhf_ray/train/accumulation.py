"""One optimizer step's micro-batches on a DeepSpeed engine, its gradient reduced per micro-batch or once per step.

    with StepWindow(engine, once_per_step) as window:
        for i, micro in enumerate(micro_batches):
            window.backward(loss_of(micro), last=i == len(micro_batches) - 1)
    engine.step()  # the optimizer step (DeepSpeed applies it at the accumulation boundary)

ZeRO-2 reduces the gradient in every micro-batch's backward, so each rank keeps only its partition. once_per_step
(deepspeed.grad_reduction, train.deepspeed_config.reduces_once_per_step) runs the window inside DeepSpeed's
`engine.coalesce_grad_reduction()`: the backwards accumulate whole gradients locally and one reduction runs when the
window closes. SFT and RM (train.common) and the PPO learners (learner.py) share this.
"""
from __future__ import annotations

import contextlib


class StepWindow:
    def __init__(self, engine, once_per_step: bool):
        self.engine, self.once_per_step = engine, once_per_step
        self._coalesce: contextlib.AbstractContextManager = contextlib.nullcontext()

    def __enter__(self) -> "StepWindow":
        if self.once_per_step:
            try:
                self._coalesce = self.engine.coalesce_grad_reduction()
                self._coalesce.__enter__()
            except NotImplementedError as e:  # an optimizer wrapper DeepSpeed cannot coalesce
                raise ValueError(f"deepspeed.grad_reduction per_step: DeepSpeed cannot coalesce this engine's "
                                 f"gradient reduction ({e}); set grad_reduction to per_micro_batch") from e
        return self

    def backward(self, loss, last: bool) -> None:
        """Backward of one micro-batch; `last`: the window's final one (the accumulation boundary)."""
        engine = self.engine
        if self.once_per_step:
            # the engine's micro-step counter advances only at step(), once per window: the boundary is said outright
            engine.set_gradient_accumulation_boundary(last)
            engine.backward(loss)
            return
        engine.backward(loss)
        if not last:
            engine.step()  # counts the micro-batch; DeepSpeed applies nothing before the boundary

    def __exit__(self, *exc) -> bool:
        suppressed = bool(self._coalesce.__exit__(*exc))  # coalesced: the one reduction of the window's gradients
        if self.once_per_step:
            # DeepSpeed puts back the boundary flag the window opened with; the step after it is the boundary
            self.engine.set_gradient_accumulation_boundary(True)
        return suppressed
