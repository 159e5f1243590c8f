"""Every config key does something: a registry names, for each dotted key of `Config`, the collected test that fails
when the key is ignored, or the message that rejects a wrong value at load. `test_every_config_key_is_registered`
walks the dataclass tree and fails on any key without an entry (a new key needs one) or with a stale entry.

Below the registry: small, cheap tests for keys that no other test pinned down (pure logic, tiny models in-process,
no Ray, no vLLM, no DeepSpeed engine).
"""
from __future__ import annotations

import ast
import dataclasses
import json
import logging
import math
import shutil
import types
import typing
from pathlib import Path

import pytest
import torch

from rlhf_ray.config import Config, ConfigError, ModelConfig, load_config, ppo_learner

TESTS = Path(__file__).parent
ROOT = TESTS.parent

# ------------------------------------------------------------------------------------------- the registry
# dotted key -> "tests/<file>.py::<test>" (a collected test that fails when the key is ignored), or
# {"rejects": "<part of the load-time error>", "with": {overrides that produce it}}.
_T = "tests/test_config_registry.py::"
_PIPELINE, _GEN, _SYNC = "tests/test_data_pipeline.py::", "tests/test_generator.py::", "tests/test_weight_sync.py::"


def _dtype_conflict(role: str) -> dict:
    """models.<role>.dtype is read: an explicit dtype that contradicts the run's one precision is rejected."""
    return {"rejects": f"models.{role}.dtype is bfloat16 but ppo.actor.deepspeed.precision is fp32",
            "with": {f"models.{role}.path": "m", f"models.{role}.dtype": "bfloat16",
                     "ppo.actor.deepspeed.precision": "fp32"}}


