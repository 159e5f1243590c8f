"""The typed config tree: YAML + dotted overrides, errors that name the key, cross-field validation."""
from pathlib import Path

import pytest

from rlhf_ray.config import (Config, ConfigError, dump_config, load_config, parse_overrides, to_dict)

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_follow_deepspeed_chat():
    cfg = load_config()
    assert (cfg.ppo.kl_coef, cfg.ppo.clip_ratio, cfg.ppo.reward_clip, cfg.ppo.gamma, cfg.ppo.lam) == (0.1, 0.2, 5.0, 1.0, 0.95)


def test_yaml_sets_nested_keys_and_overrides_win(tmp_path):
    path = write(tmp_path, "ppo:\n  kl_coef: 0.3\n  actor:\n    deepspeed:\n      zero_stage: 3\ngeneration:\n  num_engines: 2\n")
    cfg = load_config(path, ["--ppo.kl_coef", "0.05", "--generation.temperature=0.5"])
    assert cfg.ppo.kl_coef == 0.05  # the override beats the file
    assert cfg.ppo.actor.deepspeed.zero_stage == 3
    assert cfg.generation.num_engines == 2 and cfg.generation.temperature == 0.5


def test_override_forms_and_yaml_values():
    assert parse_overrides(["--a.b", "3", "--c=true", "--d.e", "[1, 2]", "--f", "null"]) == {
        "a.b": 3, "c": True, "d.e": [1, 2], "f": None}
    with pytest.raises(ConfigError, match="has no value"):
        parse_overrides(["--ppo.kl_coef"])
    with pytest.raises(ConfigError, match="expected --section.key"):
        parse_overrides(["ppo.kl_coef", "1"])


def test_misspelt_key_names_key_and_suggestion(tmp_path):
    path = write(tmp_path, "ppo:\n  kl_cof: 0.2\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "ppo.kl_cof" in str(err.value) and "did you mean 'ppo.kl_coef'" in str(err.value)
    assert str(path) in str(err.value)
    with pytest.raises(ConfigError, match="unknown key 'generaton'; did you mean 'generation'"):
        load_config(None, ["--generaton.num_engines", "2"])


def test_float_keys_take_exponent_literals_yaml_reads_as_strings():
    # YAML 1.1 parses "1e-5" (no dot) as a string; a float key still takes it, from files and overrides alike.
    cfg = load_config(None, ["--ppo.actor.optim.lr", "1e-5", "--ppo.kl_coef=2E-3"])
    assert cfg.ppo.actor.optim.lr == 1e-5 and cfg.ppo.kl_coef == 0.002
    with pytest.raises(ConfigError, match=r"ppo\.kl_coef: expected float, got '1e-5x'"):
        load_config(None, ["--ppo.kl_coef", "1e-5x"])


def test_wrong_type_names_key_and_type(tmp_path):
    with pytest.raises(ConfigError, match=r"ppo\.kl_coef: expected float, got 'high'"):
        load_config(write(tmp_path, "ppo:\n  kl_coef: high\n"))
    with pytest.raises(ConfigError, match=r"generation\.num_engines: expected int, got 1.5"):
        load_config(None, ["--generation.num_engines", "1.5"])
    with pytest.raises(ConfigError, match=r"sft\.deepspeed\.zero_stage: expected one of 0, 1, 2, 3, got 4"):
        load_config(None, ["--sft.deepspeed.zero_stage", "4"])
    with pytest.raises(ConfigError, match=r"ppo\.adaptive_kl: expected bool"):
        load_config(None, ["--ppo.adaptive_kl", "1"])
    with pytest.raises(ConfigError, match=r"models: expected a mapping"):
        load_config(None, {"models": 3})
    with pytest.raises(ConfigError, match=r"ppo\.kl_coef: expected float, got \{'x': 1\}"):
        load_config(None, ["--ppo.kl_coef.x", "1"])


def test_int_is_accepted_for_float_but_bool_is_not_int():
    assert load_config(None, ["--ppo.kl_coef", "1"]).ppo.kl_coef == 1.0
    with pytest.raises(ConfigError, match="expected int"):
        load_config(None, ["--ppo.ppo_epochs", "true"])


@pytest.mark.parametrize("override, message", [
    (["--ppo.advantage_estimator", "grpo"], "needs generation.n_samples_per_prompt >= 2"),
    (["--ppo.ptx_coef", "1.0"], "ppo.ptx_coef > 0 needs pretraining data in data.ptx"),
    (["--sft.deepspeed.global_batch_size", "7"], "sft.deepspeed.global_batch_size (7) must be a multiple"),
    (["--ppo.dual_clip", "0.5"], "ppo.dual_clip must be > 1"),
    (["--data.data_split", "2,4"], "data.data_split must be three"),
    (["--sft.deepspeed.offload_params", "true"], "offload_params needs zero_stage 3"),
    (["--rm.deepspeed.zero_stage", "3", "--rm.deepspeed.grad_reduction", "per_step"],
     "rm.deepspeed.grad_reduction per_step needs zero_stage 0-2"),
    (["--generation.top_p", "0"], "generation.top_p"),
])
def test_cross_field_validation_names_keys(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, override)
    assert message in str(err.value)


def test_dump_round_trips(tmp_path):
    cfg = load_config(None, ["--ppo.kl_coef", "0.07", "--data.datasets", "[{path: a.jsonl, weight: 2}]"])
    again = load_config(write(tmp_path, dump_config(cfg)))
    assert to_dict(again) == to_dict(cfg)
    assert again.data.datasets[0].weight == 2.0


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "ppo: [\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- 1\n"))


