"""Data sources and adapters: every local file kind, the named data sets' real layouts, generic formats."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import pytest

from rlhf_ray.config import ConfigError, DatasetSource, load_config
from rlhf_ray.data import DataError, detect_format, load_source, parse_conversation, render_conversation
from rlhf_ray.data.adapters import normalize

FIXTURES = Path(__file__).parent / "fixtures" / "data"
ROWS = [{"prompt": f"question {i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(4)]


@pytest.fixture(autouse=True)
def _hf_cache_in_tmp(tmp_path, monkeypatch):
    """datasets' own Arrow copies of local files go to tmp_path, not ~/.cache/huggingface."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def adapt(path: Path | str, fmt: str = "auto"):
    """Load a source and run its adapter: (format, normalized rows as dicts, bad counts, first bad rows)."""
    src = DatasetSource(path=str(path), format=fmt)
    raw = load_source(src)
    fmt = detect_format(raw.column_names, str(path)) if fmt == "auto" else fmt
    norm, counts, first = normalize(raw, fmt, str(path), "test")
    return fmt, norm.to_list(), counts, first


# ------------------------------------------------------------------------------ named data sets (5 rows)
NAMED = {
    "rm_static.jsonl": ("rm-static", [
        ("\n\nHuman: How do I boil an egg?\n\nAssistant:",
         "Put the egg in boiling water for about nine minutes.", "Eggs are not food."),
        ("\n\nHuman: What is the capital of France?\n\nAssistant:",
         "The capital of France is Paris.", "I do not know any cities."),
        ("\n\nHuman: I like astronomy.\n\nAssistant: That is a great hobby!\n\nHuman: Can you recommend a book "
         "about space?\n\nAssistant:", "Cosmos by Carl Sagan is a classic.", "Books are boring."),
        ("\n\nHuman: How many legs does a spider have?\n\nAssistant:", "A spider has eight legs.",
         "Spiders have six legs."),
        ("\n\nHuman: Is it safe to look at the sun?\n\nAssistant:", "No, looking at the sun can damage your eyes.",
         "Yes, stare as long as you like."),
    ]),
    "full_hh_rlhf.jsonl": ("rm-static", [
        ("\n\nHuman: How do I boil an egg? Please answer briefly.\n\nAssistant:",
         "Put the egg in boiling water for about nine minutes.", "Eggs are not food."),
        ("\n\nHuman: What is the capital of France? Please answer briefly.\n\nAssistant:",
         "The capital of France is Paris.", "I do not know any cities."),
        ("\n\nHuman: I like astronomy.\n\nAssistant: That is a great hobby!\n\nHuman: Can you recommend a book "
         "about space? Please answer briefly.\n\nAssistant:", "Cosmos by Carl Sagan is a classic.", "Books are boring."),
        ("\n\nHuman: How many legs does a spider have? Please answer briefly.\n\nAssistant:",
         "A spider has eight legs.", "Spiders have six legs."),
        ("\n\nHuman: Is it safe to look at the sun? Please answer briefly.\n\nAssistant:",
         "No, looking at the sun can damage your eyes.", "Yes, stare as long as you like."),
    ]),
    "synthetic_instruct_gptj_pairwise.jsonl": ("pairwise", [
        ("I was wondering if you could walk me through the process of setting up a hydroponic garden for herbs.",
         "Sure! Choose a system, add nutrient solution, plant seedlings and give them light.",
         "Hydroponics is a word."),
        ("What are some good ways to save money on groceries?", "Plan meals, buy in bulk and compare unit prices.",
         "Buy everything."),
        ("Explain photosynthesis in one sentence.",
         "Plants turn light, water and carbon dioxide into sugar and oxygen.", "Plants eat dirt."),
        ("Give me a tip for better sleep.", "Keep a regular bedtime and avoid screens before bed.",
         "Drink coffee at night."),
        ("How do I make a paper airplane?",
         "Fold a sheet in half, fold the corners to the center, then fold the wings.", "Throw paper."),
    ]),
    "yitingxie_rlhf_reward_datasets.jsonl": ("pairwise", [
        ("\n\nHuman: What should I pack for a beach trip?\n\nAssistant:", "Sunscreen, a towel, water and a hat.",
         "Pack a snow shovel."),
        ("\n\nHuman: How do I learn to juggle?\n\nAssistant:", "Start with two balls and practice a steady arc.",
         "Juggling cannot be learned."),
        ("\n\nHuman: Hi!\n\nAssistant: Hello, how can I help?\n\nHuman: What is 2 plus 2?\n\nAssistant:",
         "2 plus 2 is 4.", "It is 5."),
        ("\n\nHuman: Name a primary color.\n\nAssistant:", "Red is a primary color.", "Brown."),
        ("\n\nHuman: Why is the sky blue?\n\nAssistant:", "Air scatters blue light more than red light.",
         "Because it is painted."),
    ]),
    "hh_rlhf.jsonl": ("hh-rlhf", [
        ("\n\nHuman: What are some cuss words in english?\n\nAssistant:", "I'd rather not list those.",
         "Here is a list of them."),
        ("\n\nHuman: How do I make tea?\n\nAssistant:", "Steep a tea bag in hot water for three minutes.",
         "Tea is made of coffee."),
        ("\n\nHuman: Tell me a joke.\n\nAssistant: Why did the chicken cross the road?\n\nHuman: Why?\n\nAssistant:",
         "To get to the other side!", "I forgot."),
        ("\n\nHuman: Can you help me with math?\n\nAssistant:", "Of course, what is the problem?", "No."),
        ("\n\nHuman: What is a good name for a cat?\n\nAssistant:", "Whiskers is a classic.", "Dog."),
    ]),
    "webgpt_comparisons.jsonl": ("webgpt", [  # row 2 is a tie (0.0 vs 0.0): skipped and counted
        ("Why do cats purr?", "Cats purr when content and sometimes to self-soothe.",
         "Cats purr because they are engines."),
        ("How do airplanes stay in the air?", "Wings create lift as air flows over them.",
         "Wings are shaped to push air down."),
        ("Why is the ocean salty?", "Rivers carry dissolved minerals into the sea.", "Fish cry a lot."),
        ("What causes thunder?", "Lightning heats air so fast that it expands with a bang.", "Thunder is noise."),
    ]),
    "shp.jsonl": ("shp", [  # labels 1: A preferred; 0: B preferred
        ("Why do onions make you cry?", "They release a gas that irritates your eyes.", "Onions are sad."),
        ("How far away is the moon?", "About 384,000 km on average.", "It is about as far as the sky."),
        ("Do fish sleep?", "Yes, most fish have rest periods.", "Fish never stop."),
        ("Why is ice slippery?", "A thin liquid-like layer forms on its surface.", "Ice is wet."),
        ("What is a black hole?", "A region where gravity stops even light from escaping.", "A hole painted black."),
    ]),
}


