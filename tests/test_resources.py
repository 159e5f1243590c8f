"""The small-machine resource convention and placement groups that fail fast instead of hanging."""
import os
import time

import pytest
import ray
from ray.util.placement_group import remove_placement_group

from rlhf_ray.config import load_config
from rlhf_ray.resources import PlacementError, local_num_cpus, ppo_layout, ready_placement_group


def test_local_cluster_declares_enough_cpus_for_every_bundle():
    cfg = load_config(None, {"generation.num_engines": 3, "generation.tensor_parallel_size": 2})
    bundles = sum(len(layout.bundles) for layout in ppo_layout(cfg))
    assert bundles == 2 + 1 + 2 + 1 + 3 * 2  # actor, reference, critic, reward, 3 engines x TP2
    assert local_num_cpus(cfg) >= bundles + 1 > (os.cpu_count() or 1)
    assert local_num_cpus(load_config(None, {"ray.local_num_cpus": 3})) == 3  # an explicit value wins


def test_layout_follows_colocation_and_estimator():
    cfg = load_config(None, {"placement.colocate_actor_reference": True, "placement.colocate_critic_reward": True})
    assert [lay.role for lay in ppo_layout(cfg)] == ["actor+reference", "critic+reward", "generator[0]"]
    grpo = load_config(None, {"ppo.advantage_estimator": "grpo", "generation.n_samples_per_prompt": 4})
    assert "critic" not in [lay.role for lay in ppo_layout(grpo)]  # no critic group without GAE
    assert all(lay.strategy == "STRICT_PACK" for lay in ppo_layout(cfg) if lay.role.startswith("generator"))


def test_full_ppo_layout_is_placeable_on_this_machine(ray_cluster, base_config):
    groups = []
    try:
        for layout in ppo_layout(base_config):
            groups.append(ready_placement_group(layout.role, layout.bundles, layout.strategy, timeout_s=30))
        assert len(groups) == 5  # actor, reference, critic, reward, one engine: each its own group
    finally:
        for pg in groups:
            remove_placement_group(pg)


def test_unplaceable_group_fails_fast_naming_role_and_resources(ray_cluster):
    too_many = ray.cluster_resources()["CPU"] + 1
    start = time.time()
    with pytest.raises(PlacementError) as err:
        ready_placement_group("critic", [{"CPU": too_many}], timeout_s=2)
    assert time.time() - start < 20
    assert "role 'critic'" in str(err.value) and f"'CPU': {too_many}" in str(err.value)
