"""PPO run checkpoints: one folder per iteration, written atomically, the last K kept.

    <run>/checkpoints/iter_000004/   complete or absent (written to a temporary sibling, then renamed)
        controller.json              iteration, data position, KL controller, RNG states, weight version (JSON)
        actor/ critic/               each learner group's DeepSpeed checkpoint (model, optimizer, scheduler)
Learner actors write their parts straight into the temporary folder, so the run folder must be on storage every
node sees (a shared file system on multi-node clusters).
"""
from __future__ import annotations

import json
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


CONTROLLER_STATE = "controller.json"


def rng_state() -> dict:
    """The driver's Python, NumPy and torch RNG states as plain JSON data (lists of ints), no pickle."""
    import numpy as np

    version, python_keys, gauss = random.getstate()
    kind, numpy_keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(python_keys), gauss],
            "numpy": [kind, numpy_keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "torch": torch.get_rng_state().tolist()}


def set_rng_state(state: dict) -> None:
    import numpy as np

    version, python_keys, gauss = state["python"]
    random.setstate((version, tuple(python_keys), gauss))
    kind, numpy_keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(numpy_keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def write_controller_state(folder: str | Path, state: dict) -> Path:
    """The PPO controller's state as JSON in a checkpoint folder (data only: loading it runs no code)."""
    path = Path(folder) / CONTROLLER_STATE
    path.write_text(json.dumps(state))
    return path


def read_controller_state(folder: str | Path) -> dict:
    path = Path(folder) / CONTROLLER_STATE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RuntimeError(f"checkpoint {folder}: cannot read the controller state {path.name} ({e}); remove this "
                           f"incomplete or foreign checkpoint folder, or resume from another one") from None
