"""The AWX_WS settings namespace: defaults, one object to read them, overridable in tests."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.signals import setting_changed

DEFAULTS: dict[str, Any] = {
    # Groups one websocket connection may hold at once.
    "MAX_GROUPS_PER_CONNECTION": 100,
    # Largest inbound text frame we parse; larger frames get an error reply.
    "MAX_FRAME_BYTES": 64 * 1024,
    # Seconds an emit may take before EmitError (Redis down or unreachable).
    "EMIT_TIMEOUT": 5.0,
    # Per-user rate of POST /api/v2/emit/ (DRF rate syntax).
    "EMIT_RATE": "1200/min",
    # Seconds daphne waits for Redis at start before it exits with one clear message.
    "STARTUP_REDIS_WAIT": 60.0,
    # A process's liveness record expires this many seconds after its last heartbeat...
    "LIVENESS_TTL": 30.0,
    # ...and is refreshed this often.
    "LIVENESS_INTERVAL": 10.0,
    # Peer nodes the relay dials: "host:port" (ws://host:port/websocket/broadcast/) or full URLs.
    "BROADCAST_WEBSOCKET_PEERS": [],
    # Shared HMAC key of the cluster; empty refuses every peer.
    "BROADCAST_WEBSOCKET_SECRET": "",
    # This node's own entry in BROADCAST_WEBSOCKET_PEERS: never dialled.
    "BROADCAST_WEBSOCKET_SELF": "",
    # Verify peers' TLS certificates on wss:// links (AWX does not by default; we do)...
    "BROADCAST_WEBSOCKET_VERIFY_CERT": True,
    # ...against this CA bundle (a PEM file), or the system's CAs when empty.
    "BROADCAST_WEBSOCKET_CA_BUNDLE": "",
    # Seconds a peer's nonce may be away from our clock.
    "BROADCAST_WEBSOCKET_NONCE_WINDOW": 300.0,
    # Reconnect backoff: 1 s doubling to this many seconds, with jitter.
    "BROADCAST_WEBSOCKET_BACKOFF_MAX": 16.0,
    # Seconds between pings on a relay link; a peer silent for twice this is dropped.
    "BROADCAST_WEBSOCKET_PING_INTERVAL": 10.0,
    # History kept per group for resuming streams (history.py): entries and seconds per group...
    "HISTORY_LENGTH": 1000,
    "HISTORY_AGE": 3600.0,
    # ...overridden per group kind: {"kind": {"length": n, "age": s}} or {"kind": None} for none.
    "HISTORY_KINDS": {"control": None},
    # Seconds a peer node's clock may lag ours; resuming replays that much earlier from it.
    "HISTORY_CLOCK_SKEW": 1.0,
    # Seconds a resume may wait for peers (their history, their relay forwarding the group).
    "RECOVER_TIMEOUT": 5.0,
    # Seconds between keep-alive comments on an idle SSE stream.
    "SSE_KEEPALIVE": 15.0,
    # Seconds a browser's EventSource waits before reconnecting (the stream's `retry:`).
    "SSE_RETRY": 1.0,
    # A websocket whose unread backlog passes either bound is closed with code 4008 (server.py).
    "SLOW_CLIENT_MAX_BYTES": 8 * 1024 * 1024,
    "SLOW_CLIENT_MAX_MESSAGES": 10_000,
    # Subscribe frames one websocket may send per SUBSCRIBE_WINDOW seconds; more get an error.
    "SUBSCRIBE_RATE": 20,
    "SUBSCRIBE_WINDOW": 10.0,
    # This node's name in logs and peer headers.
    "NODE_NAME": "awx_ws",
}


class WsSettings:
    """Attribute access to settings.AWX_WS with defaults; unknown names are an AttributeError."""

    def __init__(self) -> None:
        self._cache: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        if name not in DEFAULTS:
            raise AttributeError(f"unknown AWX_WS setting {name!r}")
        if name not in self._cache:
            user = getattr(settings, "AWX_WS", {})
            self._cache[name] = user.get(name, DEFAULTS[name])
        return self._cache[name]

    def reload(self) -> None:
        """Forget cached values (after override_settings)."""
        self._cache.clear()


ws_settings = WsSettings()


def _reload(*, setting: str, **kwargs: Any) -> None:
    if setting == "AWX_WS":
        ws_settings.reload()


setting_changed.connect(_reload)
