"""AWX_WS_MAX_CONNECTIONS_PER_USER: a user's websockets and SSE streams on a node, together, past
the limit refused with 403; counted across the node's daphne processes, on Redis and on RabbitMQ;
a killed process's count taken back (Redis: by the next start-up purge; RabbitMQ: once its
heartbeat is stale); the count written again after Redis restarts empty."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from websockets.exceptions import InvalidStatus

from tests.client import WsClient, open_ws, redis_at, refused_status
from tests.conftest import rabbitmq_env
from tests.factories import adb, create_token, create_user
from tests.sse import open_sse

pytestmark = [pytest.mark.usefixtures("shared_db"), pytest.mark.both_runners]

LIMIT = 3


@pytest.fixture
def limited(own_redis) -> dict[str, str]:
    return {"REDIS_URL": own_redis.url, "AWX_WS_MAX_CONNECTIONS_PER_USER": str(LIMIT)}


@pytest.fixture
async def heavy() -> dict[str, str]:
    """A user's token headers."""
    key = await adb(create_token, await adb(create_user))
    return {"Authorization": f"Token {key}"}


async def sse_status(base_url: str, headers: dict[str, str]) -> int:
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.get(
            f"{base_url}/api/v2/stream/", params={"groups": "jobs-status_changed"}, headers=headers
        )
        return response.status_code


