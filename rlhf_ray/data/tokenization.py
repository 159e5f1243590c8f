"""Normalized rows -> token ids per stage, with the model's tokenizer; padding for batches.

Prompt: with a chat template (and data.use_chat_template), the prompt conversation rendered by
`apply_chat_template(..., add_generation_prompt=True)`; otherwise "\\n\\nHuman: ...\\n\\nAssistant:" text
(DeepSpeed-Chat's convention) tokenized with the tokenizer's own special tokens (BOS where it adds one).
Answer: its tokens (a leading space in the template-less case, after "Assistant:") followed by EOS.

Truncation: a prompt over data.max_prompt_len keeps its last tokens (long_prompt=truncate_left: the end of
the conversation and the generation prompt survive) or the row is dropped (drop); an answer over
data.max_answer_len keeps its first tokens (long_answer=truncate) or the row is dropped (drop). Drops are
counted per reason; truncations are counted too. PTX text is packed into blocks of
max_prompt_len + max_answer_len tokens (documents separated by EOS, nothing cut away).
"""
from __future__ import annotations

from typing import Optional

import datasets
import torch

from rlhf_ray.config import DataConfig
from rlhf_ray.data.adapters import drop_bad_rows, render_conversation
from rlhf_ray.data.report import BadRow, DataError

IGNORE_INDEX = -100  # label value the loss skips (prompt positions, padding)
_IDS = datasets.List(datasets.Value("int32"))
_STR = datasets.Value("string")
STAGE_FEATURES = {
    "sft": {"input_ids": _IDS, "labels": _IDS, "prompt": _STR, "answer": _STR},
    "rm": {"chosen_input_ids": _IDS, "rejected_input_ids": _IDS, "prompt": _STR, "chosen": _STR, "rejected": _STR},
    "ppo": {"prompt_input_ids": _IDS, "prompt": _STR, "reference": _STR},
    "ptx": {"input_ids": _IDS},
}


def empty_stage_dataset(stage: str) -> datasets.Dataset:
    return datasets.Dataset.from_dict({k: [] for k in STAGE_FEATURES[stage]},
                                      features=datasets.Features(STAGE_FEATURES[stage]))


def uses_chat_template(tokenizer, use_chat_template: bool = True) -> bool:
    return use_chat_template and bool(getattr(tokenizer, "chat_template", None))


def encode_prompts(tokenizer, conversations: list[list[dict]], template: bool) -> list[list[int]]:
    if not conversations:
        return []
    if template:
        ids = tokenizer.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True,
                                            return_dict=False)
        return [list(x) for x in ids]
    return tokenizer([render_conversation(m) for m in conversations], add_special_tokens=True)["input_ids"]


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise DataError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no EOS token; answers end with one")
    return tokenizer.eos_token_id