def test_every_launcher_config_loads():
    configs = sorted((REPO / "launchers").glob("*.yaml"))
    assert configs, "launchers/ has no configs"
    for path in configs:
        assert isinstance(load_config(path), Config), path


def test_overriding_one_nested_key_keeps_the_sections_other_defaults(tmp_path):
    # placement.actor defaults to 2 ranks (a section default, not RoleResources' bare default of 1)
    cfg = load_config(None, ["--placement.actor.cpus_per_worker", "0.5"])
    assert cfg.placement.actor.num_workers == 2 and cfg.placement.actor.cpus_per_worker == 0.5
    cfg = load_config(write(tmp_path, "placement:\n  critic:\n    gpus_per_worker: 1\n"))
    assert cfg.placement.critic.num_workers == 2 and cfg.placement.critic.gpus_per_worker == 1.0


def test_ppo_learners_are_checked_on_the_mini_batch_not_the_sft_global_batch():
    cfg = load_config(None, {"ppo.actor.deepspeed.micro_batch_size": 4, "ppo.mini_batch_size": 8})
    assert cfg.ppo.actor.deepspeed.micro_batch_size == 4
    with pytest.raises(ConfigError, match="mini_batch_size"):
        load_config(None, {"ppo.actor.deepspeed.micro_batch_size": 4, "ppo.mini_batch_size": 6})


@pytest.mark.parametrize("override, key", [
    ({}, None),
    ({"ppo.actor.lora.dim": 0}, r"ppo\.actor\.lora\.dim is 0"),
    ({"ppo.actor.lora.only_optimize_lora": False}, r"ppo\.actor\.lora\.only_optimize_lora is false"),
    ({"models.reference.path": "other/model"}, r"models\.reference is other/model"),
    ({"placement.colocate_actor_reference": True}, r"placement\.colocate_actor_reference is true"),
])
def test_reference_in_actor_needs_a_frozen_lora_base_that_is_the_reference(override, key):
    settings = {"placement.reference_in_actor": True, "ppo.actor.lora.dim": 4, **override}
    if key is None:
        assert load_config(None, settings).placement.reference_in_actor
        return
    with pytest.raises(ConfigError, match=key):
        load_config(None, settings)
