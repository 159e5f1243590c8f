"""How roles ask Ray for resources, and how a local cluster on a small machine declares them. One place.

Convention (see README "Resources on small machines"): a Ray CPU is a *scheduling token*, not a core.
Every role bundle asks for `placement.<role>.cpus_per_worker` CPUs (GPUs likewise). A cluster we start
ourselves (no ray.address and no RAY_ADDRESS given: a private one, even if another Ray runs here) declares
    num_cpus = max(physical cores, sum of every bundle's CPUs in the layout)
so a full PPO layout — one placement group per role — is always placeable on a 2-core laptop or CI box. Real
cores are shared by the OS; vLLM engines are bound to cores separately (VLLM_CPU_OMP_THREADS_BIND). On a real
cluster nothing is inflated: Ray's own resource counts are used as they are.

Placement groups never hang: `ready_placement_group` fails after ray.placement_timeout_s naming the role, what
it asked for and what the cluster has free.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Optional

from rlhf_ray.config import Config, RoleResources, old_logprobs_from_engines, reuses_train_logprobs
from rlhf_ray.console import quiet_ray_driver_logger, route_worker_output
from rlhf_ray.env import QUIET_STATE_API_ENV, worker_env_vars
from rlhf_ray.pipeline import STAGES

log = logging.getLogger(__name__)

LOCAL = "local"  # ray.address value that forces a fresh local cluster


class PlacementError(RuntimeError):
    """A role's placement group could not be placed; the message names the role and the missing resources."""


@dataclass(frozen=True)
class RoleLayout:
    role: str
    bundles: list[dict[str, float]]
    strategy: str  # STRICT_PACK for an engine (a TP group never spans nodes), PACK for the other roles


def role_bundles(res: RoleResources, count: int) -> list[dict[str, float]]:
    bundle = {"CPU": res.cpus_per_worker}
    if res.gpus_per_worker:
        bundle["GPU"] = res.gpus_per_worker
    return [dict(bundle) for _ in range(count)]


def ppo_layout(cfg: Config) -> list[RoleLayout]:
    """The placement groups a PPO run creates, one per role (colocated roles share one)."""
    p = cfg.placement
    needs_critic = cfg.ppo.advantage_estimator == "gae"
    layouts = []
    actor = role_bundles(p.actor, p.actor.num_workers)
    if p.colocate_actor_reference:
        layouts.append(RoleLayout("actor+reference", actor, "PACK"))
    else:
        layouts.append(RoleLayout("actor", actor, "PACK"))
        if not p.reference_in_actor:  # else the actor's ranks score the reference (its adapters disabled)
            layouts.append(RoleLayout("reference", role_bundles(p.reference, p.reference.num_workers), "PACK"))
    reward = role_bundles(p.reward, p.reward.num_workers)
    if needs_critic and p.colocate_critic_reward:
        layouts.append(RoleLayout("critic+reward", role_bundles(p.critic, p.critic.num_workers), "PACK"))
    else:
        if needs_critic:
            layouts.append(RoleLayout("critic", role_bundles(p.critic, p.critic.num_workers), "PACK"))
        layouts.append(RoleLayout("reward", reward, "PACK"))
    tp = cfg.generation.tensor_parallel_size
    for engine in range(cfg.generation.num_engines):
        # One placement group per engine: its TP bundles are packed onto a single node (STRICT_PACK).
        layouts.append(RoleLayout(f"generator[{engine}]", role_bundles(p.generator, tp), "STRICT_PACK"))
    return layouts


def machine_cores() -> int:
    """The cores this process may run on (its affinity: a container's share, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def oversubscribed_env(num_cpus: int, cores: int, environ=os.environ, concurrent_threads: Optional[int] = None
                       ) -> dict[str, str]:
    """Worker environment for a local cluster with more logical CPUs than cores, where the workers' OpenMP threads
    may share cores: idle threads wait passively instead of spinning on cores the others need. Three SmolLM2 forward
    loops with 2 threads each on 2 cores took 81.2 s at once with the default and 21.1 s with passive waiting
    (benchmarks/results/omp_wait_policy.md). When the run's processes never compute on more threads at once than
    there are cores (`concurrent_threads`, peak_concurrent_threads), OpenMP's default (a short spin) stays: there
    passive waiting only slows the many small parallel regions of decoding and training (on a VM the sleeping vCPUs
    also meet more steal): the GRPO bench's rlhf_ray side spinning gave TRL / rlhf_ray 1.10, 1.08 (fp32) and 1.38,
    2.03 (bf16) where passive waiting gave 1.01, 0.98, 1.01 and 1.19, 1.30, 1.36 (grpo_vs_trl.md, 2026-12-03).
    `concurrent_threads` None: not known, passive. An OMP_WAIT_POLICY the user set is left alone."""
    fits = concurrent_threads is not None and concurrent_threads <= cores
    if num_cpus > cores and not fits and "OMP_WAIT_POLICY" not in environ:
        return {"OMP_WAIT_POLICY": "PASSIVE"}
    return {}


def peak_concurrent_threads(cfg: Config, stages: tuple[str, ...] = STAGES) -> int:
    """The most OpenMP threads this run's processes compute on at one time, over the `stages` the command runs on the
    cluster it starts (`rlhf-ray sft`: that stage; the pipeline: every stage). A worker computes on its Ray CPUs'
    worth of threads (at least 1). SFT and RM: every Ray Train worker at once. PPO, rollout.mode off, one phase after
    another: generate (the engines; hybrid: the actor's ranks), score (reference, the reward model unless rule
    functions replace it, the actor's old log-probs unless the training pass gives them, the critic's values), train
    (the actor, then the critic). Async modes: generation beside scoring or training."""

    def threads(res, workers: Optional[int] = None) -> int:
        return max(1, math.ceil(res.cpus_per_worker)) * (res.num_workers if workers is None else workers)

    p, g, placement = cfg.ppo, cfg.generation, cfg.placement
    critic = threads(placement.critic) if p.advantage_estimator == "gae" else 0
    if placement.layout == "hybrid":
        generate = threads(placement.actor)
    else:
        generate = threads(placement.generator, g.num_engines * g.tensor_parallel_size)
    rule_only = bool(p.reward_functions) and p.reward_function_mode == "replace"
    actor_old = not (reuses_train_logprobs(cfg) or old_logprobs_from_engines(cfg))
    reference = 0 if placement.reference_in_actor else threads(placement.reference)  # else on the actor's ranks
    score = (reference + (0 if rule_only else threads(placement.reward))
             + (threads(placement.actor) if actor_old or placement.reference_in_actor else 0) + critic)
    train = max(threads(placement.actor), critic)
    ppo = max(generate, score, train) if cfg.rollout.mode == "off" else generate + max(score, train)
    return max({"sft": threads(cfg.sft), "rm": threads(cfg.rm), "ppo": ppo}[stage] for stage in stages)


def local_num_cpus(cfg: Config, extra_cpus: float = 1.0) -> int:
    """Logical CPUs for a cluster we start ourselves: enough for every bundle plus the driver's tasks."""
    if cfg.ray.local_num_cpus is not None:
        return cfg.ray.local_num_cpus
    needed = sum(sum(b.get("CPU", 0.0) for b in lay.bundles) for lay in ppo_layout(cfg))
    train_needed = max(cfg.sft.num_workers, cfg.rm.num_workers) * 1.0 + 1.0  # Ray Train workers + its controller
    return max(machine_cores(), math.ceil(max(needed, train_needed) + extra_cpus))


