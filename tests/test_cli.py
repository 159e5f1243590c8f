"""The `rlhf-ray` console entry point, run as a user runs it."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).parent / "rlhf-ray")


def run(*args, check=True):
    proc = subprocess.run([CLI, *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_help_lists_every_subcommand():
    out = run("--help").stdout
    for command in ("config", "generate", "models"):
        assert command in out
    assert "--prompt" in run("generate", "--help").stdout


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
