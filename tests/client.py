"""A small websocket test client speaking AWX's protocol, on top of the websockets package."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus


class WsClient:
    """One open websocket to /websocket/ after the server's accept frame."""

    def __init__(self, ws: ClientConnection, hello: dict[str, Any]):
        self.ws = ws
        self.hello = hello
        self.xrftoken: str | None = None

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


async def open_ws(
    base_url: str,
    *,
    path: str = "/websocket/",
    headers: dict[str, str] | None = None,
    origin: str | None = None,
) -> WsClient:
    """Connect and read the accept frame; raises InvalidStatus when the handshake is refused."""
    ws = await connect(
        base_url + path,
        additional_headers=headers or {},
        origin=origin,  # type: ignore[arg-type]
        open_timeout=10,
        max_size=2**24,
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
