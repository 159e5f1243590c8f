"""Data for every stage: hub names or local files -> adapters -> seeded stage splits -> tokens -> Arrow cache.

    from rlhf_ray.data import load_stage_dataset, pad_batch, builtin_rule_reward
    ds = load_stage_dataset(cfg, "sft", tokenizer)            # data.datasets empty: the built-in data set

Columns per stage (token ids are lists of ints):
  sft  input_ids (prompt + answer + EOS), labels (same length, prompt positions -100), prompt, answer
  rm   chosen_input_ids, rejected_input_ids (each prompt + answer + EOS), prompt, chosen, rejected
  ppo  prompt_input_ids (with the chat template's generation prompt when the tokenizer has a template),
       prompt, reference (a known-good answer for rule rewards, "" when none)
  ptx  input_ids (packed blocks of plain text)

Files: sources.py (where rows come from), adapters.py (formats), tokenization.py (tokens, truncation,
padding), pipeline.py (splits, mixing, cache, report), report.py (bad-row reasons), builtin.py (the
generated task and its rule reward).
"""
from rlhf_ray.data.adapters import FORMATS, detect_format, parse_conversation, render_conversation
from rlhf_ray.data.builtin import rule_reward as builtin_rule_reward
from rlhf_ray.data.pipeline import STAGES, build_stage_dataset, load_stage_dataset
from rlhf_ray.data.report import REASONS, DataError
from rlhf_ray.data.sources import load_source
from rlhf_ray.data.tokenization import IGNORE_INDEX, encode_prompts, pad_batch, pad_labels, uses_chat_template

__all__ = ["load_stage_dataset", "build_stage_dataset", "pad_batch", "pad_labels", "builtin_rule_reward",
           "DataError", "REASONS", "FORMATS", "STAGES", "IGNORE_INDEX", "detect_format", "load_source",
           "parse_conversation", "render_conversation", "encode_prompts", "uses_chat_template"]
