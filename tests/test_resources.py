"""The small-machine resource convention and placement groups that fail fast instead of hanging."""
import os
import sys
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
    in_actor = load_config(None, {"placement.reference_in_actor": True, "ppo.actor.lora.dim": 4})
    assert [lay.role for lay in ppo_layout(in_actor)] == ["actor", "critic", "reward", "generator[0]"]


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


@pytest.mark.parametrize("configured, env, expected", [
    (None, None, "local"),  # nothing given: a private local cluster, never whatever Ray runs on this machine
    ("local", "10.0.0.1:6379", "local"),  # "local" wins over the environment
    (None, "10.0.0.1:6379", "10.0.0.1:6379"),  # the driver of `ray job submit` (RAY_ADDRESS)
    ("10.0.0.2:6379", "10.0.0.1:6379", "10.0.0.2:6379"),  # the config wins over the environment
    ("auto", None, "auto"),  # attaching to a cluster found on the machine only when asked for
])
def test_init_ray_attaches_only_to_an_address_given(monkeypatch, configured, env, expected):
    """What init_ray asks ray.init for (ray.init itself replaced: which cluster, not Ray, is under test)."""
    import rlhf_ray.resources as resources

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    if env is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", env)
    resources.init_ray(load_config(None, {"ray.address": configured}))
    assert len(calls) == 1 and calls[0]["address"] == expected
    assert ("num_cpus" in calls[0]) == (expected == "local")  # only a cluster we start declares its CPUs