REGISTRY: dict[str, str | dict] = {
    # run
    "run.name": _T + "test_metrics_logger_follows_the_logging_section",
    "run.output_dir": "tests/test_ppo.py::test_resume_continues_exactly_like_an_uninterrupted_run",
    "run.seed": "tests/test_ppo_unit.py::test_prompt_stream_resumes_at_its_position",
    # ray
    "ray.address": "tests/test_resources.py::test_init_ray_attaches_only_to_an_address_given",
    "ray.local_num_cpus": "tests/test_resources.py::test_local_cluster_declares_enough_cpus_for_every_bundle",
    "ray.placement_timeout_s": "tests/test_groups.py::test_unplaceable_role_fails_fast_naming_role_and_resources",
    # models
    "models.actor.path": "tests/test_train_common.py::test_disable_dropout",
    "models.actor.tokenizer": _T + "test_tokenizer_and_gguf_keys_reach_the_loaders",
    "models.actor.gguf_file": _T + "test_tokenizer_and_gguf_keys_reach_the_loaders",
    "models.actor.dtype": _dtype_conflict("actor"),
    "models.actor.trust_remote_code": _T + "test_trust_remote_code_reaches_every_loader",
    "models.reward.path": "tests/test_train_common.py::test_rm_scores_last_real_token_and_ranking_loss",
    "models.reward.tokenizer": _T + "test_tokenizer_and_gguf_keys_reach_the_loaders",
    "models.reward.gguf_file": _T + "test_tokenizer_and_gguf_keys_reach_the_loaders",
    "models.reward.dtype": _dtype_conflict("reward"),
    "models.reward.trust_remote_code": _T + "test_trust_remote_code_reaches_every_loader",
    "models.critic.path": _T + "test_critic_and_reference_models_default_to_reward_and_actor",
    "models.critic.tokenizer": {"rejects": "models.critic.tokenizer / models.critic.gguf_file",
                                "with": {"models.critic.path": "x", "models.critic.tokenizer": "y"}},
    "models.critic.gguf_file": {"rejects": "models.critic.tokenizer / models.critic.gguf_file",
                                "with": {"models.critic.path": "x", "models.critic.gguf_file": "y.gguf"}},
    "models.critic.dtype": _dtype_conflict("critic"),
    "models.critic.trust_remote_code": _T + "test_trust_remote_code_reaches_every_loader",
    "models.reference.path": _T + "test_critic_and_reference_models_default_to_reward_and_actor",
    "models.reference.tokenizer": {"rejects": "models.reference.tokenizer: the reference scores the actor's token ids",
                                   "with": {"models.reference.path": "x", "models.reference.tokenizer": "y"}},
    "models.reference.gguf_file": _T + "test_tokenizer_and_gguf_keys_reach_the_loaders",
    "models.reference.dtype": _dtype_conflict("reference"),
    "models.reference.trust_remote_code": _T + "test_trust_remote_code_reaches_every_loader",
    # data
    "data.datasets": _PIPELINE + "test_rm_static_and_hh_feed_sft_rm_ppo",
    "data.sft_only": _PIPELINE + "test_sft_only_data_feeds_sft_and_never_rm_or_ppo",
    "data.ptx": _PIPELINE + "test_ptx_packs_text_into_blocks",
    "data.data_split": _PIPELINE + "test_data_split_is_disjoint_seeded_and_sized",
    "data.eval_fraction": _PIPELINE + "test_data_split_is_disjoint_seeded_and_sized",
    "data.seed": _PIPELINE + "test_data_split_is_disjoint_seeded_and_sized",
    "data.max_prompt_len": _PIPELINE + "test_long_prompt_truncate_left_or_drop",
    "data.max_answer_len": _PIPELINE + "test_long_answer_truncate_or_drop_and_identical_after_truncation",
    "data.long_prompt": _PIPELINE + "test_long_prompt_truncate_left_or_drop",
    "data.long_answer": _PIPELINE + "test_long_answer_truncate_or_drop_and_identical_after_truncation",
    "data.use_chat_template": _PIPELINE + "test_use_chat_template_false_renders_hh_text",
    "data.max_bad_fraction": _PIPELINE + "test_bad_rows_are_reported_and_threshold_fails_naming_file",
    "data.cache_dir": _PIPELINE + "test_cache_dir_expands_user",
    "data.rebuild_cache": _PIPELINE + "test_cache_hit_and_invalidation",
    # generation
    "generation.num_engines": _GEN + "test_new_prompts_go_to_the_idle_engine",
    "generation.tensor_parallel_size": _GEN + "test_tp2_engine_matches_tp1_and_syncs_its_shards",
    "generation.max_new_tokens": _GEN + "test_sampling_from_config_and_core_assignment",
    "generation.temperature": _GEN + "test_sampling_from_config_and_core_assignment",
    "generation.top_p": _GEN + "test_sampling_from_config_and_core_assignment",
    "generation.top_k": _GEN + "test_sampling_from_config_and_core_assignment",
    "generation.n_samples_per_prompt": _GEN + "test_sampling_from_config_and_core_assignment",
    "generation.stop": _GEN + "test_sampling_from_config_and_core_assignment",
    "generation.max_model_len": _GEN + "test_long_prompt_is_an_error_naming_it_or_a_counted_skip",
    "generation.kv_cache_gib": _T + "test_kv_cache_gib_sizes_the_cpu_engines_cache",
    "generation.gpu_memory_utilization": _GEN + "test_sleep_frees_gpu_memory_and_wake_restores_generation",
    "generation.enforce_eager": _T + "test_enforce_eager_reaches_the_gpu_engine",
    "generation.long_prompt": _T + "test_skipped_prompts_are_replaced_so_batches_stay_whole",
    "generation.enable_sleep_mode": _T + "test_engines_sleep_only_where_vllm_frees_memory",
    "generation.stop_token_ids": _GEN + "test_sampling_from_config_and_core_assignment",
    "generation.ignore_eos": _GEN + "test_sampling_from_config_and_core_assignment",
    "generation.cpu_cores": _GEN + "test_sampling_from_config_and_core_assignment",
    "generation.max_restarts": _SYNC + "test_engine_without_restarts_left_is_dropped_and_its_prompts_served_elsewhere",
    "generation.sync_transport": _SYNC + "test_cuda_ipc_sync_into_an_engine_on_the_same_gpu",
    "generation.sync_bucket_mb": _SYNC + "test_bucket_size_option_sets_the_number_of_transfers",
    "generation.sync_timeout_s": _SYNC + "test_sync_timeout_bounds_a_stalled_sync",
    "generation.verify_weights": _SYNC + "test_verification_off_skips_checksums_and_probe",
    "generation.verify_probe_len": _SYNC + "test_sync_from_model_reaches_every_engine_verified_and_bucketed",
    "generation.verify_probe_atol": _SYNC + "test_probe_logprobs_are_checked_against_the_tolerance",
    "generation.verify_probe_every": _SYNC + "test_probe_every_n_syncs_checksums_every_sync",
    # ppo: controller and RL math
    "ppo.advantage_estimator":
        "tests/test_ppo_unit.py::test_group_estimators_center_each_group_and_penalise_kl_per_token",
    "ppo.num_iterations": "tests/test_ppo.py::test_resume_continues_exactly_like_an_uninterrupted_run",
    "ppo.rollout_batch_size": _T + "test_batch_divisibility_is_checked_at_load",
    "ppo.ppo_epochs": "tests/test_learner.py::test_critic_starts_from_reward_model_and_moves_toward_returns",
    "ppo.mini_batch_size": _T + "test_batch_divisibility_is_checked_at_load",
    "ppo.kl_coef": "tests/test_ppo_unit.py::test_gae_estimator_matches_the_rl_module_and_uses_kl_coef",
    "ppo.kl_estimator": _T + "test_loss_keys_change_the_learners_objectives",
    "ppo.kl_penalty": "tests/test_ppo_unit.py::test_training_pass_supplies_old_logprobs_only_when_exactly_on_policy",
    "ppo.adaptive_kl": _T + "test_kl_controller_follows_the_ppo_section",
    "ppo.kl_target": _T + "test_kl_controller_follows_the_ppo_section",
    "ppo.kl_horizon": _T + "test_kl_controller_follows_the_ppo_section",
    "ppo.clip_ratio": _T + "test_loss_keys_change_the_learners_objectives",
    "ppo.dual_clip": _T + "test_loss_keys_change_the_learners_objectives",
    "ppo.off_policy_correction": _T + "test_off_policy_correction_keys_change_the_actors_objective",
    "ppo.is_cap": _T + "test_off_policy_correction_keys_change_the_actors_objective",
    "ppo.is_mask_low": _T + "test_off_policy_correction_keys_change_the_actors_objective",
    "ppo.is_mask_high": _T + "test_off_policy_correction_keys_change_the_actors_objective",
    "ppo.clip_ratio_low": "tests/test_loss_options.py::test_loss_options_reach_the_learners_gradient",
    "ppo.clip_ratio_high": "tests/test_loss_options.py::test_loss_options_reach_the_learners_gradient",
    "ppo.policy_loss": "tests/test_loss_options.py::test_loss_options_reach_the_learners_gradient",
    "ppo.value_clip": _T + "test_loss_keys_change_the_learners_objectives",
    "ppo.reward_clip": _T + "test_advantage_keys_change_the_advantages",
    "ppo.gamma": _T + "test_advantage_keys_change_the_advantages",
    "ppo.lam": _T + "test_advantage_keys_change_the_advantages",
    "ppo.entropy_coef": _T + "test_loss_keys_change_the_learners_objectives",
    "ppo.loss_aggregation": _T + "test_loss_keys_change_the_learners_objectives",
    "ppo.whiten_advantages": "tests/test_ppo_unit.py::test_gae_estimator_matches_the_rl_module_and_uses_kl_coef",
    "ppo.kl_reward_shape": "tests/test_ppo_unit.py::test_kl_reward_shape_return_to_go_sums_the_kl_to_the_end",
    "ppo.dynamic_sampling": "tests/test_ppo.py::test_dapo_options_change_the_rollout_and_the_experience",
    "ppo.dynamic_sampling_max_rounds": "tests/test_ppo.py::test_dapo_options_change_the_rollout_and_the_experience",
    "ppo.overlong_mask": "tests/test_ppo.py::test_dapo_options_change_the_rollout_and_the_experience",
    "ppo.overlong_buffer": "tests/test_ppo.py::test_dapo_options_change_the_rollout_and_the_experience",
    "ppo.overlong_penalty": "tests/test_ppo.py::test_dapo_options_change_the_rollout_and_the_experience",
    "ppo.ema_decay": _T + "test_ema_actor_is_exported_next_to_the_actor",
    "ppo.ptx_coef": "tests/test_learner.py::test_ptx_loss_trains_on_pretraining_rows",
    "ppo.reward_functions": "tests/test_scorer.py::test_reward_functions_add_to_the_model_score",
    "ppo.reward_function_mode": "tests/test_scorer.py::test_replace_mode_skips_the_reward_model",
    "ppo.reward_http_timeout_s": _T + "test_reward_and_scorer_keys_reach_the_scorers",
    "ppo.reward_http_retries": _T + "test_reward_and_scorer_keys_reach_the_scorers",
    "ppo.reward_http_token_env": _T + "test_reward_and_scorer_keys_reach_the_scorers",
    "ppo.scorer_zero_stage": _T + "test_reward_and_scorer_keys_reach_the_scorers",
    "ppo.scorer_replica_max_gib": _T + "test_reward_and_scorer_keys_reach_the_scorers",
    "ppo.max_nonfinite_steps": "tests/test_nonfinite.py::test_max_nonfinite_steps_in_a_row_stop_with_a_clear_error",
    # placement
    "placement.colocate_actor_reference": "tests/test_resources.py::test_layout_follows_colocation_and_estimator",
    "placement.colocate_critic_reward": "tests/test_resources.py::test_layout_follows_colocation_and_estimator",
    "placement.layout": "tests/test_hybrid.py::test_hybrid_places_no_generator_group",
    "placement.reference_in_actor":
        "tests/test_ppo.py::test_a_lora_actor_scores_the_reference_itself_with_its_adapters_disabled",
    # logging, checkpoint
    "logging.log_every": _T + "test_metrics_logger_follows_the_logging_section",
    "logging.metrics_file": _T + "test_metrics_logger_follows_the_logging_section",
    "logging.tensorboard": _T + "test_metrics_logger_follows_the_logging_section",
    "logging.wandb_project": _T + "test_metrics_logger_follows_the_logging_section",
    "logging.level": _T + "test_log_level_comes_from_the_config_unless_the_flag_is_given",
    "checkpoint.every": "tests/test_ppo.py::test_resume_continues_exactly_like_an_uninterrupted_run",
    "checkpoint.keep_last": _T + "test_train_stage_job_keys_reach_the_ray_train_job",
    "rollout.mode": "tests/test_ppo.py::test_grpo_learns_generating_one_step_ahead_and_resumes_exactly",
    "rollout.samples_every": "tests/test_ppo.py::test_grpo_learns_generating_one_step_ahead_and_resumes_exactly",
    "rollout.max_staleness": "tests/test_ppo.py::test_grpo_learns_with_bounded_staleness_interrupting_samples_and_"
                             "resumes_exactly",
    "checkpoint.resume": "tests/test_ppo.py::test_resume_continues_exactly_like_an_uninterrupted_run",
    "ppo.max_learner_restarts": "tests/test_faults.py::test_recovery_gives_up_past_max_learner_restarts_and_passes_"
                                "other_errors_on",
    "checkpoint.storage": "tests/test_faults.py::test_controller_killed_while_writing_a_checkpoint_resumes_from_the_"
                          "previous_one",
}

