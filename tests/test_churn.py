"""10,000 connect / subscribe / disconnect cycles leave nothing behind: no group member in Redis,
no extra Redis connection, and daphne's memory where it was."""

from __future__ import annotations

import asyncio
import time

import psutil
import pytest
from redis.asyncio import Redis

from tests.client import open_ws

pytestmark = pytest.mark.slow

CYCLES = 10_000
CONCURRENCY = 50
GROUPS = 100


async def cycles(url: str, headers: dict[str, str], items: list[str], count: int) -> None:
    queue = iter(range(count))

    async def worker() -> None:
        for n in queue:
            client = await open_ws(url, headers=headers)
            errors, _reply = await client.subscribe(
                {"schedules": [items[n % GROUPS]], "jobs": ["status_changed"]}
            )
            assert errors == []
            await client.close()

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


def redis_connections(pid: int, port: int) -> int:
    return sum(
        1
        for c in psutil.Process(pid).net_connections(kind="tcp")
        if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
    )


async def members(redis: Redis, items: list[str]) -> int:
    return sum([await redis.zcard(f"asgi:group:schedules-{item}") for item in items])


async def test_10000_cycles_leave_no_member_connection_or_memory_behind(daphne_factory, token, redis_server):
    server = daphne_factory()
    headers = {"Authorization": f"Token {token}"}
    items = [f"churn{n}x{time.monotonic_ns()}" for n in range(GROUPS)]
    redis = Redis.from_url(redis_server.url)
    await cycles(server.url, headers, items, 2000)  # warm-up: pools, caches, the allocator
    await asyncio.sleep(1)
    daphne = psutil.Process(server.pid)
    rss_start = daphne.memory_info().rss
    connections_start = redis_connections(server.pid, redis_server.port)

    await cycles(server.url, headers, items, CYCLES)

    for _ in range(50):  # the last disconnects are handled within moments
        if await members(redis, items) == 0:
            break
        await asyncio.sleep(0.1)
    assert await members(redis, items) == 0
    assert redis_connections(server.pid, redis_server.port) == connections_start
    rss_end = daphne.memory_info().rss
    assert rss_end <= rss_start * 1.10, f"RSS {rss_start / 2**20:.1f} -> {rss_end / 2**20:.1f} MiB"
    await redis.aclose()
