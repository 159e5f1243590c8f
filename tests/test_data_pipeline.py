"""Stage data sets: tokenization per stage, data_split, eval split, mixing, truncation, bad-row threshold,
Arrow cache, the built-in data set and its rule reward, padding."""
from __future__ import annotations

import json
import os
from pathlib import Path

import datasets
import pytest
import torch

from rlhf_ray.config import load_config
from rlhf_ray.data import (DataError, build_stage_dataset, builtin_rule_reward, load_stage_dataset, pad_batch,
                           pad_labels)
from rlhf_ray.data import pipeline

FIXTURES = Path(__file__).parent / "fixtures" / "data"


@pytest.fixture(autouse=True)
def _hf_cache_in_tmp(tmp_path, monkeypatch):
    """datasets' own Arrow copies of local files go to tmp_path, not ~/.cache/huggingface."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")


@pytest.fixture(scope="module")
def tok(tiny_llama):
    """The tiny Llama tokenizer: ChatML chat template, EOS <|im_end|>."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


@pytest.fixture(scope="module")
def plain_tok(tiny_models):
    """A tokenizer without a chat template (the tiny GPT-2's, template removed)."""
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(tiny_models["gpt2"])
    t.chat_template = None
    return t


def cfg_for(tmp_path, **data):
    return load_config(None, {"data.cache_dir": str(tmp_path / "cache"), **{f"data.{k}": v for k, v in data.items()}})


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pairs(n: int, tag: str = "q") -> list[dict]:
    return [{"prompt": f"{tag} {i}?", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(n)]


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------ rm-static and HH feed every stage
@pytest.mark.parametrize("fixture", ["rm_static.jsonl", "hh_rlhf.jsonl"])
@pytest.mark.parametrize("template", [True, False])
def test_rm_static_and_hh_feed_sft_rm_ppo(tmp_path, tok, plain_tok, fixture, template):
    t = tok if template else plain_tok
    cfg = cfg_for(tmp_path, datasets=[{"path": str(FIXTURES / fixture)}], data_split="1,1,1", eval_fraction=0.0)
    gen_prompt = ids_of(t, "<|im_start|>assistant\n")  # the ChatML generation prompt
    eos = t.eos_token_id

    sft = load_stage_dataset(cfg, "sft", t)
    assert sft.column_names == ["input_ids", "labels", "prompt", "answer"] and len(sft) == 2
    for row in sft:
        n_prompt = sum(1 for x in row["labels"] if x == -100)
        answer_ids = ids_of(t, row["answer"] if template else " " + row["answer"]) + [eos]
        assert row["input_ids"][n_prompt:] == answer_ids == row["labels"][n_prompt:]
        assert len(row["labels"]) == len(row["input_ids"])
        prompt_text = t.decode(row["input_ids"][:n_prompt])
        if template:
            assert prompt_text.startswith("<|im_start|>user\n") and prompt_text.endswith("<|im_start|>assistant\n")
        else:
            assert prompt_text == row["prompt"] and prompt_text.endswith("\n\nAssistant:")

    rm = load_stage_dataset(cfg, "rm", t)
    assert rm.column_names == ["chosen_input_ids", "rejected_input_ids", "prompt", "chosen", "rejected"]
    row = rm[0]
    n_chosen = len(ids_of(t, row["chosen"] if template else " " + row["chosen"])) + 1
    prompt_ids = row["chosen_input_ids"][:-n_chosen]
    assert row["rejected_input_ids"][:len(prompt_ids)] == prompt_ids
    assert row["chosen_input_ids"][-1] == row["rejected_input_ids"][-1] == eos

    ppo = load_stage_dataset(cfg, "ppo", t)
    assert ppo.column_names == ["prompt_input_ids", "prompt", "reference"] and len(ppo) == 2
    for row in ppo:
        if template:
            assert row["prompt_input_ids"][-len(gen_prompt):] == gen_prompt
        else:
            assert t.decode(row["prompt_input_ids"]) == row["prompt"]
    # The three stages got disjoint rows of the five.
    prompts = [set(sft["prompt"]), set(rm["prompt"]), set(ppo["prompt"])]
    assert sum(map(len, prompts)) == 5 and len(set.union(*prompts)) == 5


def test_use_chat_template_false_renders_hh_text(tmp_path, tok):
    src = [{"path": str(FIXTURES / "rm_static.jsonl")}]
    on = load_stage_dataset(cfg_for(tmp_path, datasets=src, data_split="0,0,1", eval_fraction=0.0), "ppo", tok)
    off = load_stage_dataset(cfg_for(tmp_path, datasets=src, data_split="0,0,1", eval_fraction=0.0,
                                     use_chat_template=False), "ppo", tok)
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    assert all(im_start in ids for ids in on["prompt_input_ids"])
    assert all(im_start not in ids for ids in off["prompt_input_ids"])
    assert [tok.decode(ids) for ids in off["prompt_input_ids"]] == off["prompt"]


def test_chat_messages_use_the_template_and_no_answer_rows_skip_sft(tmp_path, tok):
    rows = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"hello {i}"}]}
            for i in range(4)] + [{"messages": [{"role": "user", "content": "question only"}]}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    cfg = cfg_for(tmp_path, datasets=[{"path": str(path)}], data_split="1,0,0", eval_fraction=0.0)
    ds, report = build_stage_dataset(cfg, "sft", tok)
    assert len(ds) == 4 and report["sources"][0]["dropped"] == {"no_answer": 1}
    row = next(r for r in ds if r["answer"] == "hello 0")
    expected_prompt = tok.apply_chat_template([{"role": "user", "content": "hi 0"}], add_generation_prompt=True,
                                              return_dict=False)
    assert row["input_ids"] == expected_prompt + ids_of(tok, "hello 0") + [tok.eos_token_id]
    with pytest.raises(DataError, match="stage 'rm'.*got no rows"):  # chat data cannot feed the RM
        load_stage_dataset(cfg_for(tmp_path, datasets=[{"path": str(path)}], data_split="0,1,0"), "rm", tok)


def test_sft_only_data_feeds_sft_and_never_rm_or_ppo(tmp_path, tok):
    sft_file = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": f"s {i}", "response": f"r {i}"} for i in range(6)])
    cfg = cfg_for(tmp_path, sft_only=[{"path": str(sft_file)}], eval_fraction=0.0)
    sft = load_stage_dataset(cfg, "sft", tok)
    assert {f"s {i}" for i in range(6)} <= set(sft["prompt"])  # all of it, on top of the built-in SFT part
    assert len(sft) == 6 + len(load_stage_dataset(cfg_for(tmp_path, eval_fraction=0.0), "sft", tok))
    for stage in ("rm", "ppo"):
        assert not any(p.startswith("s ") for p in load_stage_dataset(cfg, stage, tok)["prompt"])
    # Single-response data listed as a main data set still never reaches RM/PPO.
    with pytest.raises(DataError, match="stage 'ppo'.*got no rows"):
        load_stage_dataset(cfg_for(tmp_path, datasets=[{"path": str(sft_file)}]), "ppo", tok)


def test_prompt_only_data_feeds_ppo_with_reference(tmp_path, tok):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"What is {i} plus 1?", "reference": str(i + 1)}
                                              for i in range(5)])
    cfg = cfg_for(tmp_path, datasets=[{"path": str(path)}], data_split="0,0,1", eval_fraction=0.0)
    ppo = load_stage_dataset(cfg, "ppo", tok)
    assert sorted(ppo["reference"]) == ["1", "2", "3", "4", "5"]
    with pytest.raises(DataError, match="got no rows"):
        load_stage_dataset(cfg, "sft", tok)


