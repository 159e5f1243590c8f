"""Live control of a running PPO job: elastic generation.

Each run (`rlhf-ray ppo`, also one started with `ray job submit`) starts a named actor, `control:<run.name>` in the
cluster's `rlhf_ray` namespace. `rlhf-ray engines CONFIG --set N` reaches it from anywhere that can reach the cluster
(RAY_ADDRESS, or ray.address, and the cluster's token, as any Ray client) and queues a request; the controller takes
requests between two iterations (never inside one: no rollout is in flight then) and applies them in order
(GeneratorGroup.resize). The command waits for the outcome: a grow that cannot be placed or started fails the command,
never the run.
"""
from __future__ import annotations

import time
from typing import Optional

from rlhf_ray.config import Config, ConfigError

NAMESPACE = "rlhf_ray"


def control_name(cfg: Config) -> str:
    return f"control:{cfg.run.name}"


class RunControl:
    """The named actor: a queue of requests, their outcomes, and the run's last reported status."""

    def __init__(self):
        self.queue: list[dict] = []
        self.outcomes: dict[int, dict] = {}
        self.last_status: dict = {}
        self.next_id = 0

    def request(self, engines: int) -> int:
        self.next_id += 1
        self.queue.append({"id": self.next_id, "engines": engines})
        return self.next_id

    def take(self, status: dict) -> list[dict]:
        """The controller, between two iterations: its status, for every queued request (oldest first)."""
        taken, self.queue, self.last_status = self.queue, [], status
        return taken

    def finish(self, request_id: int, ok: bool, message: str, status: dict) -> None:
        self.outcomes[request_id] = {"ok": ok, "message": message, **status}
        self.last_status = status

    def outcome(self, request_id: int) -> Optional[dict]:
        return self.outcomes.get(request_id)

    def status(self) -> dict:
        return {**self.last_status, "queued": len(self.queue)}


def start_control(cfg: Config):
    """The run's control actor (in the driver's job: it goes when the run ends). Another live run of the same
    run.name on the cluster holds the name: a clear error, before anything else starts."""
    import ray

    name = control_name(cfg)
    try:
        return ray.remote(RunControl).options(name=name, namespace=NAMESPACE, num_cpus=0, max_restarts=0).remote()
    except ValueError as e:
        raise ConfigError(f"run.name {cfg.run.name!r}: another run of that name is running on this cluster (it holds "
                          f"the control actor {name!r} in namespace {NAMESPACE!r}); give this run another run.name") \
            from e


def stop_control(control, timeout_s: float = 30.0) -> None:
    """Kill the control actor and wait until its name is free (the next run of the same name may start at once)."""
    import ray

    ray.kill(control, no_restart=True)
    try:
        ray.get(control.status.remote(), timeout=timeout_s)
    except Exception:  # RayActorError once it is dead, and its name released with it (or the wait timed out)
        pass


def find_control(cfg: Config):
    """From outside the run (`rlhf-ray engines`): its control actor, or an error saying what to check."""
    import ray

    try:
        return ray.get_actor(control_name(cfg), namespace=NAMESPACE)
    except ValueError:
        raise ConfigError(f"no run named {cfg.run.name!r} (run.name) is running on the cluster at "
                          f"{ray.get_runtime_context().gcs_address}: nothing holds {control_name(cfg)!r} in namespace "
                          f"{NAMESPACE!r}") from None


def request_engines(control, engines: int, timeout_s: float) -> dict:
    """Queue a resize and wait for the controller's outcome ({"ok", "message", "engines", "iteration", ...})."""
    import ray
    from ray.exceptions import RayActorError

    request_id = ray.get(control.request.remote(engines))
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            outcome = ray.get(control.outcome.remote(request_id))
        except RayActorError:  # the run ended (or its driver died) before the next iteration boundary
            return {"ok": False, "message": "the run ended before it applied the request"}
        if outcome is not None:
            return outcome
        if time.monotonic() > deadline:
            return {"ok": False, "message": f"no outcome within {timeout_s:.0f}s (the run applies requests between "
                                            f"iterations; it is still queued)"}
        time.sleep(0.5)


def apply_requests(control, generators, status: dict) -> None:
    """The controller, between two iterations: resize the generator group as asked, one request at a time, and
    report each outcome. A failed request leaves the group as it was; the run goes on."""
    import logging

    import ray

    log = logging.getLogger(__name__)
    for request in ray.get(control.take.remote({**status, "engines": sum(generators.alive)})):
        before = sum(generators.alive)
        try:
            generators.resize(request["engines"])
            ok, message = True, f"engines {before} -> {sum(generators.alive)}"
            log.info("control request %d: %s", request["id"], message)
        except Exception as e:  # the run goes on with the engines it has
            ok, message = False, f"{type(e).__name__}: {e}"
            log.warning("control request %d (engines %d) failed: %s", request["id"], request["engines"], message)
        ray.get(control.finish.remote(request["id"], ok, message, {**status, "engines": sum(generators.alive)}))
