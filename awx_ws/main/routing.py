"""AWXProtocolTypeRouter (start-up purge at ASGI lifespan) and the websocket URL patterns."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from channels.layers import get_channel_layer
from channels.routing import ProtocolTypeRouter, URLRouter
from channels.security.websocket import WebsocketDenier
from django.urls import re_path
from redis.exceptions import RedisError

from awx_ws.main import metrics
from awx_ws.main.auth import PeerAuthMiddleware, WebsocketAuthStack
from awx_ws.main.conf import ws_settings
from awx_ws.main.consumers import BroadcastConsumer, EventConsumer
from awx_ws.main.exceptions import RedisUnavailable, StartupError
from awx_ws.main.layers import RedisChannelLayer
from awx_ws.main.liveness import purge_stale_state
from awx_ws.main.rabbitmq import RabbitmqChannelLayer
from awx_ws.main.sse import EventStreamStack

logger = logging.getLogger(__name__)

# Anchored both ends: /websocket/foo or /xwebsocket/ must not reach the consumer. Any other
# path is refused at the handshake (403) instead of URLRouter's "No route found" exception.
websocket_urlpatterns = [
    re_path(r"^websocket/$", EventConsumer.as_asgi()),
    re_path(r"^api/websocket/$", EventConsumer.as_asgi()),
    re_path(r"", WebsocketDenier.as_asgi()),
]


def websocket_application() -> Any:
    """Peers' relays (HMAC) on /websocket/broadcast/; clients (token or session) everywhere else."""
    return URLRouter(
        [
            re_path(r"^websocket/broadcast/$", PeerAuthMiddleware(BroadcastConsumer.as_asgi())),
            re_path(r"", WebsocketAuthStack(URLRouter(websocket_urlpatterns))),
        ]
    )


def http_application(django_app: Any) -> Any:
    """The SSE stream (long-lived, served here) at /api/v2/stream/; everything else to Django."""
    return URLRouter(
        [
            re_path(r"^api/v2/stream/$", EventStreamStack()),
            re_path(r"", django_app),
        ]
    )


class AWXProtocolTypeRouter(ProtocolTypeRouter):
    """ProtocolTypeRouter that clears channel-layer state of dead processes when the server starts.

    It runs on the ASGI lifespan startup event (awx_ws.server sends it for daphne), not at import,
    and never touches state of live processes sharing the Redis (see liveness.py).
    """

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        """Route lifespan to ourselves, everything else by protocol type."""
        if scope["type"] == "lifespan":
            return await self.lifespan(receive, send)
        return await super().__call__(scope, receive, send)

    async def lifespan(self, receive: Any, send: Any) -> None:
        """Answer the ASGI lifespan protocol."""
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except StartupError as exc:
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def startup(self) -> None:
        """Mark this process live, then purge state of dead ones; wait a bounded time for Redis."""
        layer = get_channel_layer()
        if isinstance(layer, RabbitmqChannelLayer):
            return await self._startup_rabbitmq(layer)
        if not isinstance(layer, RedisChannelLayer):
            raise StartupError(f"CHANNEL_LAYERS names {type(layer).__name__}: use CHANNEL_LAYER_BACKEND")
        wait = ws_settings.STARTUP_REDIS_WAIT
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        delay = 0.25
        attempts = 0
        while True:
            attempts += 1
            try:
                try:
                    await layer.liveness.start()
                except (RedisError, OSError) as exc:
                    raise RedisUnavailable(f"{layer.describe_hosts()}: {exc}") from exc
                report = await purge_stale_state(layer)
                break
            except RedisUnavailable as exc:
                if loop.time() + delay > deadline:
                    # One clear message and a bounded wait instead of a crash loop (AWX #8696).
                    raise StartupError(
                        f"Redis unreachable for {wait:g}s (AWX_WS_STARTUP_REDIS_WAIT), "
                        f"{attempts} attempts: {exc}"
                    ) from exc
                if attempts == 1:
                    logger.warning("waiting up to %gs for Redis: %s", wait, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        metrics.PURGED.labels("memberships").inc(report.memberships)
        metrics.PURGED.labels("queues").inc(report.queues)
        metrics.PURGED.labels("records").inc(report.records)
        logger.info(
            "start-up purge: removed %d group memberships, %d message queues, %d records "
            "of %d dead processes",
            report.memberships,
            report.queues,
            report.records,
            len(report.dead_processes),
        )

    async def _startup_rabbitmq(self, layer: RabbitmqChannelLayer) -> None:
        """Wait (bounded) for the broker; there is nothing to purge, which is logged and counted."""
        wait = ws_settings.STARTUP_REDIS_WAIT
        try:
            await asyncio.wait_for(asyncio.shield(layer.carehare_connection), wait)
        except TimeoutError as exc:
            raise StartupError(
                f"RabbitMQ unreachable for {wait:g}s (AWX_WS_STARTUP_REDIS_WAIT) at {layer.describe_hosts()}"
            ) from exc
        metrics.PURGE_SKIPPED.inc()
        # Each process's queue is exclusive: RabbitMQ deletes it, and its bindings, when the
        # process's connection goes, so a killed daphne leaves nothing behind to remove.
        logger.info(
            "start-up purge skipped: the RabbitMQ layer keeps no state outside live connections (%s)",
            layer.describe_hosts(),
        )

    async def shutdown(self) -> None:
        """Withdraw this process's liveness record (Redis) or close its broker connection (RabbitMQ)."""
        layer = get_channel_layer()
        if isinstance(layer, RedisChannelLayer):
            await layer.liveness.stop()
        elif isinstance(layer, RabbitmqChannelLayer):
            await layer.close()
