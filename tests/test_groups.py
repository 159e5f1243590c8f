"""ModelGroup: placement groups per role (and colocated), one torch.distributed world per group, batch split by
data-parallel rank and gathered in order. Real Ray; light workers (no models) so this file stays fast."""
from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray.cloudpickle
import torch

from rlhf_ray.config import RoleResources, load_config
from rlhf_ray.groups import (DistributedWorker, ModelGroup, concat_results, placement_plan, remove_placement,
                             shard_batch, start_concurrently)
from rlhf_ray.resources import PlacementError, ppo_layout


# Ray workers cannot import test modules: ship this module's classes and functions by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class EchoWorker(DistributedWorker):
    """Reports what it received, which rank it is, and the world it is in."""

    def rows(self, shard: dict, scale: float = 1.0) -> torch.Tensor:
        return torch.stack([shard["x"] * scale, torch.full_like(shard["x"], float(self.rank))], dim=1)

    def texts(self, shard: dict) -> list[str]:
        return [f"{t}@{self.rank}" for t in shard["text"]]


def world_facts(worker: DistributedWorker) -> dict:
    import os

    import ray
    import torch.distributed as dist

    total = torch.tensor([float(worker.rank + 1)])
    dist.all_reduce(total)
    return {"rank": dist.get_rank(), "world": dist.get_world_size(), "backend": dist.get_backend(),
            "sum": float(total), "port": os.environ["MASTER_PORT"],
            "pg": ray.util.get_current_placement_group().id.hex(),
            "cpus": ray.get_runtime_context().get_assigned_resources().get("CPU")}


# ---------------------------------------------------------------------------------------------- pure logic
def test_roles_start_side_by_side_and_every_start_is_waited_for_before_a_failure_is_reported():
    import threading
    import time

    together = threading.Barrier(4, timeout=10)  # passes only if the four starts run at the same time
    finished = []

    def start(role: str):
        together.wait()
        time.sleep(0.3 if role == "slow" else 0.0)  # a slow role still loading when the others have failed
        finished.append(role)
        if role.startswith("broken"):
            raise RuntimeError(f"{role} failed")
        return f"{role} group"

    started, failure = start_concurrently(start, ["actor", "broken2", "slow", "broken1"])
    assert sorted(finished) == ["actor", "broken1", "broken2", "slow"]  # none still starting on return
    assert started == {"actor": "actor group", "slow": "slow group"}  # kept, so the caller can shut them down
    assert str(failure) == "broken2 failed"  # the first failure in role order, not in time


def test_groups_starting_side_by_side_never_share_a_rendezvous_port_on_one_node():
    from rlhf_ray.groups import release_port, reserve_port

    picks = iter([29500, 29500, 29501, 29500, 29500, 29500])  # what bind-then-release may hand out
    first = reserve_port("node-a", lambda: next(picks))
    second = reserve_port("node-a", lambda: next(picks))  # the same port picked again: asked once more
    other_node = reserve_port("node-b", lambda: next(picks))
    assert (first, second, other_node) == (29500, 29501, 29500)
    with pytest.raises(RuntimeError, match="no free rendezvous port on node node-a after 2 tries"):
        reserve_port("node-a", lambda: 29500, attempts=2)
    release_port("node-a", first)  # its world is up: the rendezvous holds it now
    assert reserve_port("node-a", lambda: 29500) == 29500
    for node, port in [("node-a", 29500), ("node-a", 29501), ("node-b", 29500)]:
        release_port(node, port)


def test_shard_batch_pads_to_equal_rows_and_concat_drops_padding():
    batch = {"x": torch.arange(5.0), "text": list("abcde"), "temperature": 0.7}
    shards = [shard_batch(batch, r, 2) for r in range(2)]
    assert [s["x"].tolist() for s, _ in shards] == [[0, 1, 2], [3, 4, 4]]  # last row repeated for rank 1
    assert shards[1][0]["text"] == ["d", "e", "e"] and shards[1][0]["temperature"] == 0.7
    assert all(n == 5 for _, n in shards)
    assert concat_results([s["x"] for s, _ in shards], 5).tolist() == [0, 1, 2, 3, 4]
    assert concat_results([{"a": s["text"]} for s, _ in shards], 5) == {"a": list("abcde")}
    with pytest.raises(ValueError, match="does not split evenly over 2"):
        shard_batch(batch, 0, 2, pad=False)


def test_colocated_layout_shares_placement_groups(base_config):
    cfg = load_config(None, {"ray.address": "local", "placement.colocate_actor_reference": True,
                             "placement.colocate_critic_reward": True})
    names = [lay.role for lay in ppo_layout(cfg)]
    assert "actor+reference" in names and "critic+reward" in names and "reference" not in names


# ---------------------------------------------------------------------------------------------- on Ray
def test_full_ppo_layout_is_ready_on_this_machine(ray_cluster, base_config):
    """Every placement group of a default PPO layout (one per role) is placed on the 2-core machine."""
    from ray.util import placement_group_table

    plan = placement_plan(base_config)
    try:
        assert set(plan) == {"actor", "reference", "critic", "reward", "generator[0]"}
        assert len({id(p.placement_group) for p in plan.values()}) == 5  # separate groups by default
        for role, rp in plan.items():
            assert placement_group_table(rp.placement_group)["state"] == "CREATED", role
            assert rp.share == 1.0
    finally:
        remove_placement(plan)


