"""The soak's report: the checker's figures as JSON, and a picture of delivery staleness,
throughput and memory over time with the faults marked."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from bench.soak.checker import Verdict
from bench.soak.ledger import Ledger

COLOURS = {
    "kill_daphne": "tab:red",
    "kill_api_worker": "tab:orange",
    "kill_relay": "tab:purple",
    "kill_sentinel_master": "tab:brown",
    "restart_postgres": "tab:olive",
    "cut_relay_link": "tab:cyan",
    "stall_clients": "tab:gray",
}


def write(ledger: Ledger, verdict: Verdict, directory: Path) -> tuple[Path, Path]:
    """soak.json and soak.png in directory; their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {
        "passed": not verdict.failures,
        "failures": verdict.failures,
        "settings": ledger.settings,
        "minutes": round((ledger.ended - ledger.started) / 60, 2),
        "figures": verdict.figures,
        "faults": [
            {
                "kind": f.kind,
                "target": f.target,
                "at": round(f.start - ledger.started, 1),
                "lasted": round((f.end or f.start) - f.start, 1),
                "detail": f.detail,
                "recovered_after": None if f.recovered_after is None else round(f.recovered_after, 2),
            }
            for f in ledger.faults
        ],
        "samples": ledger.samples,
    }
    report = directory / "soak.json"
    report.write_text(json.dumps(data, indent=2, default=str))
    picture = directory / "soak.png"
    draw(ledger, picture)
    return report, picture


def draw(ledger: Ledger, path: Path) -> None:
    """Three panels over the run's time: staleness p99 and max per 5 s, deliveries per second,
    RSS per node (every program together) and Redis used_memory; faults as shaded spans."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start = ledger.started
    figure, (staleness, throughput, memory) = plt.subplots(3, 1, figsize=(11, 9), sharex=True)
    buckets: dict[int, list[float]] = {}
    for arrived, seconds in ledger.latencies:
        buckets.setdefault(int((arrived - start) // 5), []).append(seconds)
    xs = sorted(buckets)
    staleness.plot(
        [x * 5 for x in xs], [sorted(buckets[x])[int(0.99 * (len(buckets[x]) - 1))] for x in xs], label="p99"
    )
    staleness.plot([x * 5 for x in xs], [max(buckets[x]) for x in xs], label="max", alpha=0.5)
    staleness.set_ylabel("stored → arrived (s)")
    staleness.set_yscale("log")
    staleness.legend(loc="upper right")
    per_second = Counter(int(arrived - start) for arrived, _ in ledger.latencies)
    seconds = sorted(per_second)
    throughput.plot(seconds, [per_second[s] for s in seconds], linewidth=0.8)
    throughput.set_ylabel("live events delivered / s")
    keys = sorted({key for row in ledger.samples for key in row if key.endswith(".rss")})
    for node in sorted({key.split(".")[0] for key in keys}):
        times = [row["at"] - start for row in ledger.samples]
        totals = [
            sum(row.get(k) or 0 for k in keys if k.startswith(node + ".")) / 2**20 for row in ledger.samples
        ]
        memory.plot(times, totals, label=f"node {node} RSS")
        redis = [(row.get(f"{node}.redis.used_memory") or 0) / 2**20 for row in ledger.samples]
        memory.plot(times, redis, linestyle="--", label=f"node {node} Redis used_memory")
    memory.set_ylabel("MiB")
    memory.set_xlabel("seconds since the workload started")
    memory.legend(loc="upper left", fontsize="small", ncol=2)
    seen: set[str] = set()
    for fault in ledger.faults:
        for axis in (staleness, throughput, memory):
            axis.axvspan(
                fault.start - start,
                max(fault.end, fault.start + 1) - start,
                color=COLOURS.get(fault.kind, "k"),
                alpha=0.25,
                label=None if fault.kind in seen or axis is not throughput else fault.kind,
            )
        seen.add(fault.kind)
    throughput.legend(loc="upper right", fontsize="small", ncol=2)
    figure.suptitle("awx_ws soak: delivery staleness, throughput and memory, faults shaded")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
