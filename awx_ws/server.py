"""Our runner: daphne with ASGI lifespan, direct socket writes and no daily websocket cut-off.

`python -m awx_ws.server [daphne options] APP` takes daphne's own command line. The application
works under plain `daphne` too (docs/channels.md, "Which runner"); this runner adds:

- ASGI lifespan: start-up work runs before the port opens, and an application that fails it stops
  the server with one clear message (exit 1) instead of serving a half-started process;
- a websocket protocol whose writes try the socket first and which cuts off slow readers itself,
  and a handle on each connection's protocol in the scope, so the fan-out writes one prepared
  frame to many sockets (awx_ws.main.fanout);
- `--websocket_timeout -1` by default (daphne's 86,400 s cut every live stream daily).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from typing import Any

from daphne.cli import CommandLineInterface
from daphne.server import Server as DaphneServer
from daphne.ws_protocol import WebSocketProtocol as DaphneWebSocketProtocol

from awx_ws.main.backlog import SLOW_CLIENT_CLOSE_CODE, SlowReader
from awx_ws.main.exceptions import StartupError

logger = logging.getLogger("awx_ws.server")


class Lifespan:
    """Drives one ASGI lifespan exchange with an application."""

    def __init__(self, application: Any) -> None:
        self.application = application
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.task: asyncio.Task[Any] | None = None
        self.supported = True

    async def _send(self, message: dict[str, Any]) -> None:
        await self.replies.put(message)

    async def _exchange(self, event: str) -> None:
        await self.inbox.put({"type": f"lifespan.{event}"})
        if self.task is None:
            raise RuntimeError("lifespan exchange before startup()")
        get = asyncio.ensure_future(self.replies.get())
        await asyncio.wait({get, self.task}, return_when=asyncio.FIRST_COMPLETED)
        if not get.done():
            get.cancel()
            # The application returned or raised without answering: it does not do lifespan.
            if self.task.exception() is not None:
                logger.info("application has no lifespan support: %r", self.task.exception())
            self.supported = False
            return
        reply = get.result()
        if reply["type"] == f"lifespan.{event}.failed":
            raise StartupError(reply.get("message") or f"application {event} failed")

    async def startup(self) -> None:
        """Send lifespan.startup and wait for the application's answer."""
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}}
        self.task = asyncio.ensure_future(self.application(scope, self.inbox.get, self._send))
        await self._exchange("startup")

    async def shutdown(self) -> None:
        """Send lifespan.shutdown and wait for the application's answer."""
        if self.task is not None and self.supported and not self.task.done():
            await self._exchange("shutdown")


def _idle_plain_transport(transport: Any) -> bool:
    """A connected plain TCP/unix transport with nothing queued and no TLS.

    A registered producer (twisted.web's HTTPChannel registers itself) is fine: Twisted pauses it
    only when its buffer grows, and any bytes the kernel refuses still go through that buffer.
    """
    return (
        getattr(transport, "socket", None) is not None
        and getattr(transport, "TLS", True) is False
        and transport.connected
        and not transport.disconnecting
        and not transport.dataBuffer
        and not transport._tempDataBuffer
    )