# Learner sections: SFT / RM stages and the two PPO learners share their DeepSpeed, optimizer and LoRA keys.
for _section in ("sft", "rm", "ppo.actor", "ppo.critic"):
    for _key in ("zero_stage", "precision", "offload_optimizer", "offload_params", "micro_batch_size"):
        REGISTRY[f"{_section}.deepspeed.{_key}"] = _T + "test_deepspeed_keys_reach_the_deepspeed_config"
    REGISTRY[f"{_section}.optim.grad_clip"] = _T + "test_deepspeed_keys_reach_the_deepspeed_config"
    for _key in ("lr", "weight_decay", "betas", "warmup_steps", "lr_schedule"):
        REGISTRY[f"{_section}.optim.{_key}"] = _T + "test_learner_keys_reach_model_optimizer_and_schedule"
    for _key in ("dim", "alpha", "dropout", "module_names", "only_optimize_lora"):
        REGISTRY[f"{_section}.lora.{_key}"] = _T + "test_learner_keys_reach_model_optimizer_and_schedule"
    REGISTRY[f"{_section}.disable_dropout"] = _T + "test_learner_keys_reach_model_optimizer_and_schedule"
    REGISTRY[f"{_section}.deepspeed.gradient_checkpointing"] = \
        _T + "test_learner_keys_reach_model_optimizer_and_schedule"
    REGISTRY[f"{_section}.deepspeed.grad_reduction"] = \
        "tests/test_accumulation.py::test_auto_reduces_once_per_step_on_cpu_and_per_micro_batch_on_gpu"
    for _key in ("zero_hpz_partition_size", "zero_quantized_weights", "zero_quantized_gradients"):  # ZeRO++
        REGISTRY[f"{_section}.deepspeed.{_key}"] = \
            "tests/test_plan.py::test_zero_plus_plus_keys_reach_the_deepspeed_configs"
for _stage in ("sft", "rm"):
    REGISTRY |= {
        f"{_stage}.deepspeed.global_batch_size": _T + "test_deepspeed_keys_reach_the_deepspeed_config",
        f"{_stage}.output_dir": _T + "test_train_stage_job_keys_reach_the_ray_train_job",
        f"{_stage}.num_workers": _T + "test_train_stage_job_keys_reach_the_ray_train_job",
        f"{_stage}.epochs": _T + "test_train_stage_job_keys_reach_the_ray_train_job",
        f"{_stage}.max_steps": _T + "test_train_stage_job_keys_reach_the_ray_train_job",
        f"{_stage}.eval_every": _T + "test_train_stage_job_keys_reach_the_ray_train_job",
        f"{_stage}.log_every": _T + "test_train_stage_job_keys_reach_the_ray_train_job",
        f"{_stage}.checkpoint_every": _T + "test_train_stage_job_keys_reach_the_ray_train_job",
        f"{_stage}.max_failures": _T + "test_train_stage_job_keys_reach_the_ray_train_job",
        f"{_stage}.resume_from": _T + "test_train_stage_job_keys_reach_the_ray_train_job",
        f"{_stage}.use_gpu": _T + "test_train_stage_job_keys_reach_the_ray_train_job",
        f"{_stage}.cpus_per_worker": _T + "test_train_stage_job_keys_reach_the_ray_train_job",
    }
for _role in ("actor", "critic", "reference", "reward", "generator"):
    for _key in ("num_workers", "cpus_per_worker", "gpus_per_worker"):
        REGISTRY[f"placement.{_role}.{_key}"] = _T + "test_placement_keys_shape_the_placement_groups"
REGISTRY["placement.generator.num_workers"] = {"rejects": "placement.generator.num_workers: engines are counted by "
                                                          "generation.num_engines",
                                               "with": {"placement.generator.num_workers": 2}}
for _key in ("nodes", "gpus_per_node", "gpu_memory_gib", "cpu_memory_gib", "gpu_tflops", "gpu_memory_bandwidth_gbs",
             "intra_node_gbs", "pcie_gbs", "mfu", "mbu", "decode_step_overhead_s", "gpu_context_gib"):
    REGISTRY[f"cluster.{_key}"] = "tests/test_plan.py::test_option_changes_the_plan"
REGISTRY["cluster.timing_layout"] = "tests/test_plan.py::test_calibration_against_deepspeed_chat_table_1"
for _key in ("cpu_tflops", "cpu_memory_bandwidth_gbs", "inter_node_gbs"):
    REGISTRY[f"cluster.{_key}"] = "tests/test_plan.py::test_network_and_cpu_options_change_time"


