"""Surviving a dead worker process mid-run: what the PPO controller does when a step raised Ray's RayActorError.

A rank of a group killed (SIGKILL, the OOM killer, a lost node) surfaces in the controller as RayActorError from the
call it was serving. `recover(trainer, error)` then:
  1. finds the dead groups: each group's ranks are pinged (a rank whose actor is dead makes its group dead; one busy
     with a call is not). Nothing dead: the error was something else, and it is raised again.
  2. replaces each dead group in its own placement group (the bundles the dead ranks freed), several side by side as
     at start-up (PPOTrainer.start_groups): its surviving ranks are killed first (they share a torch.distributed
     world with the dead one, which cannot be repaired). Hybrid layout: the engine lives in the actor's ranks, so the
     generator group goes with the actor.
  3. when a learner (actor or critic) died, its weights and optimizer state since the last checkpoint are gone: both
     learners and the controller (iteration, data position, KL controller, RNG states) go back to the latest complete
     checkpoint (or to the run's start when none was written yet), and the engines take the restored weights under a
     new, higher weight version, verified as every sync is. The samples of the prompts taken since then are discarded
     and counted. A dead scorer (reference, reward) holds no training state: it is only replaced, and the iteration
     it broke is redone from its first prompt.
`ppo.max_learner_restarts` bounds how many replacements a run makes (learners and scorers together; dead engines are
the generator group's own business: generation.max_restarts).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

PING_TIMEOUT_S = 30.0
LEARNERS = ("actor", "critic")
ROLES = ("actor", "critic", "reference", "reward")


@dataclass
class RecoveryLog:
    """What recovery did over the run (metrics `faults/*`)."""

    restarts: int = 0
    samples_discarded: int = 0
    seconds: float = 0.0
    events: list[dict] = field(default_factory=list)

    def metrics(self) -> dict:
        return {"faults/restarts": self.restarts, "faults/samples_discarded": self.samples_discarded,
                "faults/recovery_s": self.seconds}


def alive(group) -> bool:
    """Whether no rank of `group` is dead. A rank still busy with a call (an actor serves one at a time) has not
    answered when PING_TIMEOUT_S is up: busy is not dead, and is left alone."""
    import ray
    from ray.exceptions import RayActorError

    if not group.workers:  # a handle served by another group (learner.ActorReference): that group is pinged
        return True
    pings = [w.__ray_ready__.remote() for w in group.workers]
    answered, _ = ray.wait(pings, num_returns=len(pings), timeout=PING_TIMEOUT_S)
    for ping in answered:
        try:
            ray.get(ping)
        except RayActorError:
            return False
    return True


def recover(trainer, error: BaseException) -> RecoveryLog:
    started = time.time()
    history: RecoveryLog = getattr(trainer, "recovery", None) or RecoveryLog()
    dead = [role for role in ROLES if getattr(trainer, role) is not None and not alive(getattr(trainer, role))]
    if not dead:
        raise error
    limit = trainer.cfg.ppo.max_learner_restarts
    if history.restarts >= limit:
        raise RuntimeError(f"{', '.join(dead)} died; no restart left (ppo.max_learner_restarts {limit}, "
                           f"{history.restarts} done): {error}") from error
    history.restarts += 1
    hybrid = trainer.cfg.placement.layout == "hybrid"
    replaced = dead + (["generators"] if hybrid and "actor" in dead else [])
    log.warning("%s died (%s); restart %d of %d: replacing %s", ", ".join(dead), type(error).__name__,
                history.restarts, limit, ", ".join(replaced))
    version = trainer.generators.weight_version + 1  # never reused, even by a replaced (hybrid) engine
    for role in replaced:
        group = getattr(trainer, role)
        group.shutdown() if role == "generators" else group.shutdown(remove_placement_group=False)  # plans stay
        setattr(trainer, role, None)
    trainer.start_groups(replaced)  # side by side, as at start-up
    position = trainer.prompts.position
    if any(role in LEARNERS for role in dead):
        latest = trainer.checkpoints.latest() if trainer.checkpoints is not None else None
        if latest is not None:
            trainer.restore(latest, weight_version=version)
        else:  # the new learners hold the run's initial weights
            trainer.apply_controller_state(trainer.start_state)
            trainer.sync_engines(trainer.iteration, version)
        where = latest or "the start of the run"
    else:
        trainer.prompts.position = trainer.iteration_start_position  # the broken iteration, redone from its start
        where = f"the start of iteration {trainer.iteration + 1}"
    discarded = (position - trainer.prompts.position) * trainer.cfg.generation.n_samples_per_prompt
    history.samples_discarded += discarded
    history.seconds += time.time() - started
    history.events.append({"dead": dead, "replaced": replaced, "back_to": str(where), "iteration": trainer.iteration,
                           "samples_discarded": discarded, "seconds": time.time() - started})
    log.warning("recovered in %.1fs: back to %s (iteration %d, weight version %d), %d sample(s) discarded",
                time.time() - started, where, trainer.iteration, trainer.generators.weight_version, discarded)
    return history
