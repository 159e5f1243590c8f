"""Fault-injection benchmark (issue 16, item 7): a short PPO job on the tiny Llama test model; each fault is injected
at a chosen moment by SIGKILL of the real process, found through Ray's State API; prints a table:

    fault | when | survived? | samples lost | seconds to recover | largest metric difference

"largest metric difference": over every non-timing metric of the iterations after the fault (weight versions and
faults/* excluded: a restore takes a new version), the largest |faulted - reference| where the reference is a run
nobody disturbed, resumed from the same checkpoint (iteration 2; checkpoint.every 2, 4 iterations, the fault in
iteration 3). For the engine fault nothing is restored: its reference is a run without the fault.

    flock /tmp/rlhf_ray_heavy.lock .venv/bin/python benchmarks/bench_faults.py [--out benchmarks/results/faults.md]
        [--faults actor,critic,reference,engine,controller]

Not a test. Runs its own Ray head with the dashboard (the State API needs it; a private local cluster has none) and
stops it at the end. About 8 minutes on the 2-core machine.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

NOT_COMPARED = ("time/", "throughput/", "faults/", "weight_version", "rollout/weight_version", "rollout/redispatched")
# the role -> (the group attribute of PPOTrainer, its worker class in Ray's State API, the call the kill lands in)
TARGETS = {"actor": ("actor", "PolicyLearner", "train"), "critic": ("critic", "CriticLearner", "train"),
           "reference": ("reference", "ReferenceScorer", "logprobs"), "engine": ("generators", "VLLMEngine", "generate"),
           "engine-sync": ("generators", "VLLMEngine", "sync_weights")}
KILL_DELAY_S = 0.05  # after the call is sent: the worker is computing it (tiny-model phases take ~0.2-1 s)


def state_api_pid(class_name: str) -> int:
    """The pid of the one live actor of `class_name`, from Ray's State API."""
    from ray.util.state import list_actors

    alive = [a for a in list_actors(filters=[("class_name", "=", class_name), ("state", "=", "ALIVE")], detail=True)]
    if not alive:
        raise RuntimeError(f"State API: no live {class_name}")
    return sorted(alive, key=lambda a: a.pid)[0].pid


def config(tmp: Path, name: str, **overrides):
    from test_ppo import ppo_config

    return ppo_config(tmp / name, MODELS["llama"], MODELS["value"], **{
        "ray.address": "auto", "ppo.num_iterations": 4, "checkpoint.every": 2, "ppo.rollout_batch_size": 8,
        "ppo.mini_batch_size": 32, "placement.actor.num_workers": 1, "placement.critic.num_workers": 1,
        "ppo.max_learner_restarts": 1, **overrides})


MODELS: dict[str, str] = {}


def run_with_fault(tmp: Path, fault: str) -> dict:
    """The job with `fault` injected in iteration 3; returns its metrics rows and what the injection saw."""
    from rlhf_ray.metrics import read_metrics
    from rlhf_ray.ppo import PPOTrainer

    attr, class_name, method = TARGETS[fault]
    cfg = config(tmp, fault, **({"generation.sync_bucket_mb": 0.15} if fault == "engine-sync" else {}))
    trainer = PPOTrainer(cfg)
    seen: dict = {}
    try:
        group = getattr(trainer, attr)
        call = getattr(group, method)

        def call_with_kill(*args, **kwargs):
            if trainer.iteration == 2 and "pid" not in seen:
                pid = seen["pid"] = state_api_pid(class_name)
                if fault == "engine-sync":  # a tiny model's sync is over in ~20 ms: the engine's own process
                    import ray                # SIGKILLs itself as its 2nd bucket arrives (mid-transfer, for sure)
                    from test_generator import kill_self_on_call

                    ray.get(group.engines[0].collective_rpc.remote(kill_self_on_call, ("_rlhf_load", 2)))
                else:
                    threading.Timer(KILL_DELAY_S, os.kill, (pid, signal.SIGKILL)).start()
                seen["sent"] = time.time()
                try:
                    return call(*args, **kwargs)
                except BaseException as e:  # the call the kill landed in
                    seen["raised"] = type(e).__name__
                    raise
                finally:
                    seen["call_s"] = time.time() - seen["sent"]
                    if method == "sync_weights":  # what the sync's own recovery reported
                        seen["sync_failures"] = group.last_sync.engine_failures
            return call(*args, **kwargs)

        setattr(group, method, call_with_kill)
        started = time.time()
        try:
            trainer.run()
            seen["survived"] = True
        except BaseException as e:
            seen["survived"], seen["error"] = False, f"{type(e).__name__}: {str(e)[:200]}"
        seen["run_s"] = time.time() - started
        if trainer.recovery is not None:
            seen["recovery"] = trainer.recovery.events
        seen["redispatched"] = getattr(trainer.generators, "restarts", None)
    finally:
        trainer.shutdown()
    seen["rows"] = read_metrics(Path(cfg.run.output_dir) / "ppo" / "metrics.jsonl")
    seen["out"] = Path(cfg.run.output_dir) / "ppo"
    return seen