def encode_answers(tokenizer, answers: list[str], template: bool) -> list[list[int]]:
    if not answers:
        return []
    texts = answers if template else [" " + a for a in answers]
    eos = _eos_id(tokenizer)
    return [ids + [eos] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _fit_prompt(ids: list[int], d: DataConfig, notes: list[str]) -> list[int]:
    if len(ids) <= d.max_prompt_len:
        return ids
    if d.long_prompt == "drop":
        raise BadRow("prompt_too_long")
    notes.append("prompt")
    return ids[-d.max_prompt_len:]


def _fit_answer(ids: list[int], d: DataConfig, notes: list[str]) -> list[int]:
    if len(ids) <= d.max_answer_len:
        return ids
    if d.long_answer == "drop":
        raise BadRow("answer_too_long")
    notes.append("answer")
    return ids[:d.max_answer_len]


def _stage_row(stage: str, row: dict, prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int],
               d: DataConfig, notes: list[str]) -> dict:
    prompt_ids = _fit_prompt(prompt_ids, d, notes)
    if stage == "ppo":
        return {"prompt_input_ids": prompt_ids, "prompt": row["prompt"], "reference": row["reference"]}
    if not row["chosen"] or (stage == "rm" and not row["rejected"]):
        raise BadRow("no_answer")
    chosen_ids = _fit_answer(chosen_ids, d, notes)
    if stage == "sft":
        return {"input_ids": prompt_ids + chosen_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + chosen_ids,
                "prompt": row["prompt"], "answer": row["chosen"]}
    rejected_ids = _fit_answer(rejected_ids, d, notes)
    if chosen_ids == rejected_ids:
        raise BadRow("identical_after_truncation")
    return {"chosen_input_ids": prompt_ids + chosen_ids, "rejected_input_ids": prompt_ids + rejected_ids,
            "prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}


def tokenize_stage(ds: datasets.Dataset, stage: str, tokenizer, d: DataConfig, fingerprint: str
                   ) -> tuple[datasets.Dataset, dict[str, int], dict[str, int], dict[str, int]]:
    """Normalized rows -> the stage's columns: (rows, drop counts, first dropped row per reason, truncations)."""
    if stage == "ptx":
        return pack_text(ds, tokenizer, d.max_prompt_len + d.max_answer_len, fingerprint), {}, {}, {}
    if not len(ds):
        return empty_stage_dataset(stage), {}, {}, {}
    template = uses_chat_template(tokenizer, d.use_chat_template)
    features = datasets.Features({**STAGE_FEATURES[stage], "_bad": _STR, "_truncated": _STR})

    def encode_batch(batch: dict) -> dict:
        prompts = encode_prompts(tokenizer, batch["messages"], template)
        chosen = encode_answers(tokenizer, batch["chosen"], template) if stage != "ppo" else prompts
        rejected = encode_answers(tokenizer, batch["rejected"], template) if stage == "rm" else prompts
        out = {k: [] for k in features}
        for i, row in enumerate(dict(zip(batch, values)) for values in zip(*batch.values())):
            notes: list[str] = []
            try:
                result = {**_stage_row(stage, row, prompts[i], chosen[i], rejected[i], d, notes), "_bad": ""}
            except BadRow as e:
                result = {k: [] if features[k] == _IDS else "" for k in STAGE_FEATURES[stage]} | {"_bad": e.reason}
            result["_truncated"] = ",".join(notes)
            for k in features:
                out[k].append(result[k])
        return out

    out = ds.map(encode_batch, batched=True, remove_columns=ds.column_names, features=features,
                 keep_in_memory=True, new_fingerprint=f"{fingerprint}-tokenize-{stage}")
    truncated: dict[str, int] = {}
    for note in out["_truncated"]:
        for part in filter(None, note.split(",")):
            truncated[part] = truncated.get(part, 0) + 1
    out, counts, first = drop_bad_rows(out.remove_columns("_truncated"))
    return out, counts, first, truncated


def pack_text(ds: datasets.Dataset, tokenizer, block: int, fingerprint: str) -> datasets.Dataset:
    """Texts (the `chosen` column of normalized text rows) -> EOS-separated stream cut into `block`-token rows."""
    eos = _eos_id(tokenizer)

    def pack_batch(batch: dict) -> dict:
        stream = [t for ids in tokenizer(batch["chosen"], add_special_tokens=False)["input_ids"] for t in ids + [eos]]
        return {"input_ids": [stream[i:i + block] for i in range(0, len(stream), block)]}

    return ds.map(pack_batch, batched=True, remove_columns=ds.column_names, keep_in_memory=True,
                  features=datasets.Features(STAGE_FEATURES["ptx"]), new_fingerprint=f"{fingerprint}-pack")


# ---------------------------------------------------------------------------------------------- batches
def pad_batch(sequences: list[list[int]], pad_id: int, side: str = "right", pad_to: Optional[int] = None
              ) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Pad token id lists into (ids, attention_mask), both (batch, length) int64.

    `length` is the longest sequence, or `pad_to` (an error if a sequence is longer). `side="left"` is what
    generation wants (prompts end at the same column). The mask comes from lengths, so `pad_id=-100` pads
    labels (see pad_labels).
    """
    if side not in ("left", "right"):
        raise ValueError(f"pad_batch: side must be 'left' or 'right', got {side!r}")
    longest = max((len(s) for s in sequences), default=0)
    if pad_to is not None and longest > pad_to:
        i = max(range(len(sequences)), key=lambda j: len(sequences[j]))
        raise ValueError(f"pad_batch: sequence {i} has {longest} tokens, more than pad_to={pad_to}")
    length = longest if pad_to is None else pad_to
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, seq in enumerate(sequences):
        n = len(seq)
        cols = slice(0, n) if side == "right" else slice(length - n, length)
        ids[i, cols] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


def pad_labels(labels: list[list[int]], side: str = "right", pad_to: Optional[int] = None) -> torch.LongTensor:
    """Labels padded with IGNORE_INDEX (-100), aligned with pad_batch of the matching input_ids."""
    return pad_batch(labels, IGNORE_INDEX, side=side, pad_to=pad_to)[0]
