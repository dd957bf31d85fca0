"""Issue 17's targets beside the measured figures: one line per figure, met or missed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from bench.figures import FLOOD_SCENARIO

Rows = list[dict[str, Any]]
FANOUT_1000 = "fan-out 1 group x 1000"
OWN_GROUP = "clients, own group each"


@dataclass
class Target:
    """One figure, what it measured, what it should be, and whether it is (None: not measured)."""

    figure: str
    measured: str
    target: str
    met: bool | None


def find(rows: Rows, scenario: str, kind: str = "ours") -> dict[str, Any] | None:
    """The row of scenario and kind."""
    return next((r for r in rows if r["kind"] == kind and r["scenario"] == scenario), None)


def own_group(rows: Rows, kind: str = "ours") -> dict[str, Any] | None:
    """The own-group scenario's row of kind (its client count is smaller in a quick run)."""
    return next((r for r in rows if r["kind"] == kind and r["scenario"].endswith(OWN_GROUP)), None)


def ratio(a: float, b: float) -> float:
    """a / b, nan when b is 0."""
    return a / b if b else float("nan")


def unmeasured(figure: str, target: str) -> Target:
    """A figure whose scenario did not run or gave nothing to compare."""
    return Target(figure, "not measured", target, None)


def own_group_cpu(rows: Rows) -> Target:
    """Own-group: server CPU per 1,000 deliveries, ≤ 75 ms and within 1.5× the floor's."""
    figure, target = "own-group: server CPU per 1,000 deliveries (ours)", "≤ 75 ms and ≤ 1.5× floor"
    ours, floor = own_group(rows), own_group(rows, "floor")
    if ours is None or floor is None:
        return unmeasured(figure, target)
    cpu, bound = ours["cpu_ms_per_1000"], 1.5 * floor["cpu_ms_per_1000"]
    measured = (
        f"{cpu:.1f} ms (floor {floor['cpu_ms_per_1000']:.1f}: {ratio(cpu, floor['cpu_ms_per_1000']):.2f}×)"
    )
    return Target(figure, measured, target, cpu <= 75 and cpu <= bound)


def own_group_p99(rows: Rows) -> Target:
    """Own-group: p99 emit → receive at 1,000 msgs/s, ≤ 5 ms."""
    figure, target = "own-group: p99 emit→receive at 1,000 msgs/s (ours)", "≤ 5 ms"
    ours = own_group(rows)
    if ours is None:
        return unmeasured(figure, target)
    return Target(figure, f"{ours['p99_ms']:.1f} ms", target, ours["p99_ms"] <= 5)


def batched_emit(rows: Rows) -> Target:
    """Batched emit from one thread, ≥ 40,000 messages/s."""
    figure = "batched emit, 1 thread, 100-msg batches, distinct groups, history"
    target = "≥ 40,000 msgs/s"
    row, kept = find(rows, "emit, batches of 100"), find(rows, "emit, batches of 100, history written")
    if row is None or kept is None:
        return unmeasured(figure, target)
    rates = row["messages_per_s"], kept["messages_per_s"]
    measured = f"{rates[0]:,.0f} msgs/s ({rates[1]:,.0f} with history written)"
    return Target(figure, measured, target, min(rates) >= 40_000)


def single_emit(rows: Rows) -> Target:
    """The single sync emit's median, ≤ 110 µs with history and ≤ 100 µs without."""
    figure, target = "single sync emit, median, history on / off", "≤ 110 / ≤ 100 µs"
    on, off = find(rows, "sync emit"), find(rows, "sync emit, no history")
    if on is None or off is None:
        return unmeasured(figure, target)
    measured = f"{on['median_us']:.0f} / {off['median_us']:.0f} µs"
    return Target(figure, measured, target, on["median_us"] <= 110 and off["median_us"] <= 100)


def unwatched_emit(rows: Rows) -> Target:
    """The emit to a never-watched group, no dearer than the no-history one (medians)."""
    figure, target = "emit to a never-watched group, median", "≤ the no-history figure"
    row, off = find(rows, "sync emit, never-watched groups"), find(rows, "sync emit, no history")
    if row is None or off is None:
        return unmeasured(figure, target)
    measured = f"{row['median_us']:.0f} µs (no history {off['median_us']:.0f})"
    return Target(figure, measured, target, row["median_us"] <= off["median_us"])


