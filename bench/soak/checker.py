"""The soak's checker: from the ledger and the logs, every figure the report gives and every
failure that makes `make soak` exit non-zero.

- Live viewers (they catch up over REST as docs/api.md says): for every job a viewer watched until
  its summary, it holds every stored counter, 1 to final_counter; no counter came twice live on
  one connection, none below one that came before it.
- Resuming viewers (SSE, Last-Event-ID): every event of their job from the first they got to the
  job's last arrived exactly once and in order, or was named by a held-back notice; a gap the
  stream announced with a reset is counted apart (told), not as a loss.
- Status changes: every one whose request began after a connection subscribed and was answered
  before it dropped arrived on it exactly once (websockets, awxkit, SSE streams).
- Staleness: from storage (the event's `created`) to arrival, outside fault windows.
- Recovery: after each fault, the time until probes emitted through every node reached every node.
- Resources: a figure that keeps growing while the load is flat is a leak.
- Logs: every ERROR line and traceback, each placed in a fault window or listed as unexplained.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.soak.ledger import Ledger

# How long after a fault ends delivery must be back everywhere (docs/reliability.md): the
# supervisord restart of a daphne, a relay's reconnect back-off (2 s here), a Sentinel failover,
# plus a client's reconnect.
RECOVERY_BOUND = 30.0
# A connection's status is judged only for changes answered this long before it dropped (the
# client notices a drop a moment after it happens).
DROP_MARGIN = 2.0
ERROR_LINE = re.compile(
    r"\b(ERROR|CRITICAL)\b|Traceback \(most recent call last\)|\[(error|crit|alert|emerg)\]"
)
STAMP = re.compile(r"(\d{4}[-/]\d\d[-/]\d\d[ T]\d\d:\d\d:\d\d)")


@dataclass
class Verdict:
    """What the checker found; failures make the run fail."""

    figures: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


def percentile(values: list[float], fraction: float) -> float | None:
    """The value at fraction of the sorted values (None without any)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def fault_windows(ledger: Ledger) -> list[tuple[float, float]]:
    """From a moment before each fault to RECOVERY_BOUND after its end."""
    return [(fault.start - 1.0, (fault.end or fault.start) + RECOVERY_BOUND) for fault in ledger.faults]


def inside(moment: float, windows: list[tuple[float, float]]) -> bool:
    """True if moment falls in one of the windows."""
    return any(start <= moment <= end for start, end in windows)


def check(ledger: Ledger, logs: list[Path]) -> Verdict:
    """Judge the run."""
    verdict = Verdict()
    windows = fault_windows(ledger)
    check_live(ledger, verdict)
    check_resumers(ledger, verdict)
    check_statuses(ledger, verdict)
    check_staleness(ledger, windows, verdict)
    check_recovery(ledger, verdict)
    check_resources(ledger, verdict)
    check_logs(ledger, logs, windows, verdict)
    emitted = sum(len(counters) for counters in ledger.stored.values())
    verdict.figures["events_stored"] = emitted
    verdict.figures["status_changes"] = len(ledger.status_changes)
    verdict.figures["jobs"] = len(ledger.stored)
    verdict.figures["jobs_ended"] = len(ledger.finals)
    verdict.figures["faults"] = dict(Counter(fault.kind for fault in ledger.faults))
    verdict.figures["faults_not_injected"] = [
        f"{f.kind}: {f.detail}" for f in ledger.faults if "could not" in f.detail
    ]
    verdict.figures["client_errors"] = dict(ledger.client_errors)
    for text in verdict.figures["faults_not_injected"]:
        verdict.failures.append(f"fault not injected: {text}")
    verdict.figures["job_failures"] = ledger.job_failures
    verdict.failures += [f"job failed: {text}" for text in ledger.job_failures]
    # After the last job, status changes still on their way this long are late past the bound.
    verdict.figures["settled_after_seconds"] = ledger.settled_after
    if ledger.settled_after > RECOVERY_BOUND:
        verdict.failures.append(
            f"deliveries still on their way {ledger.settled_after:.0f}s after the last job "
            f"(bound {RECOVERY_BOUND:g}s)"
        )
    return verdict


