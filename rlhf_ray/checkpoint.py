"""PPO run checkpoints: one folder per iteration, committed only when complete, the last K kept.

    <checkpoint.storage>/iter_000004/   (default storage: <run>/checkpoints)
        controller.json              iteration, data position, KL controller, RNG states, weight version (JSON)
        actor/ critic/               each learner group's DeepSpeed checkpoint (model, optimizer, scheduler)
        COMPLETE                     the commit marker, written last

The storage is a local or NFS folder, or an object store URI (`s3://bucket/prefix`, `gs://...`; query parameters
such as `?endpoint_override=host:port&scheme=http` go to pyarrow), read and written through `pyarrow.fs`, as Ray
Train's storage_path is. A local folder is written as a hidden temporary sibling (`.iter_000004.tmp-<id>`) and renamed
when complete; object stores have no atomic rename, so there a checkpoint is the objects under `iter_000004/` and
counts only once its COMPLETE marker exists (written last; removed first when a checkpoint is rotated out). Anything
else found under the storage (a temporary folder, a marker-less iteration folder: a write that was killed) is never
resumed from or counted by keep-last, and `remove_incomplete()` (the next start) deletes it and says so.

Learner ranks write their parts themselves: straight into a local folder (which every node must see: NFS on a
multi-node cluster), or into a local scratch folder they upload (`staged_upload`) and download again to load
(`staged_download`).
"""
from __future__ import annotations

import contextlib
import json
import logging
import random
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

log = logging.getLogger(__name__)

_NAME = re.compile(r"^iter_(\d{6})$")
_LOCAL_TMP = re.compile(r"^\.iter_\d{6}\.(tmp|old)-[0-9a-f]+$")  # io.atomic_directory's siblings
MARKER = "COMPLETE"


def is_remote(uri: str | Path) -> bool:
    """An object store or other pyarrow file system URI (`scheme://...`), not a local path."""
    return "://" in str(uri) and not str(uri).startswith("file://")


def filesystem(uri: str | Path):
    """(pyarrow FileSystem, path in it) for a local path (relative ones from the working folder) or a URI."""
    import pyarrow.fs as pafs

    if not is_remote(uri):
        return pafs.LocalFileSystem(), str(Path(str(uri).removeprefix("file://")).expanduser().absolute())
    return pafs.FileSystem.from_uri(str(uri))


def join(uri: str | Path, *parts: str) -> str:
    """`uri`/part/...; a query string (`?endpoint_override=...`) stays at the end."""
    base, sep, query = str(uri).partition("?")
    return "/".join([base.rstrip("/"), *parts]) + sep + query