# --------------------------------------------------------------------------------- data_split and eval
def test_data_split_is_disjoint_seeded_and_sized(tmp_path, tok):
    path = write_jsonl(tmp_path / "pairs.jsonl", pairs(100))
    cfg = cfg_for(tmp_path, datasets=[{"path": str(path)}], data_split="2,4,4", eval_fraction=0.1)
    got = {(s, sp): load_stage_dataset(cfg, s, tok, sp)["prompt"] for s in ("sft", "rm", "ppo")
           for sp in ("train", "eval")}
    assert {k: len(v) for k, v in got.items()} == {("sft", "train"): 18, ("sft", "eval"): 2, ("rm", "train"): 36,
                                                   ("rm", "eval"): 4, ("ppo", "train"): 36, ("ppo", "eval"): 4}
    all_prompts = [p for v in got.values() for p in v]
    assert len(all_prompts) == len(set(all_prompts)) == 100  # disjoint, nothing lost

    again = cfg_for(tmp_path / "other", datasets=[{"path": str(path)}], data_split="2,4,4", eval_fraction=0.1)
    assert load_stage_dataset(again, "rm", tok)["prompt"] == got[("rm", "train")]  # rebuilt: same rows, order
    reseeded = cfg_for(tmp_path, datasets=[{"path": str(path)}], data_split="2,4,4", eval_fraction=0.1, seed=7)
    assert set(load_stage_dataset(reseeded, "rm", tok)["prompt"]) != set(got[("rm", "train")])
    all_ppo = cfg_for(tmp_path, datasets=[{"path": str(path)}], data_split="0,0,1", eval_fraction=0.0)
    assert len(load_stage_dataset(all_ppo, "ppo", tok)) == 100
    with pytest.raises(DataError, match="stage 'sft'.*data.data_split"):
        load_stage_dataset(all_ppo, "sft", tok)
    empty_eval = load_stage_dataset(all_ppo, "ppo", tok, "eval")  # eval_fraction 0: empty, not an error
    assert len(empty_eval) == 0 and empty_eval.column_names == ["prompt_input_ids", "prompt", "reference"]


