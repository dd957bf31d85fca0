"""Faults under load, with real processes: Redis restarted empty, daphne killed, nginx reloaded."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from awx_ws.main.emit import build_message
from awx_ws.main.layers import RedisChannelLayer
from tests.client import WsClient, open_ws
from tests.servers import ROOT, DaphneNode, Nginx, RedisServer, free_port

pytestmark = pytest.mark.slow

CLIENTS = 20


@pytest.fixture
def own_redis(state_dir: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own, to kill and restart."""
    server = RedisServer(free_port(), state_dir / f"faults-redis-{time.monotonic_ns()}").start()
    yield server
    server.stop()


def emit_cli(redis: RedisServer, group: str, payload: Any) -> subprocess.CompletedProcess[str]:
    """`manage.py emit` against redis, as a worker on that node would emit."""
    return subprocess.run(
        [sys.executable, "manage.py", "emit", group, json.dumps(payload)],
        cwd=ROOT,
        env={**os.environ, "REDIS_URL": redis.url, "AWX_WS_EMIT_TIMEOUT": "1"},
        capture_output=True,
        text=True,
        timeout=60,
    )


async def emit(redis: RedisServer, group: str, payload: Any) -> None:
    layer = RedisChannelLayer(hosts=[{"address": redis.url}])
    try:
        await layer.group_send(group, build_message(group, payload))
    finally:
        await layer.close_pools()


async def received(clients: list[WsClient], count: int) -> list[list[Any]]:
    return [[(await c.recv_json(10))["n"] for _ in range(count)] for c in clients]


async def test_redis_restarted_empty_under_load_loses_no_client(own_redis, state_dir, token):
    server = DaphneNode(state_dir / "logs", {"REDIS_URL": own_redis.url}).start()
    try:
        group = f"schedules-redisrestart{time.monotonic_ns()}"
        clients = [
            await open_ws(server.url, headers={"Authorization": f"Token {token}"}) for _ in range(CLIENTS)
        ]
        for client in clients:
            await client.subscribe({"schedules": [group.split("-", 1)[1]]})
        for n in range(20):
            await emit(own_redis, group, {"n": n})
        assert await received(clients, 20) == [list(range(20))] * CLIENTS

        own_redis.kill()
        # Emits while Redis is down fail with our error, naming the setting, and return.
        failed = emit_cli(own_redis, group, {"n": "lost"})
        assert failed.returncode != 0
        assert f"REDIS_URL={own_redis.url}" in failed.stderr
        own_redis.start()  # empty: every membership and interest set is gone

        # daphne stayed up, the clients stayed connected, and the fan-out joins its groups again:
        # probe until one arrives (a message reaches every client of the process, or none).
        assert server.proc is not None and server.proc.poll() is None
        for probe in range(100):
            await emit(own_redis, group, {"n": f"probe {probe}"})
            try:
                await clients[0].recv_json(0.2)
                break
            except TimeoutError:
                continue
        for n in range(20, 60):
            await emit(own_redis, group, {"n": n})
        # Delivery is complete again.
        for client in clients:
            got: list[int] = []
            while len(got) < 40:
                frame = await client.recv_json(10)
                if isinstance(frame["n"], int):
                    got.append(frame["n"])
            assert got == list(range(20, 60))
        assert server.wait_for_output("rejoined 1 groups in Redis")
        for client in clients:
            await client.close()
    finally:
        server.stop()


async def test_daphne_killed_and_restarted_clients_resume_without_loss(state_dir, token, redis_server):
    from awx_ws.main.emit import aemit_channel_notification

    port = free_port()
    server = DaphneNode(state_dir / "logs", port=port).start()
    headers = {"Authorization": f"Token {token}"}
    item = f"killed{time.monotonic_ns()}"
    group = f"schedules-{item}"
    try:
        clients = [await open_ws(server.url, headers=headers) for _ in range(5)]
        for client in clients:
            await client.subscribe({"schedules": [item]}, ids=True)
        for n in range(10):
            await aemit_channel_notification(group, {"n": n})
        last_ids = []
        for client in clients:
            frames = [await client.recv_json() for _ in range(10)]
            assert [f["data"]["n"] for f in frames] == list(range(10))
            last_ids.append(frames[-1]["id"])

        os.kill(server.pid, signal.SIGKILL)
        server.proc.wait(10)  # type: ignore[union-attr]
        for n in range(10, 30):  # emitted while the server is down
            await aemit_channel_notification(group, {"n": n})
        server.start()
        # The dead process's membership was purged at start, not left to collect messages.
        assert server.wait_for_output("start-up purge: removed 1 group memberships")

        for last_id in last_ids:
            client = await open_ws(server.url, headers=headers)
            errors, _reply = await client.subscribe({"schedules": [item]}, recover={group: last_id})
            assert errors == []
            replayed = [(await client.recv_json())["data"]["n"] for _ in range(20)]
            assert replayed == list(range(10, 30))
            assert (await client.recv_json())["recovered"] == {group: 20}
            await client.close()
    finally:
        server.stop()