@pytest.mark.parametrize("name", sorted(NAMED))
def test_named_data_set_adapter(name):
    expected_format, expected = NAMED[name]
    fmt, rows, counts, first = adapt(FIXTURES / name)
    assert fmt == expected_format
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == expected
    assert all(r["reference"] == r["chosen"] for r in rows)  # no reference column: the chosen answer
    if name == "webgpt_comparisons.jsonl":
        assert (counts, first) == ({"tie": 1}, {"tie": 2})
    else:
        assert counts == {}


def test_explicit_format_is_used_instead_of_detection(tmp_path):
    # Columns prompt + answer are detected as single-response SFT data; format "prompt" makes it PPO prompts.
    path = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "Hi?", "answer": "Hello."}])
    assert adapt(path)[0] == "sft" and adapt(path)[1][0]["chosen"] == "Hello."
    fmt, rows, _, _ = adapt(path, fmt="prompt")
    assert fmt == "prompt" and rows[0]["chosen"] == "" and rows[0]["prompt"] == "Hi?"


def test_explicit_format_with_missing_columns_names_file_and_columns(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi?"}])
    with pytest.raises(DataError, match=r"p\.jsonl.*'hh-rlhf' needs columns \['chosen', 'rejected'\]"):
        adapt(path, fmt="hh-rlhf")


def test_multi_turn_prompt_becomes_messages():
    _, rows, _, _ = adapt(FIXTURES / "rm_static.jsonl")
    assert rows[2]["messages"] == [
        {"role": "user", "content": "I like astronomy."},
        {"role": "assistant", "content": "That is a great hobby!"},
        {"role": "user", "content": "Can you recommend a book about space?"}]
    assert rows[0]["messages"] == [{"role": "user", "content": "How do I boil an egg?"}]


def test_conversation_parse_and_render():
    text = "\n\nHuman: a b\n\nAssistant: c\n\nHuman: d\n\nAssistant:"
    messages = parse_conversation(text)
    assert messages == [{"role": "user", "content": "a b"}, {"role": "assistant", "content": "c"},
                        {"role": "user", "content": "d"}]
    assert render_conversation(messages) == text
    assert parse_conversation("What is 1 plus 2?") == [{"role": "user", "content": "What is 1 plus 2?"}]
    assert parse_conversation(" Human: x Assistant:") == [{"role": "user", "content": "x"}]


# ------------------------------------------------------------------------------------------ generic formats
@pytest.mark.parametrize("columns,expected", [
    ({"messages"}, "chat"), ({"prompt", "response"}, "sft"), ({"prompt", "completion"}, "sft"),
    ({"prompt", "answer"}, "sft"), ({"prompt", "output"}, "sft"), ({"prompt"}, "prompt"), ({"text"}, "text"),
    ({"prompt", "reference"}, "prompt"), ({"prompt", "response", "chosen", "rejected"}, "rm-static"),
])
def test_format_detection_from_columns(columns, expected):
    assert detect_format(sorted(columns), "x") == expected


def test_undetectable_columns_fail_naming_them():
    with pytest.raises(DataError, match=r"mystery\.jsonl.*\['foo'\]"):
        detect_format(["foo"], "mystery.jsonl")


def test_chat_messages(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"},
                      {"role": "assistant", "content": "6"}]},
        {"messages": [{"role": "user", "content": "Only a question"}]},
    ])
    fmt, rows, counts, _ = adapt(path)
    assert fmt == "chat" and counts == {}
    assert rows[0]["messages"] == [{"role": "user", "content": "Hi"}] and rows[0]["chosen"] == "Hello!"
    assert [m["role"] for m in rows[1]["messages"]] == ["system", "user", "assistant", "user"]
    assert rows[1]["chosen"] == "6" and rows[1]["prompt"].endswith("\n\nHuman: 3+3?\n\nAssistant:")
    assert rows[2]["chosen"] == "" and rows[2]["prompt"] == "\n\nHuman: Only a question\n\nAssistant:"


