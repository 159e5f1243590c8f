"""Faults with real processes killed (no mocks), tiny models.

The controller (the `rlhf-ray ppo` driver) killed with SIGKILL while a checkpoint is being written to an object store
(moto's S3 server on 127.0.0.1, through pyarrow.fs): the previous checkpoint stays intact and is the one a resumed run
takes; the marker-less leftover is removed at the next start and logged. A learner rank killed mid-train. A running
job's engines grown and shrunk from another process (`rlhf-ray engines`). (An engine killed mid-sync:
tests/test_generator.py.)"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf_ray.checkpoint import MARKER, CheckpointManager, filesystem, join
from rlhf_ray.config import dump_config
from rlhf_ray.metrics import read_metrics
from rlhf_ray.ppo import PPOTrainer

import test_hybrid
from test_ppo import assert_metrics_agree, copy_checkpoint, ppo_config


def _iterations(storage: str) -> tuple[set[int], set[int]]:
    """(iterations with objects under iter_N/, iterations whose COMPLETE marker exists), straight from the store."""
    import pyarrow.fs as pafs

    fs, root = filesystem(storage)
    started, complete = set(), set()
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True)):
        name = info.path[len(root):].lstrip("/").split("/")[0]
        if name.startswith("iter_"):
            started.add(int(name[5:]))
            if info.path.endswith(f"/{MARKER}"):
                complete.add(int(name[5:]))
    return started, complete


def _kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the driver's whole session (its private Ray cluster included), then reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


def test_controller_killed_while_writing_a_checkpoint_resumes_from_the_previous_one(
        ray_cluster, tiny_llama, tiny_value_model, s3_bucket, tmp_path, caplog):
    storage = join(s3_bucket, f"kill-{tmp_path.name}")
    settings = {"ppo.advantage_estimator": "grpo", "ppo.num_iterations": 12, "ppo.rollout_batch_size": 8,
                "ppo.mini_batch_size": 32, "checkpoint.every": 1, "checkpoint.keep_last": 2,
                "checkpoint.storage": storage}
    cfg = ppo_config(tmp_path, tiny_llama, tiny_value_model, **settings)
    config_file = tmp_path / "ppo.yaml"
    config_file.write_text(dump_config(cfg))
    # The driver in a process (and session) of its own, on a private local cluster, as `rlhf-ray ppo` runs.
    log_file = open(tmp_path / "driver.log", "wb")
    driver = subprocess.Popen([str(Path(sys.executable).with_name("rlhf-ray")), "ppo", str(config_file)],
                              stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    killed_at, deadline = None, time.time() + 600
    try:
        # Stop the driver the moment a checkpoint has objects but no marker; if the marker still came first, let it
        # go on and try the next checkpoint.
        def writing() -> set[int]:  # once one is complete (the one to keep intact), a newer one being written
            started, complete = _iterations(storage)  # (keep-last removes old ones marker first: not those)
            return {i for i in started - complete if i > max(complete)} if complete else set()

        while killed_at is None and time.time() < deadline and driver.poll() is None:
            if not writing():
                time.sleep(0.005)
                continue
            os.kill(driver.pid, signal.SIGSTOP)
            if writing():
                killed_at = min(writing())
                os.kill(driver.pid, signal.SIGKILL)
            else:
                os.kill(driver.pid, signal.SIGCONT)
    finally:
        _kill_session(driver)
        log_file.close()
    assert killed_at is not None, (tmp_path / "driver.log").read_text()[-3000:]
    started, complete = _iterations(storage)
    assert killed_at in started and killed_at not in complete  # the kill landed mid-write
    previous = max(complete)
    assert previous == killed_at - 1  # every iteration checkpoints; keep-last never removed the previous one

    # Re-run the same command with --resume (here in-process, on the session's cluster): the leftover is removed and
    # said, the previous checkpoint is the one taken, and the run finishes without an iteration twice.
    resumed_cfg = ppo_config(tmp_path, tiny_llama, tiny_value_model,
                             **{**settings, "ppo.num_iterations": previous + 2, "checkpoint.resume": True})
    with caplog.at_level(logging.INFO):
        trainer = PPOTrainer(resumed_cfg)
        try:
            assert trainer.iteration == previous and trainer.generators.weight_version == previous
            trainer.run()
        finally:
            trainer.shutdown()
    assert f"iter_{killed_at:06d}" in caplog.text and "never completed" in caplog.text
    rows = read_metrics(Path(resumed_cfg.run.output_dir) / "ppo" / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == list(range(1, previous + 3))
    assert CheckpointManager(storage).incomplete() == []
    assert _iterations(storage)[1] == {previous + 1, previous + 2}  # keep_last 2 of the resumed run's checkpoints


NOT_COMPARED = ("time/", "throughput/", "faults/", "weight_version", "rollout/weight_version")


HYBRID = {**test_hybrid.HYBRID, "ppo.advantage_estimator": "grpo"}


@pytest.mark.parametrize("layout", ["separate", "hybrid"])
def test_a_learner_rank_killed_mid_train_is_replaced_and_the_run_goes_on_from_its_checkpoint(
        ray_cluster, tiny_llama, tiny_value_model, tmp_path, caplog, layout):
    """Separate layout (two actor ranks, a critic): rank 0 of the actor killed; the run's iterations after the
    recovery equal those of a run resumed from the same checkpoint. Hybrid layout (the engine inside the one actor
    rank): the engine goes with it and comes back with the restored weights."""

    settings = {"ppo.num_iterations": 4, "checkpoint.every": 2, "ppo.rollout_batch_size": 8,
                "ppo.mini_batch_size": 32, "ppo.max_learner_restarts": 1}
    if layout == "hybrid":
        settings.update(HYBRID, **{"ppo.max_learner_restarts": 2})
    cfg = ppo_config(tmp_path / "recovered", tiny_llama, tiny_value_model, **settings)
    trainer = PPOTrainer(cfg)
    killed = {}
    try:
        first_actor = trainer.actor
        train = first_actor.train

        def train_then_die(*args, **kwargs):
            if trainer.iteration == 2 and not killed:  # iteration 3, after the iteration-2 checkpoint
                # SIGKILL of rank 0's own process at its first training forward: mid-train, for real; the other
                # rank is left waiting in a collective with it
                killed.update(pid=first_actor.reports[0]["pid"], ranks=len(first_actor.workers))
                first_actor.apply(lambda w: w.rank == 0 and w.engine.module.register_forward_hook(
                    lambda *_: os.kill(os.getpid(), signal.SIGKILL)) and None)
            return train(*args, **kwargs)

        first_actor.train = train_then_die
        if layout == "hybrid":  # then the reference scorer, in iteration 4's score phase: replaced, the iteration redone
            first_reference = trainer.reference
            logprobs = first_reference.logprobs

            def score_then_die(*args, **kwargs):
                if trainer.iteration == 3 and "reference" not in killed:
                    killed["reference"] = first_reference.reports[0]["pid"]
                    first_reference.apply(lambda w: w.model.register_forward_hook(
                        lambda *_: os.kill(os.getpid(), signal.SIGKILL)) and None)
                return logprobs(*args, **kwargs)

            first_reference.logprobs = score_then_die
        with caplog.at_level(logging.WARNING, logger="rlhf_ray.recovery"):
            trainer.run()
        assert trainer.actor is not first_actor and trainer.actor.reports[0]["pid"] != killed["pid"]
        versions = trainer.generators.weight_version
    finally:
        trainer.shutdown()
    assert killed["ranks"] == (2 if layout == "separate" else 1), "the kill never happened"
    assert "actor died" in caplog.text and "recovered" in caplog.text
    out = Path(cfg.run.output_dir) / "ppo"
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4]  # iteration 3 redone once, logged once
    # Restored weights took a new version (2 before the kill, 3 for the restore), then one per iteration.
    assert [r["weight_version"] for r in rows] == [1, 2, 4, 5] and versions == 5
    assert rows[2]["faults/restarts"] == 1 and rows[2]["faults/samples_discarded"] == 8 * 4  # iteration 3's batch
    if layout == "hybrid":
        assert "replacing actor, generators" in caplog.text and "reference died" in caplog.text
        assert "back to the start of iteration 4" in caplog.text and killed["reference"]
        # the reference's death costs iteration 4's batch (regenerated), and no weights: the version goes on
        assert rows[3]["faults/restarts"] == 2 and rows[3]["faults/samples_discarded"] == 2 * 8 * 4
        return

    # The same checkpoint, resumed by a run nobody killed: iterations 3 and 4 agree.
    cfg_b = ppo_config(tmp_path / "resumed", tiny_llama, tiny_value_model, **settings, **{"checkpoint.resume": True})
    run_b = Path(cfg_b.run.output_dir) / "ppo"
    copy_checkpoint(out, run_b)
    resumed = PPOTrainer(cfg_b)
    try:
        resumed.run()
    finally:
        resumed.shutdown()
    assert_metrics_agree(rows[2:], read_metrics(run_b / "metrics.jsonl")[2:], skip=NOT_COMPARED)


def test_recovery_gives_up_past_max_learner_restarts_and_passes_other_errors_on(ray_cluster):
    """recovery.recover on a controller whose actor group has a really dead rank: with ppo.max_learner_restarts 0 it
    raises, naming the key, and replaces nothing; an error with every group alive is raised again unchanged."""
    import types

    import ray

    from rlhf_ray.config import load_config
    from rlhf_ray.recovery import recover

    @ray.remote(num_cpus=0)
    class Rank:
        def ping(self):
            return os.getpid()

    dead, live = Rank.remote(), Rank.remote()
    ray.get([dead.ping.remote(), live.ping.remote()])
    ray.kill(dead, no_restart=True)
    deadline = time.time() + 60  # the kill is asynchronous (a ping sent right after it may still be answered)
    while True:
        try:
            ray.get(dead.ping.remote(), timeout=10)
        except ray.exceptions.RayActorError:
            break  # dead before recover() looks
        assert time.time() < deadline, "ray.kill did not take effect within 60 s"
        time.sleep(0.2)
    group = lambda worker: types.SimpleNamespace(workers=[worker])  # noqa: E731 -- what recover() reads of a group
    trainer = types.SimpleNamespace(cfg=load_config(None, {"ppo.max_learner_restarts": 0}), recovery=None,
                                    actor=group(dead), critic=None, reference=group(live), reward=None)
    error = RuntimeError("the step's error")
    with pytest.raises(RuntimeError, match=r"actor died; no restart left \(ppo.max_learner_restarts 0, 0 done\)"):
        recover(trainer, error)
    trainer.actor = group(live)
    with pytest.raises(RuntimeError, match="the step's error"):
        recover(trainer, error)
    ray.kill(live, no_restart=True)


def engines_command(config_file: Path, *args: str) -> tuple[int, dict, str]:
    """`rlhf-ray engines CONFIG ...` in a process of its own, reaching this session's cluster through RAY_ADDRESS."""
    import json

    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    done = subprocess.run([str(Path(sys.executable).with_name("rlhf-ray")), "engines", str(config_file), *args],
                          env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    return done.returncode, json.loads(lines[-1]) if lines else {}, done.stdout + done.stderr


def test_engines_grow_and_shrink_mid_run_from_the_cli_and_every_prompt_is_trained_once(
        ray_cluster, tiny_llama, tiny_value_model, tmp_path):
    """A running PPO job told from another process: 1 -> 2 engines, then a grow the cluster cannot hold (the
    command fails within ray.placement_timeout_s; the run goes on), then 2 -> 1. The requests land between
    iterations; the new engine holds the run's weight version, verified, before it takes work. In between, the added
    engine is SIGKILLed in the middle of iteration 3's weight sync (generation.sync_timeout_s 600): the run goes on
    within seconds of its restart. Every prompt taken from the stream is trained on exactly once."""
    import threading

    import ray

    from test_generator import kill_self_on_call

    cfg = ppo_config(tmp_path, tiny_llama, tiny_value_model, **{
        "ppo.advantage_estimator": "grpo", "ppo.num_iterations": 6, "ppo.rollout_batch_size": 8,
        "ppo.mini_batch_size": 32, "run.name": f"elastic-{tmp_path.name}", "ray.placement_timeout_s": 5,
        "generation.sync_timeout_s": 600, "generation.sync_bucket_mb": 0.15})
    config_file = tmp_path / "ppo.yaml"
    config_file.write_text(dump_config(cfg))
    trainer = PPOTrainer(cfg)
    taken, trained, engines_after = {}, {}, {}  # iteration -> stream positions taken / trained; engines it ran with
    take, rollout_batch, step = trainer.prompts.take, trainer.rollout_batch, trainer.step
    position_of = {}

    def recording_take(n):
        rows = [dict(r) for r in take(n)]  # copies: a prompt taken twice (another epoch) is another object
        for k, row in enumerate(rows):
            position_of[id(row)] = trainer.prompts.position - n + k
        taken.setdefault(trainer.iteration + 1, []).extend(position_of[id(r)] for r in rows)
        return rows

    def recording_batch(rows, samples):
        trained[trainer.iteration + 1] = sorted({position_of[id(rows[s.prompt_index])] for s in samples})
        return rollout_batch(rows, samples)

    def recording_step():
        if trainer.iteration == 2:  # iteration 3: engine 1 dies as the 2nd bucket of its weight sync arrives
            ray.get(trainer.generators.engines[1].collective_rpc.remote(kill_self_on_call, ("_rlhf_load", 2)))
        stats = step()
        engines_after[trainer.iteration + 1] = (trainer.generators.num_engines, trainer.generators.engine_versions())
        return stats

    apply_requests = trainer.apply_requests

    def requests_queued_at_1_3_4():  # so that the requests land at known iterations, however slow the machine
        deadline = time.monotonic() + 120
        while trainer.iteration in (1, 3, 4) and ray.get(trainer.control.status.remote())["queued"] == 0:
            assert time.monotonic() < deadline, f"no request queued; the commands so far: {commands}"
            time.sleep(0.2)
        apply_requests()

    trainer.prompts.take, trainer.rollout_batch, trainer.step = recording_take, recording_batch, recording_step
    trainer.apply_requests = requests_queued_at_1_3_4
    commands = []

    def operator():  # the person at the keyboard, while the run goes on: each command waits for its outcome
        for args in ([], ["--set", "2"], ["--set", "40"], ["--set", "1"]):
            commands.append((args, *engines_command(config_file, *args)))

    person = threading.Thread(target=operator)
    try:
        person.start()
        trainer.run()
        person.join(timeout=300)
    finally:
        trainer.shutdown()
    (_, status_rc, status, _), (_, grow_rc, grew, _), (_, big_rc, refused, big_out), (_, shrink_rc, shrank, _) = \
        commands
    assert status_rc == 0 and "queued" in status, commands[0]
    assert grow_rc == 0 and grew["ok"] and (grew["engines"], grew["iteration"]) == (2, 1), commands[1]
    assert big_rc == 1 and not refused["ok"] and "placement group" in refused["message"], big_out  # PlacementError
    assert (refused["engines"], refused["iteration"]) == (2, 3)  # the run went on, with the engines it had
    assert shrink_rc == 0 and shrank["ok"] and (shrank["engines"], shrank["iteration"]) == (1, 4), commands[3]
    rows = read_metrics(Path(cfg.run.output_dir) / "ppo" / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == list(range(1, 7))
    assert [r["rollout/engines_used"] for r in rows] == [1, 2, 2, 2, 1, 1]  # grown after 1, shrunk after 4
    assert [engines_after[k][0] for k in range(1, 7)] == [1, 2, 2, 2, 1, 1]
    for r in rows:  # every engine holds the version the iteration ended with
        assert engines_after[r["iteration"]][1] == [r["weight_version"]] * engines_after[r["iteration"]][0]
    assert [r["faults/sync_engine_failures"] for r in rows] == [0, 0, 1, 0, 0, 0]  # the kill landed mid-sync
    assert rows[2]["time/sync_s"] < 120  # its restart included; not the 600 s sync timeout
    # Weight versions agree: each rollout came from the weights of the iteration before, on every engine.
    assert [r["rollout/weight_version"] for r in rows] == [0] + [r["weight_version"] for r in rows[:-1]]
    # Every prompt taken was trained on, once, in the iteration that took it (nothing skipped here).
    assert all(r["rollout/skipped_prompts"] == 0 for r in rows)
    assert taken == trained and sorted(p for ps in trained.values() for p in ps) == list(range(6 * 8))


def test_control_actor_name_is_one_per_run_and_a_request_nobody_applies_times_out(ray_cluster, tmp_path):
    """Two live runs of one run.name on a cluster: the second is refused before it starts anything. A request the run
    does not apply within `rlhf-ray engines --timeout` comes back failed (the run applies between iterations)."""
    from rlhf_ray.config import ConfigError, load_config
    from rlhf_ray.control import find_control, request_engines, start_control, stop_control

    cfg = load_config(None, {"ray.address": "local", "run.name": f"twice-{tmp_path.name}"})
    with pytest.raises(ConfigError, match="no run named"):
        find_control(cfg)
    control = start_control(cfg)
    try:
        with pytest.raises(ConfigError, match="another run of that name is running"):
            start_control(cfg)
        started = time.monotonic()
        outcome = request_engines(find_control(cfg), 2, timeout_s=1.0)
        assert not outcome["ok"] and "no outcome within 1s" in outcome["message"]
        assert time.monotonic() - started < 10
    finally:
        stop_control(control)
    stop_control(start_control(cfg))  # the name is free again once the run's actor is gone
