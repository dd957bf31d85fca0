"""Run daphne with ASGI lifespan and our defaults: `python -m awx_ws.server [daphne options] APP`.

daphne does not speak the ASGI lifespan protocol, so start-up work (the router's purge of dead
processes' channel-layer state) would have nowhere to run but import time or the first connection.
This Server subclass sends `lifespan.startup` before it listens and `lifespan.shutdown` when the
reactor stops; an application that fails start-up stops the server with one clear message.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from typing import Any

from daphne.cli import CommandLineInterface
from daphne.server import Server as DaphneServer

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


class Server(DaphneServer):
    """daphne's Server plus ASGI lifespan around the reactor's run, and a handle on each socket.

    Websocket scopes get `scope["extensions"]["awx_ws.protocol"]`: daphne's protocol object, so
    the fan-out (awx_ws.main.fanout) can write one prepared frame to many sockets directly.
    """

    def create_application(self, protocol: Any, scope: dict[str, Any]) -> Any:
        """daphne's, plus the protocol handle in websocket scopes."""
        if scope.get("type") == "websocket":
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