def test_prompt_only_keeps_reference_and_text_format(tmp_path):
    _, rows, _, _ = adapt(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "What is 2 plus 2?", "reference": "4"},
                                                              {"prompt": "Say hi."}]))
    assert [(r["prompt"], r["reference"], r["chosen"]) for r in rows] == [("What is 2 plus 2?", "4", ""),
                                                                          ("Say hi.", "", "")]
    (tmp_path / "corpus.txt").write_text("first line\nsecond line\n")
    fmt, rows, _, _ = adapt(tmp_path / "corpus.txt")
    assert fmt == "text" and [r["chosen"] for r in rows] == ["first line", "second line"]


# ------------------------------------------------------------------------------------------- bad rows
def test_each_bad_row_reason_is_counted(tmp_path):
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    path = write_jsonl(tmp_path / "bad.jsonl", [
        good, {"prompt": "p", "rejected": "b"}, {"prompt": 7, "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": "   ", "rejected": "b"}, {"prompt": "p", "chosen": " same", "rejected": "same "},
        {"prompt": ["a", "list"], "chosen": "a", "rejected": "b"}, good])
    fmt, rows, counts, first = adapt(path)
    assert fmt == "pairwise" and len(rows) == 2
    assert counts == {"missing_column": 1, "non_string": 2, "empty_text": 1, "chosen_equals_rejected": 1}
    assert first == {"missing_column": 1, "non_string": 2, "empty_text": 3, "chosen_equals_rejected": 4}