async def test_nginx_reloaded_with_sockets_open_keeps_them(state_dir, node, api, token):
    from awx_ws.main.emit import aemit_channel_notification

    front = Nginx(state_dir / f"nginx-reload-{time.monotonic_ns()}", node.port, api.port).start()
    headers = {"Authorization": f"Token {token}"}
    item = f"reload{time.monotonic_ns()}"
    try:
        before = await open_ws(f"ws://127.0.0.1:{front.port}", headers=headers)
        await before.subscribe({"schedules": [item]})
        os.kill(front.pid, signal.SIGHUP)  # nginx -s reload
        await asyncio.sleep(1)  # new workers take new connections; the old one keeps its own
        after = await open_ws(f"ws://127.0.0.1:{front.port}", headers=headers)
        await after.subscribe({"schedules": [item]})
        await aemit_channel_notification(f"schedules-{item}", {"n": 1})
        # The old worker keeps serving the socket it holds until that socket closes.
        assert await before.recv_json() == {"n": 1}
        assert await after.recv_json() == {"n": 1}
        await before.close()
        await after.close()
    finally:
        front.stop()


async def test_a_nodes_redis_restarted_empty_the_relay_recovers_both_ways(state_dir, token, database):
    from tests.test_cluster import make_nodes
    from tests.test_cluster_recovery import wait_connected

    a, b = make_nodes(state_dir, [f"redisA{time.monotonic_ns()}", f"redisB{time.monotonic_ns()}"])
    for node in (a, b):
        node.start()
    try:
        wait_connected(a, b)
        wait_connected(b, a)
        headers = {"Authorization": f"Token {token}"}
        item = f"relayredis{time.monotonic_ns()}"
        group = f"schedules-{item}"
        on_a, on_b = await open_ws(a.url, headers=headers), await open_ws(b.url, headers=headers)
        await on_a.subscribe({"schedules": [item]})
        await on_b.subscribe({"schedules": [item]})

        async def crosses(emitter: Any, receiver: WsClient, label: str) -> None:
            """Emit probes on emitter until receiver gets one of them (bounded)."""
            for probe in range(150):
                await emitter.emit(group, {"n": f"{label} {probe}"})
                try:
                    while not str((await receiver.recv_json(0.2))["n"]).startswith(label):
                        pass  # an earlier probe, or one of the other direction
                    return
                except TimeoutError:
                    continue
            raise AssertionError(f"{label}: nothing crossed in 30 s")

        await crosses(a, on_b, "a->b before")
        await crosses(b, on_a, "b->a before")

        a.redis.kill()
        a.redis.start()  # empty: A's memberships, interest and its relay's state are gone

        await crosses(b, on_a, "b->a after")  # A's fan-out rejoined; A's relay reads B again
        await crosses(a, on_b, "a->b after")  # B's relay reconnected to A and asked again
        assert a.daphne is not None and a.daphne.proc is not None and a.daphne.proc.poll() is None

        for n in range(10):
            await a.emit(group, {"n": n})
            await b.emit(group, {"n": 100 + n})
        # Each client: its own node's 10 and the other node's 10, each once (order across nodes free).
        for client in (on_a, on_b):
            got: list[int] = []
            while len(got) < 20:
                frame = await client.recv_json(10)
                if isinstance(frame["n"], int):
                    got.append(frame["n"])
            assert sorted(got) == list(range(10)) + list(range(100, 110))
            await client.assert_silent(0.5)
        await on_a.close()
        await on_b.close()
    finally:
        for node in (a, b):
            node.stop()
            node.redis.stop()
