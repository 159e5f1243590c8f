"""Where rows come from: a hub name, local files, a save_to_disk folder, or the built-in generator.

Everything goes through `datasets`: `load_dataset(name)` for hub names, the packaged json / parquet / arrow /
csv / text builders for local files (offline clusters need nothing else), `load_from_disk` for saved folders.
A path that looks local but does not exist fails here instead of being sent to the hub.
"""
from __future__ import annotations

import glob
import hashlib
import json
from pathlib import Path

import datasets

from rlhf_ray.config import DatasetSource
from rlhf_ray.data.builtin import builtin_dataset
from rlhf_ray.data.report import DataError

BUILTIN_PREFIX = "builtin:"
# File suffix -> the datasets packaged builder that reads it.
BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".arrow": "arrow", ".csv": "csv",
            ".txt": "text"}


def _looks_local(path: str) -> bool:
    return (path.startswith(("/", "./", "../", "~")) or Path(path).suffix in BUILDERS
            or any(c in path for c in "*?[") or Path(path).expanduser().exists())


def _local_files(path: str) -> list[Path]:
    matches = sorted(Path(p) for p in glob.glob(str(Path(path).expanduser()), recursive=True))
    if not matches:
        raise DataError(f"data file not found: {path}")
    return matches


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def load_source(src: DatasetSource, hf_cache_dir: str | None = None) -> datasets.Dataset:
    """The rows of one configured source, as a datasets.Dataset (memory-mapped where datasets does so).

    `hf_cache_dir` is where datasets keeps the Arrow copies of local files (hub data uses its own cache)."""
    path = src.path
    if path.startswith(BUILTIN_PREFIX):
        return builtin_dataset(path[len(BUILTIN_PREFIX):])
    if not _looks_local(path):  # the Hugging Face cache: one filled beforehand works with HF_DATASETS_OFFLINE=1
        return datasets.load_dataset(path, split=src.split)
    files = _local_files(path)
    if len(files) == 1 and files[0].is_dir():
        folder = files[0]
        if not _is_saved_dataset(folder):  # a folder of data files: datasets infers the builder
            return datasets.load_dataset(str(folder), split=src.split, cache_dir=hf_cache_dir)
        loaded = datasets.load_from_disk(str(folder))
        if isinstance(loaded, datasets.DatasetDict):
            if src.split not in loaded:
                raise DataError(f"{path}: no split '{src.split}' (it has {', '.join(loaded)}); set split")
            return loaded[src.split]
        return loaded
    suffixes = {f.suffix for f in files}
    if len(suffixes) != 1 or files[0].suffix not in BUILDERS:
        raise DataError(f"{path}: cannot tell how to read {', '.join(sorted(s or '(no suffix)' for s in suffixes))} "
                        f"files; use one of {', '.join(BUILDERS)}")
    try:
        return datasets.load_dataset(BUILDERS[files[0].suffix], data_files=[str(f) for f in files],
                                     split=src.split, cache_dir=hf_cache_dir)
    except (ValueError, datasets.exceptions.DatasetGenerationError) as e:
        raise DataError(f"{path}: could not be read as {BUILDERS[files[0].suffix]}: {e}") from e


def source_fingerprint(src: DatasetSource) -> str:
    """Changes when the source's data changes: file names, sizes and mtimes for local data; the hub name,
    split and the loaded data set's own fingerprint for hub data; the generated rows for built-ins."""
    path = src.path
    if path.startswith(BUILTIN_PREFIX):
        state = [path, builtin_dataset(path[len(BUILTIN_PREFIX):])._fingerprint]
    elif _looks_local(path):
        state = [path, src.split]
        for f in _local_files(path):
            members = sorted(p for p in f.rglob("*") if p.is_file()) if f.is_dir() else [f]
            state += [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in members]
    else:
        state = [path, src.split, load_source(src)._fingerprint]
    return hashlib.sha256(json.dumps(state, default=str).encode()).hexdigest()[:16]
