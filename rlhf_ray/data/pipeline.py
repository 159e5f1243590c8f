"""One stage's tokenized data set: sources -> adapters -> data_split -> train/eval -> tokens -> mix -> cache.

    ds = load_stage_dataset(cfg, "rm", tokenizer, split="train")

Splits (DeepSpeed-Chat's data_split): each data set in data.datasets is shuffled with data.seed and cut into
SFT / RM / PPO parts by the shares of data_split ("2,4,4": 20% / 40% / 40%), so no row reaches two stages;
each part then holds out data.eval_fraction of its rows as "eval". data.sft_only sources go whole to SFT,
data.ptx sources whole to PTX (both split into train/eval the same way). Bad rows are dropped with counted
reasons before the split; rows a stage cannot use (too long with drop, no answer) after it.

Mixing: a source contributes round(rows x weight) train rows (a seeded subset below 1, repeats above 1);
several sources are concatenated and shuffled with data.seed. Eval rows are never re-weighted.

Cache: the result is saved as Arrow under data.cache_dir, keyed by the stage, split, data settings, each
source's fingerprint (local files: names, sizes, mtimes) and the tokenizer (vocabulary, merges, special tokens,
chat template). data.rebuild_cache=true rebuilds regardless. A file lock serializes ranks building the
same key. The report (rows per source, drops per reason, truncations) is saved beside it and logged.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import datasets
import numpy as np
from filelock import FileLock

from rlhf_ray.env import cache_root
from rlhf_ray.config import Config, DataConfig, DatasetSource, to_dict
from rlhf_ray.data.adapters import FORMATS, detect_format, normalize
from rlhf_ray.data.report import DataError, check_bad_rows
from rlhf_ray.data.sources import load_source, source_fingerprint
from rlhf_ray.data.tokenization import empty_stage_dataset, tokenize_stage
from rlhf_ray.io import atomic_directory

logger = logging.getLogger("rlhf_ray.data")

STAGES = ("sft", "rm", "ppo", "ptx")
SPLITS = ("train", "eval")
PIPELINE_VERSION = 1  # bump when adapters/tokenization change what they produce
BUILTIN_TASKS = DatasetSource(path="builtin:tasks", format="pairwise")
BUILTIN_TEXT = DatasetSource(path="builtin:text", format="text")


def stage_sources(d: DataConfig, stage: str) -> list[tuple[str, DatasetSource]]:
    """(role, source) pairs feeding `stage`; role "split" sources are cut by data_split, "whole" ones are not."""
    if stage == "ptx":
        return [("whole", s) for s in (d.ptx or [BUILTIN_TEXT])]
    main = [("split", s) for s in (d.datasets or [BUILTIN_TASKS])]
    return main + [("whole", s) for s in d.sft_only] if stage == "sft" else main


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    state = [type(tokenizer).__name__, vocab, getattr(tokenizer, "chat_template", None),
             tokenizer.eos_token, tokenizer.bos_token, tokenizer.pad_token]
    return hashlib.sha256(json.dumps(state, default=str).encode()).hexdigest()[:16]


def cache_key(d: DataConfig, stage: str, split: str, tokenizer, sources) -> str:
    settings = {k: v for k, v in to_dict(d).items()
                if k not in ("datasets", "sft_only", "ptx", "cache_dir", "rebuild_cache")}
    state = {"version": PIPELINE_VERSION, "stage": stage, "split": split, "settings": settings,
             "sources": [(role, to_dict(s), source_fingerprint(s)) for role, s in sources],
             "tokenizer": tokenizer_fingerprint(tokenizer)}
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()[:20]


# --------------------------------------------------------------------------------------------- splitting
def split_shares(data_split: str) -> list[float]:
    shares = [float(s) for s in data_split.split(",")]
    return [s / sum(shares) for s in shares]


def stage_indices(n: int, d: DataConfig, stage: str, split: str, role: str) -> np.ndarray:
    """Row indices of this stage's part (role "split": its data_split share) and split, seeded by data.seed."""
    order = np.random.default_rng(d.seed).permutation(n)
    if role == "split":
        bounds = np.round(np.cumsum([0.0] + split_shares(d.data_split)) * n).astype(int)
        k = ("sft", "rm", "ppo").index(stage)
        order = order[bounds[k]:bounds[k + 1]]
    n_eval = int(round(len(order) * d.eval_fraction))
    return order[:n_eval] if split == "eval" else order[n_eval:]


