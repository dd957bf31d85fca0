"""AWX's flood policy for job events on the websocket (pure rules; notifications.py applies them).

AWX survives floods by not sending: at most MAX_WEBSOCKET_EVENT_RATE events per second per job
go to the websocket (30 by default, 0 for no limit), except the events a client needs to draw the
job's outline, which always go. Events with nothing to show (no stdout, no lines) never go. The
REST API keeps every event. AWX leaves it there: its classic UI shows a stale page until reloaded
(ansible/awx#15420, #14662, #9747). Here the job's viewers are told, at most once a second per job,
which counters were held back (held_back.py sends the notice), and fetch those from REST.

The window is AWX's: an event goes out if fewer than `rate` went out in the second before it. Its
state, the send times of the last `rate` events, is kept per job in the database the API
processes share (models.WebsocketEventRate), so the limit holds across them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

# Sent whatever the rate: the outline of a run, and its end.
ALWAYS_SENT = frozenset(
    {"playbook_on_start", "playbook_on_play_start", "playbook_on_task_start", "playbook_on_stats", "EOF"}
)
WINDOW = 1.0  # seconds


class Event(Protocol):
    """What the policy reads of a job event."""

    event: str
    stdout: str
    start_line: int
    end_line: int


def has_nothing_to_show(event: Event) -> bool:
    """No stdout and no lines: AWX sends none of these (the always-sent outline excepted)."""
    return event.event not in ALWAYS_SENT and not event.stdout and event.start_line == event.end_line


@dataclass
class Verdict:
    """Which events of a batch go to the websocket, and what the window holds afterwards."""

    send: list[bool]
    recent: list[float]
    held_back: int = 0
    empty: int = 0
    # Index in the batch -> why it is not sent ("rate" or "empty"), for the metrics.
    reasons: dict[int, str] = field(default_factory=dict)


def admit(events: Sequence[Event], recent: Sequence[float], now: float, rate: int) -> Verdict:
    """Decide for events posted at now, given the send times of the job's last events."""
    window = [t for t in recent if now - t < WINDOW][-rate:] if rate > 0 else []
    verdict = Verdict(send=[], recent=window)
    for index, event in enumerate(events):
        if has_nothing_to_show(event):
            verdict.send.append(False)
            verdict.empty += 1
            verdict.reasons[index] = "empty"
        elif event.event in ALWAYS_SENT or rate == 0:
            verdict.send.append(True)
        elif len(verdict.recent) < rate:
            verdict.send.append(True)
            verdict.recent.append(now)
        else:
            verdict.send.append(False)
            verdict.held_back += 1
            verdict.reasons[index] = "rate"
    return verdict


# --- what a job's viewers are told of the events held back ------------------------------------

# A notice names at most this many counter ranges. Past that, its last range spans all the rest,
# and may then take in counters that went out: a client skips the counters it already has.
MAX_RANGES = 100
Ranges = list[list[int]]  # [[first, last], ...], inclusive, ascending, disjoint


def held_back_ranges(counters: Sequence[int], verdict: Verdict) -> Ranges:
    """The runs of consecutive counters of a batch (sorted by counter) that were not sent, keeping
    the runs that hold an event the rate held back. An event with nothing to show may stand inside
    a run (it was not sent either: fetching it duplicates nothing); a counter the batch does not
    hold ends a run, since another request may have sent it."""
    ranges: Ranges = []
    run: list[int] | None = None
    held = False
    for index, counter in enumerate(counters):
        if verdict.send[index] or (run is not None and counter != run[1] + 1):
            if run is not None and held:
                ranges.append(run)
            run, held = None, False
        if not verdict.send[index]:
            run = [run[0], counter] if run is not None else [counter, counter]
            held = held or verdict.reasons.get(index) == "rate"
    if run is not None and held:
        ranges.append(run)
    return ranges


def merge_ranges(first: Ranges, second: Ranges) -> Ranges:
    """Both lists as one, touching ranges joined, at most MAX_RANGES long (see there)."""
    merged: Ranges = []
    for start, end in sorted([*first, *second]):
        if merged and start <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    if len(merged) > MAX_RANGES:
        merged = [*merged[: MAX_RANGES - 1], [merged[MAX_RANGES - 1][0], merged[-1][1]]]
    return merged


def notice_due(pending: Ranges, announced: float, now: float) -> bool:
    """A notice goes out when something is pending and none went out in the last WINDOW: at most
    one a second per job, however many requests a flood is posted in."""
    return bool(pending) and now - announced >= WINDOW
