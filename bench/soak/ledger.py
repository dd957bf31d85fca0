"""What the soak did and what its clients saw: the facts the checker judges, written as JSON.

Times are wall-clock (`time.time()`): servers stamp events with it (`created`), and logs with it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Fault:
    """One injected fault: from start until end (a cut until it heals, a kill at its instant)."""

    kind: str
    target: str
    start: float
    end: float = 0.0
    detail: str = ""
    recovered_after: float | None = None  # seconds from end until probes crossed every node again


@dataclass
class Watch:
    """A live viewer's time on one job: what it held (live or fetched) when it stopped watching."""

    viewer: str
    job: int
    since: float
    until: float = 0.0
    held: set[int] = field(default_factory=set)
    live: int = 0
    fetched: int = 0
    duplicates: int = 0  # a counter received live twice on one connection
    out_of_order: int = 0  # a counter received live below one received before it on one connection
    disorder: list[tuple[float, int, int, str]] = field(default_factory=list)  # (when, counter, after, front)
    final: int | None = None  # the summary's final_counter, when it came while watching
    notices: int = 0  # held-back notices received


@dataclass
class Presence:
    """When one connection of a viewer was subscribed to jobs-status_changed, and what it got."""

    viewer: str
    since: float
    until: float = 0.0
    statuses: Counter[tuple[int, str]] = field(default_factory=Counter)
    front: str = ""  # the node's nginx it was connected through


@dataclass
class Resumer:
    """An SSE client that drops and resumes with Last-Event-ID: every message it got, per group."""

    viewer: str
    since: float
    until: float = 0.0
    resumes: int = 0
    ids: dict[str, list[str]] = field(default_factory=dict)
    counters: dict[int, list[int]] = field(default_factory=dict)  # job -> counters, as received
    held_back: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # job -> ranges
    statuses: Counter[tuple[int, str]] = field(default_factory=Counter)
    resets: list[tuple[float, str]] = field(default_factory=list)  # (when, the groups' reasons)
    jobs: dict[int, float] = field(default_factory=dict)  # job -> when it was subscribed


@dataclass
class Ledger:
    """Everything the checker needs."""

    started: float
    settings: dict[str, Any]
    stored: dict[int, dict[int, float]] = field(default_factory=dict)  # job -> counter -> stored at
    finals: dict[int, int] = field(default_factory=dict)  # job -> its last counter, once ended
    job_fronts: dict[int, str] = field(default_factory=dict)  # job -> the node's nginx it posts to
    status_changes: list[tuple[int, str, float, float]] = field(
        default_factory=list
    )  # job, status, asked, answered
    faults: list[Fault] = field(default_factory=list)
    watches: list[Watch] = field(default_factory=list)
    presences: list[Presence] = field(default_factory=list)
    resumers: list[Resumer] = field(default_factory=list)
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (arrived, seconds since stored)
    probes: list[tuple[int, str, float]] = field(default_factory=list)  # (round, emitted on, at)
    probe_arrivals: list[tuple[int, str, str, float]] = field(
        default_factory=list
    )  # round, from, at node, when
    samples: list[dict[str, Any]] = field(default_factory=list)  # resources over time
    client_errors: Counter[str] = field(default_factory=Counter)  # what clients met, by kind
    job_failures: list[str] = field(default_factory=list)  # jobs the API refused or never answered
    ended: float = 0.0
    settled_after: float = 0.0  # seconds the end waited for deliveries still on their way

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready copy (sets and Counters as lists)."""
        data = asdict(self)
        for watch in data["watches"]:
            watch["held"] = len(watch["held"])
        for presence in data["presences"]:
            presence["statuses"] = len(presence["statuses"])
        for resumer in data["resumers"]:
            resumer["statuses"] = len(resumer["statuses"])
            resumer["ids"] = {group: len(ids) for group, ids in resumer["ids"].items()}
            resumer["counters"] = {job: len(counters) for job, counters in resumer["counters"].items()}
        data["stored"] = {job: len(counters) for job, counters in self.stored.items()}
        data["latencies"] = len(self.latencies)
        data["probe_arrivals"] = len(self.probe_arrivals)
        data["client_errors"] = dict(self.client_errors)
        return data