def mix(parts: list[tuple[str, float, datasets.Dataset]], seed: int, weighted: bool) -> datasets.Dataset:
    """Concatenate sources; with `weighted`, each contributes round(rows x weight) rows, then all are shuffled."""
    rng = np.random.default_rng(seed)
    pieces = []
    for path, weight, ds in parts:
        n = len(ds)
        if weighted and weight != 1.0 and n:
            want = int(round(n * weight))
            idx = np.concatenate([np.tile(np.arange(n), want // n), rng.choice(n, want % n, replace=False)])
            logger.info("mixing %s: %d rows x weight %g -> %d rows", path, n, weight, want)
            ds = ds.select(idx)
        pieces.append(ds)
    out = datasets.concatenate_datasets(pieces) if len(pieces) > 1 else pieces[0]
    if len(pieces) > 1 or (weighted and any(w != 1.0 for _, w, _ in parts)):
        out = out.shuffle(seed=seed, keep_in_memory=True)
    return out


# ---------------------------------------------------------------------------------------------- building
def _build(d: DataConfig, stage: str, split: str, tokenizer, sources, hf_cache: str, key: str):
    parts, report = [], {"stage": stage, "split": split, "sources": []}
    for i, (role, src) in enumerate(sources):
        raw = load_source(src, hf_cache)
        fmt = src.format if src.format != "auto" else detect_format(raw.column_names, src.path)
        entry = {"path": src.path, "format": fmt, "rows": len(raw)}
        report["sources"].append(entry)
        if stage not in FORMATS[fmt].stages:
            logger.warning("%s: format '%s' cannot feed stage '%s' (it feeds %s); skipped for this stage",
                           src.path, fmt, stage, ", ".join(sorted(FORMATS[fmt].stages)))
            entry["skipped"] = f"format '{fmt}' cannot feed stage '{stage}'"
            continue
        if role == "split" and FORMATS[fmt].stages == {"sft"}:
            logger.warning("%s: single-response data in data.datasets gives SFT only its data_split share; "
                           "list it under data.sft_only to use all of it", src.path)
        norm, counts, first = normalize(raw, fmt, src.path, f"{key}-{i}")
        entry.update(bad=counts, first_bad_row=first)
        check_bad_rows(src.path, f"format '{fmt}'", len(raw), counts, first, d.max_bad_fraction)
        part = norm.select(stage_indices(len(norm), d, stage, split, role))
        tokens, drops, first_drop, truncated = tokenize_stage(part, stage, tokenizer, d, f"{key}-{i}")
        entry.update(stage_rows=len(part), dropped=drops, first_dropped_row=first_drop, truncated=truncated,
                     out_rows=len(tokens))
        check_bad_rows(src.path, f"stage '{stage}' ({split})", len(part), drops, first_drop, d.max_bad_fraction)
        if truncated:
            logger.info("%s: stage '%s' (%s): truncated %s", src.path, stage, split, truncated)
        parts.append((src.path, src.weight, tokens))
    if not parts or not any(len(p) for _, _, p in parts):
        msg = (f"stage '{stage}' ({split}) got no rows from {[s.path for _, s in sources]}: "
               f"check data.data_split ('{d.data_split}'), data.eval_fraction and the formats")
        if split == "train":
            raise DataError(msg)
        logger.warning(msg)  # an empty eval split is allowed (data.eval_fraction 0, or tiny data)
        parts = [("", 1.0, empty_stage_dataset(stage))]
    ds = mix(parts, d.seed, weighted=split == "train")
    report["rows"] = len(ds)
    return ds, report


def build_stage_dataset(cfg: Config, stage: str, tokenizer, split: str = "train"
                        ) -> tuple[datasets.Dataset, dict]:
    """The stage's tokenized rows and their report (see module doc); cached under data.cache_dir."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    d = cfg.data
    root = Path(d.cache_dir).expanduser() if d.cache_dir else cache_root() / "data"
    hf_cache = str(root / "hf")
    sources = stage_sources(d, stage)
    key = cache_key(d, stage, split, tokenizer, sources)
    path = root / f"{stage}-{split}-{key}"
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if (path / "report.json").is_file() and not d.rebuild_cache:
            report = json.loads((path / "report.json").read_text())
            logger.info("data %s/%s: %d rows from cache %s", stage, split, report["rows"], path)
        else:
            ds, report = _build(d, stage, split, tokenizer, sources, hf_cache, key)
            with atomic_directory(path) as tmp:
                ds.save_to_disk(str(tmp / "data"))
                (tmp / "report.json").write_text(json.dumps(report, indent=1))
            logger.info("data %s/%s: %d rows built into %s", stage, split, report["rows"], path)
        # Memory-mapped, still readable if a rebuild replaces it; datasets cannot load a saved empty data set.
        ds = datasets.load_from_disk(str(path / "data")) if report["rows"] else empty_stage_dataset(stage)
    report["cache_path"] = str(path)
    return ds, report


def load_stage_dataset(cfg: Config, stage: str, tokenizer, split: str = "train") -> datasets.Dataset:
    """Tokenized rows for stage "sft" | "rm" | "ppo" | "ptx" and split "train" | "eval" (columns: see
    rlhf_ray/data/__init__.py). The train split fails when empty; an eval split may be empty."""
    return build_stage_dataset(cfg, stage, tokenizer, split)[0]