def reference_rows(tmp: Path, name: str, from_run: Path | None) -> list[dict]:
    """A run nobody disturbs: resumed from `from_run`'s iteration-2 checkpoint, or (None) from the start."""
    from rlhf_ray.metrics import read_metrics
    from rlhf_ray.ppo import PPOTrainer

    cfg = config(tmp, name, **({"checkpoint.resume": True} if from_run else {}))
    out = Path(cfg.run.output_dir) / "ppo"
    if from_run:
        shutil.copytree(from_run / "checkpoints" / "iter_000002", out / "checkpoints" / "iter_000002")
        shutil.copy(from_run / "metrics.jsonl", out / "metrics.jsonl")
    trainer = PPOTrainer(cfg)
    try:
        trainer.run()
    finally:
        trainer.shutdown()
    return read_metrics(out / "metrics.jsonl")


def largest_difference(rows: list[dict], reference: list[dict], first_iteration: int = 3) -> tuple[float, str, int]:
    """(largest |difference|, where, how many values were compared) over the iterations from `first_iteration`."""
    by_iteration = {r["iteration"]: r for r in reference}
    worst, where, compared = 0.0, "", 0
    for row in rows:
        other = by_iteration.get(row["iteration"])
        if row["iteration"] < first_iteration:
            continue
        if other is None:
            return float("nan"), f"iteration {row['iteration']} missing from the reference run", compared
        for key, value in row.items():
            if key.startswith(NOT_COMPARED) or not isinstance(value, (int, float)) or key == "iteration":
                continue
            diff, compared = abs(value - other.get(key, float("nan"))), compared + 1
            if not diff <= worst:  # also catches a missing key (nan)
                worst, where = diff, f"{key} @ {row['iteration']}"
    return worst, where, compared


