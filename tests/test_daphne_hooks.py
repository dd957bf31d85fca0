"""What we rely on in other packages' private parts fails here, loudly, when it moves.

daphne_hooks.py finds a connection's protocol from the `send` daphne gives the application, and
layers.py names group keys as channels_redis does. A daphne or channels_redis release that
changes either breaks these tests before it breaks slow-client cut-offs or the fan-out.
"""

from __future__ import annotations

import asyncio
from typing import Any

from awx_ws.main import daphne_hooks
from awx_ws.main.layers import RedisChannelLayer
from tests.client import redis_at


async def sends_daphne_gives(**server_options: Any) -> tuple[Any, Any]:
    """(the protocol, the send callable) of one application instance made by daphne's Server."""
    from daphne.server import Server

    received: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    async def application(scope: Any, receive: Any, send: Any) -> None:
        received.set_result(send)

    # Never run: only its create_application is called, as daphne calls it for a new connection.
    server = Server(application=application, endpoints=["tcp:port=0:interface=127.0.0.1"], **server_options)
    protocol = object()
    server.connections = {protocol: {}}
    server.create_application(protocol, {"type": "websocket"})
    return protocol, await asyncio.wait_for(received, 5)


async def test_the_protocol_behind_daphnes_send_is_found():
    protocol, send = await sends_daphne_gives()
    assert daphne_hooks.connection_protocol(send) is protocol


async def test_daphnes_websocket_timeout_is_read_from_its_server():
    _protocol, send = await sends_daphne_gives()
    assert daphne_hooks.websocket_timeout(send) == 86400  # daphne's default: a daily cut-off
    _protocol, send = await sends_daphne_gives(websocket_timeout=-1)
    assert daphne_hooks.websocket_timeout(send) is None


async def test_other_servers_sends_are_left_alone():
    async def send(message: Any) -> None:
        pass

    assert daphne_hooks.connection_protocol(send) is None
    assert daphne_hooks.websocket_timeout(send) is None


async def test_group_keys_are_named_as_channels_redis_names_them(redis_server):
    layer = RedisChannelLayer(hosts=[{"address": redis_server.url}])
    redis = redis_at(redis_server.url)
    try:
        await layer.group_add("jobs-keyformat", "specific.0123!x")
        assert layer.group_key("jobs-keyformat") == "asgi:group:jobs-keyformat"
        assert await redis.zrange(layer.group_key("jobs-keyformat"), 0, -1) == [b"specific.0123!x"]
        await layer.group_discard("jobs-keyformat", "specific.0123!x")
    finally:
        await layer.close_pools()


def test_daphnes_access_log_leaves_credentials_out():
    import datetime
    import io

    from daphne.access import AccessLogGenerator

    assert daphne_hooks.redact_access_log()  # apps.py did it already; doing it again is harmless
    assert daphne_hooks.redact_access_log()
    stream = io.StringIO()
    log = AccessLogGenerator(stream)
    details = {"client": "127.0.0.1:5", "method": "GET", "status": 200, "size": 1}
    log("http", "complete", {**details, "path": "/api/v2/stream/?groups=jobs-status_changed&token=s3cret"})
    log("websocket", "connecting", {**details, "path": "/websocket/?token=s3cret"})
    log.write_entry("h", datetime.datetime.now(), "GET /x?token=s3cret")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3 and "s3cret" not in stream.getvalue()
    assert '"GET /api/v2/stream/?groups=jobs-status_changed&token=[redacted]" 200 1' in lines[0]
