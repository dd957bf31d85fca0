"""500 SSE clients come and go: nothing they held stays behind in Redis or in the server."""

from __future__ import annotations

import asyncio
import contextlib
import time

import httpx
import psutil
import pytest
from redis.asyncio import Redis

from tests.client import emit_to, redis_at
from tests.servers import PROCESS_CONNECTIONS, DaphneNode
from tests.sse import SseStream, open_sse
from tests.waiting import eventually

pytestmark = pytest.mark.slow

CLIENTS = 500
GROUPS = 50


async def process_stats(redis: Redis, server: DaphneNode, newer_than: float, timeout: float = 10.0) -> dict:
    """The server's own figures (stats.py), from a heartbeat written after newer_than."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        async for key in redis.scan_iter(match="asgi:process-stats:*"):
            stats = {k.decode(): v.decode() for k, v in (await redis.hgetall(key)).items()}
            if stats.get("pid") == str(server.pid) and float(stats["updated"]) > newer_than:
                return stats
        await asyncio.sleep(0.2)
    raise AssertionError(f"no fresh figures from daphne pid {server.pid}")


async def redis_state(redis: Redis, groups: list[str], server: DaphneNode) -> tuple[int, int, int, int]:
    """(Redis clients other than the server's and ours, the server's connections, group members,
    pub/sub channels) of the node's own Redis."""
    clients = (await redis.info("clients"))["connected_clients"]
    port = redis.connection_pool.connection_kwargs["port"]
    own = sum(
        1
        for conn in psutil.Process(server.pid).net_connections(kind="tcp")
        if conn.raddr and conn.raddr.port == port and conn.status == psutil.CONN_ESTABLISHED
    )
    members = sum([await redis.zcard(f"asgi:group:{group}") for group in groups])
    channels = len(await redis.pubsub_channels())
    return clients - own - 1, own, members, channels


async def connect_many(server: DaphneNode, groups: list[str], headers: dict, stack, http) -> list[SseStream]:
    async def one(n: int) -> SseStream:
        stream = await stack.enter_async_context(
            open_sse(server.http_url, groups[n % GROUPS], headers=headers, client=http)
        )
        await stream.wait_ready(30)
        return stream

    return await asyncio.gather(*(one(n) for n in range(CLIENTS)))


async def test_500_streams_leave_nothing_behind_within_two_seconds(daphne_factory, token, own_redis):
    # One user's 500 streams: past the per-user limit (100, test_connlimit.py), raised for this load.
    server = daphne_factory({"REDIS_URL": own_redis.url, "AWX_WS_MAX_CONNECTIONS_PER_USER": "1000"})
    headers = {"Authorization": f"Token {token}"}
    groups = [f"schedules-sseload{n}x{time.monotonic_ns()}" for n in range(GROUPS)]
    redis = redis_at(own_redis.url)
    limits = httpx.Limits(max_connections=CLIENTS + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(30.0, read=None)) as http:
        # A first round warms the server up (its connection pool, the fan-out's tasks)...
        async with contextlib.AsyncExitStack() as stack:
            streams = await connect_many(server, groups, headers, stack, http)
            await emit_to(own_redis.url, groups[3], {"warm": "up"})
            assert await streams[3].payloads(1) == [{"warm": "up"}]

        async def idle() -> dict | None:
            # The server's figures once it has let the warm-up's streams go (written every 2 s).
            stats = await process_stats(redis, server, time.time())
            return stats if (stats["streams"], stats["groups"]) == ("0", "0") else None

        baseline = await eventually(idle, 15, "the server to release the warm-up's 500 streams")

        # ...the second is measured.
        async with contextlib.AsyncExitStack() as stack:
            streams = await connect_many(server, groups, headers, stack, http)
            busy = await process_stats(redis, server, time.time())
            assert (busy["streams"], busy["groups"]) == (str(CLIENTS), str(GROUPS))
            await emit_to(own_redis.url, groups[7], {"to": "group 7"})
            receivers = [stream for n, stream in enumerate(streams) if n % GROUPS == 7]
            assert [await stream.payloads(1) for stream in receivers] == [[{"to": "group 7"}]] * 10
        closed = time.time()

    # Released while nothing is being sent: within 2 s Redis holds nothing of the streams: no other
    # client, no membership, no pub/sub channel, and no more than the process's fixed connections.
    def released(state: tuple[int, int, int, int]) -> bool:
        others, own, members, channels = state
        return (others, members, channels) == (0, 0, 0) and own <= PROCESS_CONNECTIONS

    deadline = time.monotonic() + 2.0
    while not released(await redis_state(redis, groups, server)) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    state = await redis_state(redis, groups, server)
    assert released(state), state
    after = await process_stats(redis, server, closed + 2.0)
    assert (after["streams"], after["groups"], after["tasks"]) == ("0", "0", baseline["tasks"])
    await redis.aclose()