def check_live(ledger: Ledger, verdict: Verdict) -> None:
    """Live viewers: complete once the summary came, no live duplicate, no disorder but a relayed
    event coming late in the window of a fault that made a relay link catch up: the catch-up
    delivers what was on its way when the link dropped rather than lose it (docs/channels.md,
    Relay catch-up), and AWX's live page places an event by its counter."""
    lost = duplicates = disorder = late = complete = 0
    examples: list[str] = []
    late_examples: list[str] = []
    for watch in ledger.watches:
        duplicates += watch.duplicates
        for when, counter, after, front in watch.disorder:
            relayed = port_of(front) != port_of(ledger.job_fronts.get(watch.job, "?"))
            if relayed and relay_fault_at(ledger, when):
                late += 1
            else:
                disorder += 1
            if len(late_examples) < 10:
                late_examples.append(
                    f"{watch.viewer}@{port_of(front)} job {watch.job} (posted through "
                    f"{port_of(ledger.job_fronts.get(watch.job, '?'))}): {counter} after {after} "
                    f"at {when - ledger.started:.1f}s ({fault_at(ledger, when)})"
                )
        if watch.final is None:
            continue
        missing = set(range(1, watch.final + 1)) - watch.held
        complete += 1
        if missing:
            lost += len(missing)
            if len(examples) < 5:
                examples.append(f"{watch.viewer} job {watch.job}: {len(missing)} of {watch.final} missing")
    verdict.figures["live"] = {
        "watches": len(ledger.watches),
        "watches_to_the_end": complete,
        "lost": lost,
        "duplicated": duplicates,
        "out_of_order": disorder,
        "late_in_fault_windows": late,
        "delivered_live": sum(w.live for w in ledger.watches),
        "fetched": sum(w.fetched for w in ledger.watches),
        "held_back_notices": sum(w.notices for w in ledger.watches),
        "examples": examples,
        "out_of_order_examples": late_examples,
    }
    if lost or duplicates or disorder:
        verdict.failures.append(
            f"live viewers: {lost} lost, {duplicates} duplicated, {disorder} out of order"
        )


def check_resumers(ledger: Ledger, verdict: Verdict) -> None:
    """Resuming viewers: exactly once and in order per job, from the first event they got."""
    lost = duplicates = disorder = told = delivered = 0
    examples: list[str] = []
    for resumer in ledger.resumers:
        for job, counters in resumer.counters.items():
            delivered += len(counters)
            duplicates += len(counters) - len(set(counters))
            disorder += sum(1 for a, b in zip(counters, counters[1:], strict=False) if b < a)
            stored = ledger.stored.get(job, {})
            # Events stored while it was subscribed, from the first it got on.
            expected = {
                n for n, at in stored.items() if counters[0] <= n and at <= resumer.until - DROP_MARGIN
            }
            for first, last in resumer.held_back.get(job, []):
                expected -= set(range(first, last + 1))
            missing = expected - set(counters)
            if missing and resumer.resets:
                told += len(missing)
            elif missing:
                lost += len(missing)
                if len(examples) < 5:
                    examples.append(f"{resumer.viewer} job {job}: {sorted(missing)[:10]} of {len(expected)}")
    verdict.figures["resumed"] = {
        "streams": len(ledger.resumers),
        "resumes": sum(r.resumes for r in ledger.resumers),
        "delivered": delivered,
        "lost": lost,
        "duplicated": duplicates,
        "out_of_order": disorder,
        "gaps_told_by_reset": told,
        "resets": sum(len(r.resets) for r in ledger.resumers),
        "examples": examples,
    }
    if lost or duplicates or disorder:
        verdict.failures.append(
            f"resuming viewers: {lost} lost, {duplicates} duplicated, {disorder} out of order"
        )