async def accepted_again(url: str, headers: dict[str, str], timeout: float = 10.0) -> WsClient:
    """A websocket, once the node has taken back a closed one (bounded retries)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await open_ws(url, headers=headers)
        except InvalidStatus:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def test_past_the_limit_websockets_and_streams_are_refused(daphne_factory, limited, heavy, token):
    node = daphne_factory(limited)
    sockets = [await open_ws(node.url, headers=heavy) for _ in range(LIMIT - 1)]
    async with open_sse(node.http_url, "jobs-status_changed", headers=heavy) as stream:
        await stream.wait_ready()  # websockets and streams count together
        assert await refused_status(node.url, headers=heavy) == 403
        assert await sse_status(node.http_url, heavy) == 403
        assert node.wait_for_output("AWX_WS_MAX_CONNECTIONS_PER_USER (3)")
        # Someone else is not held back.
        other = await open_ws(node.url, headers={"Authorization": f"Token {token}"})
        await other.close()
    # The stream ended: its slot is free again.
    sockets.append(await accepted_again(node.url, heavy))
    assert await refused_status(node.url, headers=heavy) == 403
    await sockets.pop().close()
    sockets.append(await accepted_again(node.url, heavy))
    for ws in sockets:
        await ws.close()


async def test_the_limit_is_per_node_across_its_daphne_processes(daphne_factory, limited, heavy):
    first, second = daphne_factory(limited), daphne_factory(limited)
    sockets = [await open_ws(first.url, headers=heavy) for _ in range(LIMIT - 1)]
    sockets.append(await open_ws(second.url, headers=heavy))
    assert await refused_status(first.url, headers=heavy) == 403
    assert await refused_status(second.url, headers=heavy) == 403
    for ws in sockets:
        await ws.close()


async def test_a_killed_process_gives_its_users_slots_back_at_the_next_start(daphne_factory, limited, heavy):
    doomed = daphne_factory(limited)
    for _ in range(LIMIT):
        await open_ws(doomed.url, headers=heavy)  # left open: the process dies under them
    doomed.kill()  # -9: it takes back nothing itself
    successor = daphne_factory(limited)  # its start-up purge finds the dead process's counts
    assert successor.wait_for_output("start-up purge: removed")
    fresh = [await open_ws(successor.url, headers=heavy) for _ in range(LIMIT)]
    assert await refused_status(successor.url, headers=heavy) == 403
    for ws in fresh:
        await ws.close()


async def test_after_redis_restarts_empty_open_connections_count_again(
    daphne_factory, own_redis, limited, heavy
):
    first, second = daphne_factory(limited), daphne_factory(limited)
    sockets = [await open_ws(first.url, headers=heavy) for _ in range(LIMIT - 1)]
    sockets.append(await open_ws(second.url, headers=heavy))
    own_redis.kill()
    own_redis.start()  # empty: the node's count of the user's open connections is gone
    redis = redis_at(own_redis.url)
    deadline = time.monotonic() + 20
    # Both processes write their share again once their fan-outs find Redis back.
    while [int(n) for n in await redis.hvals("asgi:user-connections")] != [LIMIT]:
        assert time.monotonic() < deadline, "connection counts not written again after the restart"
        await asyncio.sleep(0.1)
    await redis.aclose()
    assert await refused_status(first.url, headers=heavy) == 403
    assert await refused_status(second.url, headers=heavy) == 403
    await sockets.pop().close()  # the one on `second`: a slot is free on the node again
    sockets.append(await accepted_again(first.url, heavy))
    for ws in sockets:
        await ws.close()


@pytest.fixture
def rabbitmq_limited(rabbitmq_server) -> dict[str, str]:
    """Processes of one node on RabbitMQ (a name of their own), which count in the database."""
    return {
        **rabbitmq_env(rabbitmq_server),
        "AWX_WS_MAX_CONNECTIONS_PER_USER": str(LIMIT),
        "AWX_WS_NODE_NAME": f"rabbit{time.monotonic_ns()}",
        "AWX_WS_LIVENESS_TTL": "2",
        "AWX_WS_LIVENESS_INTERVAL": "1",
    }


async def test_on_rabbitmq_the_limit_is_per_node_across_its_daphne_processes(
    daphne_factory, rabbitmq_limited, heavy
):
    first, second = daphne_factory(rabbitmq_limited), daphne_factory(rabbitmq_limited)
    sockets = [await open_ws(first.url, headers=heavy) for _ in range(LIMIT - 1)]
    async with open_sse(second.http_url, "jobs-status_changed", headers=heavy) as stream:
        await stream.wait_ready()
        assert await refused_status(first.url, headers=heavy) == 403
        assert await refused_status(second.url, headers=heavy) == 403
        assert await sse_status(first.http_url, heavy) == 403
    sockets.append(await accepted_again(first.url, heavy))  # the stream's slot, back on the node
    assert await refused_status(second.url, headers=heavy) == 403
    for ws in sockets:
        await ws.close()


async def test_on_rabbitmq_a_killed_process_stops_counting_once_its_heartbeat_is_stale(
    daphne_factory, rabbitmq_limited, heavy
):
    doomed, survivor = daphne_factory(rabbitmq_limited), daphne_factory(rabbitmq_limited)
    for _ in range(LIMIT):
        await open_ws(doomed.url, headers=heavy)  # left open: the process dies under them
    assert await refused_status(survivor.url, headers=heavy) == 403
    doomed.kill()  # -9: it takes back nothing itself
    # Within AWX_WS_LIVENESS_TTL (2 s) of its last heartbeat, its count is no longer the node's.
    fresh = [await accepted_again(survivor.url, heavy, timeout=15)]
    fresh += [await open_ws(survivor.url, headers=heavy) for _ in range(LIMIT - 1)]
    assert await refused_status(survivor.url, headers=heavy) == 403
    for ws in fresh:
        await ws.close()


async def test_on_rabbitmq_processes_racing_for_the_last_slot_admit_one(
    daphne_factory, rabbitmq_limited, heavy
):
    """Counting is serialised per node and user (SQLite's write lock, PostgreSQL's advisory lock):
    handshakes arriving together at two processes cannot all read "one slot left"."""
    env = {**rabbitmq_limited, "AWX_WS_MAX_CONNECTIONS_PER_USER": "1"}
    first, second = daphne_factory(env), daphne_factory(env)

    async def attempt(url: str) -> WsClient | None:
        try:
            return await open_ws(url, headers=heavy)
        except InvalidStatus as exc:
            assert exc.response.status_code == 403
            return None

    outcomes = await asyncio.gather(*(attempt(node.url) for node in (first, second) for _ in range(8)))
    admitted = [ws for ws in outcomes if ws is not None]
    assert len(admitted) == 1
    await admitted[0].close()
