"""AWXProtocolTypeRouter (start-up work under any server) and the websocket and HTTP routes."""

from __future__ import annotations

import json
import logging
from typing import Any

from channels.routing import ProtocolTypeRouter, URLRouter
from django.urls import re_path

from awx_ws.main import daphne_hooks, master_watch
from awx_ws.main.auth import PeerAuthMiddleware, WebsocketAuthStack, deny_websocket
from awx_ws.main.backlog import CONNECTION_EXTENSION, Outbox
from awx_ws.main.consumers import EventConsumer
from awx_ws.main.exceptions import StartupError
from awx_ws.main.peer_consumer import BroadcastConsumer
from awx_ws.main.sse import EventStreamStack
from awx_ws.main.startup import Startup

logger = logging.getLogger(__name__)

# Anchored both ends: /websocket/foo or /xwebsocket/ must not reach the consumer. Any other
# path is refused at the handshake (403) instead of URLRouter's "No route found" exception.
websocket_urlpatterns = [
    re_path(r"^websocket/$", EventConsumer.as_asgi()),
    re_path(r"^api/websocket/$", EventConsumer.as_asgi()),
    # URLRouter takes ASGI applications where django-stubs expects Django views.
    re_path(r"", deny_websocket),  # type: ignore[arg-type]
]


def websocket_application() -> Any:
    """Peers' relays (HMAC) on /websocket/broadcast/; clients (token or session) everywhere else."""
    return URLRouter(
        [
            re_path(r"^websocket/broadcast/$", PeerAuthMiddleware(BroadcastConsumer.as_asgi())),
            re_path(r"", WebsocketAuthStack(URLRouter(websocket_urlpatterns))),
        ]
    )


# The SSE stream's path: long-lived, served here rather than by Django.
STREAM_PATH = "/api/v2/stream/"


def http_application(django_app: Any) -> Any:
    """The SSE stream (long-lived, served here) at STREAM_PATH; everything else to Django."""
    return URLRouter(
        [
            re_path(r"^api/v2/stream/$", EventStreamStack()),
            re_path(r"", django_app),
        ]
    )


class AWXProtocolTypeRouter(ProtocolTypeRouter):
    """ProtocolTypeRouter that does this process's start-up work (startup.py) under any server.

    It clears channel-layer state of dead processes and starts the fan-out: on the ASGI lifespan
    startup event (awx_ws.server, uvicorn), or when daphne's reactor starts (`start_with_server`,
    for plain `daphne`, which sends no lifespan), and at the latest before the first websocket or
    stream is accepted. Never at import, and never touching state of live processes
    (layers/redis_presence.py).
    """

    def __init__(self, application_mapping: dict[str, Any]) -> None:
        super().__init__(application_mapping)
        self.startup = Startup()
        self._timeout_warned = False

    def start_with_server(self) -> None:
        """Start up when the server starts, and stop when it stops, where lifespan is not sent."""
        daphne_hooks.when_server_runs(self.startup.begin)
        daphne_hooks.before_server_stops(self.startup.stop)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        """Route lifespan to ourselves; hold websockets and streams until start-up is done."""
        if scope["type"] == "lifespan":
            return await self.lifespan(receive, send)
        protocol = daphne_hooks.connection_protocol(send)
        if protocol is not None:
            # The connection's socket, for the slow-client cut-off under any daphne (backlog.py).
            scope = dict(
                scope, extensions={**(scope.get("extensions") or {}), CONNECTION_EXTENSION: protocol}
            )
        elif _client_connection(scope):
            # Another server (uvicorn, hypercorn): its send waits while the client does not read,
            # which would hold up the fan-out; an outbox queues, and cuts off slow readers.
            outbox = Outbox(scope, receive, send)
            try:
                return await self._serve(scope, outbox.receive, outbox.send)
            finally:
                await outbox.finish()
        return await self._serve(scope, receive, send)

    async def _serve(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        if scope["type"] == "websocket":
            self._warn_about_timeout(send)
        if scope["type"] == "websocket" or scope.get("path") == STREAM_PATH:
            if not await self.startup.ready():
                return await _unavailable(scope, receive, send, self.startup.failure)
        return await super().__call__(scope, receive, send)

    def _warn_about_timeout(self, send: Any) -> None:
        if self._timeout_warned:
            return
        self._timeout_warned = True
        timeout = daphne_hooks.websocket_timeout(send)
        if timeout is not None:
            logger.warning(
                "daphne closes every websocket after %gs (--websocket_timeout): clients are cut off "
                "daily; run daphne with --websocket_timeout -1, or python -m awx_ws.server",
                timeout,
            )

    async def lifespan(self, receive: Any, send: Any) -> None:
        """Answer the ASGI lifespan protocol."""
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup.run()
                except StartupError as exc:
                    if master_watch.master() is None:
                        await send({"type": "lifespan.startup.failed", "message": str(exc)})
                        return
                    # A worker under a server's master: stay up and retry (startup.py says why).
                    self.startup.keep_trying(exc)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.startup.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return


def _client_connection(scope: dict[str, Any]) -> bool:
    """A client's websocket or event stream (not a peer's relay link, not a Django request)."""
    if scope["type"] == "websocket":
        return bool(scope.get("path") != "/websocket/broadcast/")
    return bool(scope["type"] == "http" and scope.get("path") == STREAM_PATH)


async def _unavailable(scope: dict[str, Any], receive: Any, send: Any, reason: Exception | None) -> None:
    """Refuse a connection while start-up has not succeeded: websocket 403, HTTP 503."""
    # The reason was logged once, as an ERROR, when start-up failed; daphne logs each refusal.
    logger.debug(
        "refusing a %s connection from %s: not started (%s)", scope["type"], scope.get("client"), reason
    )
    if scope["type"] == "websocket":
        return await deny_websocket(scope, receive, send)
    detail = f"the service cannot reach its channel layer yet: {reason}"
    await send(
        {"type": "http.response.start", "status": 503, "headers": [(b"content-type", b"application/json")]}
    )
    await send({"type": "http.response.body", "body": json.dumps({"detail": detail}).encode()})