def controller_fault(tmp: Path) -> dict:
    """The driver (`rlhf-ray ppo`) SIGKILLed while a checkpoint is written (its objects on a local moto S3 server
    exist, its COMPLETE marker does not), then the same command again with --resume."""
    from rlhf_ray.checkpoint import join
    from rlhf_ray.config import dump_config

    from test_faults import _iterations

    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen: dict = {}
    try:
        time.sleep(3)
        import pyarrow.fs as pafs
        pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http",
                          allow_bucket_creation=True).create_dir("bench")
        storage = join(f"s3://bench?endpoint_override=127.0.0.1:{port}&scheme=http", "controller")
        cfg = config(tmp, "controller", **{"ray.address": "local", "ppo.num_iterations": 12, "checkpoint.every": 1,
                                           "checkpoint.storage": storage})
        path = tmp / "controller.yaml"
        path.write_text(dump_config(cfg))
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own private cluster
        rlhf_ray = str(Path(sys.executable).with_name("rlhf-ray"))
        driver = subprocess.Popen([rlhf_ray, "ppo", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                  start_new_session=True, env=env)
        try:
            while driver.poll() is None:
                started, complete = _iterations(storage)
                writing = {i for i in started - complete if complete and i > max(complete)}
                if not writing:
                    time.sleep(0.005)
                    continue
                os.kill(driver.pid, signal.SIGSTOP)
                started, complete = _iterations(storage)
                if {i for i in started - complete if i > max(complete)}:
                    os.kill(driver.pid, signal.SIGKILL)
                    seen["killed_writing"] = min(started - complete)
                    seen["previous"] = max(complete)
                    break
                os.kill(driver.pid, signal.SIGCONT)
        finally:
            try:
                os.killpg(driver.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            driver.wait()
        t = time.time()
        resumed = subprocess.run([rlhf_ray, "ppo", str(path), "--resume", "--ppo.num_iterations",
                                  str(seen["previous"] + 2)], capture_output=True, text=True, env=env)
        seen["resume_s"] = time.time() - t
        seen["survived"] = resumed.returncode == 0
        seen["leftover_removed"] = "never completed" in resumed.stdout + resumed.stderr
        seen["resumed_at"] = seen["previous"]
        seen["samples_lost"] = (seen["killed_writing"] - seen["previous"]) * 8 * 4  # trained, not committed
    finally:
        server.terminate()
        server.wait()
    return seen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--faults", default="actor,critic,reference,engine,engine-sync,controller")
    parser.add_argument("--out", help="write the table (Markdown) and the raw results (.json next to it) here")
    args = parser.parse_args()

    import ray

    from rlhf_ray.models.tiny import build_tiny_model
    from rlhf_ray.models import ValueHeadModel

    tmp = Path(tempfile.mkdtemp(prefix="bench_faults_"))
    MODELS["llama"] = str(build_tiny_model("llama", tmp / "models" / "llama", seed=0))
    import torch
    torch.manual_seed(1)
    ValueHeadModel.from_causal_lm(MODELS["llama"]).save_pretrained(tmp / "models" / "rm")
    MODELS["value"] = str(tmp / "models" / "rm")
    for key, value in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_EC2_METADATA_DISABLED": "true", "OMP_WAIT_POLICY": "PASSIVE"}.items():
        os.environ.setdefault(key, value)

    from rlhf_ray.resources import local_num_cpus
    import psutil
    import socket

    def free_port() -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    # A throwaway head with the dashboard (State API), as tests/test_job_submit.py starts one: loopback only, token
    # auth off, a short temp dir (Ray's socket paths have a length limit).
    temp_dir = tempfile.mkdtemp(prefix="rf", dir="/tmp")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    port = free_port()
    start = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--port", str(port),
             "--num-cpus", str(local_num_cpus(config(tmp, "sizing"))), "--include-dashboard", "true",
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(free_port()), "--node-ip-address", "127.0.0.1",
             "--temp-dir", temp_dir, "--disable-usage-stats"]
    proc = subprocess.run(start, capture_output=True, text=True, timeout=180)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    results = []
    try:
        os.environ["RAY_ADDRESS"] = f"127.0.0.1:{port}"  # the jobs attach to it (ray.address auto)
        for fault in args.faults.split(","):
            t = time.time()
            if fault == "controller":
                seen = controller_fault(tmp)
                results.append({"fault": "controller (driver) SIGKILL", "when": f"writing checkpoint "
                                f"{seen.get('killed_writing')} (its objects uploaded, no COMPLETE marker)",
                                "survived": "yes, resumed from checkpoint " + str(seen.get("previous"))
                                if seen.get("survived") and seen.get("leftover_removed") else f"no: {seen}",
                                "samples_lost": f"{seen.get('samples_lost')} (trained, checkpoint not committed)",
                                "recover_s": f"{seen.get('resume_s', float('nan')):.1f} (a new driver: start-up + "
                                             f"2 iterations)",
                                "max_diff": "n/a", "raw": seen})
                print(f"{fault}: {results[-1]['survived']} in {time.time() - t:.0f}s", flush=True)
                continue
            seen = run_with_fault(tmp, fault)
            restored = fault in ("actor", "critic")
            ref = reference_rows(tmp, f"{fault}_ref", seen["out"] if restored else None)
            worst, where, compared = largest_difference(seen["rows"], ref)
            events = seen.get("recovery") or []
            redispatched = sum(r.get("rollout/redispatched", 0) for r in seen["rows"])
            if fault == "engine":
                lost = f"0 ({redispatched} prompt(s) re-dispatched; engine restarts {seen['redispatched']})"
            elif fault == "engine-sync":
                detected = ", ".join(f"{f['seconds']:.1f}s" for f in seen.get("sync_failures") or [])
                lost = f"0 (failed sync attempts detected after: {detected or 'none'})"
            else:
                lost = str(sum(e["samples_discarded"] for e in events))
            results.append({"fault": f"{fault} SIGKILL", "when": "iteration 3's weight sync, as the engine's 2nd bucket "
                            "(of 0.15 MB) arrives (pid from the State API)" if fault == "engine-sync" else
                            f"iteration 3, {KILL_DELAY_S}s after its {TARGETS[fault][2]} call was sent (pid from the "
                            f"State API)",
                            "survived": "yes" if seen.get("survived") else f"no: {seen.get('error')}",
                            "samples_lost": lost,
                            "recover_s": f"{sum(e['seconds'] for e in events):.1f}" if events else
                                         f"{seen['call_s']:.1f} (the whole sync, restart included)"
                                         if fault == "engine-sync" else "n/a",
                            "max_diff": f"{worst:.2e} ({where}; {compared} values)" if where else
                                        f"0 ({compared} values compared)",
                            "raw": {k: v for k, v in seen.items() if k not in ("rows", "out")}})
            print(f"{fault}: {results[-1]['survived']} in {time.time() - t:.0f}s", flush=True)
    finally:
        ray.shutdown()
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any(temp_dir in arg for arg in (p.info["cmdline"] or [])):
                    p.kill()
            except psutil.Error:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    table = ["| fault | when | survived? | samples lost | seconds to recover | largest metric difference |",
             "|---|---|---|---|---|---|"]
    table += [f"| {r['fault']} | {r['when']} | {r['survived']} | {r['samples_lost']} | {r['recover_s']} | "
              f"{r['max_diff']} |" for r in results]
    text = (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, tiny Llama, 4 iterations of 8 prompts x 4, "
            f"checkpoint every 2, fault in iteration 3\n\n" + "\n".join(table) + "\n")
    print(text)
    if args.out:
        Path(args.out).write_text(text)
        Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
