"""emit_channel_notification, its async twin and `manage.py emit`: delivery, reuse, failure.

Every test that talks to `node` or `layer_port` runs on the Redis layer and on the RabbitMQ layer.
"""

from __future__ import annotations

import asyncio
import datetime
import decimal
import json
import os
import socket
import threading
import uuid

import psutil
import pytest

from awx_ws.main.emit import aemit_channel_notification, emit_channel_notification
from awx_ws.main.exceptions import EmitError, InvalidGroupName
from tests.servers import free_port, run_manage

pytestmark = [pytest.mark.usefixtures("fresh_in_process_layer"), pytest.mark.both_runners]


@pytest.fixture(scope="module")
def node(layer_node):
    """Both layers' nodes in turn (conftest.layer_backend)."""
    return layer_node


@pytest.fixture
def layer_port(layer_backend, request) -> int:
    """The port of the layer's server (Redis or RabbitMQ)."""
    return request.getfixturevalue(f"{layer_backend}_server").port


def server_connections(port: int) -> int:
    """TCP connections this test process holds to the server on port."""
    return sum(
        1
        for conn in psutil.Process().net_connections(kind="tcp")
        if conn.raddr and conn.raddr.port == port and conn.status == psutil.CONN_ESTABLISHED
    )


async def test_sync_emit_from_worker_threads_reaches_the_subscriber(client):
    await client.subscribe({"jobs": ["status_changed"]})
    threads = [
        asyncio.to_thread(emit_channel_notification, "jobs-status_changed", {"n": n}) for n in range(8)
    ]
    await asyncio.gather(*threads)
    received = sorted([(await client.recv_json())["n"] for _ in range(8)])
    assert received == list(range(8))
    # No copy of any: a marker emitted after every thread's emit returned comes next (one group,
    # one node: in order).
    await aemit_channel_notification("jobs-status_changed", {"n": "marker"})
    assert await client.recv_json() == {"n": "marker"}


def test_sync_emit_opens_no_connection_or_thread_per_call(layer_port):
    before = server_connections(layer_port)
    emit_channel_notification("jobs-warmup", {"n": 0})
    connections, threads = server_connections(layer_port), threading.active_count()
    # Not exact: the process's pool may already hold an idle connection from an earlier test of
    # this process (sync emits from 8 threads above), which the warm-up reuses, or it opens one;
    # and connections are the process's, not this test's. It keeps one open, and opens at most one.
    assert connections >= 1
    assert connections - before <= 1
    for n in range(50):
        emit_channel_notification("jobs-reuse", {"n": n})
    assert server_connections(layer_port) == connections
    assert threading.active_count() == threads


async def test_sync_emit_from_many_threads_at_once_shares_a_small_pool(client, layer_port):
    await client.subscribe({"jobs": ["pool"]})
    before = server_connections(layer_port)
    await asyncio.gather(
        *(asyncio.to_thread(emit_channel_notification, "jobs-pool", {"n": n}) for n in range(40))
    )
    assert sorted([(await client.recv_json())["n"] for _ in range(40)]) == list(range(40))
    # At most one pooled connection per concurrent caller (the executor's threads), not one per call.
    executor_threads = min(32, (os.cpu_count() or 1) + 4)
    assert server_connections(layer_port) - before <= executor_threads


async def test_sync_emit_inside_an_event_loop_points_to_the_async_twin():
    with pytest.raises(EmitError, match="aemit_channel_notification"):
        emit_channel_notification("jobs-status_changed", {})


@pytest.mark.parametrize("group", ["bad group", "", "x" * 100, "jobs/1"])
async def test_invalid_group_names_are_refused_before_redis(group):
    with pytest.raises(InvalidGroupName):
        await aemit_channel_notification(group, {})
    with pytest.raises(InvalidGroupName):
        await asyncio.to_thread(emit_channel_notification, group, {})


async def test_payload_is_serialized_once_with_djangos_encoder(client):
    await client.subscribe({"jobs": ["summary"]})
    payload = {
        "created": datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC),
        "uuid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "amount": decimal.Decimal("1.50"),
    }
    await aemit_channel_notification("jobs-summary", payload)
    assert await client.recv_json() == {
        "created": "2026-01-02T03:04:05Z",
        "uuid": "12345678-1234-5678-1234-567812345678",
        "amount": "1.50",
    }


def test_emit_command_with_redis_down_fails_naming_the_url():
    port = free_port()
    result = run_manage(
        "emit",
        "jobs-status_changed",
        "{}",
        env={"REDIS_URL": f"redis://127.0.0.1:{port}/0", "AWX_WS_EMIT_TIMEOUT": "2"},
    )
    assert result.returncode == 1
    assert f"REDIS_URL=redis://127.0.0.1:{port}/0" in result.stderr
    assert "Traceback" not in result.stderr


def test_emit_command_against_a_silent_redis_gives_up_after_the_timeout():
    # A listener that never answers: the client connects, then waits for a reply forever.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        result = run_manage(
            "emit",
            "jobs-status_changed",
            "{}",
            env={"REDIS_URL": f"redis://127.0.0.1:{port}/0", "AWX_WS_EMIT_TIMEOUT": "1"},
        )
    assert result.returncode == 1
    assert "took longer than 1s (AWX_WS_EMIT_TIMEOUT)" in result.stderr
    assert f"REDIS_URL=redis://127.0.0.1:{port}/0" in result.stderr


def test_emit_command_refuses_bad_json_and_bad_groups():
    bad_json = run_manage("emit", "jobs-status_changed", "{nope")
    assert bad_json.returncode == 1
    assert "payload is not valid JSON" in bad_json.stderr
    bad_group = run_manage("emit", "jobs status", "{}")
    assert bad_group.returncode == 1
    assert "invalid group name 'jobs status'" in bad_group.stderr


async def test_emit_command_delivers_to_a_subscriber(client, layer_env):
    await client.subscribe({"job_events": []})
    await client.subscribe({"schedules": ["changed"]})
    payload = '{"id": 9, "x": [1, 2]}'
    result = await asyncio.to_thread(run_manage, "emit", "schedules-changed", payload, env=layer_env)
    assert result.returncode == 0, result.stderr
    assert json.loads(await client.ws.recv()) == {"id": 9, "x": [1, 2]}


def test_emit_command_with_rabbitmq_down_fails_naming_the_url():
    port = free_port()
    result = run_manage(
        "emit",
        "jobs-status_changed",
        "{}",
        env={
            "CHANNEL_LAYER_BACKEND": "rabbitmq",
            "RABBITMQ_URL": f"amqp://guest:secret@127.0.0.1:{port}",
            "AWX_WS_EMIT_TIMEOUT": "2",
        },
    )
    assert result.returncode == 1
    assert "took longer than 2s (AWX_WS_EMIT_TIMEOUT)" in result.stderr
    # The password never shows; the setting and address do.
    assert f"RABBITMQ_URL=amqp://guest:***@127.0.0.1:{port}" in result.stderr
    assert "secret" not in result.stderr
    assert "Traceback" not in result.stderr
