"""How much a connection's peer has not taken yet, and when a reader counts as too slow.

Twisted buffers whatever the kernel does not accept, without bound: a client that stops reading
would grow the server's memory with every message sent to it (channels_redis#212, AWX #7720).
Past AWX_WS SLOW_CLIENT_MAX_BYTES (or SLOW_CLIENT_MAX_MESSAGES frames) waiting, a websocket is
closed with SLOW_CLIENT_CLOSE_CODE and an SSE stream is cut. The check runs after every write:
in awx_ws.server's websocket protocol, and in the consumer's ASGI send path under plain daphne,
where the router hands the connection's daphne protocol over in the scope (CONNECTION_EXTENSION).

Other servers (uvicorn, hypercorn) wait in their ASGI send while the socket's buffer is full: one
client that stops reading would hold up the process's fan-out, which writes to every subscriber in
turn. There the router gives each client connection an `Outbox`: sends queue and return at once,
one task writes them in order, and the same limits apply to what waits in the queue.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
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


# How long a connection's last frames (a close, the end of a stream) may take to reach a client
# once the application is done with it, before the server is left to drop the connection.
FINAL_DRAIN_SECONDS = 10.0

Channel = Callable[..., Awaitable[Any]]


def _endings(scope: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], str]:
    """For a cut-off connection: what is sent last, what the application receives next, and the
    log's words (SlowReader's under daphne)."""
    if scope["type"] == "websocket":
        reason = "slow client: messages not read in time"
        close = {"type": "websocket.close", "code": SLOW_CLIENT_CLOSE_CODE, "reason": reason}
        return close, {"type": "websocket.disconnect", "code": SLOW_CLIENT_CLOSE_CODE}, "closing slow client"
    end = {"type": "http.response.body", "body": b"", "more_body": False}
    return end, {"type": "http.disconnect"}, "cutting off slow stream of"


class Outbox:
    """A connection's ASGI send and receive, for servers whose send waits for the client: sends
    queue and one task writes them in order. Past SLOW_CLIENT_MAX_BYTES or _MESSAGES waiting, the
    queue is dropped, the close (or the stream's end) is all that is left to write, and the
    application receives the disconnect at once (it lets go of its groups as when a client
    leaves); what it sends after that is dropped."""

    def __init__(self, scope: dict[str, Any], receive: Channel, send: Channel) -> None:
        self._receive, self._send = receive, send
        self._last, self._gone, self._cut_off_words = _endings(scope)
        self._peer = scope.get("client")
        self._queue: deque[tuple[dict[str, Any], int]] = deque()
        self._bytes = 0
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()  # nothing queued, nothing being written
        self._idle.set()
        self._cut = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self.done = False  # cut off, or the connection is gone

    async def send(self, message: dict[str, Any]) -> None:
        """Queue one ASGI message for the client; never waits for the socket."""
        if self.done:
            return
        size = len(message.get("bytes") or message.get("text") or message.get("body") or b"")
        self._queue.append((message, size))
        self._bytes += size
        limits = ws_settings.SLOW_CLIENT_MAX_BYTES, ws_settings.SLOW_CLIENT_MAX_MESSAGES
        if self._bytes > limits[0] or len(self._queue) > limits[1]:
            self._cut_off(*limits)
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write())
        self._idle.clear()
        self._wake.set()

    async def receive(self) -> dict[str, Any]:
        """The server's next message for the application; the disconnect once cut off."""
        if not self._cut.is_set():
            incoming = asyncio.ensure_future(self._receive())
            cut = asyncio.ensure_future(self._cut.wait())
            try:
                await asyncio.wait({incoming, cut}, return_when=asyncio.FIRST_COMPLETED)
            finally:  # also when the application stops receiving (cancelled)
                cut.cancel()
                if not incoming.done():
                    incoming.cancel()  # a queue's get: nothing is lost by cancelling it
            if not incoming.cancelled():
                return dict(incoming.result())
        return dict(self._gone)

    def _cut_off(self, max_bytes: int, max_frames: int) -> None:
        from awx_ws.main import metrics  # after the settings (see SlowReader.too_slow)

        metrics.SLOW_CLIENT_CLOSES.inc()
        logger.warning(
            "%s %s: %d bytes in %d messages not taken (limits %d bytes, %d messages)",
            self._cut_off_words,
            self._peer,
            self._bytes,
            len(self._queue),
            max_bytes,
            max_frames,
        )
        self._queue.clear()
        self._queue.append((self._last, 0))
        self._bytes = 0
        self.done = True
        self._cut.set()

    async def _write(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._queue:
                    message, size = self._queue.popleft()
                    self._bytes -= size
                    await self._send(message)
                self._idle.set()
        except Exception as exc:  # the connection is gone (each server says so its own way)
            logger.debug("client %s gone: %r", self._peer, exc)
            self.done = True
            self._queue.clear()
            self._idle.set()

    async def finish(self) -> None:
        """Once the application is done: let the last frames out (bounded), then stop writing."""
        if self._writer is None:
            return
        try:
            async with asyncio.timeout(FINAL_DRAIN_SECONDS):
                await self._idle.wait()
        except TimeoutError:
            logger.info("client %s took nothing for %gs: left to the server", self._peer, FINAL_DRAIN_SECONDS)
        self._writer.cancel()
        await asyncio.gather(self._writer, return_exceptions=True)
