"""PPO run checkpoints: one folder per iteration, written atomically, the last K kept.

    <run>/checkpoints/iter_000004/   complete or absent (written to a temporary sibling, then renamed)
        controller.pt                iteration, data position, KL controller, RNG states, weight version
        actor/ critic/               each learner group's DeepSpeed checkpoint (model, optimizer, scheduler)
Learner actors write their parts straight into the temporary folder, so the run folder must be on storage every
node sees (a shared file system on multi-node clusters).
"""
from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch

from rlhf_ray.io import atomic_directory

_NAME = re.compile(r"^iter_(\d{6})$")


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int = 2):
        self.root = Path(root)
        self.keep_last = keep_last

    def all(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and _NAME.match(p.name))

    def latest(self) -> Optional[Path]:
        found = self.all()
        return found[-1] if found else None

    def save(self, iteration: int, write: Callable[[Path], None]) -> Path:
        """`write(folder)` fills a temporary folder; it becomes iter_<iteration> only when complete."""
        final = self.root / f"iter_{iteration:06d}"
        with atomic_directory(final) as tmp:
            write(tmp)
        for old in self.all()[:-self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        return final


def rng_state() -> dict:
    import numpy as np

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