@contextlib.contextmanager
def staged_upload(uri: str) -> Iterator[str]:
    """A local folder to write into: `uri` itself when local (created), else a scratch folder whose files are
    uploaded to `uri` on success and which is removed either way."""
    if not is_remote(uri):
        Path(uri).mkdir(parents=True, exist_ok=True)
        yield uri
        return
    import pyarrow.fs as pafs

    scratch = tempfile.mkdtemp(prefix="rlhf_ray_ckpt_")
    try:
        yield scratch
        fs, path = filesystem(uri)
        pafs.copy_files(scratch, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextlib.contextmanager
def staged_download(uri: str) -> Iterator[str]:
    """A local folder holding what is at `uri`: `uri` itself when local, else a downloaded scratch copy (removed)."""
    if not is_remote(uri):
        yield uri
        return
    import pyarrow.fs as pafs

    scratch = tempfile.mkdtemp(prefix="rlhf_ray_ckpt_")
    try:
        fs, path = filesystem(uri)
        pafs.copy_files(path, scratch, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class CheckpointManager:
    def __init__(self, storage: str | Path, keep_last: int = 2):
        self.uri = str(storage)
        self.fs, self.root = filesystem(storage)
        self.keep_last = keep_last
        self.local = not is_remote(storage)

    def __repr__(self) -> str:
        return f"CheckpointManager({self.uri!r})"

    def _entries(self) -> list:
        import pyarrow.fs as pafs

        try:
            return self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        except FileNotFoundError:
            return []

    def _committed(self, name: str) -> bool:
        import pyarrow.fs as pafs

        if self.local:  # renamed into place only when complete (a pre-marker checkpoint has no marker)
            return True
        return self.fs.get_file_info(f"{self.root}/{name}/{MARKER}").type == pafs.FileType.File

    def _committed_names(self) -> list[str]:
        """Folder names of the complete checkpoints, oldest first."""
        import pyarrow.fs as pafs

        names = sorted(e.base_name for e in self._entries()
                       if e.type == pafs.FileType.Directory and _NAME.match(e.base_name))
        return [n for n in names if self._committed(n)]

    def all(self) -> list[str]:
        """URIs of the complete checkpoints, oldest first."""
        return [join(self.uri, n) for n in self._committed_names()]

    def latest(self) -> Optional[str]:
        found = self.all()
        return found[-1] if found else None

    def incomplete(self) -> list[str]:
        """Paths (in the file system) of writes that never committed: temporary folders, marker-less folders."""
        import pyarrow.fs as pafs

        out = []
        for e in self._entries():
            if e.type != pafs.FileType.Directory:
                continue
            if (self.local and _LOCAL_TMP.match(e.base_name)) or (
                    not self.local and _NAME.match(e.base_name) and not self._committed(e.base_name)):
                out.append(e.path)
        return sorted(out)

    def remove_incomplete(self) -> list[str]:
        """Delete what incomplete() finds (a write killed midway), logging each; returns what was removed."""
        removed = self.incomplete()
        for path in removed:
            log.warning("checkpoint storage %s: removing %s, a checkpoint write that never completed (the run was "
                        "stopped while writing it)", self.uri, path)
            self.fs.delete_dir(path)
        return removed

    def _remove(self, name: str) -> None:
        if not self.local:  # the marker first: a deletion cut short leaves an incomplete folder, never a bad one
            self.fs.delete_file(f"{self.root}/{name}/{MARKER}")
        self.fs.delete_dir(f"{self.root}/{name}")

    def save(self, iteration: int, write: Callable[[str], None]) -> str:
        """`write(folder_uri)` fills the checkpoint's folder; it counts (and older ones rotate out) only when complete:
        renamed into place on local storage, COMPLETE marker written last on an object store."""
        import pyarrow.fs as pafs

        name = f"iter_{iteration:06d}"
        marker = json.dumps({"iteration": iteration, "written_at": time.time()})
        if self.local:
            from rlhf_ray.io import atomic_directory

            with atomic_directory(Path(self.root) / name) as tmp:
                write(str(tmp))
                (tmp / MARKER).write_text(marker)
        else:
            if self.fs.get_file_info(f"{self.root}/{name}").type != pafs.FileType.NotFound:
                self._remove(name)  # a leftover of this iteration (a resumed run writes it again)
            write(join(self.uri, name))
            with self.fs.open_output_stream(f"{self.root}/{name}/{MARKER}") as f:
                f.write(marker.encode())
        for old in self._committed_names()[:-self.keep_last]:
            self._remove(old)
        return join(self.uri, name)


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


def write_controller_state(folder: str | Path, state: dict) -> str:
    """The PPO controller's state as JSON in a checkpoint folder (data only: loading it runs no code)."""
    fs, path = filesystem(join(folder, CONTROLLER_STATE))
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(state).encode())
    return path


def read_controller_state(folder: str | Path) -> dict:
    fs, path = filesystem(join(folder, CONTROLLER_STATE))
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read().decode())
    except (OSError, ValueError) as e:
        raise RuntimeError(f"checkpoint {folder}: cannot read the controller state {CONTROLLER_STATE} ({e}); remove "
                           f"this incomplete or foreign checkpoint folder, or resume from another one") from None
