"""Benchmark: reward curves of GRPO, DAPO, Dr. GRPO and GSPO (rlhf_ray) beside TRL's GRPOTrainer, same budget.

    .venv/bin/python -m pip install -e '.[bench]'      # TRL (not needed by anything else)
    flock /tmp/rlhf_ray_heavy.lock .venv/bin/python benchmarks/bench_algorithms.py \
        [--runs grpo,dapo,dr_grpo,gspo,trl] [--seeds 1,2] [--iterations 12] [--prompts 8] [--group 4]
        [--max-new-tokens 24] [--lr 1e-5] [--beta 0.04] [--precision bf16] [--out STEM]

Not a test. Every run is one fresh process of benchmarks/bench_grpo_vs_trl.py (--side rlhf_ray | trl), so both
sides share its settings: SmolLM2-135M-Instruct loaded in fp32, the built-in task's PPO prompts in the same order
(per seed), the rule reward, --prompts x --group completions per iteration ending at EOS or --max-new-tokens,
temperature 1, one optimizer step per iteration over the whole batch (lr --lr, constant), the k3 KL to a frozen
reference in the loss (--beta), mixed precision --precision, no gradient checkpointing. rlhf_ray runs
placement.layout hybrid (one learner rank with the vLLM engine in its process). What each rlhf_ray run changes:
  grpo     advantage_estimator grpo, loss_aggregation token-mean (the defaults; TRL's loss_type "dapo" and
           scale_rewards "group" are the same formulas)
  dapo     + clip_ratio_low 0.2 / clip_ratio_high 0.28, dynamic_sampling (max 4 extra rounds), overlong_buffer 4
           (soft penalty over the last 4 tokens before --max-new-tokens). The KL term stays, unlike the DAPO paper,
           so that only the named mechanisms differ between runs.
  dr_grpo  advantage_estimator dr_grpo (no std division), loss_aggregation seq-mean-token-sum-norm
  gspo     policy_loss gspo (sequence-level ratio, clip 3e-4 / 4e-4), loss_aggregation seq-mean-token-mean
  trl      TRL's GRPOTrainer (GRPOConfig defaults except the settings above)
Sample budget: --iterations x --prompts x --group generated completions per run. DAPO's dynamic sampling generates
more than that to fill its batches: the curves are drawn against completions generated, and the table gives
DAPO's last-3 reward both over its last iterations and over the last 3 that ended within the common budget.
KL: rlhf_ray logs the summed k3 KL per sequence (kl/mean), TRL the token mean (kl); over one batch the token mean
is the per-sequence mean divided by the mean response length, so both are given in both units.
Writes <STEM>.md, <STEM>.json and <STEM>.png (default benchmarks/results/algorithms_smollm2_<UTC date-time>).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIDE_SCRIPT = Path(__file__).with_name("bench_grpo_vs_trl.py")
RESULTS = Path(__file__).resolve().parent / "results"
ALGORITHMS = {  # rlhf_ray config overrides per run (bench_grpo_vs_trl.py sets the common ones)
    "grpo": [],
    "dapo": ["ppo.clip_ratio_low=0.2", "ppo.clip_ratio_high=0.28", "ppo.dynamic_sampling=true",
             "ppo.dynamic_sampling_max_rounds=4", "ppo.overlong_buffer=4"],
    "dr_grpo": ["ppo.advantage_estimator=dr_grpo", "ppo.loss_aggregation=seq-mean-token-sum-norm"],
    "gspo": ["ppo.policy_loss=gspo", "ppo.loss_aggregation=seq-mean-token-mean"],
}
LAST = 3  # iterations averaged at each end of a curve


def run_one(args, name: str, seed: int) -> dict:
    """One run in a fresh process; {'error': ...} instead of raising, so one broken run leaves the others."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        command = [sys.executable, str(SIDE_SCRIPT), "--side", "trl" if name == "trl" else "rlhf_ray",
                   "--precision", args.precision, "--layout", "hybrid", "--natural-length",
                   "--model", args.model, "--prompts", str(args.prompts), "--group", str(args.group),
                   "--max-new-tokens", str(args.max_new_tokens), "--steps", str(args.iterations - 1),
                   "--lr", str(args.lr), "--beta", str(args.beta), "--seed", str(seed), "--result", f.name]
        for item in ALGORITHMS.get(name, []):
            command += ["--set", item]
        started = time.time()
        rc = subprocess.run(command).returncode
        if rc != 0:
            return {"error": f"exited with {rc} (its log is above)", "command": command[1:]}
        result = json.loads(Path(f.name).read_text())
    result["wall_s"] = time.time() - started  # launch to exit: start-up, every iteration, shutdown
    result["command"] = command[1:]
    return result


