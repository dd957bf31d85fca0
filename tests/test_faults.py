"""Faults under load, with real processes: Redis restarted empty, daphne killed, nginx reloaded."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from awx_ws.main.emit import build_message
from awx_ws.main.layers import RedisChannelLayer
from tests.client import WsClient, open_ws, redis_at
from tests.servers import ROOT, DaphneNode, Nginx, RedisServer, free_port
from tests.waiting import eventually

pytestmark = [pytest.mark.slow, pytest.mark.both_runners]

CLIENTS = 20


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


async def test_redis_restarted_empty_under_load_loses_no_client(own_redis, state_dir, token, runner):
    server = DaphneNode(state_dir / "logs", {"REDIS_URL": own_redis.url}, runner=runner).start()
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


async def test_daphne_killed_and_restarted_clients_resume_without_loss(
    state_dir, token, redis_server, runner
):
    from awx_ws.main.emit import aemit_channel_notification

    port = free_port()
    server = DaphneNode(state_dir / "logs", port=port, runner=runner).start()
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


def title(process: psutil.Process) -> str:
    """A process's title (nginx sets its workers' own), or "" once it has exited."""
    try:
        return " ".join(process.cmdline())
    except psutil.NoSuchProcess:
        return ""


async def test_nginx_reloaded_with_sockets_open_keeps_them(state_dir, node, api, token):
    from awx_ws.main.emit import aemit_channel_notification

    front = Nginx(state_dir / f"nginx-reload-{time.monotonic_ns()}", node.port, api.port).start()
    headers = {"Authorization": f"Token {token}"}
    item = f"reload{time.monotonic_ns()}"
    try:
        before = await open_ws(f"ws://127.0.0.1:{front.port}", headers=headers)
        await before.subscribe({"schedules": [item]})
        master = psutil.Process(front.pid)
        old_workers = {worker.pid for worker in master.children()}
        os.kill(front.pid, signal.SIGHUP)  # nginx -s reload

        def reloaded() -> bool:
            # New workers take new connections; the old one keeps its own, shutting down.
            workers = master.children()
            shutting_down = [
                w for w in workers if w.pid in old_workers and "shutting down" in " ".join(w.cmdline())
            ]
            return bool(shutting_down) and any(w.pid not in old_workers for w in workers)

        await eventually(reloaded, 10, "nginx to start new workers, the old one shutting down")
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


async def test_a_nodes_redis_restarted_empty_the_relay_recovers_both_ways(state_dir, token, database, runner):
    from tests.test_cluster import make_nodes, wait_connected

    a, b = make_nodes(
        state_dir, [f"redisA{time.monotonic_ns()}", f"redisB{time.monotonic_ns()}"], runner=runner
    )
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
            # What each side holds, to tell a missing membership from a missing link.
            state = {node.name: (await members_of(node, group), await node.status()) for node in (a, b)}
            raise AssertionError(f"{label}: nothing crossed in 30 s; members and relay status: {state}")

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


async def members_of(node: Any, group: str) -> list[bytes]:
    """The members of group in node's Redis."""
    redis = redis_at(node.redis.url)
    try:
        return list(await redis.zrange(f"asgi:group:{group}", 0, -1))
    finally:
        await redis.aclose()


def failed_rounds(metrics_dir: Path, task: str) -> float:
    """awx_ws_background_failures_total{task} as the node's processes wrote it."""
    from prometheus_client import CollectorRegistry, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(metrics_dir))
    return registry.get_sample_value("awx_ws_background_failures_total", {"task": task}) or 0.0


async def test_delivery_resumes_after_2000_failed_rounds_on_a_process_never_restarted(
    own_redis, daphne_factory, state_dir, token
):
    """An outage far past 1,024 retries (where `0.1 * 2**failures` overflowed): every loop backs
    off (shortened here through settings), keeps trying, and delivers once Redis is back."""
    metrics_dir = state_dir / f"outage-metrics-{time.monotonic_ns()}"  # this node's only
    metrics_dir.mkdir()
    settings = {"AWX_WS_RETRY_DELAY": "0.001", "AWX_WS_RETRY_MAX_DELAY": "0.004"}
    env = {"REDIS_URL": own_redis.url, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), **settings}
    server = daphne_factory(env)
    headers = {"Authorization": f"Token {token}"}
    item = f"outage{time.monotonic_ns()}"
    group = f"schedules-{item}"
    client = await open_ws(server.url, headers=headers)
    await client.subscribe({"schedules": [item]})

    own_redis.stop()
    deadline = time.monotonic() + 120
    loops = ("fanout_receive", "fanout_sync", "liveness")
    while min(failed_rounds(metrics_dir, task) for task in loops) <= 2000:
        assert time.monotonic() < deadline, {task: failed_rounds(metrics_dir, task) for task in loops}
        await asyncio.sleep(0.2)
    assert server.proc is not None and server.proc.poll() is None

    own_redis.start()  # empty: the fan-out must write its memberships again
    redis = redis_at(own_redis.url)
    try:
        deadline = time.monotonic() + 30
        while not await redis.zcard(f"asgi:group:{group}"):
            assert time.monotonic() < deadline, "the fan-out did not rejoin its group"
            await asyncio.sleep(0.05)
        await emit(own_redis, group, {"n": "after the outage"})
        assert await client.recv_json() == {"n": "after the outage"}
        # The heartbeat is back too: a purge elsewhere will not take this process for dead.
        deadline = time.monotonic() + 30
        while not [key async for key in redis.scan_iter(match="asgi:alive:*")]:
            assert time.monotonic() < deadline, "the liveness record did not come back"
            await asyncio.sleep(0.05)
        # New clients are served by the same process.
        late = await open_ws(server.url, headers=headers)
        await late.subscribe({"schedules": [item]})
        await emit(own_redis, group, {"n": "to both"})
        assert await client.recv_json() == await late.recv_json() == {"n": "to both"}
        await late.close()
    finally:
        await redis.aclose()
    await client.close()
    log = server.output()
    assert "Traceback" not in log
    for task in ("fan-out receive", "fan-out sync"):
        # One line when the trouble started, one when it ended (and one a minute in between).
        assert len([line for line in log.splitlines() if f" {task} failed " in line]) <= 2
        assert re.search(rf"{task} works again after \d{{4,}} failed round", log), task