class WebSocketProtocol(DaphneWebSocketProtocol):
    """daphne's websocket protocol: writes try the socket first, and slow readers are cut off.

    Twisted queues every write and registers the socket for writability, which costs two
    epoll_ctl calls and selector bookkeeping per write: about 60 % of daphne's CPU in a profile of
    a 1,000-subscriber fan-out (docs/performance.md). With nothing queued, a non-blocking send()
    now is what Twisted would do one loop turn later; whatever the kernel does not take goes to
    Twisted's buffer as before, so order and back-pressure are unchanged.

    That buffer has no bound: a client that stops reading would grow it with every message it is
    sent (channels_redis#212, AWX #7720). Past SLOW_CLIENT_MAX_BYTES or SLOW_CLIENT_MAX_MESSAGES
    waiting, the connection is closed with code 4008; a client that does not read the close frame
    either is aborted when autobahn's close handshake times out, which frees the buffer.
    """

    # Watches this connection's unread backlog (created at the first write).
    _slow_reader: SlowReader | None = None

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        """Send frame bytes (straight to the socket when possible), then check the backlog."""
        self.send_frames(data, 1, sync, chopsize)

    def send_frames(self, data: bytes, count: int, sync: bool = False, chopsize: int | None = None) -> None:
        """Send count whole frames' bytes in one write (awx_ws.main.frames), then check the backlog."""
        self._send(data, sync, chopsize)
        if self.state == self.STATE_OPEN:
            if self._slow_reader is None:
                self._slow_reader = SlowReader(self.transport)
            if self._slow_reader.too_slow(len(data), count):
                # The close frame is a write too: the reader is cut off once, never again.
                self.sendClose(code=SLOW_CLIENT_CLOSE_CODE, reason="slow client: messages not read in time")

    def _send(self, data: bytes, sync: bool, chopsize: int | None) -> None:
        transport = self.transport
        if sync or chopsize or self.send_queue or not _idle_plain_transport(transport):
            super().sendData(data, sync, chopsize)
            return
        try:
            sent = transport.socket.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            # Let Twisted meet the error and close the connection its usual way.
            super().sendData(data, sync, chopsize)
            return
        if sent < len(data):
            transport.write(data[sent:])
        if self.state == self.STATE_OPEN:
            self.trafficStats.outgoingOctetsWireLevel += len(data)
        elif self.state in (self.STATE_CONNECTING, self.STATE_PROXY_CONNECTING):
            self.trafficStats.preopenOutgoingOctetsWireLevel += len(data)
        if self.logOctets:
            self.logTxOctets(data, False)
        return None


class Server(DaphneServer):
    """daphne's Server plus ASGI lifespan around the reactor's run, and a handle on each socket.

    Scopes get `scope["extensions"]["awx_ws.protocol"]`: daphne's protocol object, so the fan-out
    (awx_ws.main.fanout) can write one prepared frame to many websockets directly, and an SSE
    stream can see how much its client has not read yet.
    """

    def create_application(self, protocol: Any, scope: dict[str, Any]) -> Any:
        """daphne's, plus the protocol handle in the scope."""
        if scope.get("type") in ("websocket", "http"):
            scope.setdefault("extensions", {})["awx_ws.protocol"] = protocol
        return super().create_application(protocol, scope)

    def run(self) -> None:
        """Run lifespan start-up on the reactor's loop, then serve until stopped."""
        from twisted.internet import defer, reactor

        loop = reactor._asyncioEventloop  # daphne's own handle
        asyncio.set_event_loop(loop)
        lifespan = Lifespan(self.application)
        try:
            loop.run_until_complete(lifespan.startup())
        except StartupError as exc:
            logger.critical("daphne pid %s cannot start: %s", os.getpid(), exc)
            raise SystemExit(1) from exc
        # daphne builds its websocket factory inside run(); swap our protocol in before any
        # connection is accepted (callWhenRunning fires before the reactor's first I/O).
        reactor.callWhenRunning(lambda: setattr(self.ws_factory, "protocol", WebSocketProtocol))
        reactor.addSystemEventTrigger(
            "before",
            "shutdown",  # type: ignore[arg-type]  # zope interface stub lacks `self`
            lambda: defer.Deferred.fromFuture(asyncio.ensure_future(lifespan.shutdown())),
        )
        super().run()


class CommandLine(CommandLineInterface):
    """daphne's command line with our Server and no daily websocket cut-off."""

    server_class = Server

    def __init__(self) -> None:
        super().__init__()
        # daphne cuts websockets after 86400 s by default, ending live streams daily (AWX PR #3424).
        self.parser.set_defaults(websocket_timeout=-1)


def main(argv: list[str] | None = None) -> None:
    """Entry point: the same options as the daphne command."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    CommandLine().run(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
