"""Lineage: per trained sample, where it came from (prompt id, engines, the weight versions of its tokens), how stale
it was when trained (learner steps since the oldest of them), when it was generated and trained; the sampled
samples.jsonl (rollout.samples_every)."""
from __future__ import annotations

import json
from pathlib import Path


# ------------------------------------------------------------------------------------------- lineage
def sample_staleness(samples: list, version_steps: dict[int, int], trained_step: int) -> list[int]:
    """Learner steps between the weights that sampled each sample's first (oldest) token and the learners that train
    on it. Counted in steps, not version numbers: recovery gives the restored weights a new, higher version."""
    return [trained_step - version_steps[s.weight_version] for s in samples]


def lineage(info: dict, iteration: int, trained_at: tuple[float, float]) -> list[dict]:
    """One record per sample of the trained batch (info: as ppo.PPOTrainer.next_rollout gives it, with
    "staleness" and "stale"): where it came from, how stale it was, and whether it was trained ("trained") or left
    out as older than the mode allows ("stale")."""
    rows, (start, end) = info["rows"], info["times"]
    return [{"iteration": iteration, "prompt_id": rows[s.prompt_index]["prompt_id"], "sample_index": s.sample_index,
             "engine": s.engine, "engines": s.extra.get("engines", [s.engine]), "weight_version": s.weight_version,
             "weight_versions": list(dict.fromkeys(s.token_versions)), "staleness": staleness,
             "outcome": "stale" if stale else "trained", "generation_start": start, "generation_end": end,
             "train_start": trained_at[0], "train_end": trained_at[1]}
            for s, staleness, stale in zip(info["samples"], info["staleness"], info["stale"])]


def unused_records(info: dict, iteration: int) -> list[dict]:
    """One record per prompt taken from the stream for this batch and not trained on: "skipped" (too long for the
    engines: generation.long_prompt skip) or "filtered" (its samples' scores tied: ppo.dynamic_sampling). With the
    trained samples' records, every prompt id is accounted for exactly once."""
    unused = info.get("unused_prompts", {})
    return [{"iteration": iteration, "prompt_id": i, "outcome": reason}
            for reason in ("skipped", "filtered") for i in unused.get(reason, [])]


def staleness_metrics(records: list[dict]) -> dict:
    """rollout/staleness_mean, _max and a histogram (rollout/staleness_<v>: samples that many steps old), and
    rollout/dropped_stale: samples left out as too old."""
    values = [r["staleness"] for r in records if r["outcome"] == "trained"]
    out = {"rollout/staleness_mean": sum(values) / max(1, len(values)), "rollout/staleness_max": max(values, default=0)}
    for v in sorted(set(values)):
        out[f"rollout/staleness_{v}"] = values.count(v)
    out["rollout/dropped_stale"] = sum(r["outcome"] == "stale" for r in records)
    return out


def write_samples(path: Path, records: list[dict], batch: dict, rewards: list[float], every: int, offset: int,
                  unused: tuple = ()) -> int:
    """Append every `every`-th record (counted across iterations from `offset`) with its texts and reward to the
    JSONL file, and every `unused` prompt's record (unused_records, with its prompt: rare, and each one matters to
    the accounting); returns the new offset."""
    with open(path, "a") as f:
        for record in unused:
            f.write(json.dumps(record) + "\n")
        for i, record in enumerate(records):
            if (offset + i) % every == 0:
                f.write(json.dumps({**record, "prompt": batch["prompts"][i], "response": batch["responses"][i],
                                    "reward": rewards[i]}) + "\n")
    return offset + len(records)