@pytest.fixture(scope="module")
def echo_group(ray_cluster):
    group = ModelGroup("probe", EchoWorker, 2, resources=RoleResources(num_workers=2, cpus_per_worker=0.25))
    yield group
    group.shutdown()


def test_group_is_one_world_and_ranks_sit_in_their_placement_group(echo_group):
    facts = echo_group.apply(world_facts)
    assert [f["rank"] for f in facts] == [0, 1]
    assert all(f["world"] == 2 and f["backend"] == "gloo" and f["sum"] == 3.0 for f in facts)
    assert {f["pg"] for f in facts} == {echo_group.placement.placement_group.id.hex()}
    assert all(f["cpus"] == 0.25 for f in facts)


def test_worker_refuses_a_placement_group_that_is_not_its_roles(ray_cluster):
    import ray
    from ray.exceptions import RayActorError

    with pytest.raises(RayActorError, match="expected to run in placement group"):
        ray.get(ray.remote(EchoWorker).options(num_cpus=0).remote(
            role="actor", rank=0, world_size=1, placement_group_id="ff" * 18).current_placement_group_id.remote())


def test_run_sharded_splits_by_rank_and_gathers_in_order(echo_group):
    import ray

    batch = {"x": torch.arange(5.0), "text": list("abcde")}
    out = echo_group.run_sharded("rows", batch, scale=2.0)
    assert out[:, 0].tolist() == [0, 2, 4, 6, 8]  # rows in order, padding dropped
    assert out[:, 1].tolist() == [0, 0, 0, 1, 1]  # rows 0-2 on rank 0, 3-4 on rank 1
    assert echo_group.run_sharded("texts", batch) == ["a@0", "b@0", "c@0", "d@1", "e@1"]
    # ObjectRefs in and out: the batch and the gathered result never pass through the driver.
    ref = echo_group.run_sharded("rows", ray.put(batch), as_ref=True)
    assert isinstance(ref, ray.ObjectRef) and torch.equal(ray.get(ref), echo_group.run_sharded("rows", batch))


def test_one_rank_group_returns_its_result_without_a_join_task(ray_cluster, monkeypatch):
    """A join task runs in a Ray worker process that stays alive (and holds torch) after it: a one-rank group has
    nothing to join, so its result's ref is returned as it is."""
    import ray

    import rlhf_ray.groups as groups

    group = ModelGroup("probe1", EchoWorker, 1, resources=RoleResources(num_workers=1, cpus_per_worker=0.25))
    try:
        monkeypatch.setattr(groups, "_remote_concat", lambda: pytest.fail("a join task for a one-rank group"))
        ref = group.run_sharded("rows", ray.put({"x": torch.arange(3.0)}), as_ref=True)
        assert ray.get(ref)[:, 0].tolist() == [0.0, 1.0, 2.0]
    finally:
        group.shutdown()


def test_colocated_roles_share_one_placement_group(ray_cluster):
    cfg = load_config(None, {"ray.address": "local", "placement.colocate_actor_reference": True,
                             "placement.colocate_critic_reward": True, "placement.actor.cpus_per_worker": 0.5,
                             "placement.actor.num_workers": 2, "placement.critic.cpus_per_worker": 0.5,
                             "placement.critic.num_workers": 2})
    plan = placement_plan(cfg, roles=["actor", "reference", "critic", "reward"])
    groups = []
    try:
        assert plan["actor"].placement_group is plan["reference"].placement_group
        assert plan["critic"].placement_group is plan["reward"].placement_group
        assert plan["actor"].placement_group is not plan["critic"].placement_group
        def start(role: str) -> ModelGroup:
            res = getattr(cfg.placement, role)
            return ModelGroup(role, EchoWorker, res.num_workers, resources=res, placement=plan[role])

        with ThreadPoolExecutor(4) as pool:  # the groups start side by side (each start is mostly waiting)
            groups += pool.map(start, ("actor", "reference", "critic", "reward"))
        facts = {g.role: g.apply(world_facts) for g in groups}
        pg_ids = {role: {f["pg"] for f in fs} for role, fs in facts.items()}
        assert pg_ids["actor"] == pg_ids["reference"] == {plan["actor"].placement_group.id.hex()}
        assert pg_ids["critic"] == pg_ids["reward"] == {plan["critic"].placement_group.id.hex()}
        # Each colocated role takes half of every bundle it sits in.
        assert [f["cpus"] for f in facts["actor"]] == [0.25, 0.25] and facts["reference"][0]["cpus"] == 0.25
        assert facts["actor"][0]["sum"] == 3.0 and facts["reference"][0]["world"] == 1  # separate worlds
        assert len({fs[0]["port"] for fs in facts.values()}) == 4  # each group's rank 0 picked its own free port
    finally:
        for g in groups:
            g.shutdown()
        remove_placement(plan)


def test_unplaceable_role_fails_fast_naming_role_and_resources(ray_cluster):
    cfg = load_config(None, {"ray.address": "local", "ray.placement_timeout_s": 2,
                             "placement.critic.cpus_per_worker": 1000})
    # the critic's section default of 2 ranks survives the override: 2 bundles of 1000 CPUs
    with pytest.raises(PlacementError, match=r"role 'critic'.*asks for \{'CPU': 2000\.0\} in 2 bundle.*free of"):
        placement_plan(cfg, roles=["critic"])