def config_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the dataclass tree (an Optional section counts as its section; a list as one key)."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            inner = [a for a in typing.get_args(tp) if a is not type(None)]
            tp = inner[0] if len(inner) == 1 else tp
        if dataclasses.is_dataclass(tp):
            keys += config_keys(tp, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def collected_tests() -> set[str]:
    """'tests/<file>.py::<function>' of every module-level test function (what pytest collects, parameters aside)."""
    names = set()
    for path in sorted(TESTS.glob("test_*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test"):
                names.add(f"tests/{path.name}::{node.name}")
    return names


def test_every_config_key_is_registered():
    keys = config_keys()
    missing = [k for k in keys if k not in REGISTRY]
    stale = sorted(set(REGISTRY) - set(keys))
    tests = collected_tests()
    unknown_tests = sorted(f"{k} -> {v}" for k, v in REGISTRY.items() if isinstance(v, str) and v not in tests)
    problems = []
    if missing:
        problems.append(f"{len(missing)} config key(s) have no entry in tests/test_config_registry.py REGISTRY (name a "
                        f"test that fails when the key is ignored, or its load-time rejection):\n  "
                        + "\n  ".join(missing))
    if stale:
        problems.append("REGISTRY names keys the config no longer has:\n  " + "\n  ".join(stale))
    if unknown_tests:
        problems.append("REGISTRY names tests that are not collected:\n  " + "\n  ".join(unknown_tests))
    assert not problems, "\n".join(problems)


def test_registered_rejections_are_raised_at_load():
    config_source = (ROOT / "rlhf_ray" / "config.py").read_text()
    for key, entry in REGISTRY.items():
        if isinstance(entry, str):
            continue
        message = entry["rejects"]
        if "with" not in entry:
            assert message in config_source, f"{key}: '{message}' appears nowhere in rlhf_ray/config.py"
            continue
        with pytest.raises(ConfigError) as raised:
            load_config(None, entry["with"])
        assert message in str(raised.value), f"{key}: {entry['with']} failed with another error: {raised.value}"


# ----------------------------------------------------------------------------- learner sections (pure)
LEARNER_SECTIONS = ["sft", "rm", "ppo.actor", "ppo.critic"]


def _learner_section(cfg: Config, name: str):
    """What the code hands to deepspeed_config: the stage's section, or ppo_learner's (the run's one precision)."""
    return ppo_learner(cfg, name.split(".")[1]) if name.startswith("ppo.") else getattr(cfg, name)


@pytest.mark.parametrize("name", LEARNER_SECTIONS)
def test_deepspeed_keys_reach_the_deepspeed_config(name):
    from rlhf_ray.train.deepspeed_config import deepspeed_config

    ppo = name.startswith("ppo.")
    batch = {"ppo.mini_batch_size": 16, "ppo.rollout_batch_size": 16} if ppo else \
        {f"{name}.deepspeed.global_batch_size": 16}
    cfg = load_config(None, {f"{name}.deepspeed.zero_stage": 3, f"{name}.deepspeed.micro_batch_size": 4,
                             f"{name}.deepspeed.precision": "fp16", f"{name}.deepspeed.offload_optimizer": True,
                             f"{name}.deepspeed.offload_params": True, f"{name}.optim.grad_clip": 0.25, **batch})
    step_batch = cfg.ppo.mini_batch_size if ppo else None  # what the PPO learners pass
    ds = deepspeed_config(_learner_section(cfg, name), num_ranks=2, cuda=True, train_batch_size=step_batch)
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"]) == (16, 4)
    assert ds["gradient_accumulation_steps"] == 2  # 16 / (4 x 2 ranks)
    assert ds["fp16"]["enabled"] and not ds["bf16"]["enabled"] and ds["gradient_clipping"] == 0.25
    default = deepspeed_config(_learner_section(load_config(None, {}), name), 2, cuda=True,
                               train_batch_size=8 if ppo else None)
    assert default["zero_optimization"] == {"stage": 2} and default["bf16"]["enabled"]


@pytest.fixture(scope="module")
def dropout_models(tiny_models, tmp_path_factory) -> dict[str, str]:
    """The tiny OPT with dropout 0.3 (so disable_dropout is visible), and a value-head folder on it."""
    from rlhf_ray.models import ValueHeadModel

    root = tmp_path_factory.mktemp("dropout_models")
    lm = root / "opt"
    shutil.copytree(tiny_models["opt"], lm)
    config = json.loads((lm / "config.json").read_text())
    config.update(dropout=0.3, attention_dropout=0.3)
    (lm / "config.json").write_text(json.dumps(config))
    ValueHeadModel.from_causal_lm(str(lm)).save_pretrained(root / "value")
    return {"lm": str(lm), "value": str(root / "value")}


def _built(name: str, cfg: Config, total_steps: int = 10):
    """(model, optimizer, scheduler) as the code that trains `name` builds them."""
    from rlhf_ray.learner import CriticLearner, PolicyLearner, critic_model
    from rlhf_ray.train import rm, sft
    from rlhf_ray.train.common import build_lr_scheduler, build_optimizer

    if name in ("sft", "rm"):
        stage = getattr(cfg, name)
        model = (sft if name == "sft" else rm).build_model(cfg, stage)
        optimizer = build_optimizer(model, stage.optim)
        return model, optimizer, build_lr_scheduler(optimizer, stage.optim, total_steps)
    role = name.split(".")[1]
    cls, model_cfg = (PolicyLearner, cfg.models.actor) if role == "actor" else (CriticLearner, critic_model(cfg))
    learner = cls(role, 0, 1, model=model_cfg, stage=ppo_learner(cfg, role), ppo=cfg.ppo, total_steps=total_steps)
    learner.cuda = False
    model = learner.prepare_model(learner.build_model())
    optimizer = learner.make_optimizer(model)
    return model, optimizer, learner.make_scheduler(optimizer)


def _dropout(model) -> float:
    """The OPT backbone's dropout probability (its layers apply it functionally, from the config)."""
    return next(m.config.dropout for m in model.modules() if hasattr(getattr(m, "config", None), "dropout"))


@pytest.mark.parametrize("name", LEARNER_SECTIONS)
def test_learner_keys_reach_model_optimizer_and_schedule(name, dropout_models):
    """disable_dropout, gradient_checkpointing, lora.* and optim.* of each learner section change what is built."""
    models = {"models.actor.path": dropout_models["lm"], "models.reward.path":
              dropout_models["lm"] if name == "rm" else dropout_models["value"]}
    cfg = load_config(None, {**models, f"{name}.disable_dropout": False,
                             f"{name}.deepspeed.gradient_checkpointing": True,
                             f"{name}.lora.dim": 4, f"{name}.lora.alpha": 8.0, f"{name}.lora.dropout": 0.125,
                             f"{name}.lora.module_names": ["q_proj", "v_proj"],
                             f"{name}.lora.only_optimize_lora": False,
                             f"{name}.optim.lr": 0.01, f"{name}.optim.weight_decay": 0.1,
                             f"{name}.optim.betas": [0.8, 0.9], f"{name}.optim.warmup_steps": 2,
                             f"{name}.optim.lr_schedule": "linear"})
    model, optimizer, scheduler = _built(name, cfg)
    assert _dropout(model) == pytest.approx(0.3)
    assert any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
    lora = {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "r")}
    assert {n.rsplit(".", 1)[-1] for n in lora} == {"q_proj", "v_proj"}
    layer = next(iter(lora.values()))
    assert (layer.r["default"], layer.lora_alpha["default"], layer.lora_dropout["default"].p) == (4, 8.0, 0.125)
    assert all(p.requires_grad for p in model.parameters())  # only_optimize_lora false
    groups = optimizer.param_groups
    assert {g["lr"] for g in groups} == {0.0} and all(tuple(g["betas"]) == (0.8, 0.9) for g in groups)  # warm-up
    assert max(g["weight_decay"] for g in groups) == pytest.approx(0.1)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    assert groups[0]["lr"] == pytest.approx(0.01 * 6 / 8)  # linear: (10 - 4) / (10 - 2) after a 2-step warm-up

    cfg = load_config(None, {**models, f"{name}.lora.dim": 4})  # defaults: dropout off, only LoRA (and head) trained
    model, optimizer, scheduler = _built(name, cfg)
    assert _dropout(model) == 0.0
    assert not any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
    assert all("lora_" in n or "v_head" in n for n, p in model.named_parameters() if p.requires_grad)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-5 * 0.5 * (1 + math.cos(math.pi * 0.4)))  # cosine


