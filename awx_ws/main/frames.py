"""Websocket frames written straight to daphne's sockets (awx_ws.server): each message framed once,
the same bytes for every socket, and every frame a received batch has for one socket in one write.

A fan-out of 1,000 sockets at 50 messages a second gets its messages in batches: delivering one
takes about as long as the gap to the next, so the next few are queued by then. One write per
socket per batch, not per message, saves a system call and a loop turn per message per socket.
Order is kept: a socket's frames go in the order of the batch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from awx_ws.main.metrics import Tally

logger = logging.getLogger(__name__)

# autobahn's WebSocketProtocol.STATE_OPEN
STATE_OPEN = 3


class Framed(Protocol):
    """A fan-out subscriber as seen here (fanout.Subscriber): its socket, or None."""

    frame_protocol: Any


S = TypeVar("S", bound=Framed)


class FrameBatch:
    """The frames of one received batch, per socket, until flush() writes them."""

    def __init__(self) -> None:
        # daphne's protocol object -> its frames' bytes, in order (dicts keep insertion order).
        self._frames: dict[Any, list[bytes]] = {}

    def add(self, members: Iterable[S], text: str) -> list[S]:
        """Queue text for every member with a frame protocol; the members without one."""
        frame = None
        others = []
        for subscriber in members:
            protocol = subscriber.frame_protocol
            if protocol is None:
                others.append(subscriber)
                continue
            if frame is None:
                # Never compressed, so valid on any connection (permessage-deflate or not).
                frame = protocol.factory.prepareMessage(text.encode(), doNotCompress=True).payloadHybi
            self._frames.setdefault(protocol, []).append(frame)
        return others

    def flush(self, delivered: Tally, dropped: Tally) -> None:
        """Write each socket's frames in one write; count what was written and what was not."""
        batches, self._frames = self._frames, {}
        written = 0
        for protocol, frames in batches.items():
            if protocol.state != STATE_OPEN:
                dropped.add("connection_closing", len(frames))  # its consumer is being torn down
                continue
            try:
                protocol.send_frames(b"".join(frames), len(frames))
            except Exception as exc:  # one broken connection must not stop the others
                dropped.add("connection_closing", len(frames))
                logger.warning("writing to %s failed: %r", getattr(protocol, "peer", "?"), exc)
                continue
            written += len(frames)
        if written:
            delivered.add("websocket", written)
