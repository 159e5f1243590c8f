"""Bad-row accounting: every dropped row is counted under a reason, logged, and checked against a threshold."""
from __future__ import annotations

import logging
from collections import Counter

logger = logging.getLogger("rlhf_ray.data")

# Reasons a row can be dropped for (adapters and tokenization use exactly these names).
REASONS = {
    "missing_column": "a column the format needs is absent or null",
    "non_string": "a text field is not a string (or a structured field has the wrong shape)",
    "empty_text": "a prompt or answer is empty or whitespace",
    "chosen_equals_rejected": "the preferred and the rejected answer are the same text",
    "tie": "both answers have the same score (webgpt)",
    "bad_label": "the preference label is not 0 or 1 (SHP)",
    "no_assistant_turn": "a conversation has no 'Assistant:' turn to split a prompt from (HH)",
    "prompt_mismatch": "chosen and rejected conversations do not share their prompt (HH)",
    "no_answer": "the row has no answer, which this stage needs",
    "prompt_too_long": "the prompt is longer than data.max_prompt_len (data.long_prompt=drop)",
    "answer_too_long": "an answer is longer than data.max_answer_len (data.long_answer=drop)",
    "identical_after_truncation": "chosen and rejected become the same tokens after truncation",
}


class DataError(ValueError):
    """A data set cannot be used as configured; the message names the file and the reasons."""


class BadRow(Exception):
    """Raised by an adapter for one row; `reason` is one of REASONS."""

    def __init__(self, reason: str):
        assert reason in REASONS, reason
        super().__init__(reason)
        self.reason = reason


def count_reasons(reasons: list[str]) -> tuple[dict[str, int], dict[str, int]]:
    """From one reason per row ("" = good): counts per reason and the first row index of each."""
    counts = Counter(r for r in reasons if r)
    first: dict[str, int] = {}
    for i, r in enumerate(reasons):
        if r and r not in first:
            first[r] = i
    return dict(counts), first


def check_bad_rows(source: str, what: str, total: int, counts: dict[str, int], first: dict[str, int],
                   max_bad_fraction: float) -> None:
    """Log the counts; raise DataError when more than `max_bad_fraction` of `total` rows were dropped."""
    bad = sum(counts.values())
    if not bad:
        return
    detail = ", ".join(f"{r}: {n} (first at row {first[r]})" for r, n in sorted(counts.items()))
    msg = f"{source}: {what}: dropped {bad} of {total} rows: {detail}"
    if total and bad / total > max_bad_fraction:
        raise DataError(f"{msg}; that is {bad / total:.0%} > data.max_bad_fraction={max_bad_fraction}. "
                        + "; ".join(f"{r} = {REASONS[r]}" for r in sorted(counts)))
    logger.warning(msg)