# ------------------------------------------------------------------------------------- model loading
def _custom_code_model(llama: str, root: Path) -> tuple[str, str]:
    """The tiny Llama behind a config class of its own (auto_map): loading it needs trust_remote_code. Returns the
    causal-LM folder and a value-head folder on it."""
    from rlhf_ray.models import ValueHeadModel

    custom = root / "custom"
    shutil.copytree(llama, custom)
    (custom / "configuration_custom.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass CustomLlamaConfig(LlamaConfig):\n"
        "    model_type = 'rlhf_ray_custom_llama'\n")
    (custom / "modeling_custom.py").write_text(
        "from transformers import LlamaForCausalLM, LlamaModel\n\nfrom .configuration_custom import CustomLlamaConfig\n"
        "\n\nclass CustomLlamaModel(LlamaModel):\n    config_class = CustomLlamaConfig\n\n\n"
        "class CustomLlamaForCausalLM(LlamaForCausalLM):\n    config_class = CustomLlamaConfig\n")
    config = json.loads((custom / "config.json").read_text())
    config.update(model_type="rlhf_ray_custom_llama", auto_map={
        "AutoConfig": "configuration_custom.CustomLlamaConfig", "AutoModel": "modeling_custom.CustomLlamaModel",
        "AutoModelForCausalLM": "modeling_custom.CustomLlamaForCausalLM"})
    (custom / "config.json").write_text(json.dumps(config))
    ValueHeadModel.from_causal_lm(str(custom), trust_remote_code=True).save_pretrained(root / "custom_value")
    return str(custom), str(root / "custom_value")


def test_trust_remote_code_reaches_every_loader(tiny_llama, tmp_path):
    """models.<role>.trust_remote_code is passed wherever that model loads: SFT, RM, the PPO learners and scorers
    (vLLM's LLM(...) gets models.actor's too, generator.VLLMEngine)."""
    from rlhf_ray.learner import CriticLearner, PolicyLearner, critic_model
    from rlhf_ray.scorer import ReferenceScorer, RewardScorer, reference_model
    from rlhf_ray.train import rm, sft

    lm, value = _custom_code_model(tiny_llama, tmp_path)

    def loaders(cfg):
        return {
            "sft": lambda: sft.build_model(cfg, cfg.sft),
            "rm": lambda: rm.build_model(cfg, cfg.rm),
            "actor": lambda: PolicyLearner("actor", 0, 1, model=cfg.models.actor, stage=cfg.ppo.actor,
                                           ppo=cfg.ppo).build_model(),
            "critic": lambda: CriticLearner("critic", 0, 1, model=critic_model(cfg), stage=cfg.ppo.critic,
                                            ppo=cfg.ppo).build_model(),
            "reference": lambda: ReferenceScorer("reference", 0, 1, model=reference_model(cfg),
                                                 deepspeed=cfg.ppo.actor.deepspeed).load(lm, torch.float32),
            "reward": lambda: RewardScorer("reward", 0, 1, model=cfg.models.reward,
                                           deepspeed=cfg.ppo.critic.deepspeed).load(value, torch.float32),
        }

    def config(trust: bool, reward: str) -> Config:  # RM training starts from a causal LM, PPO reads a value head
        return load_config(None, {"models.actor.path": lm, "models.reward.path": reward,
                                  "models.critic.path": value, "models.reference.path": lm,
                                  **{f"models.{r}.trust_remote_code": trust
                                     for r in ("actor", "reward", "critic", "reference")}})

    for trust in (True, False):
        for reward in (lm, value):
            for role, load in loaders(config(trust, reward)).items():
                if (role == "rm") != (reward == lm):
                    continue
                if trust:
                    model = load()
                    assert "Custom" in type(getattr(model, "backbone", model)).__name__, role
                else:
                    with pytest.raises(ValueError, match="trust_remote_code"):
                        load()


