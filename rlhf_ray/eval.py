"""`rlhf-ray eval rm|policy`: held-out numbers for a reward model and for a policy (DeepSpeed-Chat's eval scripts).

    rlhf-ray eval rm --path <run>/rm --data prefs.jsonl
    rlhf-ray eval policy --path <run>/ppo/actor --baseline <run>/sft --reward <run>/rm --data prompts.jsonl

Data goes through the data pipeline (rlhf_ray/data) as training data does, with every row of each --data file
held out for evaluation (no data_split share, no mixing weights): bad rows are dropped and counted per reason, as
`rlhf-ray data` reports them, and never stop the evaluation.

`eval rm` scores each (prompt, chosen, rejected) pair in this process with the RM stage's own held-out metric
(train.common.evaluate with train/rm.py's sums): accuracy = share of pairs where chosen scores above rejected,
mean margin = mean of chosen - rejected scores.

`eval policy` answers every prompt with each policy through a vLLM engine actor on the Ray cluster
(generator.GeneratorGroup; `init_ray` attaches to ray.address / RAY_ADDRESS, else starts a private local cluster,
as every command does), one policy after the other, and scores the answers with PPO's reward actors
(scorer.RewardGroup): --reward is a reward-model folder (its value at the last token of the policy's own token
ids, as in PPO, so policies and reward model must share a tokenizer) or a `ppo.reward_functions` entry (a dotted
path or an http(s) URL), called with the prompts, responses and `references` of the prompt file. Win rate of the
policy over the baseline: (wins + ties / 2) / prompts answered by both.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

from rlhf_ray.config import Config, ModelConfig, load_config

EVAL_BATCH_SIZE = 8  # pairs per forward pass in `eval rm`
STAGE_SHARE = {"rm": "0,1,0", "ppo": "0,0,1"}  # data_split giving the whole file to the stage


class EvalError(ValueError):
    """Bad input to `rlhf-ray eval`; the message names the option and the value."""


def eval_config(stage: str, data: list[str], fmt: str = "auto", overrides: Optional[dict] = None) -> Config:
    """Defaults with --data as the stage's only sources, every row held out (eval split) and no bad-row limit."""
    cfg = load_config(None, {"data.datasets": [{"path": d, "format": fmt} for d in data],
                             "data.data_split": STAGE_SHARE[stage], "data.max_bad_fraction": 1.0,
                             **(overrides or {})})
    # eval_fraction 1.0 (config validation wants < 1 for training): the whole part is the eval split, which may
    # come out empty (all rows bad) without an error, so its report can still be shown.
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval_fraction=1.0))


def source_datasets(cfg: Config, stage: str, tokenizer) -> list[tuple]:
    """(rows, report entry) per --data source, each built alone so that its numbers stay its own."""
    from rlhf_ray.data.pipeline import build_stage_dataset

    out = []
    for src in cfg.data.datasets:
        one = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, datasets=[src]))
        ds, report = build_stage_dataset(one, stage, tokenizer, "eval")
        out.append((ds, report["sources"][0]))
    return out


def dropped_by_reason(entries: list[dict]) -> dict[str, int]:
    """Rows dropped per reason over all sources: bad rows (adapters) and rows the stage cannot use (tokenization)."""
    total: dict[str, int] = {}
    for entry in entries:
        for counts in (entry.get("bad") or {}, entry.get("dropped") or {}):
            for reason, n in counts.items():
                total[reason] = total.get(reason, 0) + n
    return dict(sorted(total.items()))


def check_data(data: list[str]) -> None:
    for d in data:
        if not (d.startswith("builtin:") or any(c in d for c in "*?[") or Path(d).expanduser().exists()):
            raise EvalError(f"--data {d}: no such file")