def check_statuses(ledger: Ledger, verdict: Verdict) -> None:
    """Every status change made while a connection was subscribed arrived on it once."""
    lost = duplicates = expected_total = 0
    examples: list[str] = []
    by_fault: Counter[str] = Counter()
    details: list[list[Any]] = []  # viewer, job, status, emitted through, asked, answered, since, until
    connections: list[tuple[str, float, float, Counter[tuple[int, str]], bool]] = [
        (f"{p.viewer}@{port_of(p.front)}", p.since, p.until, p.statuses, False) for p in ledger.presences
    ]
    connections += [(r.viewer, r.since, r.until, r.statuses, bool(r.resets)) for r in ledger.resumers]
    for viewer, since, until, got, told in connections:
        for job, status, asked, answered in ledger.status_changes:
            if asked < since or answered > until - DROP_MARGIN:
                continue
            expected_total += 1
            count = got.get((job, status), 0)
            if count == 0 and not told:
                lost += 1
                by_fault[fault_at(ledger, answered)] += 1
                if len(details) < 100:
                    details.append(
                        [viewer, job, status, port_of(ledger.job_fronts.get(job, "?")),
                         round(asked - ledger.started, 2), round(answered - ledger.started, 2),
                         round(since - ledger.started, 2), round(until - ledger.started, 2)]
                    )  # fmt: skip
                if len(examples) < 5:
                    examples.append(
                        f"{viewer}: job {job} {status} through {port_of(ledger.job_fronts.get(job, '?'))} "
                        f"(answered {answered - ledger.started:.1f}s)"
                    )
            elif count > 1:
                duplicates += count - 1
    verdict.figures["status"] = {
        "connections": len(connections),
        "expected": expected_total,
        "lost": lost,
        "duplicated": duplicates,
        "lost_by_fault": dict(by_fault),
        "lost_details": details,
        "examples": examples,
    }
    if lost or duplicates:
        verdict.failures.append(f"status changes: {lost} lost ({dict(by_fault)}), {duplicates} duplicated")


def port_of(front: str) -> str:
    """The port of a node's nginx address: which node, in the examples."""
    return front.rsplit(":", 1)[-1]


# Faults after which a relay link catches up (relay_catchup.py): what it delivers late may come
# behind a newer message. A daphne killed drops its peers' links; a failover restarts C's.
RELAY_FAULTS = {"cut_relay_link", "kill_relay", "kill_daphne", "kill_sentinel_master"}


def relay_fault_at(ledger: Ledger, moment: float) -> bool:
    """True if moment lies in the window of a fault after which a relay link catches up."""
    return any(
        fault.kind in RELAY_FAULTS and start <= moment <= end
        for fault, (start, end) in zip(ledger.faults, fault_windows(ledger), strict=True)
    )


def fault_at(ledger: Ledger, moment: float) -> str:
    """The kind of the latest fault whose window holds moment ("none" outside every window)."""
    for fault, (start, end) in reversed(list(zip(ledger.faults, fault_windows(ledger), strict=True))):
        if start <= moment <= end:
            return fault.kind
    return "none"


def check_staleness(ledger: Ledger, windows: list[tuple[float, float]], verdict: Verdict) -> None:
    """Storage to arrival, outside fault windows."""
    calm = [seconds for arrived, seconds in ledger.latencies if not inside(arrived, windows)]
    verdict.figures["staleness_seconds"] = {
        "count": len(calm),
        "p50": percentile(calm, 0.5),
        "p99": percentile(calm, 0.99),
        "max": max(calm, default=None),
    }


def check_recovery(ledger: Ledger, verdict: Verdict) -> None:
    """Per fault: seconds from its end until a probe round crossed every pair of nodes."""
    nodes = sorted({name for _, name, _ in ledger.probes})
    emitted: dict[int, dict[str, float]] = defaultdict(dict)
    for round_, name, at in ledger.probes:
        emitted[round_][name] = at
    arrivals: dict[int, dict[tuple[str, str], float]] = defaultdict(dict)
    for round_, origin, node, at in ledger.probe_arrivals:
        arrivals[round_].setdefault((origin, node), at)
    pairs = {(a, b) for a in nodes for b in nodes}
    by_kind: dict[str, list[float]] = defaultdict(list)
    for fault in ledger.faults:
        end = fault.end or fault.start
        for round_ in sorted(emitted):
            if len(emitted[round_]) < len(nodes) or min(emitted[round_].values()) < end:
                continue
            if set(arrivals[round_]) >= pairs:
                fault.recovered_after = max(arrivals[round_].values()) - end
                break
        if fault.recovered_after is None or fault.recovered_after > RECOVERY_BOUND:
            verdict.failures.append(
                f"{fault.kind} on {fault.target}: delivery not back everywhere within {RECOVERY_BOUND:g}s "
                f"({'never' if fault.recovered_after is None else f'{fault.recovered_after:.1f}s'})"
            )
        if fault.recovered_after is not None:
            by_kind[fault.kind].append(fault.recovered_after)
    verdict.figures["recovery_seconds"] = {kind: max(values) for kind, values in by_kind.items()}
    verdict.figures["recovery_bound_seconds"] = RECOVERY_BOUND