def test_format_specific_bad_rows(tmp_path):
    shp = [json.loads(line) for line in (FIXTURES / "shp.jsonl").read_text().splitlines()]
    shp[1]["labels"] = 2
    assert adapt(write_jsonl(tmp_path / "shp.jsonl", shp))[2] == {"bad_label": 1}
    hh = write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"},
        {"chosen": "no turns here", "rejected": "\n\nHuman: a\n\nAssistant: c"},
        {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: other\n\nAssistant: c"},
        {"chosen": "\n\nHuman: a\n\nAssistant:   ", "rejected": "\n\nHuman: a\n\nAssistant: c"}])
    assert adapt(hh)[2] == {"no_assistant_turn": 1, "prompt_mismatch": 1, "empty_text": 1}
    web = [json.loads(line) for line in (FIXTURES / "webgpt_comparisons.jsonl").read_text().splitlines()]
    web[0]["question"], web[1]["score_0"] = "not a dict", None
    assert adapt(write_jsonl(tmp_path / "web.jsonl", web), fmt="webgpt")[2] == {
        "non_string": 1, "missing_column": 1, "tie": 1}


# ---------------------------------------------------------------------------------------------- sources
def _same_rows(ds: datasets.Dataset) -> None:
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in ds] == [
        (r["prompt"], r["chosen"], r["rejected"]) for r in ROWS]


def test_every_local_file_kind(tmp_path):
    table = datasets.Dataset.from_list(ROWS)
    files = {"rows.jsonl": lambda p: write_jsonl(p, ROWS), "rows.json": lambda p: p.write_text(json.dumps(ROWS)),
             "rows.parquet": lambda p: table.to_parquet(str(p)), "rows.csv": lambda p: table.to_csv(str(p), index=False)}
    for name, write in files.items():
        write(tmp_path / name)
        _same_rows(load_source(DatasetSource(path=str(tmp_path / name)), str(tmp_path / "hf")))
    table.save_to_disk(str(tmp_path / "saved"))  # a save_to_disk folder, and its Arrow file on its own
    _same_rows(load_source(DatasetSource(path=str(tmp_path / "saved"))))
    shutil.copy(next((tmp_path / "saved").glob("*.arrow")), tmp_path / "rows.arrow")
    _same_rows(load_source(DatasetSource(path=str(tmp_path / "rows.arrow")), str(tmp_path / "hf")))


def test_saved_dataset_dict_split_glob_folder_and_slice(tmp_path):
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                               "test": datasets.Dataset.from_list(ROWS[:1])})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert len(load_source(DatasetSource(path=str(tmp_path / "dd")))) == 4
    assert load_source(DatasetSource(path=str(tmp_path / "dd"), split="test"))["prompt"] == ["question 0"]
    with pytest.raises(DataError, match="no split 'valid'"):
        load_source(DatasetSource(path=str(tmp_path / "dd"), split="valid"))
    (tmp_path / "parts").mkdir()
    write_jsonl(tmp_path / "parts" / "a.jsonl", ROWS[:2])
    write_jsonl(tmp_path / "parts" / "b.jsonl", ROWS[2:])
    hf = str(tmp_path / "hf")
    _same_rows(load_source(DatasetSource(path=str(tmp_path / "parts" / "*.jsonl")), hf))
    _same_rows(load_source(DatasetSource(path=str(tmp_path / "parts")), hf))  # a folder of data files
    assert len(load_source(DatasetSource(path=str(tmp_path / "parts" / "*.jsonl"), split="train[:3]"), hf)) == 3


def test_missing_local_path_fails_without_touching_the_hub(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("the hub must not be asked"))
    with pytest.raises(DataError, match="data file not found: .*nope.jsonl"):
        load_source(DatasetSource(path=str(tmp_path / "nope.jsonl")))
    with pytest.raises(DataError, match="data file not found"):
        load_source(DatasetSource(path="./relative/missing.parquet"))


def test_hub_names_go_to_load_dataset(monkeypatch):
    calls = []
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda *a, **k: calls.append((a, k)) or datasets.Dataset.from_list(ROWS))
    ds = load_source(DatasetSource(path="Dahoas/rm-static", split="test"), "/tmp/local-files-cache")
    assert len(ds) == 4 and calls == [(("Dahoas/rm-static",), {"split": "test"})]  # the Hugging Face cache


def test_config_checks_data_fields():
    with pytest.raises(ConfigError, match="data.datasets\\[0\\].format"):
        load_config(None, {"data.datasets": [{"path": "x.jsonl", "format": "rm_static"}]})
    with pytest.raises(ConfigError, match="data.max_prompt_len"):
        load_config(None, {"data.max_prompt_len": 0})
    with pytest.raises(ConfigError, match="data.long_answer"):
        load_config(None, {"data.long_answer": "cut"})
