"""Chromium's own EventSource against the stream: it reconnects by itself after the server
drops it, sends Last-Event-ID, and the page sees every message exactly once."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import pytest
from redis.asyncio import Redis

from awx_ws.main.emit import aemit_channel_notification
from tests.client import redis_at
from tests.factories import adb, session_cookie
from tests.servers import DaphneNode, Nginx
from tests.waiting import eventually

pytestmark = [pytest.mark.usefixtures("shared_db"), pytest.mark.slow, pytest.mark.both_runners]

PAGE_SCRIPT = """
(group) => {
    window.received = [];
    window.opens = 0;
    const source = new EventSource("/api/v2/stream/?groups=" + group);
    source.onopen = () => { window.opens += 1; };
    source.onmessage = (event) => { window.received.push(JSON.parse(event.data).n); };
}
"""


async def stream_holder(redis: Redis, servers: list[DaphneNode]) -> DaphneNode:
    """The daphne process whose figures (stats.py) show the browser's stream."""
    pids = {server.pid: server for server in servers}
    for _ in range(100):
        async for key in redis.scan_iter(match="asgi:process-stats:*"):
            stats = await redis.hgetall(key)
            if stats.get(b"streams") == b"1" and int(stats[b"pid"]) in pids:
                return pids[int(stats[b"pid"])]
        await asyncio.sleep(0.1)
    raise AssertionError("no daphne reports the browser's stream")


async def page_state(page: Any) -> tuple[list[int], int]:
    return await page.evaluate("[window.received, window.opens]")


async def test_chromium_event_source_resumes_after_the_server_drops_it(
    browser, daphne_factory, api, user, redis_server, state_dir
):
    servers = [daphne_factory(), daphne_factory()]
    nginx = Nginx(state_dir / f"nginx-browser-{os.getpid()}", [s.port for s in servers], api.port).start()
    redis = redis_at(redis_server.url)
    group = f"schedules-browser{time.monotonic_ns()}"
    try:
        context = await browser.new_context()
        cookie = await adb(session_cookie, user)
        await context.add_cookies([{"name": "awx_sessionid", "value": cookie, "url": nginx.http_url}])
        page = await context.new_page()
        await page.goto(f"{nginx.http_url}/api/v2/")
        await page.evaluate(PAGE_SCRIPT, group)
        # Subscribed: the serving process's fan-out is in the group. Until then a message would
        # be lost to a page that never asked for it: the wait must succeed, however slow Chromium
        # is to open the page and its EventSource on a loaded machine.
        await eventually(
            lambda: redis.zcard(f"asgi:group:{group}"), 30, "the browser's stream to join the group"
        )

        for n in range(30):
            await aemit_channel_notification(group, {"n": n})
        holder = await stream_holder(redis, servers)

        async def shown_30() -> bool:
            return len((await page_state(page))[0]) >= 30

        try:
            await eventually(shown_30, 20, "the page to show the first 30 messages")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: [received, opens] = {await page_state(page)}") from None
        os.kill(holder.pid, signal.SIGKILL)  # the stream drops mid-way
        for n in range(30, 100):  # ...while messages keep coming
            await aemit_channel_notification(group, {"n": n})
            await asyncio.sleep(0.01)  # pacing, the point: a producer that goes on across the drop

        deadline = time.monotonic() + 20
        received, opens = await page_state(page)
        while len(received) < 100 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            received, opens = await page_state(page)
        # It did reconnect (to the other daphne, through nginx). Not exact: while nginx still picks
        # the killed upstream, an attempt fails and the browser opens again (its own retry timing).
        assert opens >= 2
        assert received == list(range(100))  # no gap, no duplicate, in order
        await context.close()
    finally:
        await redis.aclose()
        nginx.stop()
