"""The reward model as a real Ray Train job (2 CPU workers, DeepSpeed ZeRO-3), launched through `rlhf-ray rm`.

One fit on the built-in preference set (chosen = the right answer, rejected = a wrong one), then the output
folder is reloaded the way PPO's reward scorer and critic load it (ValueHeadModel.from_pretrained).
Run under the heavy lock: flock /tmp/rlhf_ray_heavy.lock .venv/bin/python -m pytest tests/test_train_rm.py
"""
from __future__ import annotations

import contextlib
import io

import pytest
import torch
import yaml

from rlhf_ray import cli
from rlhf_ray.config import load_config
from rlhf_ray.train import read_metrics

pytestmark = pytest.mark.timeout(600)

STEPS = 120


@pytest.fixture(scope="module")
def rm_run(ray_cluster, tiny_llama, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rm")
    config = tmp / "rm.yaml"
    config.write_text(yaml.safe_dump({
        "ray": {"address": "local"}, "run": {"output_dir": str(tmp / "run"), "seed": 0},
        "models": {"reward": {"path": tiny_llama}},
        "data": {"cache_dir": str(tmp / "data_cache"), "max_prompt_len": 64, "max_answer_len": 16},
        "rm": {"num_workers": 2, "deepspeed": {"zero_stage": 3, "micro_batch_size": 8, "global_batch_size": 16},
               "optim": {"lr": 1e-3, "lr_schedule": "constant"}, "log_every": 40, "eval_every": 0,
               "checkpoint_every": 0},
    }))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["rm", str(config), "--rm.max_steps", str(STEPS)]) == 0
    cfg = load_config(config, ["--rm.max_steps", str(STEPS)])
    metrics_file = next((tmp / "run" / "rm_train" / "logs").glob("*.jsonl"))
    return cfg, tmp / "run" / "rm", read_metrics(metrics_file), out.getvalue()


def test_rm_learns_the_builtin_preferences(rm_run):
    _, output_dir, records, printed = rm_run
    reports = [r for r in records if r["event"] == "report"]
    initial, final = reports[0], reports[-1]
    assert initial["step"] == 0 and final["step"] == STEPS
    assert final["eval_accuracy"] > 0.8 and final["eval_accuracy"] > initial["eval_accuracy"]
    assert final["eval_chosen_score"] > final["eval_rejected_score"]
    assert f"-> {output_dir}" in printed and "eval_accuracy" in printed  # the CLI's summary line


def test_reloaded_reward_model_ranks_held_out_pairs(rm_run):
    from rlhf_ray.data import load_stage_dataset
    from rlhf_ray.models import ValueHeadModel
    from rlhf_ray.models.loading import load_tokenizer

    cfg, output_dir, records, _ = rm_run
    final = [r for r in records if r["event"] == "report"][-1]
    assert (output_dir / "value_head.json").is_file() and (output_dir / "tokenizer.json").is_file()
    dtype = next(r for r in records if r["event"] == "start")["workers"][0]["dtype"]  # precision auto's choice
    model = ValueHeadModel.from_pretrained(output_dir, dtype=torch.float32).eval()  # bf16: autocast, as the run
    rows = load_stage_dataset(cfg, "rm", load_tokenizer(cfg.models.reward), split="eval").to_list()

    def score(ids: list[int]) -> float:
        return model.score(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)).item()

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        chosen = [score(r["chosen_input_ids"]) for r in rows]  # one unpadded sequence at a time
        rejected = [score(r["rejected_input_ids"]) for r in rows]
    accuracy = sum(c > r for c, r in zip(chosen, rejected)) / len(rows)
    assert accuracy > 0.8
    # fp32: the run's eval exactly. bf16 rounds scores to 8 significant bits, and the run scores padded batches:
    # a near-tied pair may flip
    exact = dtype == "float32"
    assert accuracy == pytest.approx(final["eval_accuracy"], abs=1e-9 if exact else 2.5 / len(rows))
    tol = 1e-4 if exact else 5e-2
    assert sum(chosen) / len(rows) == pytest.approx(final["eval_chosen_score"], abs=tol)
    assert sum(rejected) / len(rows) == pytest.approx(final["eval_rejected_score"], abs=tol)
