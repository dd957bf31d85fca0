"""A TCP proxy on loopback that a test or the soak's nemesis cuts and heals: a relay link's
network, without a firewall.

Cut: every connection through it is closed at once (both ends see the TCP connection go), and new
ones are closed as soon as they are accepted, as a partition that answers with resets would. Heal:
new connections are forwarded again; the relays reconnect by themselves. Hold: the connections
stay up but nothing more crosses, as behind a node too loaded to forward (release() or cut()).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

logger = logging.getLogger(__name__)


class LinkProxy:
    """127.0.0.1:port forwarded to 127.0.0.1:target, in this process's event loop."""

    def __init__(self, port: int, target: int) -> None:
        self.port = port
        self.target = target
        self.cut_now = False
        self.cuts = 0
        self.turned_away = 0  # connections closed on arrival while cut
        self._server: asyncio.Server | None = None
        self._pairs: set[asyncio.Task[None]] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()

    async def start(self) -> LinkProxy:
        """Listen."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut_now:
            self.turned_away += 1
            writer.transport.abort()
            return
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        self._pairs.add(task)
        try:
            await asyncio.gather(
                _pipe(reader, upstream_writer, self._flowing), _pipe(upstream_reader, writer, self._flowing)
            )
        except asyncio.CancelledError:
            pass
        finally:
            self._pairs.discard(task)
            for end in (writer, upstream_writer):
                end.transport.abort()

    def hold(self) -> None:
        """Keep the connections open but forward nothing more until release() or cut()."""
        self._flowing.clear()

    def release(self) -> None:
        """Forward again what was held, and what follows."""
        self._flowing.set()

    def cut(self) -> None:
        """Close every connection through the proxy (dropping what it held) and refuse new ones
        until heal()."""
        self.cut_now = True
        self._flowing.set()
        self.cuts += 1
        for task in list(self._pairs):
            task.cancel()

    def heal(self) -> None:
        """Forward new connections again."""
        self.cut_now = False

    def close(self) -> None:
        """Stop listening and close every connection."""
        self.cut()
        if self._server is not None:
            self._server.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, flowing: asyncio.Event) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while data := await reader.read(65536):
            await flowing.wait()
            writer.write(data)
            await writer.drain()
    writer.transport.abort()
