"""Per-iteration metrics: console (tqdm with ETA), metrics.jsonl, TensorBoard, W&B when configured, and a PNG.

One `MetricsLogger.log(step, metrics)` call fans out to every sink, every logging.log_every steps and at the last
one (the progress bar moves every step). The JSONL file is the record the tests and the plots read; TensorBoard and
W&B are for people watching a run.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)


class MetricsLogger:
    def __init__(self, out_dir: str | Path, *, filename: str = "metrics.jsonl", tensorboard: bool = True,
                 wandb_project: Optional[str] = None, run_name: str = "rlhf", config: Optional[dict] = None,
                 total_steps: Optional[int] = None, initial_step: int = 0, append: bool = False, log_every: int = 1):
        self.out_dir = Path(out_dir)
        self.log_every, self.total_steps = log_every, total_steps
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / filename
        if not append and self.path.exists():
            self.path.unlink()
        if append and self.path.exists():  # resumed at initial_step: rows a crashed run logged after it are redone
            kept = [line for line in self.path.read_text().splitlines(keepends=True)
                    if line.strip() and json.loads(line)["iteration"] <= initial_step]
            self.path.write_text("".join(kept))
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard hides older events at steps >= it (all of a previous run's when starting fresh)
            self.tb = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"),
                                    purge_step=initial_step + 1 if append else 0)
        self.wandb = None
        if wandb_project:
            import wandb  # optional: only when logging.wandb_project is set

            self.wandb = wandb.init(project=wandb_project, name=run_name, config=config or {}, resume="allow")
        self.bar = None
        if total_steps:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, desc=run_name, unit="iter", dynamic_ncols=True)

    @classmethod
    def from_config(cls, cfg, out_dir: str | Path, **kwargs) -> "MetricsLogger":
        """The logger the config's logging.* section describes (kwargs: total_steps, initial_step, append)."""
        lg = cfg.logging
        return cls(out_dir, filename=lg.metrics_file, tensorboard=lg.tensorboard, wandb_project=lg.wandb_project,
                   run_name=cfg.run.name, log_every=lg.log_every, **kwargs)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if step % self.log_every and step != self.total_steps:
            if self.bar is not None:
                self.bar.update(1)
            return
        record = {"iteration": step, **{k: _plain(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        numeric = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "iteration"}
        if self.tb is not None:
            for key, value in numeric.items():
                self.tb.add_scalar(key, value, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(numeric, step=step)
        summary = {k: numeric[k] for k in ("reward/mean", "kl/mean", "loss/policy", "time/iteration_s") if k in numeric}
        if self.bar is not None:
            self.bar.set_postfix({k.split("/")[0] if k != "time/iteration_s" else "s": f"{v:.3g}"
                                  for k, v in summary.items()})
            self.bar.update(1)
        else:
            log.info("iteration %d: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in summary.items()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no nan/inf; keep the fact visible
    return value


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


SUMMARY_WINDOW = 3  # iterations averaged at each end of a run: first-3 vs last-3


def _points(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["iteration"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]


def first_last_means(rows: list[dict], key: str, n: int = SUMMARY_WINDOW) -> Optional[tuple[float, float]]:
    """Mean of `key` over the first n and over the last n logged iterations (None when nothing was logged)."""
    values = [v for _, v in _points(rows, key)]
    if not values:
        return None
    return sum(values[:n]) / len(values[:n]), sum(values[-n:]) / len(values[-n:])


def run_summary(rows: list[dict], keys: tuple[str, ...] = ("reward/mean", "kl/mean")) -> str:
    """One line: each key's first-3 -> last-3 iteration means and the change."""
    parts = []
    for key in keys:
        means = first_last_means(rows, key)
        if means is not None:
            first, last = means
            parts.append(f"{key} first-{SUMMARY_WINDOW} {first:.3g} -> last-{SUMMARY_WINDOW} {last:.3g} "
                         f"({last - first:+.3g})")
    return f"{len(rows)} iterations; " + "; ".join(parts) if parts else f"{len(rows)} iterations"


def plot_curves(metrics_path: str | Path, out_png: str | Path,
                keys: tuple[str, ...] = ("reward/mean", "kl/mean")) -> Path:
    """A PNG with one panel per key against the iteration (reward and KL by default), each with its first-3 and
    last-3 iteration means drawn over the iterations they average and given in the panel's title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5))
    for ax, key in zip([axes] if len(keys) == 1 else axes, keys):
        points = _points(rows, key)
        title = key
        if points:
            ax.plot(*zip(*points), marker="o")
            first, last = first_last_means(rows, key)
            head, tail = points[:SUMMARY_WINDOW], points[-SUMMARY_WINDOW:]
            ax.hlines(first, head[0][0], head[-1][0], colors="tab:orange", linestyles="--", linewidth=2)
            ax.hlines(last, tail[0][0], tail[-1][0], colors="tab:green", linestyles="--", linewidth=2)
            title = f"{key}\nfirst-{SUMMARY_WINDOW} {first:.3g}, last-{SUMMARY_WINDOW} {last:.3g}"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)
