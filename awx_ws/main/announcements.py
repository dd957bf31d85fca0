"""Peer discovery's announcements (discovery.py), signed and checked.

NOTIFY and LISTEN need no privilege, so any role that may log in to the database can send on a
cluster's channel. Every announcement therefore carries `time`, a random `nonce` and `mac`, an
HMAC keyed by BROADCAST_WEBSOCKET_SECRET over the cluster id, node, address, action, time and
nonce (peerauth.announcement_mac). `AnnouncementCheck` lets through only those that verify, are
within BROADCAST_WEBSOCKET_NONCE_WINDOW of this node's clock and were not heard before; the
others are counted (`awx_ws_discovery_refused_total{reason}`) and logged at most once a minute.
"""

from __future__ import annotations

import hmac
import json
import logging
import secrets
import time
from dataclasses import asdict, dataclass

from awx_ws.main import metrics
from awx_ws.main.peerauth import announcement_mac
from awx_ws.main.setting_rules import peers as check_peers

logger = logging.getLogger(__name__)

ACTIONS = frozenset({"hello", "online", "offline"})
FIELDS = ("cluster", "node", "address", "action")
# What the MAC covers, in this order.
SIGNED = (*FIELDS, "time", "nonce")
# Refused announcements are logged at most once per this many seconds.
REFUSALS_LOG_EVERY = 60.0


@dataclass(frozen=True)
class Announcement:
    """What a node says on its cluster's channel."""

    cluster: str
    node: str
    address: str
    action: str

    def payload(self, secret: str, now: float | None = None) -> str:
        """As NOTIFY carries it: signed, with the time and a nonce of its own."""
        data = {
            **asdict(self),
            "time": f"{time.time() if now is None else now:.3f}",
            "nonce": secrets.token_hex(16),
        }
        data["mac"] = announcement_mac(secret, [data[key] for key in SIGNED])
        return json.dumps(data)


class Refused(Exception):
    """Why an announcement was not acted on: reason is the metric's label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class AnnouncementCheck:
    """Reads announcements of one cluster: only those that verify, are fresh and are new."""

    def __init__(self, cluster: str, secret: str, window: float) -> None:
        self.cluster, self.secret, self.window = cluster, secret, window
        # Nonces heard within the window, with when they stop mattering (time.time()).
        self._nonces: dict[str, float] = {}
        self._refused: dict[str, int] = {}
        self._last_log = -float("inf")

    def read(self, payload: str, now: float) -> Announcement | None:
        """The announcement in payload if it may be acted on; None (counted, logged) otherwise."""
        try:
            return self._verified(payload, now)
        except Refused as refused:
            metrics.DISCOVERY_REFUSED.labels(refused.reason).inc()
            self._refused[refused.reason] = self._refused.get(refused.reason, 0) + 1
            self._report(str(refused))
            return None

    def _verified(self, payload: str, now: float) -> Announcement:
        data = self._signed_by_someone(payload)
        expected = announcement_mac(self.secret, [data[key] for key in SIGNED])
        if not hmac.compare_digest(data["mac"].encode(), expected.encode()):
            raise Refused(
                "forged",
                f"node {data['node']!r} at {data['address']!r}: wrong MAC "
                "(not signed with this node's BROADCAST_WEBSOCKET_SECRET)",
            )
        self._fresh_and_new(data, now)
        problem = check_peers([data["address"]])
        if data["action"] not in ACTIONS:
            problem = f"unknown action {data['action']!r}"
        if problem:
            raise Refused("invalid", f"node {data['node']!r}: {problem}")
        return Announcement(*(data[key] for key in FIELDS))

    def _signed_by_someone(self, payload: str) -> dict[str, str]:
        """payload's fields if it is a signed announcement of this cluster (not yet verified)."""
        try:
            data = json.loads(payload)
        except ValueError:
            raise Refused("malformed", f"not JSON: {payload[:120]!r}") from None
        if not isinstance(data, dict) or not all(isinstance(data.get(key), str) for key in FIELDS):
            raise Refused("malformed", f"without {', '.join(FIELDS)}: {payload[:120]!r}")
        if not all(isinstance(data.get(key), str) for key in ("time", "nonce", "mac")):
            raise Refused("unsigned", f"node {data['node']!r} at {data['address']!r}: no time, nonce and mac")
        if data["cluster"] != self.cluster:
            raise Refused(
                "other_cluster",
                f"node {data['node']!r} of cluster {data['cluster']!r} (this node is in {self.cluster!r})",
            )
        return data

    def _fresh_and_new(self, data: dict[str, str], now: float) -> None:
        """Refused unless a verified announcement is within the window and heard for the first time."""
        try:
            skew = abs(now - float(data["time"]))
        except ValueError:
            raise Refused(
                "malformed", f"node {data['node']!r}: time {data['time']!r} is not a number"
            ) from None
        if not skew <= self.window:  # also refuses nan
            raise Refused(
                "stale", f"node {data['node']!r}: {skew:.0f}s from our clock (window {self.window:g}s)"
            )
        self._forget_old(now)
        if data["nonce"] in self._nonces:
            raise Refused("replayed", f"node {data['node']!r} at {data['address']!r}: heard before")
        self._nonces[data["nonce"]] = now + self.window

    def _forget_old(self, now: float) -> None:
        # Nonces only arrive with a valid MAC: as many as the cluster's nodes announce in a window.
        if self._nonces and min(self._nonces.values()) < now:
            self._nonces = {nonce: until for nonce, until in self._nonces.items() if until >= now}

    def _report(self, last: str) -> None:
        """One WARNING line per REFUSALS_LOG_EVERY seconds at most, with the counts since."""
        clock = time.monotonic()
        if clock - self._last_log < REFUSALS_LOG_EVERY:
            return
        counts = ", ".join(f"{count} {reason}" for reason, count in sorted(self._refused.items()))
        logger.warning("peer discovery refused announcements (%s); the last: %s", counts, last)
        self._refused.clear()
        self._last_log = clock
