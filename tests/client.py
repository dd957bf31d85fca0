"""A small websocket test client speaking AWX's protocol, on top of the websockets package."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

# What a test opened and has not closed yet: conftest closes it after the test, inside the test's
# event loop, so a failing test leaves no socket behind for the garbage collector (which would
# warn "unclosed transport" or "loop is closed" in whatever test runs next, or at exit).
LEFT_OPEN: list[Any] = []


class WsClient:
    """One open websocket to /websocket/ after the server's accept frame."""

    def __init__(self, ws: ClientConnection, hello: dict[str, Any]):
        self.ws = ws
        self.hello = hello
        self.xrftoken: str | None = None
        LEFT_OPEN.append(self)

    async def send_json(self, data: Any) -> None:
        await self.ws.send(json.dumps(data))

    async def recv_json(self, timeout: float = 5.0) -> Any:
        return json.loads(await asyncio.wait_for(self.ws.recv(), timeout))

    async def subscribe(self, groups: dict[str, Any], **extra: Any) -> tuple[list[str], dict]:
        """Send a groups request; return (error texts before the reply, the groups reply)."""
        frame = {"groups": groups, "xrftoken": self.xrftoken, **extra}
        await self.send_json(frame)
        errors = []
        while True:
            message = await self.recv_json()
            if "groups_current" in message:
                return errors, message
            assert set(message) == {"error"}, message
            errors.append(message["error"])

    async def request_error(self, frame: str | bytes) -> str:
        """Send a raw frame that must be refused; return the error text."""
        await self.ws.send(frame)
        reply = await self.recv_json()
        assert set(reply) == {"error"}, reply
        return reply["error"]

    async def assert_silent(self, seconds: float = 0.3) -> None:
        """Nothing arrives for a while."""
        try:
            message = await asyncio.wait_for(self.ws.recv(), seconds)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected frame {message!r}")

    async def close(self) -> None:
        await self.ws.close()
        if self in LEFT_OPEN:
            LEFT_OPEN.remove(self)


def redis_at(url: str) -> Redis:
    """An async Redis client, closed after the test if the test does not close it."""
    client = Redis.from_url(url)
    LEFT_OPEN.append(client)
    return client


async def close_left_open() -> None:
    """Close whatever the test left open (conftest calls this after every test)."""
    while LEFT_OPEN:
        thing = LEFT_OPEN.pop()
        try:
            async with asyncio.timeout(5):
                if isinstance(thing, WsClient):
                    await thing.ws.close()
                else:
                    await thing.aclose()
        except (OSError, TimeoutError, RuntimeError):
            pass  # its server or loop is gone already: nothing left to close cleanly


async def open_ws(
    base_url: str,
    *,
    path: str = "/websocket/",
    headers: dict[str, str] | None = None,
    origin: str | None = None,
    compression: str | None = "deflate",
) -> WsClient:
    """Connect and read the accept frame; raises InvalidStatus when the handshake is refused.
    compression=None offers no permessage-deflate (uvicorn and hypercorn accept it, daphne not)."""
    ws = await connect(
        base_url + path,
        additional_headers=headers or {},
        origin=origin,  # type: ignore[arg-type]
        open_timeout=10,
        max_size=2**24,
        compression=compression,
    )
    hello = json.loads(await asyncio.wait_for(ws.recv(), 5))
    return WsClient(ws, hello)


async def refused_status(base_url: str, **kwargs: Any) -> int:
    """The HTTP status of a handshake that must be refused."""
    try:
        client = await open_ws(base_url, **kwargs)
    except InvalidStatus as exc:
        return exc.response.status_code
    await client.close()
    raise AssertionError("the handshake was accepted")


async def emit_to(redis_url: str, group: str, payload: Any, share: str | None = None) -> None:
    """Emit into a Redis other than the session's (a node with a Redis of its own)."""
    from awx_ws.main.emit import build_message
    from awx_ws.main.layers import RedisChannelLayer

    layer = RedisChannelLayer(hosts=[{"address": redis_url}])
    try:
        await layer.group_send(group, build_message(group, payload, share))
    finally:
        await layer.close_pools()


async def watch(redis_url: str, *groups: str) -> None:
    """Give each group a member, as a Channels consumer's group_add does: someone could resume
    them, so their history is kept (an emit to a group nobody watches keeps none)."""
    from awx_ws.main.layers import RedisChannelLayer

    layer = RedisChannelLayer(hosts=[{"address": redis_url}])
    try:
        channel = await layer.new_channel()
        for group in groups:
            await layer.group_add(group, channel)
    finally:
        await layer.close_pools()


async def open_peer_socket(url: str, peer: str, secret: str, node: str = "tests") -> ClientConnection:
    """A relay's socket to url with a header signed for peer (the node's BROADCAST_WEBSOCKET_SELF),
    after the node's proof that it holds the secret (checked: the relay drops a node without it)."""
    from awx_ws.main import peerauth

    credentials = peerauth.sign(secret, peer)
    ws = await connect(url, additional_headers=credentials.headers(node), open_timeout=10, max_size=2**24)
    LEFT_OPEN.append(_Closing(ws))
    peerauth.check_proof(secret, credentials, json.loads(await asyncio.wait_for(ws.recv(), 5)).get("proof"))
    return ws


class _Closing:
    """A ClientConnection as close_left_open closes things."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    async def aclose(self) -> None:
        await self.ws.close()