def curves(r: dict, name: str, n_seq: int) -> dict:
    """Per iteration: reward, KL in nats per token and per sequence, length, cumulative completions generated."""
    lengths = r["response_length"]
    if name == "trl":
        kl_token = r["kl_token"]
        kl_sequence = [k * n for k, n in zip(kl_token, lengths)]
        generated = [n_seq] * len(lengths)
    else:
        kl_sequence = r["kl_sequence"]
        kl_token = [k / max(n, 1e-9) for k, n in zip(kl_sequence, lengths)]
        generated = r["samples_generated"]
    cumulative, total = [], 0
    for g in generated:
        total += g
        cumulative.append(total)
    # The task's reward: rlhf_ray's reward/mean includes DAPO's overlong penalty (what it trains on), taken out here.
    reward = [x - penalty for x, penalty in zip(r["reward"], r.get("overlong_penalty", [0.0] * len(r["reward"])))]
    return {"reward": reward, "kl_token": kl_token, "kl_sequence": kl_sequence, "length": lengths,
            "generated": cumulative}


def summary(c: dict, budget: int, wall_s: float) -> dict:
    within = [i for i, g in enumerate(c["generated"]) if g <= budget]
    return {"iterations": len(c["reward"]), "generated": c["generated"][-1],
            "first3": statistics.mean(c["reward"][:LAST]), "last3": statistics.mean(c["reward"][-LAST:]),
            "last3_in_budget": statistics.mean(c["reward"][i] for i in within[-LAST:]) if within else float("nan"),
            "max_kl_token": max(c["kl_token"]), "max_kl_sequence": max(c["kl_sequence"]),
            "length_last3": statistics.mean(c["length"][-LAST:]), "wall_s": wall_s}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_reward, ax_kl) = plt.subplots(1, 2, figsize=(13, 5))
    colours = dict(zip([*ALGORITHMS, "trl"], ["tab:blue", "tab:orange", "tab:green", "tab:red", "black"]))
    for key, run in report["runs"].items():
        if "curves" not in run:
            continue
        name, seed = run["name"], run["seed"]
        style = "-" if seed == report["seeds"][0] else "--"
        c = run["curves"]
        label = f"{'TRL GRPOTrainer' if name == 'trl' else name} seed {seed}"
        ax_reward.plot(c["generated"], c["reward"], style, color=colours[name], label=label, marker=".")
        ax_kl.plot(range(1, len(c["kl_token"]) + 1), c["kl_token"], style, color=colours[name], label=label)
    ax_reward.axvline(report["budget"], color="grey", linewidth=0.8)
    ax_reward.set(xlabel="completions generated", ylabel="mean reward (rule reward, per iteration)",
                  title="reward vs sample budget")
    ax_kl.set(xlabel="iteration", ylabel="k3 KL to the reference (nats per token)", title="KL")
    ax_reward.legend(fontsize=7, ncol=2)
    fig.suptitle(f"SmolLM2-135M-Instruct, built-in task: {report['args']['prompts']} prompts x "
                 f"{report['args']['group']} completions per iteration, lr {report['args']['lr']}, "
                 f"beta {report['args']['beta']}, {report['args']['precision']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(report: dict) -> str:
    a = report["args"]
    lines = [f"# Reward curves: GRPO, DAPO, Dr. GRPO, GSPO (rlhf_ray) and TRL's GRPOTrainer, SmolLM2-135M-Instruct",
             "", f"Measured {report['date']} on this machine ({report['cpu_count']} CPUs):", "",
             f"    flock /tmp/rlhf_ray_heavy.lock .venv/bin/python {report['command']}", "",
             f"Built-in task (rule reward 1 when the response contains the reference word / sum), {a['prompts']} prompts "
             f"x {a['group']} completions per iteration (up to {a['max_new_tokens']} new tokens, EOS ends them), "
             f"{a['iterations']} iterations = {report['budget']} completions per run, lr {a['lr']}, k3 KL in the loss "
             f"(beta {a['beta']}), {a['precision']}. What each run changes: benchmarks/bench_algorithms.py's "
             f"docstring. Curves: `{Path(report['png']).name}`.", "",
             f"| run | seed | iterations | completions generated | reward first {LAST} | reward last {LAST} "
             f"| last {LAST} within budget | largest KL (nats/token) | largest KL (nats/sequence) "
             f"| response length (last {LAST}) | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in report["runs"].values():
        label = "TRL GRPOTrainer" if run["name"] == "trl" else f"rlhf_ray {run['name']}"
        if "summary" not in run:
            lines.append(f"| {label} | {run['seed']} | {run.get('error', 'missing')} |" + " |" * 8)
            continue
        s = run["summary"]
        lines.append(f"| {label} | {run['seed']} | {s['iterations']} | {s['generated']} | {s['first3']:.3f} "
                     f"| {s['last3']:.3f} | {s['last3_in_budget']:.3f} | {s['max_kl_token']:.4f} "
                     f"| {s['max_kl_sequence']:.3f} | {s['length_last3']:.1f} | {s['wall_s']:.0f} |")
    verdicts = report.get("grpo_vs_trl", {})
    if verdicts:
        lines += ["", f"rlhf_ray GRPO vs TRL, mean reward over the last {LAST} iterations, per seed:"]
        for seed, v in verdicts.items():
            lines.append(f"- seed {seed}: rlhf_ray {v['rlhf_ray']:.3f}, TRL {v['trl']:.3f} "
                         f"({'at least TRL' if v['rlhf_ray'] >= v['trl'] else 'below TRL'})")
    lines += ["", "Per iteration (reward / KL nats per token / response length):", ""]
    for run in report["runs"].values():
        if "curves" in run:
            c = run["curves"]
            cells = " ".join(f"{r:.2f}/{k:.3f}/{n:.0f}" for r, k, n in zip(c["reward"], c["kl_token"], c["length"]))
            lines.append(f"- {run['name']} seed {run['seed']}: {cells}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default=",".join([*ALGORITHMS, "trl"]),
                        help=f"comma-separated: {', '.join(ALGORITHMS)}, trl")
    parser.add_argument("--seeds", default="1,2", help="comma-separated run seeds (each also orders the prompts)")
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--prompts", type=int, default=8, help="distinct prompts per iteration")
    parser.add_argument("--group", type=int, default=4, help="completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--beta", type=float, default=0.04, help="k3 KL coefficient in the loss")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--model", default="builtin:smollm2")
    parser.add_argument("--out", help="output stem (default benchmarks/results/algorithms_smollm2_<UTC date-time>)")
    args = parser.parse_args()
    names, seeds = args.runs.split(","), [int(s) for s in args.seeds.split(",")]
    unknown = [n for n in names if n not in ALGORITHMS and n != "trl"]
    if unknown:
        raise SystemExit(f"unknown --runs entries {unknown}; known: {', '.join(ALGORITHMS)}, trl")
    if args.iterations < 2 * LAST:
        raise SystemExit(f"--iterations must be at least {2 * LAST} (first and last {LAST} are compared)")
    stem = Path(args.out) if args.out else RESULTS / f"algorithms_smollm2_{time.strftime('%Y-%m-%d_%H%M', time.gmtime())}"
    n_seq = args.prompts * args.group
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu_count": __import__("os").cpu_count(),
              "command": " ".join(["benchmarks/bench_algorithms.py", *sys.argv[1:]]), "args": vars(args),
              "seeds": seeds, "budget": args.iterations * n_seq, "png": str(stem.with_suffix(".png")), "runs": {}}
    for seed in seeds:
        for name in names:
            print(f"\n=== {name}, seed {seed} ===", flush=True)
            result = run_one(args, name, seed)
            run = {"name": name, "seed": seed, **result}
            if "error" not in result:
                run["curves"] = curves(result, name, n_seq)
                run["summary"] = summary(run["curves"], report["budget"], result["wall_s"])
            report["runs"][f"{name}/{seed}"] = run
    for seed in seeds:
        ours, trl = report["runs"].get(f"grpo/{seed}", {}), report["runs"].get(f"trl/{seed}", {})
        if "summary" in ours and "summary" in trl:
            report.setdefault("grpo_vs_trl", {})[seed] = {"rlhf_ray": ours["summary"]["last3"],
                                                          "trl": trl["summary"]["last3"]}
    stem.parent.mkdir(parents=True, exist_ok=True)
    plot(report, stem.with_suffix(".png"))
    text = markdown(report)
    print("\n" + text)
    stem.with_suffix(".md").write_text(text + "\n")
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nwrote {stem.with_suffix('.md')}, {stem.with_suffix('.json')} and {stem.with_suffix('.png')}")
    return 1 if any("error" in r for r in report["runs"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
