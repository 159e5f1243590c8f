"""`rlhf-ray eval rm|policy`: a reward model's pairwise accuracy on a file with bad rows, and a policy's win rate
under a crafted reward whose value is known (real vLLM engine actors and reward actors on the session cluster)."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rlhf_ray.cli import main

GOOD = 17
BAD = [{"prompt": "Say hi.", "chosen": "", "rejected": "no"},  # empty_text
       {"prompt": "Say yes.", "chosen": "yes", "rejected": "yes"},  # chosen_equals_rejected
       {"prompt": "", "chosen": "a", "rejected": "b"}]  # empty_text


def json_line(out: str) -> dict:
    """--json prints one line; Ray may print worker log lines around it (log_to_driver)."""
    return json.loads(next(line for line in out.splitlines() if line.startswith('{"')))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_RAY_CACHE", str(tmp_path / "cache"))  # the data cache of this test only


@pytest.fixture
def prefs(tmp_path) -> str:
    rows = [{"prompt": f"What is {i} plus 1?", "chosen": f"It is {i + 1}.", "rejected": "I do not know at all."}
            for i in range(GOOD)]
    rows[3:3] = BAD[:1]
    rows[8:8] = BAD[1:2]
    rows[12:12] = BAD[2:]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def expected_rm_numbers(rm_path: str, tokenizer_path: str, rows: list[dict]) -> tuple[float, float]:
    """Accuracy and mean margin computed directly: the value at the last token of each rendered pair."""
    import torch

    from rlhf_ray.data.adapters import parse_conversation
    from rlhf_ray.data.tokenization import encode_answers, encode_prompts
    from rlhf_ray.models.loading import load_tokenizer
    from rlhf_ray.config import ModelConfig
    from rlhf_ray.models.value_head import ValueHeadModel

    tok = load_tokenizer(ModelConfig(path=tokenizer_path))
    model = ValueHeadModel.from_pretrained(rm_path, dtype=torch.float32).eval()
    prompt_ids = encode_prompts(tok, [parse_conversation(r["prompt"]) for r in rows], True)
    margins = []
    with torch.no_grad():
        for p, r in zip(prompt_ids, rows):
            chosen, rejected = encode_answers(tok, [r["chosen"], r["rejected"]], True)
            s = [model.score(torch.tensor([p + a]), torch.ones(1, len(p) + len(a), dtype=torch.long)).item()
                 for a in (chosen, rejected)]
            margins.append(s[0] - s[1])
    return sum(m > 0 for m in margins) / len(margins), sum(margins) / len(margins)


def test_eval_rm_reports_drops_per_reason_and_accuracy_on_the_good_rows(prefs, tiny_value_model, tiny_llama, cache,
                                                                        capsys):
    assert main(["eval", "rm", "--path", tiny_value_model, "--tokenizer", tiny_llama, "--data", prefs]) == 0
    out = capsys.readouterr().out
    assert "prefs.jsonl (format pairwise): 20 rows read" in out
    assert ("bad rows dropped: 3: chosen_equals_rejected 1 (first at source row 8), "
            "empty_text 2 (first at source row 3)") in out
    assert "dropped rows by reason: chosen_equals_rejected 1, empty_text 2" in out

    assert main(["eval", "rm", "--path", tiny_value_model, "--tokenizer", tiny_llama, "--data", prefs, "--json"]) == 0
    result = json_line(capsys.readouterr().out)
    assert result["pairs"] == GOOD and result["dropped_by_reason"] == {"chosen_equals_rejected": 1, "empty_text": 2}
    [source] = result["sources"]
    assert source["rows"] == 20 and source["pairs"] == GOOD
    good = [json.loads(line) for line in open(prefs)]
    good = [r for r in good if r not in BAD]
    accuracy, margin = expected_rm_numbers(tiny_value_model, tiny_llama, good)
    assert result["accuracy"] == pytest.approx(accuracy) and result["mean_margin"] == pytest.approx(margin, abs=1e-5)
    # the command's first line (a Ray worker of an earlier test may print into the captured output meanwhile)
    own = [line for line in out.splitlines() if not line.lstrip("\x1b[0123456789;m").startswith("(")]
    assert f"{GOOD} pairs, accuracy {accuracy:.4f}, mean margin {margin:+.4f}" in own[0]


def test_eval_rm_format_and_lengths_are_used(prefs, tiny_value_model, tiny_llama, cache, capsys):
    # the pairwise file read as webgpt: the pipeline's data error, naming the columns
    assert main(["eval", "rm", "--path", tiny_value_model, "--tokenizer", tiny_llama, "--data", prefs,
                 "--format", "webgpt"]) == 1
    assert "rlhf-ray eval: data error:" in (err := capsys.readouterr().err) and "format 'webgpt' needs" in err
    assert main(["eval", "rm", "--path", tiny_value_model, "--tokenizer", tiny_llama, "--data", prefs,
                 "--max-prompt-len", "4", "--max-answer-len", "2", "--json"]) == 0
    [source] = json_line(capsys.readouterr().out)["sources"]
    assert source["truncated"] and set(source["truncated"]) >= {"prompt", "answer"}, source["truncated"]


def test_bad_input_names_the_option(prefs, tmp_path, tiny_value_model, tiny_llama, cache, capsys):
    missing = str(tmp_path / "missing.jsonl")
    assert main(["eval", "rm", "--path", tiny_value_model, "--data", missing]) == 2
    assert f"rlhf-ray eval: error: --data {missing}: no such file" in capsys.readouterr().err
    assert main(["eval", "rm", "--path", tiny_llama, "--data", prefs]) == 2
    assert f"--path {tiny_llama}: not a reward-model folder" in capsys.readouterr().err
    for bad, words in (("no_such_pkg.rewards:score", "cannot import module 'no_such_pkg.rewards'"),
                       (tiny_llama, "not a reward-model folder (no value_head.json)")):
        assert main(["eval", "policy", "--path", tiny_llama, "--reward", bad, "--data", prefs]) == 2
        err = capsys.readouterr().err
        assert f"--reward {bad}" in err and words in err, err


# ------------------------------------------------------------------------------------------------ eval policy
class CraftedReward(BaseHTTPRequestHandler):
    """Scores by a tag in the prompt: [win] rewards a non-empty answer, [lose] an empty one, [tie] gives 0.5."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        rewards = [float(r != "") if "[win]" in p else float(r == "") if "[lose]" in p else 0.5
                   for p, r in zip(body["prompts"], body["responses"])]
        data = json.dumps({"rewards": rewards}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def crafted_reward():
    server = ThreadingHTTPServer(("127.0.0.1", 0), CraftedReward)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/score"
    server.shutdown()


@pytest.fixture
def silent_model(tiny_llama, tmp_path) -> str:
    """The tiny Llama with its final norm zeroed: every logit is 0, so greedy always picks token 0 (<|endoftext|>,
    not EOS): answers are exactly max_new_tokens long and decode to ''."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    with torch.no_grad():
        model.model.norm.weight.zero_()
    path = tmp_path / "silent"
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(path)
    return str(path)


def test_eval_policy_win_rate_under_a_crafted_reward(ray_cluster, tiny_llama, silent_model, crafted_reward, tmp_path,
                                                     cache, capsys):
    """5 [win], 2 [tie], 1 [lose] prompts; the policy answers with text, the baseline with nothing: win rate
    (5 + 2/2) / 8 = 0.75, mean rewards 0.75 and 0.25."""
    from rlhf_ray.eval import policy_text

    tags = ["win"] * 5 + ["tie"] * 2 + ["lose"]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"[{t}] Tell me about number {i}."}) + "\n"
                               for i, t in enumerate(tags)))
    args = ["eval", "policy", "--path", tiny_llama, "--baseline", silent_model, "--reward", crafted_reward,
            "--data", str(prompts), "--max-new-tokens", "6", "--examples", "8", "--json"]
    assert main(args) == 0
    result = json_line(capsys.readouterr().out)
    assert all(ex["policy"] != "" and ex["baseline"] == "" for ex in result["examples"]), result["examples"]
    assert len(result["examples"]) == 8 and result["prompts"] == 8
    assert result["win_rate"] == 0.75 and (result["wins"], result["ties"], result["losses"]) == (5, 2, 1)
    assert result["policy"]["mean_reward"] == 0.75 and result["baseline"]["mean_reward"] == 0.25
    assert result["baseline"]["mean_response_tokens"] == 6 and result["baseline"]["cut_at_max_tokens"] == 8
    assert result["policy"]["mean_response_tokens"] <= 6
    text = policy_text(result)  # what the command prints without --json
    assert "win rate of policy over baseline: 0.7500 (5 wins, 2 ties, 1 losses" in text
    assert "greedy" in text and "mean reward 0.2500" in text

    # sampling at temperature 1 (seeded): other answers than greedy's; no baseline, no win rate
    greedy = {ex["prompt"]: ex["policy"] for ex in result["examples"]}
    assert main(["eval", "policy", "--path", tiny_llama, "--reward", crafted_reward, "--data", str(prompts),
                 "--max-new-tokens", "6", "--examples", "8", "--temperature", "1.0", "--json"]) == 0
    sampled = json_line(capsys.readouterr().out)
    assert "win_rate" not in sampled and sampled["sampling"]["temperature"] == 1.0
    assert any(ex["policy"] != greedy[ex["prompt"]] for ex in sampled["examples"])


def test_help_covers_both_commands(capsys):
    for argv in (["--help"], ["eval", "--help"], ["eval", "rm", "--help"], ["eval", "policy", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
    out = capsys.readouterr().out
    assert "eval" in out and "--baseline" in out and "--reward" in out and "--max-answer-len" in out
    assert "ties / 2" in out
