"""`rlhf-ray data CONFIG [--stage sft|rm|ppo|ptx]`: what the data pipeline makes of the configured sources.

For each stage and split it builds (or reads from the cache) exactly what training reads (pipeline.py) and prints
its report: rows per source, rows dropped per reason with the first row of each, truncations, token-length
percentiles, and a few rows decoded with their special tokens (the chat template as applied). A source that loses
more than data.max_bad_fraction of its rows stops the command with the pipeline's own DataError message (exit 1).
"""
from __future__ import annotations

import sys

import numpy as np

from rlhf_ray.config import Config
from rlhf_ray.data.pipeline import SPLITS, build_stage_dataset
from rlhf_ray.data.report import DataError

# The token columns of each stage, measured and decoded.
LENGTH_COLUMNS = {"sft": ("input_ids",), "rm": ("chosen_input_ids", "rejected_input_ids"),
                  "ppo": ("prompt_input_ids",), "ptx": ("input_ids",)}
PERCENTILES = (50, 90, 99)


def default_stages(cfg: Config) -> list[str]:
    """sft, rm, ppo; ptx too when PTX data or a PTX loss is configured."""
    return ["sft", "rm", "ppo"] + (["ptx"] if cfg.data.ptx or cfg.ppo.ptx_coef > 0 else [])


def stage_tokenizer(cfg: Config, stage: str):
    """The tokenizer the stage trains with: the reward model's for rm, the actor's otherwise."""
    from rlhf_ray.models.loading import load_tokenizer

    return load_tokenizer(cfg.models.reward if stage == "rm" else cfg.models.actor)


def _reasons(counts: dict, first: dict, where: str) -> str:
    return ", ".join(f"{reason} {n} (first at {where} {first.get(reason, '?')})"
                     for reason, n in sorted(counts.items()))


def source_lines(entry: dict) -> list[str]:
    """One source's part of a report (pipeline._build's entries)."""
    lines = [f"    {entry['path']} (format {entry['format']}): {entry['rows']} rows read"]
    if entry.get("skipped"):
        return lines + [f"      skipped: {entry['skipped']}"]
    if entry.get("bad"):
        lines.append(f"      bad rows dropped: {sum(entry['bad'].values())}: "
                     + _reasons(entry["bad"], entry["first_bad_row"], "source row"))
    line = f"      this stage's part: {entry.get('stage_rows', 0)} rows -> {entry.get('out_rows', 0)} rows"
    if entry.get("dropped"):
        # the pipeline reports these by their index in the stage's part (after the seeded split), not the file's
        line += "; dropped: " + _reasons(entry["dropped"], entry.get("first_dropped_row", {}), "part row")
    if entry.get("truncated"):
        line += "; truncated: " + ", ".join(f"{k} {n}" for k, n in sorted(entry["truncated"].items()))
    return lines + [line]


def length_line(ds, column: str) -> str:
    lengths = np.array([len(ids) for ids in ds[column]]) if len(ds) else np.array([0])
    pct = ", ".join(f"p{p} {int(np.percentile(lengths, p))}" for p in PERCENTILES)
    return f"    tokens {column}: {pct}, max {int(lengths.max())}"


def example_lines(ds, stage: str, tokenizer, n: int) -> list[str]:
    lines = []
    for i in range(min(n, len(ds))):
        for column in LENGTH_COLUMNS[stage]:
            text = tokenizer.decode(ds[i][column], skip_special_tokens=False)
            lines.append(f"    example {i + 1} {column}:")
            lines += [f"      | {line}" for line in text.splitlines() or [""]]
    return lines


def cmd_data(args, cfg: Config) -> int:
    import datasets

    datasets.disable_progress_bars()  # the report is the output; the pipeline's own log lines still go to stderr
    stages = [args.stage] if args.stage else default_stages(cfg)
    for stage in stages:
        tokenizer = stage_tokenizer(cfg, stage)
        print(f"stage {stage} (tokenizer {getattr(tokenizer, 'name_or_path', '?')}, max_prompt_len "
              f"{cfg.data.max_prompt_len}, max_answer_len {cfg.data.max_answer_len}):")
        for split in SPLITS:
            try:
                ds, report = build_stage_dataset(cfg, stage, tokenizer, split)
            except DataError as e:
                sys.stdout.flush()
                print(f"rlhf-ray data: data error: {e}", file=sys.stderr)
                return 1
            print(f"  {split}: {report['rows']} rows (cache {report['cache_path']})")
            for entry in report["sources"]:
                print("\n".join(source_lines(entry)))
            for column in LENGTH_COLUMNS[stage]:
                print(length_line(ds, column))
            if split == "train":
                print("\n".join(example_lines(ds, stage, tokenizer, args.examples)))
    return 0
