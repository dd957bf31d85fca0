"""Fan-out to many concurrent clients on one daphne (guards the redis-py pool exhaustion seen
with channels_redis 4.3.0 and redis-py 8.1.0 at 100 consumers)."""

from __future__ import annotations

import asyncio

import pytest

from awx_ws.main.emit import aemit_channel_notification
from tests.client import open_ws

pytestmark = pytest.mark.both_runners

CLIENTS = 200
MESSAGES = 5


async def test_200_concurrent_clients_all_receive_every_fan_out_message(daphne_factory, token):
    # One user's 200 sockets: past the per-user limit (100, test_connlimit.py), raised for this load.
    server = daphne_factory({"AWX_WS_MAX_CONNECTIONS_PER_USER": "1000"})
    headers = {"Authorization": f"Token {token}"}
    clients = await asyncio.gather(*(open_ws(server.url, headers=headers) for _ in range(CLIENTS)))
    try:
        replies = await asyncio.gather(*(c.subscribe({"jobs": ["status_changed"]}) for c in clients))
        assert all(reply["groups_current"] == ["jobs-status_changed"] for _, reply in replies)
        for n in range(MESSAGES):
            await aemit_channel_notification("jobs-status_changed", {"n": n})

        async def receive_all(client) -> list[int]:
            return [(await client.recv_json(timeout=30))["n"] for _ in range(MESSAGES)]

        received = await asyncio.wait_for(asyncio.gather(*(receive_all(c) for c in clients)), 90)
        assert received == [list(range(MESSAGES))] * CLIENTS
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    assert "MaxConnectionsError" not in server.output()
    assert "Traceback" not in server.output()