def ray_address(cfg: Config) -> Optional[str]:
    """The cluster to attach to: ray.address, else RAY_ADDRESS (set by `ray job submit` for its driver); "auto" only
    when one of them says so. None (nothing given, or "local"): start a private local cluster. Never a Ray instance
    merely found on the machine (a test session, another run), whose resources this run would compete for."""
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or None
    return None if address == LOCAL else address


def init_ray(cfg: Config, concurrent_threads: Optional[int] = None, **kwargs):
    """Attach to the cluster given (ray_address), or start a private local one sized by the convention above.
    `concurrent_threads`: the most threads the command computes on at once (peak_concurrent_threads for the training
    stages); None (a command that does not say) keeps passive OpenMP waiting on an oversubscribed local cluster."""
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context()
    quiet_ray_driver_logger()
    env_vars = worker_env_vars()
    # Every worker process: rlhf_ray's log format (console.setup_worker_process).
    runtime_env = {"env_vars": env_vars, "worker_process_setup_hook": "rlhf_ray.console.setup_worker_process"}
    address = ray_address(cfg)
    if address is not None:
        source = "ray.address" if cfg.ray.address else "RAY_ADDRESS"
        log.info("attaching to the Ray cluster at %s (%s)", address, source)
        context = ray.init(address=address, runtime_env=runtime_env, **kwargs)
    else:
        if logging.getLogger().getEffectiveLevel() > logging.DEBUG:  # no State API here: env.quiet_state_api_warning
            env_vars[QUIET_STATE_API_ENV] = "1"
        num_cpus, cores = local_num_cpus(cfg), machine_cores()
        env_vars.update(oversubscribed_env(num_cpus, cores, concurrent_threads=concurrent_threads))
        why = "ray.address: local" if cfg.ray.address == LOCAL else "no ray.address or RAY_ADDRESS given"
        log.info("starting a private local Ray cluster with %d logical CPUs (%d cores%s): %s", num_cpus, cores,
                 ", OpenMP threads wait passively" if env_vars.get("OMP_WAIT_POLICY") == "PASSIVE" else "", why)
        # address="local": a new instance even when another Ray runs on this machine (None would join the latest).
        context = ray.init(address=LOCAL, num_cpus=num_cpus, include_dashboard=False, runtime_env=runtime_env,
                           **kwargs)
    route_worker_output()  # worker output: the command's log file, and what matters to the console
    return context


def ready_placement_group(role: str, bundles: list[dict[str, float]], strategy: str = "PACK",
                          timeout_s: float = 120.0):
    """Create a placement group and wait until it is placed, or raise PlacementError naming what is missing."""
    import ray
    from ray.exceptions import GetTimeoutError
    from ray.util.placement_group import placement_group, remove_placement_group

    pg = placement_group(bundles, strategy=strategy, name=f"rlhf_ray:{role}")
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except GetTimeoutError:
        remove_placement_group(pg)
        asked: dict[str, float] = {}
        for b in bundles:
            for k, v in b.items():
                asked[k] = asked.get(k, 0.0) + v
        free = {k: ray.available_resources().get(k, 0.0) for k in asked}
        total = {k: ray.cluster_resources().get(k, 0.0) for k in asked}
        raise PlacementError(
            f"placement group for role '{role}' not ready after {timeout_s:.0f}s: it asks for {asked} in "
            f"{len(bundles)} bundle(s) ({strategy}); the cluster has {free} free of {total}. Lower "
            f"placement.<role>.cpus_per_worker / num_workers, or give a local cluster more logical CPUs "
            f"(ray.local_num_cpus)") from None
    return pg
