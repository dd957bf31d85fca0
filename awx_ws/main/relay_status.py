"""A relay link's figures and how its failures read: what `run_wsbroadcast --status` shows.

The relay (relay.py) keeps one LinkStatus per peer and writes it to the node's records every
second (`as_mapping`); `describe` turns a failed or lost link into the one line an operator reads.
"""

from __future__ import annotations

import ssl
import time
from collections import deque
from dataclasses import dataclass, field

from websockets.exceptions import InvalidStatus

from awx_ws.main import metrics


@dataclass
class LinkStatus:
    """One link's state and counters."""

    peer: str
    state: str = "connecting"
    since: float = field(default_factory=time.time)
    received_total: int = 0
    dropped_total: int = 0
    reconnects: int = 0
    last_error: str = ""
    # "static" (BROADCAST_WEBSOCKET_PEERS) or "discovered"; when the peer last gave a sign of life
    # (its link up, or its announcement heard).
    source: str = "static"
    last_seen: float = 0.0
    # Since when messages the peer emitted have not reached this node (the link went down, or the
    # relay started after one that had it down); 0 once caught up (relay_catchup.py).
    down_since: float = 0.0
    # When the newest message this link delivered here was emitted (its id's time, on the peer's
    # clock): a peer that forwards late still had what it emitted after it on the way when the
    # link dropped, so the catch-up reaches back to it (relay_catchup.catchup_floors).
    newest_emitted: float = 0.0
    # (second, count) buckets of the last minute
    _recent: deque[list[int]] = field(default_factory=deque)

    def __post_init__(self) -> None:
        metrics.RELAY_UP.labels(self.peer).set(0)

    def received(self, emitted: float | None = None) -> None:
        """Count one message (emitted: when, by its id, if it has one)."""
        self.received_total += 1
        if emitted is not None and emitted > self.newest_emitted:
            self.newest_emitted = emitted
        metrics.RELAY_RECEIVED.labels(self.peer).inc()
        now = int(time.time())
        if self._recent and self._recent[-1][0] == now:
            self._recent[-1][1] += 1
        else:
            self._recent.append([now, 1])

    def last_minute(self) -> int:
        """Messages received in the last 60 seconds."""
        cutoff = int(time.time()) - 60
        while self._recent and self._recent[0][0] <= cutoff:
            self._recent.popleft()
        return sum(count for _, count in self._recent)

    def move_to(self, state: str) -> bool:
        """Change state; True when it really changed (the caller logs it)."""
        if state == self.state:
            return False
        self.state, self.since = state, time.time()
        metrics.RELAY_UP.labels(self.peer).set(1 if state == "connected" else 0)
        return True

    def as_mapping(self) -> dict[str, str]:
        """The figures as stored in Redis."""
        return {
            "peer": self.peer,
            "state": self.state,
            "since": f"{self.since:.3f}",
            "received_total": str(self.received_total),
            "received_last_minute": str(self.last_minute()),
            "dropped_total": str(self.dropped_total),
            "reconnects": str(self.reconnects),
            "last_error": self.last_error,
            "source": self.source,
            "last_seen": f"{self.last_seen:.3f}",
            "down_since": f"{self.down_since:.3f}",
            "updated": f"{time.time():.3f}",
        }


def describe(exc: BaseException) -> str:
    """A one-line reason for a failed or lost link."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"TLS certificate not trusted: {exc.verify_message} (the peer's certificate must be signed "
            "by a CA in BROADCAST_WEBSOCKET_CA_BUNDLE, or the system's CAs)"
        )
    if isinstance(exc, InvalidStatus):
        code = exc.response.status_code
        hint = (
            " (check BROADCAST_WEBSOCKET_SECRET, that the peer's BROADCAST_WEBSOCKET_SELF is this entry, "
            "whether the peer has started, or whether its Redis is reachable: the peer logs why)"
            if code == 403
            else ""
        )
        return f"HTTP {code} at handshake{hint}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
