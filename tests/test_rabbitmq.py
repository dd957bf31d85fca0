"""What is particular to the RabbitMQ layer: its settings, what it cannot do, a cluster on it.

The websocket protocol and emit specs run on both layers (test_websocket.py, test_emit.py); here
are the differences a deployment on RabbitMQ must know about, each handled without a crash.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from awx_ws.main import metrics
from awx_ws.main.emit import aemit_channel_notification
from config.settings import channel_layer_config
from tests.client import open_ws
from tests.conftest import close_in_process_layer, rabbitmq_env
from tests.servers import ROOT, DaphneNode, Gunicorn, RabbitMQServer, Relay, free_port, free_ports
from tests.sse import open_sse
from tests.waiting import eventually

pytestmark = pytest.mark.usefixtures("fresh_in_process_layer")


@pytest.fixture
def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Token {token}"}


@pytest.fixture
async def on_rabbitmq(rabbitmq_server: RabbitMQServer) -> AsyncIterator[None]:
    """This process's emits go through the RabbitMQ layer too."""
    from django.test import override_settings

    with override_settings(CHANNEL_LAYERS={"default": channel_layer_config("rabbitmq")}):
        yield
        await close_in_process_layer()


def scrape(url: str) -> dict[str, float]:
    """The node's metrics as {'name{labels}': value}."""
    text = httpx.get(f"{url}/api/v2/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


async def test_settings_reach_the_broker(daphne_factory, rabbitmq_server, auth):
    """RABBITMQ_* settings: the process's exclusive queue and its consumer carry them."""
    server = daphne_factory(
        {
            **rabbitmq_env(rabbitmq_server),
            "RABBITMQ_LOCAL_CAPACITY": "50",
            "RABBITMQ_PREFETCH_COUNT": "7",
            "RABBITMQ_REMOTE_CAPACITY": "42",
            "RABBITMQ_EXPIRY": "30",
            "RABBITMQ_GROUPS_EXCHANGE": "awx-settings-test",
        }
    )
    client = await open_ws(server.url, headers=auth)
    await client.subscribe({"schedules": ["settings"]})
    bindings = await asyncio.to_thread(
        rabbitmq_server.rows, "list_bindings", "source_name", "destination_name", "routing_key"
    )
    queue = next(dest for source, dest, key in bindings if source == "awx-settings-test")
    assert any(key == "schedules-settings" for source, dest, key in bindings if dest == queue)
    queues = await asyncio.to_thread(rabbitmq_server.rows, "list_queues", "name", "exclusive", "arguments")
    (exclusive, arguments) = next((row[1], row[2]) for row in queues if row[0] == queue)
    assert exclusive == "true"
    assert "x-max-length" in arguments and "42" in arguments
    assert "x-message-ttl" in arguments and "30000" in arguments
    consumers = await asyncio.to_thread(
        rabbitmq_server.rows, "list_consumers", "queue_name", "prefetch_count"
    )
    assert [queue, "7"] in consumers
    await client.close()


async def test_a_peer_header_opens_one_process_of_a_node_once(daphne_factory, rabbitmq_server):
    """Several daphne processes serve one node (nginx spreads peers over them): a header accepted
    by one is a replay to the others, on RabbitMQ too (nonces kept in the node's database)."""
    from awx_ws.main import peerauth

    node = {
        **rabbitmq_env(rabbitmq_server),
        "BROADCAST_WEBSOCKET_SELF": f"rabbit-node{time.monotonic_ns()}:443",
    }
    first, second = daphne_factory(node), daphne_factory(node)
    headers = peerauth.sign(
        os.environ["BROADCAST_WEBSOCKET_SECRET"], node["BROADCAST_WEBSOCKET_SELF"]
    ).headers("x")
    statuses = []
    for process in (first, second):
        try:
            async with connect(
                f"{process.url}/websocket/broadcast/", additional_headers=headers, open_timeout=10
            ):
                statuses.append(101)
        except InvalidStatus as exc:
            statuses.append(exc.response.status_code)
    assert statuses == [101, 403]
    assert second.wait_for_output("nonce already used on this node (a replayed header)")


def test_a_prefetch_count_above_the_local_capacity_is_refused_naming_both():
    result = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=ROOT,
        env={
            **os.environ,
            "CHANNEL_LAYER_BACKEND": "rabbitmq",
            "RABBITMQ_LOCAL_CAPACITY": "10",
            "RABBITMQ_PREFETCH_COUNT": "11",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "RABBITMQ_PREFETCH_COUNT=11" in result.stderr
    assert "RABBITMQ_LOCAL_CAPACITY=10" in result.stderr


def test_an_unknown_backend_is_refused_naming_the_setting():
    result = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=ROOT,
        env={**os.environ, "CHANNEL_LAYER_BACKEND": "kafka"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "CHANNEL_LAYER_BACKEND='kafka'" in result.stderr


async def test_start_up_purge_is_skipped_with_a_log_line_and_a_metric(daphne_factory, rabbitmq_server):
    var = rabbitmq_server.workdir / f"var-{free_port()}"
    # Metrics of its own (the session's processes share a directory otherwise).
    env = {
        **rabbitmq_env(rabbitmq_server),
        "AWX_WS_VAR": str(var),
        "PROMETHEUS_MULTIPROC_DIR": str(var / "metrics"),
    }
    server = daphne_factory(env)
    assert server.wait_for_output("start-up purge skipped: the RabbitMQ layer keeps no state")
    figures = await asyncio.to_thread(scrape, server.http_url)
    assert figures["awx_ws_startup_purge_skipped_total"] == 1.0
    assert "start-up purge: removed" not in server.output()


async def test_a_killed_daphne_leaves_nothing_behind_and_its_clients_come_back(
    daphne_factory, rabbitmq_server, auth
):
    """Nothing to purge: RabbitMQ deletes a process's exclusive queue with its connection."""
    env = rabbitmq_env(rabbitmq_server)
    first = daphne_factory(env)
    client = await open_ws(first.url, headers=auth)
    await client.subscribe({"schedules": ["killed"]})

    async def bound() -> int:
        rows = await asyncio.to_thread(rabbitmq_server.rows, "list_bindings", "source_name", "routing_key")
        return sum(1 for source, key in rows if source == "groups" and key == "schedules-killed")

    assert await bound() == 1
    first.kill()
    for _ in range(50):
        if await bound() == 0:
            break
        await asyncio.sleep(0.1)
    assert await bound() == 0
    second = daphne_factory(env)
    again = await open_ws(second.url, headers=auth)
    await again.subscribe({"schedules": ["killed"]})
    await aemit_via(rabbitmq_server, "schedules-killed", {"back": True})
    assert await again.recv_json() == {"back": True}
    await again.close()


async def aemit_via(rabbitmq_server: RabbitMQServer, group: str, payload: object) -> None:
    """Emit as `manage.py emit` on the RabbitMQ layer does (the sync path, its own process)."""
    await emit_on({**os.environ, **rabbitmq_env(rabbitmq_server)}, group, payload)


async def test_a_full_queue_drops_for_itself_only_with_a_log_line_and_a_metric(
    rabbitmq_node, rabbitmq_server, on_rabbitmq, auth, caplog
):
    """remote_capacity: RabbitMQ refuses messages for a full queue; everyone else gets them."""
    from awx_ws.main.layers.rabbitmq import RabbitmqChannelLayer

    client = await open_ws(rabbitmq_node.url, headers=auth)
    await client.subscribe({"schedules": ["full"]})
    # A member that never reads, with room for 1 message in memory and 3 in RabbitMQ.
    stuck = RabbitmqChannelLayer(host=rabbitmq_server.url(), local_capacity=1, remote_capacity=3)
    stuck_channel = await stuck.new_channel()
    await stuck.group_add("schedules-full", stuck_channel)
    stuck_queue = stuck_channel.split("!")[0]

    def taken_by_the_stuck_consumer() -> bool:
        # Delivered to its process (which never reads it), so no longer ready in its queue.
        rows = rabbitmq_server.rows("list_queues", "name", "messages_ready", "messages_unacknowledged")
        return any(row[0] == stuck_queue and row[1] == "0" for row in rows)

    dropped = metrics.DROPPED.labels("channel_full")
    before = dropped._value.get()
    logger = logging.getLogger("awx_ws.main.layers.rabbitmq")  # does not propagate to caplog's root handler
    logger.addHandler(caplog.handler)
    try:
        await aemit_channel_notification("schedules-full", {"n": 0})
        # Taken by the stuck consumer: no longer counted by the queue.
        await eventually(
            lambda: asyncio.to_thread(taken_by_the_stuck_consumer), 20, "the stuck consumer to take message 0"
        )
        for n in range(1, 20):
            await aemit_channel_notification("schedules-full", {"n": n})
    finally:
        logger.removeHandler(caplog.handler)
    assert [(await client.recv_json())["n"] for _ in range(20)] == list(range(20))
    # 1 taken into the stuck process's memory, 3 queued, the other 16 refused for it alone.
    assert dropped._value.get() - before == 16
    assert "schedules-full is full (its process's RABBITMQ_REMOTE_CAPACITY)" in caplog.text
    await stuck.close()
    await client.close()


async def test_resuming_reports_a_reset_as_no_history_is_kept(rabbitmq_node, on_rabbitmq, auth):
    client = await open_ws(rabbitmq_node.url, headers=auth)
    errors, reply = await client.subscribe({"schedules": ["resume"]}, ids=True)
    assert errors == []
    position = reply["positions"]["schedules-resume"]
    await aemit_channel_notification("schedules-resume", {"n": 1})
    # Delivered live, without an id: there is nothing to resume from.
    assert await client.recv_json() == {"group": "schedules-resume", "data": {"n": 1}}
    await client.close()

    again = await open_ws(rabbitmq_node.url, headers=auth)
    errors, reply = await again.subscribe({"schedules": ["resume"]}, recover={"schedules-resume": position})
    assert errors == []
    summary = await again.recv_json()
    assert summary["recovered"] == {}
    assert "no history is kept with the RabbitMQ channel layer" in summary["reset"]["schedules-resume"]
    await aemit_channel_notification("schedules-resume", {"n": 2})
    assert await again.recv_json() == {"group": "schedules-resume", "data": {"n": 2}}
    await again.close()


async def test_an_sse_stream_resuming_gets_stream_reset_then_live(rabbitmq_node, on_rabbitmq, auth):
    group = "schedules-sse_resume"
    async with open_sse(rabbitmq_node.http_url, group, headers=auth) as stream:
        await stream.wait_ready()
        await aemit_channel_notification(group, {"n": 1})
        assert await stream.payloads(1) == [{"n": 1}]
        last_id = stream.last_id
    async with open_sse(rabbitmq_node.http_url, group, headers=auth, last_event_id=last_id) as stream:
        reset = await stream.next_event()
        assert reset.event == "stream-reset"
        assert "no history is kept" in json.loads(reset.data)["groups"][group]
        await aemit_channel_notification(group, {"n": 2})
        assert await stream.payloads(1) == [{"n": 2}]


def test_readiness_names_rabbitmq(rabbitmq_server, state_dir):
    up = Gunicorn(state_dir / "logs", rabbitmq_env(rabbitmq_server)).start()
    port = free_port()
    down_env = {**rabbitmq_env(rabbitmq_server), "RABBITMQ_URL": f"amqp://guest:guest@127.0.0.1:{port}"}
    down = Gunicorn(state_dir / "logs", {**down_env, "AWX_WS_EMIT_TIMEOUT": "1"}).start()
    try:
        ready = httpx.get(f"{up.http_url}/api/v2/ready/", timeout=20)
        assert (ready.status_code, ready.json()) == (200, {"rabbitmq": "ok", "database": "ok"})
        not_ready = httpx.get(f"{down.http_url}/api/v2/ready/", timeout=20)
        assert not_ready.status_code == 503
        assert f"RABBITMQ_URL=amqp://guest:***@127.0.0.1:{port}" in not_ready.json()["rabbitmq"]
    finally:
        up.stop()
        down.stop()


@pytest.mark.slow
async def test_a_cluster_on_rabbitmq_relays_both_ways(rabbitmq_server, state_dir, token):
    """Two nodes, each with a broker of its own (a vhost) and a relay, no Redis: exactly once."""
    names = ["node-a", "node-b"]
    ports = free_ports(2)
    peers = ",".join(f"127.0.0.1:{port}" for port in ports)
    envs, processes = {}, []
    for name, port in zip(names, ports, strict=True):
        workdir = state_dir / f"rabbitmq-cluster-{name}"
        envs[name] = {
            **os.environ,
            **rabbitmq_env(rabbitmq_server, name),
            # Nothing may need Redis: point it at a port where none listens.
            "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
            "BROADCAST_WEBSOCKET_PEERS": peers,
            "BROADCAST_WEBSOCKET_SELF": f"127.0.0.1:{port}",
            "AWX_WS_NODE_NAME": name,
            "AWX_WS_VAR": str(workdir / "var"),
        }
        processes.append(DaphneNode(workdir, envs[name], port=port).start())
        processes.append(Relay(workdir, name, envs[name]).start())
    try:
        headers = {"Authorization": f"Token {token}"}
        a = await open_ws(f"ws://127.0.0.1:{ports[0]}", headers=headers)
        b = await open_ws(f"ws://127.0.0.1:{ports[1]}", headers=headers)
        await a.subscribe({"schedules": ["relayed"]})
        await b.subscribe({"schedules": ["relayed"]})

        for origin, local, remote in (("node-a", a, b), ("node-b", b, a)):
            # The peer forwards the group once the relays have told it: probe until it does.
            for attempt in range(30):
                await emit_on(envs[origin], "schedules-relayed", {"probe": attempt})
                assert await local.recv_json() == {"probe": attempt}
                try:
                    await remote.recv_json(timeout=1)
                except TimeoutError:
                    continue
                break
            else:
                raise AssertionError(f"nothing emitted on {origin} crossed to its peer")
            await emit_on(envs[origin], "schedules-relayed", {"from": origin})
            assert await local.recv_json() == {"from": origin}
            assert await drain_until(remote, {"from": origin}) == {"from": origin}
        await a.assert_silent()
        await b.assert_silent()
        await a.close()
        await b.close()
    finally:
        for process in processes:
            process.stop()


async def drain_until(client, wanted: object) -> object:
    """The first message equal to wanted, skipping late probes."""
    while True:
        message = await client.recv_json()
        if message == wanted or "probe" not in message:
            return message


async def emit_on(env: dict[str, str], group: str, payload: object) -> None:
    """`manage.py emit` in a process of its own with env."""
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "manage.py", "emit", group, json.dumps(payload)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
async def test_a_broker_restart_answers_subscribes_with_an_error_then_delivery_resumes(
    daphne_factory, state_dir, auth
):
    """A broker of this test's own, stopped under a live node and started again."""
    broker = RabbitMQServer(free_port(), state_dir / f"rabbitmq-restart-{free_port()}", ["/"]).start()
    try:
        server = daphne_factory(rabbitmq_env(broker))
        client = await open_ws(server.url, headers=auth)
        await client.subscribe({"schedules": ["before"]})
        broker.stop()
        # The subscribe is answered (within the layer's 5 s connection wait), the socket stays.
        await client.send_json({"groups": {"schedules": ["before", "during"]}})
        error = await client.recv_json(timeout=15)
        assert error == {"error": "subscribe failed: the service cannot reach RabbitMQ, try again"}
        assert (await client.recv_json())["groups_current"] == ["schedules-before"]
        assert server.proc is not None and server.proc.poll() is None
        broker.start()
        # channels_rabbitmq reconnects and binds the process's groups again.
        for attempt in range(60):
            await aemit_via(broker, "schedules-before", {"attempt": attempt})
            try:
                message = await client.recv_json(timeout=1)
            except TimeoutError:
                continue
            break
        else:
            raise AssertionError("no delivery after the broker came back")
        assert "attempt" in message
        errors, reply = await client.subscribe({"schedules": ["before", "during"]})
        assert errors == [] and reply["groups_current"] == ["schedules-before", "schedules-during"]
        await client.close()
    finally:
        broker.stop()