def test_tokenizer_and_gguf_keys_reach_the_loaders(tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    from rlhf_ray.models.loading import load_causal_lm, load_tokenizer
    from rlhf_ray.scorer import reference_model
    from rlhf_ray.train import rm, sft

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.add_tokens(["<rlhf_ray_extra>"])
    tok.save_pretrained(tmp_path / "tok")
    cfg = load_config(None, {"models.actor.path": tiny_llama, "models.actor.tokenizer": str(tmp_path / "tok"),
                             "models.reward.path": tiny_llama, "models.reward.tokenizer": str(tmp_path / "tok")})
    assert len(load_tokenizer(cfg.models.actor)) == len(rm.load_tokenizer(cfg)) == len(tok) == len(
        load_tokenizer(ModelConfig(path=tiny_llama))) + 1
    gguf = load_config(None, {f"models.{r}.{k}": v for r in ("actor", "reward", "reference")
                              for k, v in (("path", tiny_llama), ("gguf_file", "absent.gguf"))})
    for load in (lambda: sft.build_model(gguf, gguf.sft), lambda: rm.build_model(gguf, gguf.rm),
                 lambda: load_causal_lm(reference_model(gguf)), lambda: load_tokenizer(gguf.models.actor)):
        with pytest.raises(OSError, match="absent.gguf"):
            load()


def test_critic_and_reference_models_default_to_reward_and_actor():
    from rlhf_ray.learner import critic_model
    from rlhf_ray.scorer import reference_model

    cfg = load_config(None, {"models.actor.path": "a", "models.reward.path": "r"})
    assert (critic_model(cfg).path, reference_model(cfg).path) == ("r", "a")
    cfg = load_config(None, {"models.actor.path": "a", "models.reward.path": "r", "models.critic.path": "c",
                             "models.reference.path": "f"})
    assert (critic_model(cfg).path, reference_model(cfg).path) == ("c", "f")


# ------------------------------------------------------------------------------------- PPO controller
def test_batch_divisibility_is_checked_at_load():
    """rollout_batch_size x n_samples_per_prompt must be whole mini-batches, and a mini-batch whole micro-batches
    on every rank of both learners: at load, not when the learners first train."""
    load_config(None, {"ppo.rollout_batch_size": 4, "generation.n_samples_per_prompt": 2, "ppo.mini_batch_size": 8})
    with pytest.raises(ConfigError, match=r"ppo.rollout_batch_size \(6\) x generation.n_samples_per_prompt \(1\) = 6 "
                                          r"samples per iteration must be a multiple of ppo.mini_batch_size \(4\)"):
        load_config(None, {"ppo.rollout_batch_size": 6, "ppo.mini_batch_size": 4})
    with pytest.raises(ConfigError, match=r"ppo.mini_batch_size \(8\) must be a multiple of ppo.critic.deepspeed"
                                          r".micro_batch_size \(3\) x placement.critic.num_workers"):
        load_config(None, {"ppo.critic.deepspeed.micro_batch_size": 3})
    load_config(None, {"ppo.critic.deepspeed.micro_batch_size": 3, "ppo.advantage_estimator": "reinforce_pp"})


def test_dapo_and_kl_shape_contradictions_fail_at_load_naming_the_keys():
    grpo = {"ppo.advantage_estimator": "grpo", "generation.n_samples_per_prompt": 2}
    load_config(None, {**grpo, "ppo.dynamic_sampling": True, "ppo.overlong_mask": True, "ppo.overlong_buffer": 16,
                       "ppo.kl_reward_shape": "return_to_go"})
    cases = [
        ({"ppo.advantage_estimator": "reinforce_pp", "ppo.dynamic_sampling": True},
         "ppo.dynamic_sampling drops groups whose scores tie: it needs generation.n_samples_per_prompt >= 2"),
        ({"generation.n_samples_per_prompt": 2, "ppo.dynamic_sampling": True},
         "ppo.dynamic_sampling with ppo.advantage_estimator gae"),
        ({**grpo, "ppo.dynamic_sampling": True, "ppo.dynamic_sampling_max_rounds": -1},
         "ppo.dynamic_sampling_max_rounds must be >= 0"),
        ({"ppo.overlong_buffer": 64}, "ppo.overlong_buffer (64) must be >= 0 and below generation.max_new_tokens (64)"),
        ({"ppo.overlong_penalty": -1.0}, "ppo.overlong_penalty must be >= 0"),
        ({"ppo.overlong_mask": True, "generation.ignore_eos": True}, "ppo.overlong_mask with generation.ignore_eos"),
        ({"ppo.kl_reward_shape": "return_to_go"},
         "with ppo.advantage_estimator gae and ppo.kl_penalty 'reward' it would do nothing"),
        ({**grpo, "ppo.kl_reward_shape": "return_to_go", "ppo.kl_penalty": "loss", "ppo.kl_estimator": "k3"},
         "with ppo.advantage_estimator grpo and ppo.kl_penalty 'loss' it would do nothing"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError) as raised:
            load_config(None, overrides)
        assert message in str(raised.value), (overrides, raised.value)


def test_skipped_prompts_are_replaced_so_batches_stay_whole():
    """generation.long_prompt: skip drops prompts the engines cannot take; the controller asks the stream for more
    until rollout_batch_size prompts are answered, so the sample count stays whole mini-batches."""
    from rlhf_ray.generator import Rollout, Sample
    from rlhf_ray.experience import PromptStream, answered_rollout

    rows = [{"prompt_input_ids": [1] * (9 if i % 3 == 0 else 2), "prompt": f"p{i}", "reference": ""}
            for i in range(12)]
    stream, calls = PromptStream(rows, seed=0), []

    def generate(batch, offset):  # as the engines answer with long_prompt: skip (max_model_len 8), 2 samples each
        calls.append((len(batch), offset))
        skipped = [i for i, r in enumerate(batch) if len(r["prompt_input_ids"]) >= 8]
        samples = [Sample(i, [7, j], [0.0, 0.0], "length", sample_index=j)
                   for i in range(len(batch)) if i not in skipped for j in range(2)]
        return Rollout(samples, 0, skipped=skipped, engine_prompts={0: len(batch) - len(skipped)})

    got, samples, totals = answered_rollout(stream.take, generate, want=6, max_prompts=len(rows))
    assert len(got) == 6 and all(len(r["prompt_input_ids"]) == 2 for r in got) and len(samples) == 12
    assert [(s.prompt_index, s.sample_index) for s in samples] == [(i, j) for i in range(6) for j in range(2)]
    assert totals["skipped"] == sum(n for n, _ in calls) - 6 > 0 and stream.position == sum(n for n, _ in calls)
    long_ids = [r["prompt_id"] for r in (stream.row_at(i) for i in range(stream.position))
                if len(r["prompt_input_ids"]) >= 8]
    assert totals["skipped_ids"] == long_ids and len(long_ids) == totals["skipped"]  # accounted for by id
    assert [offset for _, offset in calls] == [sum(n for n, _ in calls[:k]) for k in range(len(calls))]
    all_long = PromptStream([dict(rows[0])], seed=0)
    with pytest.raises(ValueError, match="generation.long_prompt: skip: 2 of 2 prompts"):
        answered_rollout(all_long.take, generate, want=2, max_prompts=1)


def test_engines_sleep_only_where_vllm_frees_memory(caplog):
    from rlhf_ray.ppo import engines_sleep

    with caplog.at_level(logging.INFO, logger="rlhf_ray.ppo"):
        assert engines_sleep(True, [{"sleep_enabled": True}, {"sleep_enabled": True}])
        assert not engines_sleep(False, [{"sleep_enabled": True}])
        assert not caplog.records
        assert not engines_sleep(True, [{"sleep_enabled": False}])  # CPU engines
    assert [r.getMessage() for r in caplog.records] == [
        "generation.enable_sleep_mode: ignored, the engines run on CPU where vLLM's sleep frees nothing"]


def test_ema_actor_is_exported_next_to_the_actor(tmp_path):
    from rlhf_ray.ppo import export_actor

    class Actor:  # records what a PolicyGroup would be asked to write
        def __init__(self):
            self.saved = []

        def save_pretrained(self, path, ema=False):
            self.saved.append((Path(path).name, ema))

    for ema_decay, expected in ((None, [("actor", False)]), (0.99, [("actor", False), ("actor_ema", True)])):
        actor = Actor()
        cfg = load_config(None, {"ppo.ema_decay": ema_decay})
        assert export_actor(actor, tmp_path, cfg.ppo.ema_decay) == tmp_path / "actor"
        assert actor.saved == expected


def test_kl_controller_follows_the_ppo_section():
    from rlhf_ray import rl
    from rlhf_ray.ppo import kl_controller

    fixed = kl_controller(load_config(None, {"ppo.kl_coef": 0.2}).ppo)
    assert isinstance(fixed, rl.FixedKLController) and fixed.value == 0.2
    adaptive = load_config(None, {"ppo.adaptive_kl": True, "ppo.kl_target": 1.0, "ppo.kl_horizon": 100})
    ctl = kl_controller(adaptive.ppo)
    ctl.update(current_kl=2.0, n_steps=10)  # Ziegler et al.: coef *= 1 + clip(kl / target - 1, +-0.2) * n / horizon
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))


def test_advantage_keys_change_the_advantages():
    """ppo.gamma, lam and reward_clip, as compute_advantages reads them."""
    from rlhf_ray.experience import compute_advantages

    g = torch.Generator().manual_seed(0)
    logprobs, ref = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    mask, values, scores = torch.ones(4, 6), torch.randn(4, 6, generator=g), torch.tensor([9.0, -9.0, 0.5, 1.0])

    def advantages(**overrides):
        p = load_config(None, {f"ppo.{k}": v for k, v in overrides.items()}).ppo
        out = compute_advantages(p, 0.1, scores, logprobs, ref, mask, 1, values)
        return out.advantages, out.returns

    base = advantages(whiten_advantages=False)
    for key, value in (("gamma", 0.9), ("lam", 0.5), ("reward_clip", 1.0)):
        changed = advantages(whiten_advantages=False, **{key: value})
        assert not torch.allclose(base[1], changed[1]), key