def fanout_cpu(rows: Rows) -> Target:
    """Fan-out to 1,000 subscribers: server CPU per 1,000 deliveries, ≤ 21 ms."""
    figure, target = "fan-out 1,000 subscribers: CPU per 1,000 deliveries (ours)", "≤ 21 ms"
    ours = find(rows, FANOUT_1000)
    if ours is None:
        return unmeasured(figure, target)
    return Target(figure, f"{ours['cpu_ms_per_1000']:.1f} ms", target, ours["cpu_ms_per_1000"] <= 21)


def fanout_vs_floor(rows: Rows) -> Target:
    """Fan-out to 1,000 subscribers at 50 msgs/s: ours ≤ 0.6× the floor's CPU per 1,000."""
    return ratio_target(
        "fan-out 1,000 subscribers at 50 msgs/s: CPU vs floor",
        "≤ 0.6× floor",
        (find(rows, FANOUT_1000), find(rows, FANOUT_1000, "floor")),
        ("cpu_ms_per_1000", ".1f"),
        0.6,
    )


def subscribe_leave(rows: Rows) -> Target:
    """A subscribe + leave with 10,000 groups held: within 2× of the same with 10 (relay + fan-out)."""
    return ratio_target(
        "subscribe/leave, 10,000 groups held: CPU per change vs 10 held",
        "≤ 2× (relay + fan-out)",
        (find(rows, "subscribe+leave, 10000 groups held"), find(rows, "subscribe+leave, 10 groups held")),
        ("cpu_ms_per_change", ".2f"),
        2,
    )


def ratio_target(
    figure: str, target: str, pair: tuple[Any, Any], field: tuple[str, str], limit: float
) -> Target:
    """A figure read as the ratio of two rows' values of one field (name, format), met at ≤ limit."""
    (measured_row, base_row), (name, fmt) = pair, field
    if measured_row is None or base_row is None:
        return unmeasured(figure, target)
    times = ratio(measured_row[name], base_row[name])
    measured = f"{times:.2f}× ({measured_row[name]:{fmt}} / {base_row[name]:{fmt}} ms)"
    return Target(figure, measured, target, times <= limit)


def flood(rows: Rows) -> Target:
    """The flood: the watcher gets no more than the rate allows, the API keeps every event."""
    figure = "flood: watcher ≤ rate × (⌊span s⌋ + 1) + always-sent; API has all"
    row = find(rows, FLOOD_SCENARIO)
    target = "≤ bound; API 5,001"
    if row is None:
        return unmeasured(figure, target)
    bound = row["received_bound"]
    measured = (
        f"{row['received']} (bound {row['rate_per_s']} × {row['seconds_spanned']} + {row['always_sent']} "
        f"= {bound}), API {row['api_count']}/{row['posted']}"
    )
    met = row["received"] <= bound and row["api_count"] == row["posted"] and row["final_received"]
    return Target(figure, measured, target, met)


TARGETS: list[Callable[[Rows], Target]] = [
    own_group_cpu,
    own_group_p99,
    batched_emit,
    single_emit,
    unwatched_emit,
    fanout_cpu,
    fanout_vs_floor,
    subscribe_leave,
    flood,
]


def targets(rows: Rows) -> list[Target]:
    """Every target, in issue 17's order."""
    return [check(rows) for check in TARGETS]


def render(found: list[Target]) -> str:
    """The "Targets (issue 17)" block."""
    lines = ["Targets (issue 17)"]
    for t in found:
        verdict = "n/a" if t.met is None else "met" if t.met else "missed"
        lines.append(f"  {t.figure:<68} {t.measured:<44} target {t.target:<26} {verdict}")
    return "\n".join(lines)


def as_json(found: list[Target]) -> list[dict[str, Any]]:
    """The targets for the results file."""
    return [asdict(t) for t in found]
