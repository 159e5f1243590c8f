"""Does the main command learn? The README's main command for several seeds, then `eval policy` of its PPO actor
against its SFT model on the held-out demo prompts (issue 17's acceptance).

For each seed: `rlhf-ray pipeline launchers/cpu_demo.yaml --run.seed S --run.output_dir runs/cpu_demo_seedS`,
sampled by demo_memory.py (wall time, peak machine memory), its PPO curve's first-3 and last-3 iteration means of
the strict reward, then

    rlhf-ray eval policy --path <run>/ppo/actor --baseline <run>/sft --reward rlhf_ray.data.builtin.strict_reward \\
        --data builtin:demo-eval --json          # greedy, 50 prompts none of the stages saw

Run it from a clone where `./setup.sh` has been run (the README's first command):

    flock /tmp/rlhf_ray_heavy.lock .venv/bin/python benchmarks/bench_demo.py --seeds 1,2,3 --out benchmarks/results/X
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLI = REPO / ".venv" / "bin" / "rlhf-ray"
PY = REPO / ".venv" / "bin" / "python"
REWARD = "rlhf_ray.data.builtin.strict_reward"


def run_seed(seed: int, runs: Path, out: Path) -> dict:
    from rlhf_ray.metrics import first_last_means, read_metrics

    run_dir = runs / f"cpu_demo_seed{seed}"
    samples, log = out.with_name(f"{out.name}_seed{seed}_memory.jsonl"), out.with_name(f"{out.name}_seed{seed}.log")
    command = [str(CLI), "pipeline", "launchers/cpu_demo.yaml", "--run.seed", str(seed), "--run.output_dir",
               str(run_dir)]
    started = time.time()
    proc = subprocess.run([str(PY), "benchmarks/demo_memory.py", "run", str(samples), "--log", str(log), "--",
                           *command], cwd=REPO)
    wall = time.time() - started
    if proc.returncode:
        raise SystemExit(f"seed {seed}: the main command failed (exit {proc.returncode}); see {log}")
    memory = [json.loads(line) for line in samples.read_text().splitlines() if line.strip()]
    rows = read_metrics(run_dir / "ppo" / "metrics.jsonl")
    first, last = first_last_means(rows, "reward/mean")
    evaluated = subprocess.run([str(CLI), "eval", "policy", "--path", str(run_dir / "ppo" / "actor"), "--baseline",
                                str(run_dir / "sft"), "--reward", REWARD, "--data", "builtin:demo-eval", "--json"],
                               cwd=REPO, capture_output=True, text=True)
    if evaluated.returncode:
        raise SystemExit(f"seed {seed}: eval policy failed: {evaluated.stderr[-3000:]}")
    result = json.loads(evaluated.stdout.strip().splitlines()[-1])
    return {"seed": seed, "wall_s": round(wall, 1), "peak_used_gib": round(max(s["used_kb"] for s in memory) / 2**20, 2),
            "before_used_gib": round(memory[0]["used_kb"] / 2**20, 2), "iterations": len(rows),
            "reward_curve": [round(r["reward/mean"], 4) for r in rows], "first3": round(first, 4),
            "last3": round(last, 4), "rise": round(last - first, 4), "eval": result, "command": " ".join(command)}


def markdown(results: list[dict]) -> str:
    lines = ["| seed | wall (s) | peak used (GiB) | PPO iterations | strict reward first-3 | last-3 | rise | "
             "eval: PPO reward | SFT reward | win rate PPO vs SFT |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        e = r["eval"]
        lines.append(f"| {r['seed']} | {r['wall_s']:.0f} | {r['peak_used_gib']:.2f} | {r['iterations']} | "
                     f"{r['first3']:.3f} | {r['last3']:.3f} | {r['rise']:+.3f} | {e['policy']['mean_reward']:.3f} | "
                     f"{e['baseline']['mean_reward']:.3f} | {e['win_rate']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    sys.path.insert(0, str(REPO))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--runs", default=str(REPO / "runs"), help="where the runs' folders go")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" /
                                             f"demo_learning_{time.strftime('%Y-%m-%d_%H%M')}"))
    args = parser.parse_args()
    out = Path(args.out)
    results = []
    for seed in (int(s) for s in args.seeds.split(",")):
        results.append(run_seed(seed, Path(args.runs), out))
        print(json.dumps({k: v for k, v in results[-1].items() if k != "eval"}), flush=True)
        out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    table = markdown(results)
    out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
