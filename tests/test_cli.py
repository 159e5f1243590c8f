"""The `rlhf-ray` console entry point, run as a user runs it."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).parent / "rlhf-ray")


def run(*args, check=True):
    proc = subprocess.run([CLI, *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_help_lists_every_subcommand():
    out = run("--help").stdout
    for command in ("config", "generate", "models", "engines"):
        assert command in out
    assert "--prompt" in run("generate", "--help").stdout
    assert "--set N" in run("engines", "--help").stdout


def test_config_show_applies_overrides():
    out = run("config", "show", "launchers/cpu_demo.yaml", "--ppo.kl_coef", "0.05").stdout
    assert "kl_coef: 0.05" in out
    assert "path: builtin:smollm2" in out  # from the YAML file


def test_config_errors_exit_2_with_the_key():
    proc = run("config", "show", "launchers/cpu_demo.yaml", "--ppo.kl_cof", "1", check=False)
    assert proc.returncode == 2
    assert "did you mean 'ppo.kl_coef'" in proc.stderr
    proc = run("config", "show", "launchers/cpu_demo.yaml", "--ppo.kl_coef", "x", check=False)
    assert proc.returncode == 2 and "ppo.kl_coef: expected float" in proc.stderr


def test_models_tiny_writes_a_loadable_folder(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run("models", "tiny", "--family", "opt", "--out", str(tmp_path / "m"))
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "m").config.model_type == "opt"
    assert AutoTokenizer.from_pretrained(tmp_path / "m").chat_template


def test_ppo_with_a_reward_model_that_is_no_value_head_folder_fails_at_load_in_one_line(tmp_path):
    """A new user's first try: cpu_demo's models.reward is the RM stage's base model, not a reward model. It must
    fail before anything starts (no Ray, no groups), in one line naming the key, without a traceback."""
    import time

    started = time.time()
    proc = run("ppo", "launchers/cpu_demo.yaml", "--run.output_dir", str(tmp_path / "run"), check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert time.time() - started < 60
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "models.reward.path 'builtin:smollm2' is not a value-head folder" in lines[0]
    assert not (tmp_path / "run" / "ppo").exists()  # nothing started, nothing written


def test_ppo_of_a_launcher_reads_the_pipelines_own_sft_and_rm_outputs(tmp_path):
    """`rlhf-ray ppo CONFIG` after the pipeline's SFT and RM stages (launchers/submit.sh CONFIG ppo ...): the actor
    and reference come from <run>/sft, the reward model and critic from <run>/rm, as in the pipeline's PPO stage."""
    from rlhf_ray.config import ConfigError, load_config
    from rlhf_ray.pipeline import ppo_config_for_run

    cfg = load_config(REPO / "launchers" / "opt13b_1node.yaml", {"run.output_dir": str(tmp_path)})
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="models.reward.path 'facebook/opt-350m' is not a value-head folder"):
        ppo_config_for_run(cfg)  # no rm/ yet: the base reward model cannot score
    (tmp_path / "rm").mkdir()
    (tmp_path / "rm" / "value_head.json").write_text("{}")
    models = ppo_config_for_run(cfg).models
    assert (models.actor.path, models.reward.path) == (str(tmp_path.resolve() / "sft"), str(tmp_path.resolve() / "rm"))
    assert models.critic is None and models.reference is None  # both follow: critic <- rm, reference <- sft
