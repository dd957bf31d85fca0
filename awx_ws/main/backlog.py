"""How much a connection's peer has not taken yet, and when a reader counts as too slow.

Twisted buffers whatever the kernel does not accept, without bound: a client that stops reading
would grow the server's memory with every message sent to it (channels_redis#212, AWX #7720).
Past AWX_WS SLOW_CLIENT_MAX_BYTES (or SLOW_CLIENT_MAX_MESSAGES frames) waiting, a websocket is
closed with SLOW_CLIENT_CLOSE_CODE and an SSE stream is cut. The check runs after every write:
in awx_ws.server's websocket protocol, and in the consumer's ASGI send path under plain daphne,
where the router hands the connection's daphne protocol over in the scope (CONNECTION_EXTENSION).
"""

from __future__ import annotations

import logging
from typing import Any

from awx_ws.main.conf import ws_settings

logger = logging.getLogger(__name__)

# The close code for a client that stopped reading (Centrifugo uses 3008 for the same; 4000-4999
# is the application range). See docs/reliability.md.
SLOW_CLIENT_CLOSE_CODE = 4008

# scope["extensions"][CONNECTION_EXTENSION]: daphne's protocol object of the connection (set by
# the router under any daphne), read for its transport's backlog only.
CONNECTION_EXTENSION = "awx_ws.connection"


def backlog_bytes(transport: Any) -> int:
    """Bytes a Twisted transport holds for a peer that has not taken them yet."""
    buffered = getattr(transport, "dataBuffer", b"")
    return len(buffered) - getattr(transport, "offset", 0) + getattr(transport, "_tempDataLen", 0)


def connection_transport(scope: dict[str, Any]) -> Any | None:
    """The Twisted transport of a scope's connection, or None (a server other than daphne)."""
    protocol = (scope.get("extensions") or {}).get(CONNECTION_EXTENSION)
    return getattr(protocol, "transport", None)


# Bytes a write adds around its payload: a websocket frame header (at most 10 bytes from a
# server) or an HTTP chunk's size line.
FRAMING = 16


class SlowReader:
    """Watches one connection's backlog after each write; says when its reader is too slow."""

    def __init__(self, transport: Any, cut_off_message: str = "closing slow client") -> None:
        self.transport = transport
        self.cut_off_message = cut_off_message
        # Frames written while earlier ones were still waiting.
        self.waiting_frames = 0
        self.cut_off = False

    def too_slow(self, written: int, frames: int = 1) -> bool:
        """After a write of `written` payload bytes in `frames` messages: True (once) when the
        backlog passes either limit (logged and counted).

        Only what was waiting before this write counts: a transport that is not written straight
        to the socket (Twisted's ordinary write, plain daphne, HTTP) holds every new frame until
        its next loop turn, however fast the client reads.
        """
        if self.cut_off or self.transport is None:
            return False
        waiting = backlog_bytes(self.transport)
        if waiting - written <= FRAMING:
            self.waiting_frames = 0
            return False
        self.waiting_frames += frames
        max_bytes, max_frames = ws_settings.SLOW_CLIENT_MAX_BYTES, ws_settings.SLOW_CLIENT_MAX_MESSAGES
        if waiting <= max_bytes and self.waiting_frames <= max_frames:
            return False
        self.cut_off = True
        # Imported here: prometheus_client must not load before the settings have set
        # PROMETHEUS_MULTIPROC_DIR, and awx_ws.server imports this module before Django is set up.
        from awx_ws.main import metrics

        metrics.SLOW_CLIENT_CLOSES.inc()
        logger.warning(
            "%s %s: %d bytes in %d messages not taken (limits %d bytes, %d messages)",
            self.cut_off_message,
            _peer(self.transport),
            waiting,
            self.waiting_frames,
            max_bytes,
            max_frames,
        )
        return True


def _peer(transport: Any) -> str:
    try:
        address = transport.getPeer()
        return f"{address.host}:{address.port}"
    except (AttributeError, OSError):
        return "?"