def test_loss_keys_change_the_learners_objectives():
    """ppo.clip_ratio, dual_clip, loss_aggregation, entropy_coef, kl_estimator (KL in the loss) and value_clip, as
    the learners' micro-batch objectives read them."""
    from rlhf_ray.learner import policy_objective, value_objective

    g = torch.Generator().manual_seed(0)
    shape = (3, 5)
    mask = torch.ones(shape)
    mask[0, 3:] = 0  # rows of different lengths: the aggregations differ
    mb = {"action_mask": mask, "old_logprobs": torch.randn(shape, generator=g) - 1,
          "advantages": torch.randn(shape, generator=g) * 3, "ref_logprobs": torch.randn(shape, generator=g) - 1,
          "old_values": torch.randn(shape, generator=g), "returns": torch.randn(shape, generator=g) * 2}
    logprobs, entropy = torch.randn(shape, generator=g) - 1, torch.rand(shape, generator=g)
    values = mb["old_values"] + torch.randn(shape, generator=g)

    def policy(**overrides) -> float:
        p = load_config(None, {"ppo.kl_penalty": "loss", "ppo.kl_estimator": "k3",
                               **{f"ppo.{k}": v for k, v in overrides.items()}}).ppo
        return policy_objective(p, logprobs, entropy, mb, kl_coef=0.5)[0].item()

    base = policy()
    for key, value in (("clip_ratio", 0.05), ("dual_clip", 1.5), ("loss_aggregation", "seq-mean-token-sum"),
                       ("entropy_coef", 0.1), ("kl_estimator", "k2")):
        assert policy(**{key: value}) != pytest.approx(base), key

    def value(**overrides) -> float:
        p = load_config(None, {f"ppo.{k}": v for k, v in overrides.items()}).ppo
        return value_objective(p, values, mb)[0].item()

    assert value(value_clip=0.01) != pytest.approx(value())
    assert value(loss_aggregation="seq-mean-token-sum") != pytest.approx(value())


def test_off_policy_correction_keys_change_the_actors_objective():
    """ppo.off_policy_correction with is_cap / is_mask_low / is_mask_high, as the actor's micro-batch objective reads
    them: the engines' log-probs (vllm_logprobs) weigh or mask the tokens; none leaves the loss as it was."""
    from rlhf_ray.learner import policy_objective

    g = torch.Generator().manual_seed(1)
    shape = (4, 6)
    mask = torch.ones(shape)
    old = torch.randn(shape, generator=g) - 1
    mb = {"action_mask": mask, "old_logprobs": old, "advantages": torch.randn(shape, generator=g) * 3,
          "vllm_logprobs": old + torch.randn(shape, generator=g)}  # rho from e^-2 to e^2 and beyond
    logprobs, entropy = old + 0.1 * torch.randn(shape, generator=g), torch.rand(shape, generator=g)

    def policy(**overrides) -> tuple[float, dict]:
        p = load_config(None, {f"ppo.{k}": v for k, v in overrides.items()}).ppo
        loss, stats = policy_objective(p, logprobs, entropy, mb, kl_coef=0.0)
        return loss.item(), stats

    base, stats = policy()
    assert "is_ratio_mean" not in stats
    for mode in ("tis", "icepop", "seq_mask"):
        loss, stats = policy(off_policy_correction=mode)
        assert loss != pytest.approx(base) and 0 < stats["corrected_fraction"] < 1, mode
    assert policy(off_policy_correction="tis", is_cap=1.5)[0] != pytest.approx(policy(off_policy_correction="tis")[0])
    for key, value in (("is_mask_low", 0.3), ("is_mask_high", 1.05)):
        for mode in ("icepop", "seq_mask"):
            assert policy(off_policy_correction=mode, **{key: value})[0] != \
                pytest.approx(policy(off_policy_correction=mode)[0]), (key, mode)
    for bad, message in (({"is_cap": 0}, "ppo.is_cap must be > 0"),
                         ({"is_mask_low": 1.2}, "ppo.is_mask_low and ppo.is_mask_high must satisfy"),
                         ({"is_mask_high": 0.9}, "ppo.is_mask_low and ppo.is_mask_high must satisfy")):
        with pytest.raises(ConfigError, match=message):
            load_config(None, {f"ppo.{k}": v for k, v in bad.items()})


def test_reward_and_scorer_keys_reach_the_scorers(monkeypatch, tiny_llama):
    """ppo.reward_http_* reach the HTTP reward function; scorer_zero_stage / scorer_replica_max_gib the scorers."""
    from rlhf_ray.scorer import ReferenceScorer, RewardScorer, _scorer_kwargs, reward_worker_kwargs

    monkeypatch.setenv("RLHF_RAY_TEST_REWARD_TOKEN", "s3cret")
    cfg = load_config(None, {"models.actor.path": tiny_llama, "ppo.reward_functions": ["http://127.0.0.1:9/score"],
                             "ppo.reward_http_timeout_s": 1.5, "ppo.reward_http_retries": 4,
                             "ppo.reward_http_token_env": "RLHF_RAY_TEST_REWARD_TOKEN",
                             "ppo.scorer_replica_max_gib": 1e-6})
    [fn] = RewardScorer("reward", 0, 1, **reward_worker_kwargs(cfg)).functions
    assert (fn.timeout_s, fn.retries, fn.headers) == (1.5, 4, {"Authorization": "Bearer s3cret"})
    reference = ReferenceScorer("reference", 0, 2, model=None, **_scorer_kwargs(cfg, cfg.ppo.actor.deepspeed))
    assert reference.choose_zero_stage(tiny_llama) == 3  # above scorer_replica_max_gib: partitioned
    pinned = load_config(None, {"ppo.scorer_zero_stage": 0, "ppo.scorer_replica_max_gib": 1e-6})
    reference = ReferenceScorer("reference", 0, 2, model=None, **_scorer_kwargs(pinned, pinned.ppo.actor.deepspeed))
    assert reference.choose_zero_stage(tiny_llama) == 0


def test_kv_cache_gib_sizes_the_cpu_engines_cache():
    """What VLLMEngine passes as kv_cache_memory_bytes on CPU; a live engine reports it back
    (test_generator.py::test_two_engines_greedy_ids_and_logprobs_equal_transformers, kv_cache_gib 0.5)."""
    from rlhf_ray.generator import cpu_kv_cache_bytes

    assert cpu_kv_cache_bytes(load_config(None, {"generation.kv_cache_gib": 3}).generation) == 3 * 2**30
    assert cpu_kv_cache_bytes(load_config(None, {"generation.kv_cache_gib": 0.25}).generation) == 2**28
    assert cpu_kv_cache_bytes(load_config(None, {}).generation) == 2**30


