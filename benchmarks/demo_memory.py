"""Where the main command's memory goes: sample the machine and every process every 2 s while a command runs.

    .venv/bin/python benchmarks/demo_memory.py run OUT.jsonl -- .venv/bin/rlhf-ray pipeline launchers/cpu_demo.yaml
    .venv/bin/python benchmarks/demo_memory.py report OUT.jsonl

`used` is what the README measures with `free -m`: MemTotal - MemAvailable (/proc/meminfo), so it includes whatever
else runs on the machine (the first sample, before the command starts, is that baseline). Per process: PSS from
/proc/PID/smaps_rollup (shared pages split between the processes that map them, so the PSS of all processes adds up
to what they use together), grouped by role: Ray actors by their class (`ray::PolicyLearner`, ...), the driver,
Ray's own daemons. `report` prints the peak sample's breakdown and, per stage (from the driver's log lines in the
JSONL's `stage` field), the peak of `used`.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import threading
import time

STAGE_MARKS = (("sft", re.compile(r"rlhf_ray\.train: sft: ")), ("rm", re.compile(r"rlhf_ray\.train: rm: ")),
               ("ppo", re.compile(r"rlhf_ray\.data: data ppo/train")))  # ppo: PPO and the chat transcript after it


def meminfo() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":")
            out[key] = int(value.split()[0])
    return out


def processes(min_rss_kb: int = 20_000) -> list[dict]:
    procs = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")[:200]
            roll = {}
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    parts = line.split()
                    if parts[0] in ("Rss:", "Pss:"):
                        roll[parts[0][:-1]] = int(parts[1])
        except OSError:
            continue  # gone, or not ours to read
        if roll.get("Rss", 0) >= min_rss_kb:
            procs.append({"pid": int(pid), "cmd": cmd, **roll})
    return procs


def role(cmd: str) -> str:
    if "rlhf-ray" in cmd or "pytest" in cmd:
        return "driver"
    m = re.match(r"ray::([\w]+)", cmd)
    if m:
        return "ray::" + m.group(1)
    for daemon in ("gcs_server", "raylet", "dashboard/agent.py", "runtime_env/agent", "log_monitor", "dashboard.py",
                   "monitor.py"):
        if daemon in cmd:
            return daemon
    return cmd.split(" ")[0].rsplit("/", 1)[-1]


def sample(out, stage: str, t0: float) -> None:
    m = meminfo()
    out.write(json.dumps({"t": round(time.time() - t0, 1), "stage": stage, "used_kb": m["MemTotal"] - m["MemAvailable"],
                          "shmem_kb": m["Shmem"], "procs": processes()}) + "\n")
    out.flush()


def cmd_run(args) -> int:
    """Run the command, sample every `interval` s, tag samples with the stage its output last announced."""
    stage = ["start"]
    t0 = time.time()
    with open(args.out, "w") as out:
        sample(out, "before", t0)
        proc = subprocess.Popen(args.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)

        def follow():
            with open(args.log, "w") if args.log else open(os.devnull, "w") as log:
                for line in proc.stdout:
                    log.write(line)
                    for name, pattern in STAGE_MARKS:
                        if pattern.search(line):
                            stage[0] = name

        reader = threading.Thread(target=follow, daemon=True)
        reader.start()
        while proc.poll() is None:
            sample(out, stage[0], t0)
            time.sleep(args.interval)
        reader.join()
        sample(out, "after", t0)
    print(f"exit {proc.returncode}, wall {time.time() - t0:.0f} s", file=sys.stderr)
    return proc.returncode


def breakdown(s: dict) -> list[tuple[str, int, int]]:
    agg: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for p in s["procs"]:
        a = agg[role(p["cmd"])]
        a[0] += p.get("Pss", 0)
        a[1] += 1
    return sorted(((k, kb, n) for k, (kb, n) in agg.items()), key=lambda x: -x[1])


def cmd_report(args) -> int:
    samples = [json.loads(line) for line in open(args.out)]
    gib = lambda kb: kb / 2**20  # noqa: E731
    before = samples[0]
    peak = max(samples, key=lambda s: s["used_kb"])
    print(f"before: {gib(before['used_kb']):.2f} GiB used; peak {gib(peak['used_kb']):.2f} GiB used at t={peak['t']}s "
          f"(stage {peak.get('stage', '?')}); sum of process PSS at the peak "
          f"{gib(sum(kb for _, kb, _ in breakdown(peak))):.2f}")
    for name, kb, n in breakdown(peak):
        if kb >= 20 * 2**10:
            print(f"  {name:36s} x{n:<2d} {gib(kb):5.2f} GiB")
    stages: dict[str, dict] = {}
    for s in samples:
        if s.get("stage", "?") not in stages or s["used_kb"] > stages[s.get("stage", "?")]["used_kb"]:
            stages[s.get("stage", "?")] = s
    print("stage peaks (used GiB, its largest processes):")
    for name, s in stages.items():
        top = ", ".join(f"{k} {gib(kb):.2f}" for k, kb, _ in breakdown(s)[:5])
        print(f"  {name:10s} {gib(s['used_kb']):5.2f} at t={s['t']}s | {top}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run a command and sample memory")
    run.add_argument("out")
    run.add_argument("--interval", type=float, default=2.0)
    run.add_argument("--log", help="write the command's output here")
    report = sub.add_parser("report", help="peak and per-stage breakdown of a sampled run")
    report.add_argument("out")
    argv = sys.argv[1:]
    command = argv[argv.index("--") + 1:] if "--" in argv else []  # the command to run: everything after --
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if args.cmd == "run":
        if not command:
            parser.error("run: give the command after --")
        args.command = command
        return cmd_run(args)
    return cmd_report(args)


if __name__ == "__main__":
    sys.exit(main())
