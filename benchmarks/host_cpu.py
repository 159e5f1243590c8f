"""How much of the CPU the host took from a benchmark run: the steal share from /proc/stat.

On a shared virtual machine the hypervisor runs other tenants on our cores; the time it takes away ("steal") slows
wall-clock numbers without showing in any profile. The benches record, for every measured side, the share of the
busy CPU time that was stolen while it ran:

    steal / (user + nice + system + irq + softirq + steal)     (the first line of /proc/stat, all cores)

    before = host_cpu.ticks(); ...run...; share = host_cpu.steal_share(before, host_cpu.ticks())

Two sides compared with very different shares were not measured under the same conditions: the benches print it
beside each number. None where /proc/stat does not exist (not Linux).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
BUSY = ("user", "nice", "system", "irq", "softirq", "steal")


def ticks(stat: Path = Path("/proc/stat")) -> Optional[dict[str, int]]:
    """The machine's cumulative CPU ticks per state (all cores), or None without /proc/stat."""
    try:
        first = stat.read_text().splitlines()[0].split()
    except OSError:
        return None
    return dict(zip(FIELDS, (int(v) for v in first[1:1 + len(FIELDS)])))


def _delta(before: Optional[dict[str, int]], after: Optional[dict[str, int]]) -> Optional[dict[str, int]]:
    return {k: after[k] - before[k] for k in FIELDS} if before and after else None


def steal_share(before: Optional[dict[str, int]], after: Optional[dict[str, int]]) -> Optional[float]:
    """Stolen share of the busy CPU time between two `ticks()` readings (None if either is missing or nothing ran)."""
    delta = _delta(before, after)
    busy = sum(delta[k] for k in BUSY) if delta else 0
    return delta["steal"] / busy if busy > 0 else None


def busy_share(before: Optional[dict[str, int]], after: Optional[dict[str, int]]) -> Optional[float]:
    """Share of all CPU time (every core, idle and stolen included) this VM spent running anything: how much of the
    machine a run kept busy (two sides at equal work but unequal busy shares spin or idle differently)."""
    delta = _delta(before, after)
    total = sum(delta.values()) if delta else 0
    return sum(delta[k] for k in BUSY if k != "steal") / total if total > 0 else None


def describe(share: Optional[float]) -> str:
    return "steal n/a" if share is None else f"steal {share:.0%}"
