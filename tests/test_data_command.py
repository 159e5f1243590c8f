"""`rlhf-ray data CONFIG`: the data pipeline's report for a file with bad rows, and its threshold (no Ray, no model)."""
from __future__ import annotations

import json

import pytest

from rlhf_ray.cli import main

GOOD = 17
BAD = [{"prompt": "Say hi.", "chosen": "", "rejected": "no"},  # empty_text
       {"prompt": "Say yes.", "chosen": "yes", "rejected": "yes"},  # chosen_equals_rejected
       {"prompt": "", "chosen": "a", "rejected": "b"}]  # empty_text


@pytest.fixture
def config_with_bad_rows(tmp_path, tiny_llama):
    rows = [{"prompt": f"What is {i} plus 1?", "chosen": f"It is {i + 1}.", "rejected": "I do not know."}
            for i in range(GOOD)]
    rows[3:3] = BAD[:1]
    rows[8:8] = BAD[1:2]
    rows[12:12] = BAD[2:]  # source rows 3, 8 and 12
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "data.yaml"
    config.write_text(json.dumps({  # JSON is YAML
        "models": {"actor": {"path": tiny_llama}, "reward": {"path": tiny_llama}},
        "data": {"datasets": [{"path": str(data), "format": "pairwise"}], "cache_dir": str(tmp_path / "cache"),
                 "data_split": "0,1,0", "eval_fraction": 0.2}}))
    return str(config)


def test_data_prints_rows_drops_lengths_and_examples(config_with_bad_rows, capsys):
    assert main(["data", config_with_bad_rows, "--stage", "rm", "--examples", "1"]) == 0
    out = capsys.readouterr().out
    assert "prefs.jsonl (format pairwise): 20 rows read" in out
    assert ("bad rows dropped: 3: chosen_equals_rejected 1 (first at source row 8), "
            "empty_text 2 (first at source row 3)") in out
    assert "  train: 14 rows" in out and "  eval: 3 rows" in out  # 17 good rows, 20% held out
    assert "tokens chosen_input_ids: p50 " in out and "tokens rejected_input_ids: p50 " in out
    assert "example 1 chosen_input_ids:" in out and "<|im_start|>user" in out  # the chat template, rendered


def test_data_over_the_bad_fraction_exits_nonzero_with_the_message(config_with_bad_rows, capsys):
    code = main(["data", config_with_bad_rows, "--stage", "rm", "--data.max_bad_fraction", "0.1"])
    err = capsys.readouterr().err
    assert code == 1
    assert "rlhf-ray data: data error:" in err and "dropped 3 of 20 rows" in err
    assert "15% > data.max_bad_fraction=0.1" in err and "empty_text = a prompt or answer is empty" in err