# -------------------------------------------------------------------------------------------------- eval rm
def eval_rm(path: str, data: list[str], fmt: str = "auto", tokenizer: Optional[str] = None,
            max_prompt_len: int = 256, max_answer_len: int = 256) -> dict:
    import torch

    from rlhf_ray.models.loading import load_tokenizer
    from rlhf_ray.models.value_head import HEAD_META, ValueHeadModel
    from rlhf_ray.train import rm as rm_task
    from rlhf_ray.train.common import evaluate

    if not (Path(path) / HEAD_META).is_file():
        raise EvalError(f"--path {path}: not a reward-model folder (no {HEAD_META}); `rlhf-ray rm` writes them "
                        f"(<run>/rm)")
    check_data(data)
    cfg = eval_config("rm", data, fmt, {"data.max_prompt_len": max_prompt_len, "data.max_answer_len": max_answer_len})
    tok = load_tokenizer(ModelConfig(path=path, tokenizer=tokenizer))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = ValueHeadModel.from_pretrained(path, dtype=torch.float32).to(device).requires_grad_(False)
    sources, sums = [], {"pairs": 0.0, "correct": 0.0, "chosen": 0.0, "rejected": 0.0, "loss": 0.0}
    for ds, entry in source_datasets(cfg, "rm", tok):
        pairs = len(ds)
        m = evaluate(model, rm_task.rows(ds), tok.pad_token_id, rm_task, EVAL_BATCH_SIZE, device=device) \
            if pairs else {}
        for key, metric in (("correct", "accuracy"), ("chosen", "chosen_score"), ("rejected", "rejected_score"),
                            ("loss", "loss")):
            sums[key] += m.get(metric, 0.0) * pairs
        sums["pairs"] += pairs
        sources.append({**entry, **summary(pairs, m)})
    total = rm_task.eval_metrics(sums) if sums["pairs"] else {}
    return {"path": path, **summary(int(sums["pairs"]), total), "dropped_by_reason": dropped_by_reason(sources),
            "sources": sources}


def summary(pairs: int, m: dict) -> dict:
    if not pairs:
        return {"pairs": 0, "accuracy": None, "mean_margin": None}
    return {"pairs": pairs, "accuracy": m["accuracy"], "mean_margin": m["chosen_score"] - m["rejected_score"],
            "chosen_score": m["chosen_score"], "rejected_score": m["rejected_score"], "loss": m["loss"]}


def rm_text(result: dict) -> str:
    from rlhf_ray.data.preview import source_lines

    def numbers(r: dict) -> str:
        if not r["pairs"]:
            return "0 pairs left to score"
        return (f"{r['pairs']} pairs, accuracy {r['accuracy']:.4f}, mean margin {r['mean_margin']:+.4f} "
                f"(chosen {r['chosen_score']:+.4f}, rejected {r['rejected_score']:+.4f})")

    lines = [f"eval rm {result['path']}: {numbers(result)}"]
    for entry in result["sources"]:
        lines += source_lines(entry) + [f"      {numbers(entry)}"]
    dropped = result["dropped_by_reason"]
    lines.append("  dropped rows by reason: " + (", ".join(f"{r} {n}" for r, n in dropped.items()) or "none"))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- eval policy
def reward_target(spec: str) -> tuple[Optional[ModelConfig], list[str]]:
    """--reward: (reward-model folder, []) or (None, [reward function spec]); fails here, naming it, if neither."""
    from rlhf_ray.models.value_head import HEAD_META
    from rlhf_ray.scorer import RewardFunctionError, import_callable

    folder = Path(spec).expanduser()
    if folder.is_dir():
        if not (folder / HEAD_META).is_file():
            raise EvalError(f"--reward {spec}: a folder but not a reward-model folder (no {HEAD_META}); give a "
                            f"value-head folder (`rlhf-ray rm` output) or a reward function")
        return ModelConfig(path=str(folder)), []
    if spec.startswith(("http://", "https://")):
        return None, [spec]
    try:
        import_callable(spec)
    except RewardFunctionError as e:
        raise EvalError(f"--reward {spec}: no such reward-model folder, and not a usable reward function: {e}") \
            from None
    return None, [spec]


