"""A failed PPO start-up leaves nothing behind in the Ray cluster: no placement group, no actor.

A long-lived driver (a notebook, a controller that retries, this test session) keeps using the same cluster after a
failed attempt; anything the attempt left reserved would starve every later placement. Three ways to fail: a role
that cannot be placed after others were, a rank whose model does not load, and a failure after every group is up.
Actors are listed from the GCS (ray._private.state): ray.util.state needs the dashboard, which local clusters we
start do not run.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import ray
from ray.util import placement_group_table

from rlhf_ray.config import load_config
from rlhf_ray.ppo import PPOTrainer
from rlhf_ray.resources import PlacementError

RULE_REWARD = "rlhf_ray.data.builtin.rule_reward"


def small_run(tmp_path, actor: str, reward: str, **overrides):
    base = {
        "ray.address": "local", "run.output_dir": str(tmp_path / "run"), "data.cache_dir": str(tmp_path / "data"),
        "data.max_prompt_len": 48, "models.actor.path": actor, "models.reward.path": reward,
        "ppo.reward_functions": [RULE_REWARD], "ppo.rollout_batch_size": 4, "generation.n_samples_per_prompt": 2,
        "ppo.mini_batch_size": 8, "generation.max_new_tokens": 8, "generation.kv_cache_gib": 1,
        "placement.actor.num_workers": 1, "placement.critic.num_workers": 1, "logging.tensorboard": False,
        "ray.placement_timeout_s": 2,
    }
    return load_config(None, {**base, **overrides})


def live() -> tuple[set[str], set[str]]:
    """Ids of the cluster's live actors and of its placement groups that hold (or wait for) resources."""
    from ray._private import state

    actors = {a_id for a_id, a in state.actors().items() if a["State"] != "DEAD"}
    groups = {pg_id for pg_id, pg in placement_group_table().items() if pg["state"] != "REMOVED"}
    return actors, groups


def leftovers(before: tuple[set[str], set[str]], timeout_s: float = 20.0) -> tuple[set[str], set[str]]:
    """What the run left alive (polled briefly: ray.kill and group removal take effect asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while True:
        actors, groups = live()
        left = (actors - before[0], groups - before[1])
        if not any(left) or time.monotonic() > deadline:
            return left
        time.sleep(0.25)


def free_cpus(expected: float, timeout_s: float = 20.0) -> float:
    deadline = time.monotonic() + timeout_s
    while (free := ray.available_resources().get("CPU", 0.0)) != expected and time.monotonic() < deadline:
        time.sleep(0.25)
    return free


def test_a_role_that_cannot_be_placed_releases_the_roles_placed_before_it(ray_cluster, tiny_llama,
                                                                          tiny_value_model, tmp_path):
    # Layout order: actor, reference, critic, reward, engines. The critic (third) asks for more than the cluster has.
    cfg = small_run(tmp_path, tiny_llama, tiny_value_model,
                    **{"placement.critic.cpus_per_worker": ray.cluster_resources()["CPU"] + 1})
    # The baseline once the cluster is idle: the previous test's groups may still be on their (asynchronous) way out.
    cpus = free_cpus(ray.cluster_resources()["CPU"], timeout_s=30.0)
    before = live()
    with pytest.raises(PlacementError, match="role 'critic'"):
        PPOTrainer(cfg)
    assert free_cpus(cpus) == cpus  # actor's and reference's groups, placed before, are released
    assert leftovers(before) == (set(), set())


def test_a_rank_that_fails_to_load_its_model_leaves_no_actor_or_placement_group(ray_cluster, tiny_llama,
                                                                                tiny_value_model, tmp_path):
    # The actor's folder with its weights destroyed: the tokenizer loads in the driver, the actor rank fails in setup.
    broken = tmp_path / "broken_actor"
    shutil.copytree(tiny_llama, broken)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    cfg = small_run(tmp_path, str(broken), tiny_value_model)
    before = live()
    with pytest.raises(Exception, match="actor|safetensors|header"):
        PPOTrainer(cfg)
    assert leftovers(before) == (set(), set())


def test_a_failure_after_every_group_is_up_releases_them_all(ray_cluster, tiny_llama, tmp_path):
    # Every group starts (GRPO with a rule reward: actor, reference, reward scorer, one engine), then resuming from a
    # checkpoint folder without its controller state fails.
    cfg = small_run(tmp_path, tiny_llama, "", **{"ppo.advantage_estimator": "grpo",
                                                 "ppo.reward_function_mode": "replace", "checkpoint.resume": True})
    (Path(cfg.run.output_dir) / "ppo" / "checkpoints" / "iter_000002").mkdir(parents=True)
    before = live()
    with pytest.raises(Exception, match="iter_000002"):
        PPOTrainer(cfg)
    assert leftovers(before) == (set(), set())
