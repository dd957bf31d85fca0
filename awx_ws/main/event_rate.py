"""AWX's flood policy for job events on the websocket (pure rules; notifications.py applies them).

AWX survives floods by not sending: at most MAX_WEBSOCKET_EVENT_RATE events per second per job
go to the websocket (30 by default, 0 for no limit), except the events a client needs to draw the
job's outline, which always go. Events with nothing to show (no stdout, no lines) never go. The
REST API keeps every event; a client that was sent fewer learns how many from the job's summary
(`skipped_events`) and fetches the rest.

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