def generate_answers(cfg: Config, path: str, sampling, seed: int) -> tuple[list[dict], list, dict]:
    """The prompt rows (this policy's tokenizer and chat template), its samples and its data report entries."""
    from rlhf_ray.generator import GeneratorGroup
    from rlhf_ray.models.loading import load_tokenizer, resolve_model_path

    actor = dataclasses.replace(cfg.models.actor, path=resolve_model_path(path), tokenizer=None, gguf_file=None)
    cfg = dataclasses.replace(cfg, models=dataclasses.replace(cfg.models, actor=actor))
    tok = load_tokenizer(actor)
    parts = source_datasets(cfg, "ppo", tok)
    rows = [r for ds, _ in parts for r in ds.to_list()]
    if not rows:
        return rows, [], {"tokenizer": tok, "entries": [e for _, e in parts]}
    generators = GeneratorGroup(cfg, actor.path)
    try:
        rollout = generators.generate([r["prompt_input_ids"] for r in rows], sampling,
                                      seeds=[seed + i for i in range(len(rows))])
    finally:
        generators.shutdown()
    return rows, rollout.samples, {"tokenizer": tok, "entries": [e for _, e in parts]}


def score_samples(reward_group, rows: list[dict], samples: list, tokenizer) -> list[float]:
    """PPO's reward batch (ppo.rollout_batch: build_batch plus the texts and references) scored by the reward actors."""
    from rlhf_ray.experience import build_batch

    if not samples:
        return []
    picked = [rows[s.prompt_index] for s in samples]
    batch = build_batch([r["prompt_input_ids"] for r in picked], [s.token_ids for s in samples],
                        tokenizer.pad_token_id)
    batch.update(prompts=[r["prompt"] for r in picked], references=[r["reference"] for r in picked],
                 responses=[tokenizer.decode(s.token_ids, skip_special_tokens=True) for s in samples])
    return reward_group.scores(batch).tolist()


def eval_policy(path: str, reward: str, data: list[str], baseline: Optional[str] = None, fmt: str = "auto",
                max_new_tokens: int = 64, temperature: float = 0.0, examples: int = 3, seed: int = 0,
                worker_logs: bool = True) -> dict:
    from rlhf_ray.generator import Sampling
    from rlhf_ray.resources import init_ray
    from rlhf_ray.scorer import RewardGroup

    model, functions = reward_target(reward)
    check_data(data)
    cfg = eval_config("ppo", data, fmt, {"ppo.reward_functions": functions,
                                        "ppo.reward_function_mode": "add" if model else "replace"})
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature)
    init_ray(cfg, log_to_driver=worker_logs)  # --json: the actors' log lines would land on stdout beside the JSON
    reward_group = RewardGroup(cfg, model=model or ModelConfig())  # first: a broken reward fails before generating
    try:
        policies = {}
        for name, p in (("policy", path), ("baseline", baseline)):
            if p is None:
                continue
            rows, samples, info = generate_answers(cfg, p, sampling, seed)
            tok = info["tokenizer"]
            scores = score_samples(reward_group, rows, samples, tok)
            policies[name] = {"path": p, "rows": rows, "entries": info["entries"],
                              "answers": {s.prompt_index: (tok.decode(s.token_ids, skip_special_tokens=True), r,
                                                           len(s.token_ids), s.finish_reason == "length")
                                          for s, r in zip(samples, scores)}}
    finally:
        reward_group.shutdown()
    return policy_result(policies, reward, data, sampling, examples)


