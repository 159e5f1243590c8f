"""`rlhf-ray pipeline CONFIG`: SFT -> reward model -> PPO in one command (DeepSpeed-Chat's train.py).

    sft  trains models.actor            -> <run.output_dir>/sft   (causal-LM folder)
    rm   trains models.reward backbone  -> <run.output_dir>/rm    (value-head folder)
    ppo  actor + reference from sft, reward + critic from rm -> <run.output_dir>/ppo (actor folder, metrics, PNG)
A stage whose output folder already exists (complete: outputs are written atomically) is skipped unless named in
`redo`. The run ends with a short greedy chat transcript: the SFT model and the PPO actor side by side.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from rlhf_ray.config import Config, validate_ppo

log = logging.getLogger(__name__)

STAGES = ("sft", "rm", "ppo")
# The demo task's two kinds (rlhf_ray/data/builtin.py) and one question outside it.
TRANSCRIPT_PROMPTS = ("I see the moon, the river and the star. Now say the word fish.", "What is 12 plus 30?",
                      "What is 23 plus 19?", "What is the capital of France?")


def _done(folder: Path, marker: str) -> bool:
    return (folder / marker).is_file()


def run_pipeline(cfg: Config, redo: tuple[str, ...] = ()) -> dict[str, Path]:
    from rlhf_ray.ppo import run_ppo
    from rlhf_ray.resources import init_ray, peak_concurrent_threads
    from rlhf_ray.train.common import stage_output_dir
    from rlhf_ray.train.rm import run_rm
    from rlhf_ray.train.sft import run_sft

    unknown = set(redo) - set(STAGES)
    if unknown:
        raise ValueError(f"--redo: unknown stage(s) {sorted(unknown)}; choose from {', '.join(STAGES)}")
    validate_ppo(cfg)  # the last stage's rules fail now, not after SFT and RM
    init_ray(cfg, concurrent_threads=peak_concurrent_threads(cfg))  # one cluster for every stage: sized for all
    out: dict[str, Path] = {}
    out["sft"] = stage_output_dir(cfg, "sft")
    if _done(out["sft"], "config.json") and "sft" not in redo:
        log.info("sft: %s exists, skipped (--redo sft to train again)", out["sft"])
    else:
        out["sft"] = run_sft(cfg).output_dir
    out["rm"] = stage_output_dir(cfg, "rm")
    if _done(out["rm"], "value_head.json") and "rm" not in redo:
        log.info("rm: %s exists, skipped (--redo rm to train again)", out["rm"])
    else:
        out["rm"] = run_rm(cfg).output_dir
    ppo_cfg = ppo_config_from_stages(cfg, out["sft"], out["rm"])
    final = Path(ppo_cfg.run.output_dir) / "ppo" / "actor"
    if _done(final, "config.json") and "ppo" not in redo:
        log.info("ppo: %s exists, skipped (--redo ppo to train again)", final)
        out["ppo"] = final
    else:
        out["ppo"] = run_ppo(ppo_cfg)
    out["transcript"] = write_transcript({"SFT": out["sft"], "PPO": out["ppo"]},
                                         Path(ppo_cfg.run.output_dir) / "ppo" / "chat_transcript.txt", ppo_cfg)
    return out


def ppo_config_from_stages(cfg: Config, sft_dir: Path, rm_dir: Path) -> Config:
    """The PPO config with each stage's output as its models: actor/reference <- SFT, reward/critic <- RM."""
    actor = dataclasses.replace(cfg.models.actor, path=str(sft_dir), tokenizer=None, gguf_file=None)
    reward = dataclasses.replace(cfg.models.reward, path=str(rm_dir), tokenizer=None, gguf_file=None)
    models = dataclasses.replace(cfg.models, actor=actor, reward=reward, reference=None, critic=None)
    return dataclasses.replace(cfg, models=models)


def ppo_config_for_run(cfg: Config) -> Config:
    """The config `rlhf-ray ppo CONFIG` trains with. As given when its reward (and critic) models are value-head
    folders. Otherwise (a launcher's models.reward is the reward model's base, which `rlhf-ray rm` trains) the
    pipeline's own outputs when this run has both: <run.output_dir>/sft and <run.output_dir>/rm, as the pipeline's PPO
    stage uses them. Otherwise a one-line ConfigError (ppo.check_value_models) before anything starts."""
    from rlhf_ray.models.value_head import is_value_head_folder
    from rlhf_ray.ppo import check_value_models, value_model_paths
    from rlhf_ray.train.common import stage_output_dir

    if all(is_value_head_folder(path) for _, path in value_model_paths(cfg)):
        return cfg
    sft_dir, rm_dir = stage_output_dir(cfg, "sft"), stage_output_dir(cfg, "rm")
    if _done(sft_dir, "config.json") and _done(rm_dir, "value_head.json"):
        log.info("ppo: models.reward %r is not a value-head folder; using this run's pipeline outputs: actor and "
                 "reference from %s, reward and critic from %s", cfg.models.reward.path, sft_dir, rm_dir)
        return ppo_config_from_stages(cfg, sft_dir, rm_dir)
    check_value_models(cfg)  # raises, naming the key
    return cfg


def write_transcript(models: dict[str, Path], path: Path, cfg: Config, max_new_tokens: int = 48) -> Path:
    """A short scripted chat (greedy) with each of `models` (label -> folder: the SFT model and the PPO actor), the
    same prompts side by side: the pipeline's last artefact, next to the PNG, and printed. Each model is served by a
    vLLM engine actor on the run's Ray cluster (cfg's generation.* and ray.*), released before the next."""
    from rlhf_ray.chat import ChatSession

    replies: dict[str, list[str]] = {}
    for label, folder in models.items():
        with ChatSession(str(folder), max_new_tokens=max_new_tokens, cfg=cfg) as session:
            replies[label] = []
            for prompt in TRANSCRIPT_PROMPTS:  # independent questions: a fresh conversation each
                session.clear()
                replies[label].append(session.reply(prompt))
    width = max(len(label) for label in models)
    lines = []
    for i, prompt in enumerate(TRANSCRIPT_PROMPTS):
        lines.append(f"User: {prompt}")
        lines += [f"  {label:<{width}}: {replies[label][i]}" for label in models]
        lines.append("")
    path.write_text("\n".join(lines))
    log.info("chat transcript, greedy (%s):\n%s", path, "\n".join(lines).rstrip())
    return path