def test_a_run_without_an_address_starts_its_own_cluster_beside_a_running_one(ray_cluster):
    """This test session's cluster is running; a run with no ray.address and no RAY_ADDRESS must not join it."""
    import subprocess
    import sys

    script = ("import ray\nfrom rlhf_ray.config import load_config\nfrom rlhf_ray.resources import init_ray\n"
              "init_ray(load_config(None, {}), logging_level='ERROR')\n"
              "print(ray.get_runtime_context().gcs_address)\nray.shutdown()\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] != ray_cluster.get_runtime_context().gcs_address


def _state_api_filtering() -> tuple[bool, bool]:
    """In a worker: whether Ray Train's PlacementGroupCleaner logger lets (its State API warning, another line) through."""
    import logging

    from rlhf_ray.env import PG_CLEANER_LOGGER, STATE_API_WARNING

    logger = logging.getLogger(PG_CLEANER_LOGGER)
    passes = lambda msg: logger.filter(  # noqa: E731
        logging.LogRecord(PG_CLEANER_LOGGER, logging.WARNING, __file__, 1, msg, None, None))
    return bool(passes(STATE_API_WARNING + ". State API may be temporarily unavailable.")), bool(passes("other"))


def test_local_clusters_drop_ray_trains_state_api_warning_in_every_worker(ray_cluster):
    """A private local cluster has no dashboard, so no State API: Ray Train's placement-group cleaner would log that
    it cannot query the controller every few seconds of every SFT / RM stage. Its workers drop that one line."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    assert ray.get(ray.remote(num_cpus=0)(_state_api_filtering).remote()) == (False, True)


def test_workers_of_an_oversubscribed_local_cluster_wait_passively(ray_cluster):
    """The session's local cluster has more logical CPUs than this machine's cores: its workers' OpenMP threads
    wait passively (resources.oversubscribed_env); a cluster with a core per CPU, or a user's own choice, keeps
    OpenMP's default."""
    import os

    from rlhf_ray.resources import machine_cores, oversubscribed_env

    def policy():
        return os.environ.get("OMP_WAIT_POLICY")

    assert ray_cluster.cluster_resources()["CPU"] > machine_cores()
    assert ray_cluster.get(ray_cluster.remote(num_cpus=0)(policy).remote()) == "PASSIVE"
    assert oversubscribed_env(8, 2, environ={}) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert oversubscribed_env(8, 8, environ={}) == {}
    assert oversubscribed_env(8, 2, environ={"OMP_WAIT_POLICY": "ACTIVE"}) == {}


def test_commands_count_the_threads_of_the_stages_they_run(monkeypatch, tmp_path):
    """`rlhf-ray sft` sizes its cluster's OpenMP waiting by SFT's threads alone; the pipeline by every stage's, before
    its first stage starts the cluster. Pure logic: init_ray is replaced by a recorder that stops the command."""
    import rlhf_ray.resources as resources
    from rlhf_ray.pipeline import run_pipeline
    from rlhf_ray.train.common import run_stage

    seen = []

    def record(cfg, concurrent_threads=None, **kwargs):
        seen.append(concurrent_threads)
        raise KeyboardInterrupt  # stop before any cluster or data

    monkeypatch.setattr(resources, "init_ray", record)
    cfg = load_config(None, {"run.output_dir": str(tmp_path)})  # default placement: PPO scores on 6 threads
    for run in (lambda: run_stage(cfg, "sft"), lambda: run_pipeline(cfg)):
        with pytest.raises(KeyboardInterrupt):
            run()
    assert seen == [2, 6]


def test_passive_waiting_only_where_processes_compute_on_more_threads_than_cores():
    """Pure logic: an oversubscribed local cluster keeps OpenMP's default (spinning briefly) when no phase of the run
    computes on more threads than there are cores, and waits passively otherwise or when the command does not say."""
    from rlhf_ray.resources import oversubscribed_env, peak_concurrent_threads

    assert oversubscribed_env(8, 2, environ={}, concurrent_threads=2) == {}
    assert oversubscribed_env(8, 2, environ={}, concurrent_threads=3) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert oversubscribed_env(8, 2, environ={}, concurrent_threads=None) == {"OMP_WAIT_POLICY": "PASSIVE"}

    # the GRPO bench's layout: one hybrid actor rank on 2 CPUs, the reference on 2, the rule reward alone, the
    # training pass giving the old log-probs: every phase computes on 2 threads
    grpo = {"placement.layout": "hybrid", "placement.actor.num_workers": 1, "placement.actor.cpus_per_worker": 2,
            "placement.reference.cpus_per_worker": 2, "generation.max_restarts": 0,
            "ppo.advantage_estimator": "grpo", "ppo.kl_penalty": "loss", "ppo.kl_estimator": "k3", "ppo.ppo_epochs": 1,
            "ppo.rollout_batch_size": 4, "generation.n_samples_per_prompt": 4, "ppo.mini_batch_size": 16,
            "ppo.reward_functions": ["rlhf_ray.data.builtin.rule_reward"], "ppo.reward_function_mode": "replace",
            "sft.num_workers": 1, "rm.num_workers": 1}
    assert peak_concurrent_threads(load_config(None, grpo)) == 2
    # a reward model scores beside the reference; the actor's old log-probs beside it (two mini-batches)
    assert peak_concurrent_threads(load_config(None, {**grpo, "ppo.reward_function_mode": "add"})) == 3
    assert peak_concurrent_threads(load_config(None, {**grpo, "ppo.mini_batch_size": 8})) == 4
    # the reference scored by the actor's ranks (LoRA), one call after the other on them: the actor's 2 threads
    assert peak_concurrent_threads(load_config(None, {**grpo, "ppo.mini_batch_size": 8, "ppo.actor.lora.dim": 4,
                                                      "placement.reference_in_actor": True})) == 2
    # generation beside training (async rollouts); the critic beside the reference (GAE)
    assert peak_concurrent_threads(load_config(None, {**grpo, "rollout.mode": "one_step"})) == 4
    assert peak_concurrent_threads(load_config(None, {**grpo, "ppo.advantage_estimator": "gae",
                                                      "placement.critic.num_workers": 1})) == 3
    # every Ray Train worker at once, whichever stage the cluster is started by (the pipeline counts every stage);
    # a command that runs one stage counts that stage only
    three_sft = load_config(None, {**grpo, "sft.num_workers": 3, "sft.deepspeed.global_batch_size": 6})
    assert peak_concurrent_threads(three_sft) == 3 and peak_concurrent_threads(three_sft, stages=("sft",)) == 3
    assert peak_concurrent_threads(three_sft, stages=("ppo",)) == 2
    assert peak_concurrent_threads(three_sft, stages=("rm",)) == 1
    base = load_config(None, {})  # default placement: PPO's scoring phase runs on more threads than SFT's 2 workers
    assert peak_concurrent_threads(base, stages=("sft",)) == 2 < peak_concurrent_threads(base)
    # the separate layout: engines x tensor parallel ranks generate together
    assert peak_concurrent_threads(load_config(None, {**grpo, "placement.layout": "separate",
                                                      "generation.num_engines": 3})) == 3
