"""Which processes keep this machine's cores busy, every --interval seconds, while another command runs.

    .venv/bin/python benchmarks/cpu_timeline.py --out /tmp/timeline.jsonl -- CMD [ARGS...]
    .venv/bin/python benchmarks/cpu_timeline.py --summary /tmp/timeline.jsonl

Not a test. Samples /proc/stat (the host's busy and stolen cores) and every process's utime + stime from
/proc/<pid>/stat; writes one JSON line per interval: {t, busy_cores, steal_cores, procs: {"name:pid": cores}} with
the six busiest processes. Ray names a worker process after its actor ("ray::HybridPolicyLearner"; /proc truncates
it to 15 characters), so phases show as which process is busy and on how many cores: e.g. a learner training on
~1.8 of 2 cores, an engine generating on ~1.4 (benchmarks/results/grpo_vs_trl.md, 2026-12-03). The sampler itself
reads /proc only: ~1-2 % of one core at 0.5 s.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict

import host_cpu  # benchmarks/, this file's folder: the host's ticks from /proc/stat

HZ = os.sysconf("SC_CLK_TCK")


def process_ticks() -> dict[int, tuple[str, int]]:
    """{pid: (command name, utime + stime ticks)} of every process readable now."""
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:  # gone meanwhile
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(pid)] = (name, int(fields[11]) + int(fields[12]))  # utime, stime (fields 14, 15 of proc(5))
    return out


def sample(interval: float, out, stop) -> None:
    prev, prev_host = process_ticks(), host_cpu.ticks()
    while not stop():
        time.sleep(interval)
        now, now_host = process_ticks(), host_cpu.ticks()
        d = {k: now_host[k] - prev_host[k] for k in host_cpu.FIELDS}
        busy = sum(d[k] for k in host_cpu.BUSY if k != "steal")
        use = {f"{name}:{pid}": round((ticks - prev[pid][1]) / HZ / interval, 2)
               for pid, (name, ticks) in now.items() if pid in prev and ticks > prev[pid][1]}
        top = dict(sorted(use.items(), key=lambda kv: -kv[1])[:6])
        out.write(json.dumps({"t": round(time.time(), 2), "busy_cores": round(busy / HZ / interval, 2),
                              "steal_cores": round(d["steal"] / HZ / interval, 2), "procs": top}) + "\n")
        out.flush()
        prev, prev_host = now, now_host


def summary(path: str) -> None:
    """Per process: seconds seen busy (>= 0.1 core) and the mean cores while busy; the host's mean busy cores."""
    rows = [json.loads(line) for line in open(path)]
    if not rows:
        raise SystemExit(f"{path}: no samples")
    interval = (rows[-1]["t"] - rows[0]["t"]) / max(len(rows) - 1, 1)
    seen = defaultdict(list)
    for r in rows:
        for proc, cores in r["procs"].items():
            if cores >= 0.1:
                seen[proc].append(cores)
    print(f"{len(rows)} samples every {interval:.2f} s; host busy {sum(r['busy_cores'] for r in rows) / len(rows):.2f}"
          f" cores, steal {sum(r['steal_cores'] for r in rows) / len(rows):.2f} on average")
    for proc, cores in sorted(seen.items(), key=lambda kv: -len(kv[1]) * sum(kv[1]) / len(kv[1]))[:12]:
        print(f"  {proc:28s} busy {len(cores) * interval:7.1f} s at {sum(cores) / len(cores):.2f} cores")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--interval", type=float, default=0.5)
    ap.add_argument("--out", help="JSON lines written while the command runs")
    ap.add_argument("--summary", metavar="JSONL", help="summarise a timeline written before, and exit")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    args = ap.parse_args()
    if args.summary:
        summary(args.summary)
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command or not args.out:
        ap.error("give --out FILE and a command after --")
    import threading

    child = subprocess.Popen(command)
    with open(args.out, "w") as out:
        sampler = threading.Thread(target=sample, args=(args.interval, out, lambda: child.poll() is not None),
                                   daemon=True)
        sampler.start()
        rc = child.wait()
        sampler.join()
    summary(args.out)
    return rc


if __name__ == "__main__":
    sys.exit(main())
