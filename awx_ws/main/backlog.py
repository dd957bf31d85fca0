"""How much a connection's peer has not taken yet, and what happens past the limit.

Twisted buffers whatever the kernel does not accept, without bound: a client that stops reading
would grow the server's memory with every message sent to it (channels_redis#212, AWX #7720).
Websockets past the limit are closed with SLOW_CLIENT_CLOSE_CODE (awx_ws.server); SSE streams
are cut (awx_ws.main.sse). The limits are AWX_WS SLOW_CLIENT_MAX_BYTES / _MAX_MESSAGES.
"""

from __future__ import annotations

from typing import Any

# The close code for a client that stopped reading (Centrifugo uses 3008 for the same; 4000-4999
# is the application range). See docs/reliability.md.
SLOW_CLIENT_CLOSE_CODE = 4008


def backlog_bytes(transport: Any) -> int:
    """Bytes a Twisted transport holds for a peer that has not taken them yet."""
    buffered = getattr(transport, "dataBuffer", b"")
    return len(buffered) - getattr(transport, "offset", 0) + getattr(transport, "_tempDataLen", 0)