def policy_result(policies: dict, reward: str, data: list[str], sampling, examples: int) -> dict:
    a = policies["policy"]
    prompts = [r["prompt"] for r in a["rows"]]
    if "baseline" in policies and [r["prompt"] for r in policies["baseline"]["rows"]] != prompts:
        raise EvalError("--path and --baseline kept different prompts from --data (a prompt dropped for one "
                        "tokenizer only); compare policies on prompts both can take")
    result = {"reward": reward, "data": data, "prompts": len(prompts),
              "sampling": {"temperature": sampling.temperature, "max_new_tokens": sampling.max_new_tokens},
              "dropped_by_reason": dropped_by_reason(a["entries"]), "sources": a["entries"]}
    for name, p in policies.items():
        answers = list(p["answers"].values())
        result[name] = {"path": p["path"], "answered": len(answers),
                        "mean_reward": _mean([x[1] for x in answers]),
                        "mean_response_tokens": _mean([x[2] for x in answers]),
                        "cut_at_max_tokens": sum(x[3] for x in answers)}
    both = sorted(set.intersection(*(set(p["answers"]) for p in policies.values())))
    if "baseline" in policies:
        pa, pb = a["answers"], policies["baseline"]["answers"]
        wins = sum(pa[i][1] > pb[i][1] for i in both)
        ties = sum(pa[i][1] == pb[i][1] for i in both)
        result["win_rate"] = (wins + ties / 2) / len(both) if both else None
        result["wins"], result["ties"], result["losses"] = wins, ties, len(both) - wins - ties
    result["examples"] = [{"prompt": prompts[i], **{f"{name}{key}": p["answers"][i][k] for name, p in policies.items()
                                                    for key, k in (("", 0), ("_reward", 1))}}
                          for i in both[:examples]]
    return result


def _mean(values: list[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def policy_text(result: dict) -> str:
    s = result["sampling"]
    how = "greedy" if s["temperature"] == 0 else f"temperature {s['temperature']}"
    lines = [f"eval policy: {result['prompts']} prompts from {', '.join(result['data'])} ({how}, at most "
             f"{s['max_new_tokens']} new tokens), reward {result['reward']}"]
    for name in ("policy", "baseline"):
        if name in result:
            r = result[name]
            lines.append(f"  {name:8} {r['path']}: mean reward {_fmt(r['mean_reward'])}, mean response "
                         f"{_fmt(r['mean_response_tokens'], '.1f')} tokens ({r['cut_at_max_tokens']} cut at the "
                         f"limit), {r['answered']} answered")
    if "win_rate" in result:
        lines.append(f"  win rate of policy over baseline: {_fmt(result['win_rate'])} ({result['wins']} wins, "
                     f"{result['ties']} ties, {result['losses']} losses; a tie counts half)")
    dropped = result["dropped_by_reason"]
    lines.append("  dropped prompts by reason: " + (", ".join(f"{r} {n}" for r, n in dropped.items()) or "none"))
    for k, ex in enumerate(result["examples"], 1):
        lines.append(f"example {k}:\n  prompt: {ex['prompt']!r}")
        for name in ("policy", "baseline"):
            if name in ex:
                lines.append(f"  {name} (reward {ex[name + '_reward']:.4f}): {ex[name]!r}")
    return "\n".join(lines)


def _fmt(x: Optional[float], spec: str = ".4f") -> str:
    return "n/a" if x is None else format(x, spec)


# ---------------------------------------------------------------------------------------------------- CLI
def cmd_eval(args) -> int:
    import sys

    from rlhf_ray.data.report import DataError

    try:
        if args.eval_command == "rm":
            result = eval_rm(args.path, args.data, args.format, args.tokenizer, args.max_prompt_len,
                             args.max_answer_len)
            text = rm_text
        else:
            result = eval_policy(args.path, args.reward, args.data, args.baseline, args.format, args.max_new_tokens,
                                 args.temperature, args.examples, worker_logs=not args.json)
            text = policy_text
    except EvalError as e:
        print(f"rlhf-ray eval: error: {e}", file=sys.stderr)
        return 2
    except DataError as e:
        print(f"rlhf-ray eval: data error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result) if args.json else text(result))  # --json: one line
    return 0
