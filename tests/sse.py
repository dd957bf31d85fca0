"""An SSE test client on httpx and httpx-sse: events as a browser's EventSource sees them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
from httpx_sse import EventSource, ServerSentEvent


@dataclass
class SseStream:
    """One open stream; `last_id` follows every `id:` the server sent, as EventSource does."""

    response: httpx.Response
    events: AsyncIterator[ServerSentEvent]
    last_id: str = ""

    async def next_event(self, timeout: float = 5.0) -> ServerSentEvent:
        """The next event a browser would dispatch (id-only and retry-only blocks update last_id)."""
        async with asyncio.timeout(timeout):
            while True:
                event = await anext(self.events)
                if event.id:
                    self.last_id = event.id
                if event.data or event.event != "message":
                    return event

    async def payloads(self, count: int, timeout: float = 10.0) -> list[Any]:
        """The data of the next count message events, parsed."""
        received = []
        for _ in range(count):
            event = await self.next_event(timeout)
            assert event.event == "message", event
            received.append(json.loads(event.data))
        return received

    async def wait_ready(self, timeout: float = 5.0) -> None:
        """Read until the server's first id: the subscription is in place (and any replay sent)."""
        async with asyncio.timeout(timeout):
            while not self.last_id:
                event = await anext(self.events)
                if event.id:
                    self.last_id = event.id
                assert not event.data, f"an event before the stream was ready: {event}"

    async def assert_silent(self, seconds: float = 0.3) -> None:
        """No event arrives for a while."""
        try:
            event = await self.next_event(seconds)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected event {event!r}")


@asynccontextmanager
async def open_sse(
    base_url: str,
    groups: str,
    *,
    headers: dict[str, str] | None = None,
    last_event_id: str | None = None,
    client: httpx.AsyncClient | None = None,
) -> AsyncIterator[SseStream]:
    """GET /api/v2/stream/?groups=...; the response must be a 200 event stream."""
    headers = dict(headers or {})
    if last_event_id:
        headers["Last-Event-ID"] = last_event_id
    own = client is None
    http = client or httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None))
    try:
        request = http.build_request(
            "GET", f"{base_url}/api/v2/stream/", params={"groups": groups}, headers=headers
        )
        response = await http.send(request, stream=True)
        try:
            assert response.status_code == 200, (response.status_code, await response.aread())
            assert response.headers["content-type"].startswith("text/event-stream")
            stream = SseStream(response, EventSource(response).aiter_sse(), last_event_id or "")
            yield stream
        finally:
            await response.aclose()
    finally:
        if own:
            await http.aclose()


async def refused(base_url: str, groups: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """(status, JSON body) of a stream request that must be refused."""
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.get(f"{base_url}/api/v2/stream/", params={"groups": groups}, headers=headers)
    assert response.status_code != 200
    return response.status_code, response.json()