def test_unknown_stage_or_split(tmp_path, tok):
    with pytest.raises(ValueError, match="unknown stage 'dpo'"):
        load_stage_dataset(cfg_for(tmp_path), "dpo", tok)
    with pytest.raises(ValueError, match="unknown split 'test'"):
        load_stage_dataset(cfg_for(tmp_path), "sft", tok, split="test")


# ------------------------------------------------------------------------------------------------ mixing
def test_mixing_weights_scale_train_rows_not_eval(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", pairs(20, "a"))
    b = write_jsonl(tmp_path / "b.jsonl", pairs(20, "b"))
    cfg = cfg_for(tmp_path, datasets=[{"path": str(a), "weight": 0.5}, {"path": str(b), "weight": 2.0}],
                  data_split="1,0,0", eval_fraction=0.2)
    train = load_stage_dataset(cfg, "sft", tok)["prompt"]
    from_a, from_b = [p for p in train if p.startswith("a ")], [p for p in train if p.startswith("b ")]
    assert len(from_a) == 8 and len(set(from_a)) == 8  # half of a's 16 train rows
    assert len(from_b) == 32 and all(from_b.count(p) == 2 for p in from_b)  # each of b's 16 rows twice
    assert train[:8] != sorted(train[:8]) or train[8:16] != sorted(train[8:16])  # sources are shuffled together
    evals = load_stage_dataset(cfg, "sft", tok, "eval")["prompt"]
    assert sum(p.startswith("a ") for p in evals) == 4 and sum(p.startswith("b ") for p in evals) == 4
    plain = cfg_for(tmp_path, datasets=[{"path": str(a)}, {"path": str(b)}], data_split="1,0,0", eval_fraction=0.2)
    assert len(load_stage_dataset(plain, "sft", tok)) == 32  # weight 1: plain concatenation


# -------------------------------------------------------------------------------------------- truncation
def _long_rows() -> list[dict]:
    long_prompt = " ".join(["the mountain river"] * 20) + " end?"
    long_answer = " ".join(["blue water"] * 20) + " done."
    return [{"prompt": long_prompt, "chosen": long_answer, "rejected": long_answer + " no"},
            *pairs(3)]


def test_long_prompt_truncate_left_or_drop(tmp_path, tok):
    path = write_jsonl(tmp_path / "long.jsonl", _long_rows())
    common = dict(datasets=[{"path": str(path)}], eval_fraction=0.0, max_prompt_len=12, max_bad_fraction=1.0)
    ds, report = build_stage_dataset(cfg_for(tmp_path, **common, data_split="0,0,1"), "ppo", tok)
    gen_prompt = ids_of(tok, "<|im_start|>assistant\n")
    assert max(len(x) for x in ds["prompt_input_ids"]) == 12
    assert all(x[-len(gen_prompt):] == gen_prompt for x in ds["prompt_input_ids"])  # the end survives
    assert report["sources"][0]["truncated"] == {"prompt": 1} and len(ds) == 4
    sft, _ = build_stage_dataset(cfg_for(tmp_path, **common, data_split="1,0,0"), "sft", tok)
    assert max(sum(1 for x in r if x == -100) for r in sft["labels"]) == 12 and len(sft) == 4
    dropped, report = build_stage_dataset(cfg_for(tmp_path, **common, data_split="0,0,1", long_prompt="drop"),
                                          "ppo", tok)
    assert len(dropped) == 3 and report["sources"][0]["dropped"] == {"prompt_too_long": 1}
    assert all(len(x) <= 12 for x in dropped["prompt_input_ids"])


def test_long_answer_truncate_or_drop_and_identical_after_truncation(tmp_path, tok):
    path = write_jsonl(tmp_path / "long.jsonl", _long_rows())
    common = dict(datasets=[{"path": str(path)}], eval_fraction=0.0, max_answer_len=6, max_bad_fraction=1.0)
    sft, report = build_stage_dataset(cfg_for(tmp_path, **common, data_split="1,0,0"), "sft", tok)
    answer_lens = [sum(1 for x in r if x != -100) for r in sft["labels"]]
    assert max(answer_lens) == 6 and report["sources"][0]["truncated"] == {"answer": 1}
    long_row = next(r for r in sft if r["answer"].startswith("blue"))
    assert long_row["input_ids"][-6:] == ids_of(tok, long_row["answer"])[:6]  # the answer's first tokens
    rm, report = build_stage_dataset(cfg_for(tmp_path, **common, data_split="0,1,0"), "rm", tok)
    assert report["sources"][0]["dropped"] == {"identical_after_truncation": 1}  # chosen/rejected share 6 tokens
    assert len(rm) == 3 and not any(c.startswith("blue") for c in rm["chosen"])
    sft_drop, report = build_stage_dataset(cfg_for(tmp_path, **common, data_split="1,0,0", long_answer="drop"),
                                           "sft", tok)
    assert report["sources"][0]["dropped"] == {"answer_too_long": 1}
    assert len(sft_drop) == 3 and all(a.startswith("yes") for a in sft_drop["answer"])


# -------------------------------------------------------------------------------------- bad-row threshold
def test_bad_rows_are_reported_and_threshold_fails_naming_file(tmp_path, tok):
    rows = pairs(6) + [{"prompt": "p", "rejected": "b"}, {"prompt": "p", "chosen": "", "rejected": "b"},
                       {"prompt": "p", "chosen": "x", "rejected": "x"}]
    path = write_jsonl(tmp_path / "dirty.jsonl", rows)
    cfg = cfg_for(tmp_path, datasets=[{"path": str(path)}], data_split="1,0,0", eval_fraction=0.0)
    ds, report = build_stage_dataset(cfg, "sft", tok)
    src = report["sources"][0]
    assert src["bad"] == {"missing_column": 1, "empty_text": 1, "chosen_equals_rejected": 1}
    assert src["rows"] == 9 and len(ds) == 6 == src["rows"] - sum(src["bad"].values())  # none lost silently
    strict = cfg_for(tmp_path, datasets=[{"path": str(path)}], data_split="1,0,0", max_bad_fraction=0.25)
    with pytest.raises(DataError) as err:
        load_stage_dataset(strict, "sft", tok)
    msg = str(err.value)
    assert "dirty.jsonl" in msg and "dropped 3 of 9 rows" in msg and "data.max_bad_fraction=0.25" in msg
    for reason in ("missing_column: 1", "empty_text: 1", "chosen_equals_rejected: 1"):
        assert reason in msg


def test_stage_drops_count_against_the_threshold(tmp_path, tok):
    path = write_jsonl(tmp_path / "long.jsonl", _long_rows())
    cfg = cfg_for(tmp_path, datasets=[{"path": str(path)}], data_split="0,0,1", eval_fraction=0.0,
                  max_prompt_len=12, long_prompt="drop", max_bad_fraction=0.1)
    with pytest.raises(DataError, match=r"long\.jsonl: stage 'ppo' \(train\): dropped 1 of 4 rows: prompt_too_long"):
        load_stage_dataset(cfg, "ppo", tok)


# ------------------------------------------------------------------------------------------------- cache
def test_cache_hit_and_invalidation(tmp_path, tok, plain_tok, monkeypatch):
    builds = []
    real_build = pipeline._build
    monkeypatch.setattr(pipeline, "_build", lambda *a, **k: builds.append(1) or real_build(*a, **k))
    path = write_jsonl(tmp_path / "pairs.jsonl", pairs(20))
    base = dict(datasets=[{"path": str(path)}], data_split="1,1,1")

    first, report = build_stage_dataset(cfg_for(tmp_path, **base), "rm", tok)
    assert len(builds) == 1 and Path(report["cache_path"]).parent == tmp_path / "cache"
    again, _ = build_stage_dataset(cfg_for(tmp_path, **base), "rm", tok)
    assert len(builds) == 1 and again.to_list() == first.to_list()  # hit
    build_stage_dataset(cfg_for(tmp_path, **base, rebuild_cache=True), "rm", tok)
    assert len(builds) == 2  # forced
    build_stage_dataset(cfg_for(tmp_path, **base, max_answer_len=3), "rm", tok)
    assert len(builds) == 3  # settings changed
    build_stage_dataset(cfg_for(tmp_path, **base), "rm", plain_tok)
    assert len(builds) == 4  # tokenizer changed
    write_jsonl(path, pairs(20, "changed"))
    os.utime(path, ns=(1, 1))  # even with an old mtime the size changed; a new mtime alone also counts
    changed, _ = build_stage_dataset(cfg_for(tmp_path, **base), "rm", tok)
    assert len(builds) == 5 and all(p.startswith("changed") for p in changed["prompt"])  # data changed
    build_stage_dataset(cfg_for(tmp_path, **base), "rm", tok)
    assert len(builds) == 5


def test_cache_dir_expands_user(tmp_path, tok, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    path = write_jsonl(tmp_path / "pairs.jsonl", pairs(5))
    cfg = load_config(None, {"data.cache_dir": "~/data-cache", "data.datasets": [{"path": str(path)}]})
    _, report = build_stage_dataset(cfg, "ppo", tok)
    assert report["cache_path"].startswith(str(tmp_path / "data-cache"))


# ---------------------------------------------------------------------------------------------------- PTX
def test_ptx_packs_text_into_blocks(tmp_path, tok):
    lines = [f"line number {i} about the river" for i in range(30)]
    (tmp_path / "corpus.txt").write_text("\n".join(lines) + "\n")
    cfg = cfg_for(tmp_path, ptx=[{"path": str(tmp_path / "corpus.txt")}], max_prompt_len=10, max_answer_len=6,
                  eval_fraction=0.0)
    ds = load_stage_dataset(cfg, "ptx", tok)
    assert ds.column_names == ["input_ids"]
    assert all(len(b) == 16 for b in ds["input_ids"][:-1]) and 0 < len(ds["input_ids"][-1]) <= 16
    stream = [t for b in ds["input_ids"] for t in b]
    assert sorted(stream) == sorted(t for line in lines for t in ids_of(tok, line) + [tok.eos_token_id])
    assert len(load_stage_dataset(cfg_for(tmp_path, eval_fraction=0.0), "ptx", tok)) > 0  # built-in text


# ------------------------------------------------------------------------------------------ built-in data
def test_builtin_covers_all_stages_with_checkable_answers(tmp_path, tok):
    cfg = cfg_for(tmp_path)  # data.datasets empty
    sft, rm, ppo = (load_stage_dataset(cfg, s, tok) for s in ("sft", "rm", "ppo"))
    assert (len(sft), len(rm), len(ppo)) == (720, 1440, 1440)
    assert builtin_rule_reward(sft["prompt"], sft["answer"], [a.split()[-1].strip(".") for a in sft["answer"]]) \
        == [1.0] * len(sft)
    rm_refs = [c.split()[-1].strip(".") for c in rm["chosen"]]
    assert builtin_rule_reward(rm["prompt"], rm["chosen"], rm_refs) == [1.0] * len(rm)
    assert builtin_rule_reward(rm["prompt"], rm["rejected"], rm_refs) == [0.0] * len(rm)
    assert all(ppo["reference"]) and any("plus" in p for p in ppo["prompt"])
    evals = [load_stage_dataset(cfg, s, tok, "eval")["prompt"] for s in ("sft", "rm", "ppo")]
    every = [p for ds in (sft, rm, ppo) for p in ds["prompt"]] + [p for e in evals for p in e]
    assert len(every) == len(set(every)) == 4000  # unique prompts, disjoint stages


def test_demo_task_reads_the_word_from_the_prompt_and_holds_out_its_eval_prompts(tmp_path, tok):
    from rlhf_ray.data.builtin import DEMO_WORDS, demo_eval_rows, demo_rows, strict_reward

    rows, held_out = demo_rows(), demo_eval_rows()
    assert (len(rows), len(held_out)) == (2000, 50)
    assert not {r["prompt"] for r in rows} & {r["prompt"] for r in held_out}  # held out by construction
    echo = [r for r in rows if "plus" not in r["prompt"]]
    assert len(echo) == 1200 and {r["reference"] for r in echo} == set(DEMO_WORDS)  # varied answers
    assert all(f"word {r['reference']}." in r["prompt"] for r in echo)  # read from the prompt
    for subset in (rows, held_out):  # the chosen answer scores, the rejected one does not
        prompts, refs = [r["prompt"] for r in subset], [r["reference"] for r in subset]
        assert strict_reward(prompts, [r["chosen"] for r in subset], refs) == [1.0] * len(subset)
        assert strict_reward(prompts, [r["rejected"] for r in subset], refs) == [0.0] * len(subset)
    # An always-"dog" policy scores only on the tenth of echo prompts whose word is dog, never on a sum.
    always_dog = strict_reward([r["prompt"] for r in rows], ["Dog."] * len(rows), [r["reference"] for r in rows])
    assert 0.05 < sum(always_dog) / len(rows) < 0.08
    cfg = cfg_for(tmp_path, datasets=[{"path": "builtin:demo", "format": "pairwise"}])
    ppo = load_stage_dataset(cfg, "ppo", tok)
    assert len(ppo) > 0 and set(ppo["reference"]) > set(DEMO_WORDS)


def test_strict_reward_checks_the_whole_answer():
    from rlhf_ray.data.builtin import strict_reward

    responses = ["Dog.", ' "dog"!', "The answer is 42.", "42", "the answer is 42", "The word is dog.", "dog cat",
                 "It is 42.", "142", "The answer is 42 or 43.", "anything"]
    refs = ["dog", "dog", "42", "42", "42", "dog", "dog", "42", "42", "42", ""]
    assert strict_reward(["p"] * len(refs), responses, refs) == [1.0] * 5 + [0.0] * 6
    with pytest.raises(ValueError, match="match one to one"):
        strict_reward(["p"], ["a", "b"], ["a"])


def test_rule_reward():
    from rlhf_ray.data.builtin import rule_reward

    assert rule_reward is builtin_rule_reward
    prompts = ["p"] * 6
    responses = ["The answer is 42.", "It is 142.", "DOG!", "dogs", "I say dog", "anything"]
    refs = ["42", "42", "dog", "dog", "dog", ""]
    assert rule_reward(prompts, responses, refs) == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="match one to one"):
        rule_reward(["p"], [], ["r"])


# ------------------------------------------------------------------------------------------------ padding
def test_pad_batch_sides_pad_to_and_labels():
    ids, mask = pad_batch([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long
    ids, mask = pad_batch([[1, 2, 3], [4]], pad_id=9, side="left", pad_to=5)
    assert ids.tolist() == [[9, 9, 1, 2, 3], [9, 9, 9, 9, 4]] and mask.tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 0, 1]]
    assert pad_labels([[-100, 5], [6]]).tolist() == [[-100, 5], [6, -100]]
    with pytest.raises(ValueError, match="sequence 0 has 3 tokens, more than pad_to=2"):
        pad_batch([[1, 2, 3]], 0, pad_to=2)
    with pytest.raises(ValueError, match="side"):
        pad_batch([[1]], 0, side="middle")