# Growth allowed over the second half of a run, beyond which a figure is a leak: RSS and Redis
# memory by 25% plus a floor; open files by 50 plus 25%.
LEAK_FLOORS = {"rss": 30 * 2**20, "used_memory": 20 * 2**20, "fds": 50, "memberships": 200}


def check_resources(ledger: Ledger, verdict: Verdict) -> None:
    """A figure whose last quarter is well above its second quarter, in the same process (one
    restarted by a fault starts small and is judged only when it lived most of the run): a leak."""
    samples = ledger.samples
    trend: dict[str, dict[str, float]] = {}
    if len(samples) < 8:
        verdict.figures["resources"] = {"note": "too few samples for a trend", "samples": len(samples)}
        return
    keys = sorted({key for row in samples for key in row if key != "at" and not key.endswith(".pid")})
    for key in keys:
        pid_key = key.rsplit(".", 1)[0] + ".pid"
        last_pid = samples[-1].get(pid_key)
        rows = [row for row in samples if row.get(key) is not None and row.get(pid_key) == last_pid]
        if len(rows) < len(samples) // 2:
            trend[key] = {"restarted": 1.0}
            continue
        quarter = len(rows) // 4
        a = statistics.median(row[key] for row in rows[quarter : 2 * quarter])
        b = statistics.median(row[key] for row in rows[-quarter:])
        trend[key] = {"second_quarter": a, "last_quarter": b}
        if b > a * 1.25 + LEAK_FLOORS[key.rsplit(".", 1)[-1]]:
            verdict.failures.append(f"resource {key} grew from {a:.0f} to {b:.0f} at the same load")
    verdict.figures["resources"] = trend


def stamp(line: str) -> float | None:
    """The wall-clock time a log line carries, if any."""
    found = STAMP.search(line)
    if not found:
        return None
    text = found.group(1).replace("/", "-").replace("T", " ")
    try:
        return datetime.strptime(text, "%Y-%m-%d %H:%M:%S").timestamp()
    except ValueError:
        return None


def check_logs(
    ledger: Ledger, logs: list[Path], windows: list[tuple[float, float]], verdict: Verdict
) -> None:
    """Every ERROR line and traceback while the workload ran (not the cluster's start, where
    nginx answers before the API listens, nor its stop); those outside fault windows are unexplained."""
    explained: Counter[str] = Counter()
    unexplained: list[str] = []
    for log in logs:
        if not log.exists():
            continue
        last_stamp: float | None = None
        for line in log.read_text(errors="replace").splitlines():
            moment = stamp(line)
            if moment is not None:
                last_stamp = moment
            if not ERROR_LINE.search(line) or last_stamp is None:
                continue
            # Stamps are whole seconds: a line stamped in the second the stack's stop began may
            # be the stop's (gunicorn's master reports its workers' SIGTERM at ERROR), not judged.
            if not ledger.started - 1 <= last_stamp < math.floor(ledger.ended):
                continue
            if inside(last_stamp, [(a - 1, b + 1) for a, b in windows]):
                explained[log.name] += 1
            else:
                unexplained.append(f"{log.parent.parent.name}/{log.name}: {line[:300]}")
    verdict.figures["log_errors"] = {"in_fault_windows": dict(explained), "unexplained": unexplained[:50]}
    if unexplained:
        verdict.failures.append(f"{len(unexplained)} ERROR lines or tracebacks outside any fault")