# ------------------------------------------------------------------------------------------ logging
def test_metrics_logger_follows_the_logging_section(tmp_path):
    import importlib.util

    from rlhf_ray.metrics import MetricsLogger, read_metrics

    cfg = load_config(None, {"logging.log_every": 2, "logging.metrics_file": "m.jsonl", "logging.tensorboard": False,
                             "run.name": "named-run"})
    logger = MetricsLogger.from_config(cfg, tmp_path / "a", total_steps=5)
    for step in range(1, 6):
        logger.log(step, {"reward/mean": float(step)})
    assert logger.bar.desc.startswith("named-run")
    logger.close()
    assert [r["iteration"] for r in read_metrics(tmp_path / "a" / "m.jsonl")] == [2, 4, 5]  # every 2nd and the last
    assert not (tmp_path / "a" / "tensorboard").exists()
    logger = MetricsLogger.from_config(load_config(None, {}), tmp_path / "b")
    logger.log(1, {"reward/mean": 1.0})
    logger.close()
    assert (tmp_path / "b" / "metrics.jsonl").is_file() and (tmp_path / "b" / "tensorboard").is_dir()
    if importlib.util.find_spec("wandb") is None:  # W&B is optional: asking for it without it installed fails
        with pytest.raises(ImportError):
            MetricsLogger.from_config(load_config(None, {"logging.wandb_project": "p", "logging.tensorboard": False}),
                                      tmp_path / "c")


def test_log_level_comes_from_the_config_unless_the_flag_is_given(tmp_path, capsys, monkeypatch):
    from rlhf_ray import cli, console

    levels, real = [], console.open_console
    monkeypatch.setattr(console, "open_console", lambda level, *args: levels.append(level) or real(level, *args))
    root = logging.getLogger()
    before, handlers = root.level, list(root.handlers)
    path = tmp_path / "c.yaml"
    path.write_text("logging:\n  level: WARNING\n")
    assert cli.main(["config", "show", str(path)]) == 0
    assert cli.main(["config", "show", str(path), "--logging.level", "ERROR"]) == 0
    assert cli.main(["--log-level", "DEBUG", "config", "show", str(path)]) == 0
    assert levels == ["WARNING", "ERROR", "DEBUG"]
    assert (root.level, root.handlers) == (before, handlers)  # the console leaves logging as it found it
    capsys.readouterr()


# ------------------------------------------------------------------------------ SFT / RM Ray Train job
@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_train_stage_job_keys_reach_the_ray_train_job(stage, tmp_path):
    """output_dir, num_workers, epochs, max_steps, use_gpu, cpus_per_worker, max_failures, resume_from, the eval /
    checkpoint / log cadence (and checkpoint.keep_last) decide the stage's folder, plan, workers and steps."""
    from rlhf_ray.train.common import make_plan, resume_checkpoint, run_config, scaling_config, stage_output_dir, \
        step_actions

    cfg = load_config(None, {"run.output_dir": str(tmp_path), f"{stage}.num_workers": 4,
                             f"{stage}.deepspeed.global_batch_size": 8, f"{stage}.max_steps": 3,
                             f"{stage}.use_gpu": False, f"{stage}.cpus_per_worker": 2.5})
    assert stage_output_dir(cfg, stage) == (tmp_path / stage).resolve()
    s = getattr(cfg, stage)
    plan = make_plan(s, num_rows=1000, num_ranks=s.num_workers, seed=0, name=stage)
    assert (plan.num_ranks, plan.total_steps, plan.accumulation) == (4, 3, 1)
    scaling = scaling_config(s, cluster_gpus=8)
    assert (scaling.num_workers, scaling.use_gpu, scaling.resources_per_worker) == (4, False, {"CPU": 2.5})
    assert scaling_config(load_config(None, {f"{stage}.use_gpu": True}).__getattribute__(stage), 0).use_gpu
    other = load_config(None, {f"{stage}.output_dir": str(tmp_path / "elsewhere")})
    assert stage_output_dir(other, stage) == (tmp_path / "elsewhere").resolve()

    cadence = getattr(load_config(None, {f"{stage}.eval_every": 4, f"{stage}.checkpoint_every": 6,
                                         f"{stage}.log_every": 3}), stage)
    actions = {done: step_actions(cadence, done, total=13) for done in range(1, 14)}
    assert [d for d, (e, _, _) in actions.items() if e] == [4, 8, 12, 13]
    assert [d for d, (_, c, _) in actions.items() if c] == [6, 12, 13]
    assert [d for d, (_, _, lg) in actions.items() if lg] == [3, 4, 6, 8, 9, 12, 13]
    kept = load_config(None, {f"{stage}.max_failures": 5, "checkpoint.keep_last": 3})
    ray_run = run_config(kept, getattr(kept, stage), "r", tmp_path)
    assert (ray_run.failure_config.max_failures, ray_run.checkpoint_config.num_to_keep) == (5, 3)
    epochs = getattr(load_config(None, {f"{stage}.epochs": 3, f"{stage}.deepspeed.global_batch_size": 8}), stage)
    assert make_plan(epochs, num_rows=100, num_ranks=2, seed=0, name=stage).total_steps == 3 * (100 // 8)
    assert resume_checkpoint(s, stage) is None
    with pytest.raises(ConfigError, match=f"{stage}.resume_from: no checkpoint folder"):
        resume_checkpoint(getattr(load_config(None, {f"{stage}.resume_from": str(tmp_path / "none")}), stage), stage)
    given = getattr(load_config(None, {f"{stage}.resume_from": str(tmp_path)}), stage)
    assert resume_checkpoint(given, stage) == str(tmp_path.resolve())


def test_placement_keys_shape_the_placement_groups():
    """placement.<role>: ranks (num_workers) and each bundle's CPUs and GPUs; engines: one bundle per TP worker."""
    from rlhf_ray.resources import ppo_layout

    roles = ("actor", "critic", "reference", "reward")
    cfg = load_config(None, {"generation.num_engines": 2, "generation.tensor_parallel_size": 2,
                             "placement.generator.cpus_per_worker": 1.5, "placement.generator.gpus_per_worker": 0.5,
                             **{f"placement.{r}.{k}": v for i, r in enumerate(roles)
                                for k, v in (("num_workers", i + 1), ("cpus_per_worker", 0.25 * (i + 1)),
                                             ("gpus_per_worker", 0.125 * (i + 1)))}})
    layout = {lay.role: lay.bundles for lay in ppo_layout(cfg)}
    for i, role in enumerate(roles):
        assert layout[role] == [{"CPU": 0.25 * (i + 1), "GPU": 0.125 * (i + 1)}] * (i + 1), role
    assert layout["generator[0]"] == layout["generator[1]"] == [{"CPU": 1.5, "GPU": 0.5}] * 2


@pytest.mark.gpu
def test_enforce_eager_reaches_the_gpu_engine(ray_cluster, tiny_llama):
    """CUDA graphs (enforce_eager false) or not; on CPU vLLM is always eager, so this runs on GPU machines only."""
    import ray
    from ray.util.placement_group import remove_placement_group

    from rlhf_ray.generator import start_engine
    from rlhf_ray.resources import ready_placement_group

    for eager in (True, False):
        gen = load_config(None, {"generation.enforce_eager": eager, "generation.gpu_memory_utilization": 0.2,
                                 "generation.max_model_len": 128}).generation
        pg = ready_placement_group("generator", [{"CPU": 1, "GPU": 1}], timeout_s=60)
        engine = start_engine(tiny_llama, gen, placement_group=pg, gpus=1)
        try:
            used = ray.get(engine.__ray_call__.remote(lambda e: e.llm.llm_engine.model_config.enforce_eager))
            assert used == eager
        finally:
            ray.kill(engine)
            remove_placement_group(pg)
