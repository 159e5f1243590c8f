"""Adapters: each data set's own columns -> one normalized row (prompt, messages, chosen, rejected, reference).

Normalized columns:
  prompt     the prompt as text (the source's own text; for `messages` data the HH-style rendering)
  messages   the prompt as a conversation [{"role", "content"}], what chat templates render
  chosen     the answer for SFT / the preferred answer for RM ("" when the row has none)
  rejected   the dispreferred answer ("" when none)
  reference  a known-good answer for rule rewards: a `reference` column if the data has one, else `chosen`

Formats (DatasetSource.format, or "auto": detected from columns in DETECTION order, and logged):
  rm-static  Dahoas/rm-static, Dahoas/full-hh-rlhf: prompt, response, chosen, rejected
  pairwise   Dahoas/synthetic-instruct-gptj-pairwise, yitingxie/rlhf-reward-datasets: prompt, chosen, rejected
             (yitingxie's answers start with "Assistant:": it moves to the end of the prompt)
  hh-rlhf    Anthropic/hh-rlhf: chosen, rejected as whole "\\n\\nHuman: ...\\n\\nAssistant: ..." conversations;
             prompt = the text up to and including the last "Assistant:"
  webgpt     openai/webgpt_comparisons: question{full_text}, answer_0/1, score_0/1 (higher score is chosen)
  shp        stanfordnlp/SHP: history, human_ref_A, human_ref_B, labels (1: A is preferred)
  chat       messages: [{role, content}, ...]; a final assistant turn is the answer, the rest the prompt
  sft        prompt + one of response/completion/answer/output: single-response data, SFT only
  prompt     prompt only (optionally reference): PPO only
  text       text: plain pretraining text for the PTX loss

Any row an adapter cannot use raises BadRow(reason); the caller counts it (report.py) - none is dropped
silently.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Callable

import datasets

from rlhf_ray.data.report import BadRow, DataError, count_reasons

logger = logging.getLogger("rlhf_ray.data")

NORMALIZED = datasets.Features({
    "prompt": datasets.Value("string"),
    "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
    "chosen": datasets.Value("string"),
    "rejected": datasets.Value("string"),
    "reference": datasets.Value("string"),
    "_bad": datasets.Value("string"),
})
ANSWER_COLUMNS = ("response", "completion", "answer", "output")  # the `sft` format's answer, first found


# ---------------------------------------------------------------------------------------- conversations
_TURN = re.compile(r"(?:^|\s+)(Human|Assistant):")
_ROLES = {"Human": "user", "Assistant": "assistant"}
_SPEAKERS = {"user": "Human", "assistant": "Assistant"}


def parse_conversation(text: str) -> list[dict]:
    """ "\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c\\n\\nAssistant:" -> user a, assistant b, user c.

    Text without Human/Assistant markers is one user message. A trailing empty assistant turn (the slot the
    model is to fill) is dropped; text before the first marker becomes a system message.
    """
    parts = _TURN.split(text)
    if len(parts) == 1:
        return [{"role": "user", "content": text.strip()}]
    messages = [{"role": "system", "content": parts[0].strip()}] if parts[0].strip() else []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": _ROLES[speaker], "content": content.strip()})
    if messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    return messages


def render_conversation(messages: list[dict]) -> str:
    """The template-less prompt text (DeepSpeed-Chat / Anthropic HH convention), ending in the answer slot."""
    text = "".join(f"\n\n{_SPEAKERS[m['role']]}: {m['content']}" if m["role"] in _SPEAKERS else m["content"]
                   for m in messages)
    return text + "\n\nAssistant:"


# ------------------------------------------------------------------------------------------- row helpers
def _text(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None:
        raise BadRow("missing_column")
    if not isinstance(value, str):
        raise BadRow("non_string")
    if not value.strip():
        raise BadRow("empty_text")
    return value


def _row(prompt: str, chosen: str = "", rejected: str = "", row: dict | None = None,
         messages: list[dict] | None = None) -> dict:
    chosen, rejected = chosen.strip(), rejected.strip()
    if rejected and chosen == rejected:
        raise BadRow("chosen_equals_rejected")
    reference = (row or {}).get("reference")
    reference = reference.strip() if isinstance(reference, str) and reference.strip() else chosen
    return {"prompt": prompt, "messages": messages or parse_conversation(prompt), "chosen": chosen,
            "rejected": rejected, "reference": reference, "_bad": ""}


# --------------------------------------------------------------------------------------------- formats
_ASSISTANT = "Assistant:"


def _pairwise(row: dict) -> dict:
    prompt, chosen, rejected = _text(row, "prompt"), _text(row, "chosen"), _text(row, "rejected")
    # yitingxie/rlhf-reward-datasets: the prompt stops before "Assistant:", which opens both answers.
    if chosen.lstrip().startswith(_ASSISTANT) and rejected.lstrip().startswith(_ASSISTANT):
        prompt += "" if prompt.rstrip().endswith(_ASSISTANT) else _ASSISTANT
        chosen, rejected = (a.lstrip()[len(_ASSISTANT):] for a in (chosen, rejected))
        if not chosen.strip() or not rejected.strip():
            raise BadRow("empty_text")
    return _row(prompt, chosen, rejected, row)


def _split_last_assistant(conversation: str) -> tuple[str, str]:
    idx = conversation.rfind(_ASSISTANT)
    if idx < 0:
        raise BadRow("no_assistant_turn")
    cut = idx + len(_ASSISTANT)
    return conversation[:cut], conversation[cut:]


def _hh(row: dict) -> dict:
    prompt, chosen = _split_last_assistant(_text(row, "chosen"))
    rejected_prompt, rejected = _split_last_assistant(_text(row, "rejected"))
    if prompt != rejected_prompt:
        raise BadRow("prompt_mismatch")
    if not chosen.strip() or not rejected.strip():
        raise BadRow("empty_text")
    return _row(prompt, chosen, rejected, row)


def _webgpt(row: dict) -> dict:
    question = row.get("question")
    if question is None:
        raise BadRow("missing_column")
    if not isinstance(question, dict):
        raise BadRow("non_string")
    prompt = _text(question, "full_text")
    answers = (_text(row, "answer_0"), _text(row, "answer_1"))
    scores = (row.get("score_0"), row.get("score_1"))
    if any(s is None for s in scores):
        raise BadRow("missing_column")
    if not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores):
        raise BadRow("non_string")
    if scores[0] == scores[1]:
        raise BadRow("tie")
    best = 0 if scores[0] > scores[1] else 1
    return _row(prompt, answers[best], answers[1 - best], row)


def _shp(row: dict) -> dict:
    prompt, a, b = _text(row, "history"), _text(row, "human_ref_A"), _text(row, "human_ref_B")
    label = row.get("labels")
    if label is None:
        raise BadRow("missing_column")
    if label not in (0, 1) or isinstance(label, bool):
        raise BadRow("bad_label")
    return _row(prompt, a, b, row) if label == 1 else _row(prompt, b, a, row)


def _chat(row: dict) -> dict:
    messages = row.get("messages")
    if messages is None:
        raise BadRow("missing_column")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise BadRow("non_string")
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    answer = ""
    if messages[-1]["role"] == "assistant":
        answer = messages.pop()["content"]
        if not answer.strip():
            raise BadRow("empty_text")
    if not messages or not any(m["content"].strip() for m in messages):
        raise BadRow("empty_text")
    return _row(render_conversation(messages), answer, "", row, messages=messages)


def _sft(row: dict) -> dict:
    return _row(_text(row, "prompt"), _text(row, "response"), "", row)


def _prompt_only(row: dict) -> dict:
    row = {**row, "reference": row.get("reference") if isinstance(row.get("reference"), str) else ""}
    return _row(_text(row, "prompt"), "", "", row)


def _plain_text(row: dict) -> dict:
    return {"prompt": "", "messages": [], "chosen": _text(row, "text"), "rejected": "", "reference": "",
            "_bad": ""}


@dataclass(frozen=True)
class Format:
    name: str
    columns: tuple[str, ...]  # needed (all must exist in the data set)
    stages: frozenset[str]  # which stages it can feed
    row: Callable[[dict], dict]


PREFERENCE = frozenset({"sft", "rm", "ppo"})
FORMATS = {f.name: f for f in (
    Format("rm-static", ("prompt", "chosen", "rejected"), PREFERENCE, _pairwise),
    Format("pairwise", ("prompt", "chosen", "rejected"), PREFERENCE, _pairwise),
    Format("hh-rlhf", ("chosen", "rejected"), PREFERENCE, _hh),
    Format("webgpt", ("question", "answer_0", "answer_1", "score_0", "score_1"), PREFERENCE, _webgpt),
    Format("shp", ("history", "human_ref_A", "human_ref_B", "labels"), PREFERENCE, _shp),
    Format("chat", ("messages",), frozenset({"sft", "ppo"}), _chat),
    Format("sft", ("prompt", "response"), frozenset({"sft"}), _sft),
    Format("prompt", ("prompt",), frozenset({"ppo"}), _prompt_only),
    Format("text", ("text",), frozenset({"ptx"}), _plain_text),
)}
# (format, columns that identify it): the first whose columns are all present wins.
DETECTION = (
    ("rm-static", {"prompt", "response", "chosen", "rejected"}),
    ("pairwise", {"prompt", "chosen", "rejected"}),
    ("hh-rlhf", {"chosen", "rejected"}),
    ("webgpt", {"question", "answer_0", "answer_1", "score_0", "score_1"}),
    ("shp", {"history", "human_ref_A", "human_ref_B", "labels"}),
    ("chat", {"messages"}),
    *(("sft", {"prompt", col}) for col in ANSWER_COLUMNS),
    ("prompt", {"prompt"}),
    ("text", {"text"}),
)


def detect_format(columns: list[str], source: str) -> str:
    for name, needed in DETECTION:
        if needed <= set(columns):
            logger.info("%s: format '%s' detected from columns %s", source, name, sorted(columns))
            return name
    raise DataError(f"{source}: cannot detect the format from columns {sorted(columns)}; set format to one of "
                    f"{', '.join(FORMATS)}")


def normalize(ds: datasets.Dataset, fmt: str, source: str, fingerprint: str
              ) -> tuple[datasets.Dataset, dict[str, int], dict[str, int]]:
    """Apply format `fmt` to every row: (good rows in NORMALIZED columns, bad counts, first bad row per reason)."""
    if fmt == "sft":  # its answer column has several common names
        answer_col = next((c for c in ANSWER_COLUMNS if c in ds.column_names), None)
        if answer_col and answer_col != "response":
            ds = ds.rename_column(answer_col, "response")
    missing = [c for c in FORMATS[fmt].columns if c not in ds.column_names]
    if missing:
        raise DataError(f"{source}: format '{fmt}' needs columns {missing}, which it lacks "
                        f"(it has {sorted(ds.column_names)})")
    if not len(ds):
        return datasets.Dataset.from_dict({k: [] for k in NORMALIZED if k != "_bad"},
                                          features=datasets.Features({k: v for k, v in NORMALIZED.items() if k != "_bad"})), {}, {}
    adapt = FORMATS[fmt].row

    def adapt_batch(batch: dict) -> dict:
        out = {k: [] for k in NORMALIZED}
        for values in zip(*batch.values()):
            try:
                row = adapt(dict(zip(batch, values)))
            except BadRow as e:
                row = {"prompt": "", "messages": [], "chosen": "", "rejected": "", "reference": "",
                       "_bad": e.reason}
            for k in NORMALIZED:
                out[k].append(row[k])
        return out

    out = ds.map(adapt_batch, batched=True, remove_columns=ds.column_names, features=NORMALIZED,
                 keep_in_memory=True, new_fingerprint=f"{fingerprint}-normalize-{fmt}")
    return drop_bad_rows(out)


def drop_bad_rows(ds: datasets.Dataset) -> tuple[datasets.Dataset, dict[str, int], dict[str, int]]:
    """Keep the rows whose `_bad` reason is empty; return them with the counts and first index per reason."""
    reasons = list(ds["_bad"])
    counts, first = count_reasons(reasons)
    if counts:
        ds = ds.select([i for i, r in enumerate(reasons) if not r])
    return ds.remove_columns("_bad"), counts, first
