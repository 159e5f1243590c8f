"""Checkpoint storage (rlhf_ray/checkpoint.py): a local folder (temporary sibling renamed into place) and an object
store (COMPLETE marker written last), the S3 one a real moto server on 127.0.0.1 read through pyarrow.fs.S3FileSystem.
What was left by a write that never finished is never resumed from or counted by keep-last, and the next start
removes it and says so. The PPO runs on S3 (a kill of the controller mid-write, then resume) are in
test_faults.py."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from rlhf_ray.checkpoint import (MARKER, CheckpointManager, filesystem, join, read_controller_state, staged_download,
                                 staged_upload, write_controller_state)


def _write_parts(folder: str) -> None:
    """What a learner and the controller put in a checkpoint: files under actor/ (through the staging a learner
    rank uses) and the controller state."""
    with staged_upload(join(folder, "actor")) as local:
        (Path(local) / "global_step1").mkdir()
        (Path(local) / "global_step1" / "model.pt").write_bytes(b"weights")
        (Path(local) / "latest").write_text("global_step1")
    write_controller_state(folder, {"iteration": 1})


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "checkpoints")
    uri = request.getfixturevalue("s3_bucket")
    return join(uri, tmp_path.name)  # a prefix of its own per test


def test_a_checkpoint_counts_only_when_complete_and_keep_last_rotates(storage, caplog):
    manager = CheckpointManager(storage, keep_last=2)
    assert manager.all() == [] and manager.latest() is None and manager.incomplete() == []
    for iteration in (1, 2, 3):
        manager.save(iteration, _write_parts)
    assert [u.split("?")[0].rsplit("/", 1)[-1] for u in manager.all()] == ["iter_000002", "iter_000003"]
    latest = manager.latest()
    assert read_controller_state(latest) == {"iteration": 1}
    with staged_download(join(latest, "actor")) as local:
        assert (Path(local) / "latest").read_text() == "global_step1"
        assert (Path(local) / "global_step1" / "model.pt").read_bytes() == b"weights"
    fs, root = filesystem(latest)
    assert fs.get_file_info(f"{root}/{MARKER}").size > 0  # the marker exists on both kinds of storage

    # A write that fails midway (the controller killed, here an exception after the actor's part) never counts.
    def killed(folder: str) -> None:
        _write_parts(folder)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        manager.save(4, killed)
    if not manager.local:  # no atomic rename: the objects stay, without their marker
        assert [p.rsplit("/", 1)[-1] for p in manager.incomplete()] == ["iter_000004"]
    assert manager.latest() == latest and len(manager.all()) == 2  # neither resumed from nor rotated


def test_the_next_start_removes_what_a_killed_write_left_and_says_so(storage, caplog):
    manager = CheckpointManager(storage, keep_last=2)
    manager.save(2, _write_parts)
    fs, root = filesystem(storage)
    if manager.local:  # what io.atomic_directory leaves when the process dies before its rename
        leftover = f"{root}/.iter_000003.tmp-0123abcd"
        fs.create_dir(f"{leftover}/actor")
    else:  # the objects of a checkpoint whose marker was never written
        leftover = f"{root}/iter_000003"
        with fs.open_output_stream(f"{leftover}/actor/latest") as f:
            f.write(b"global_step3")
    assert manager.incomplete() == [leftover]
    assert manager.latest().split("?")[0].endswith("iter_000002")
    with caplog.at_level(logging.WARNING, logger="rlhf_ray.checkpoint"):
        assert manager.remove_incomplete() == [leftover]
    assert "never completed" in caplog.text and leftover in caplog.text
    assert manager.incomplete() == [] and fs.get_file_info(leftover).type.name == "NotFound"
    assert [u.split("?")[0].rsplit("/", 1)[-1] for u in manager.all()] == ["iter_000002"]  # untouched


def test_a_checkpoint_without_its_controller_state_is_named_in_the_error(tmp_path):
    (tmp_path / "iter_000002").mkdir()
    with pytest.raises(RuntimeError, match="iter_000002.*controller.json"):
        read_controller_state(str(tmp_path / "iter_000002"))
