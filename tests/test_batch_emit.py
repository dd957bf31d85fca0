"""emit_channel_notifications and its async twin: a batch in one round trip, in order within each
group, resumable as single emits are, and failures that say which messages went.

The delivery tests run on the Redis layer and on the RabbitMQ layer (conftest.layer_backend); the
failures' in a process of their own; resuming after a batch is test_sse.py's.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

import pytest

from awx_ws.main.emit import (
    aemit_channel_notification,
    aemit_channel_notifications,
    emit_channel_notifications,
)
from awx_ws.main.exceptions import EmitError, InvalidGroupName
from tests.client import redis_at, watch
from tests.servers import ROOT, free_port

pytestmark = [pytest.mark.usefixtures("fresh_in_process_layer"), pytest.mark.both_runners]

STATUS, SUMMARY = "jobs-status_changed", "jobs-summary"


@pytest.fixture(scope="module")
def node(layer_node):
    """Both layers' nodes in turn (conftest.layer_backend)."""
    return layer_node


def interleaved(count: int) -> list[tuple[str, dict[str, int]]]:
    """count messages over two groups, every third to the second."""
    return [(SUMMARY if n % 3 == 0 else STATUS, {"n": n}) for n in range(count)]


async def assert_received_in_order(client: Any, count: int) -> None:
    received = [(await client.recv_json())["n"] for _ in range(count)]
    assert [n for n in received if n % 3] == [n for n in range(count) if n % 3]
    assert [n for n in received if n % 3 == 0] == [n for n in range(count) if n % 3 == 0]
    assert sorted(received) == list(range(count))
    # Nothing twice: a marker emitted after the batch returned comes next (one node, in order).
    await aemit_channel_notification(STATUS, {"n": "marker"})
    assert await client.recv_json() == {"n": "marker"}


async def test_a_sync_batch_arrives_in_order_within_each_group(client):
    await client.subscribe({"jobs": ["status_changed", "summary"]})
    await asyncio.to_thread(emit_channel_notifications, interleaved(90))
    await assert_received_in_order(client, 90)


async def test_an_async_batch_arrives_in_order_within_each_group(client):
    await client.subscribe({"jobs": ["status_changed", "summary"]})
    await aemit_channel_notifications(interleaved(90))
    await assert_received_in_order(client, 90)


async def test_a_batch_with_a_bad_group_sends_none_of_its_messages(client):
    await client.subscribe({"jobs": ["status_changed"]})
    with pytest.raises(InvalidGroupName):
        await aemit_channel_notifications([(STATUS, {"n": 1}), ("jobs status", {"n": 2})])
    with pytest.raises(InvalidGroupName):
        await asyncio.to_thread(emit_channel_notifications, [(STATUS, {"n": 3}), ("", {"n": 4})])
    await aemit_channel_notification(STATUS, {"n": "marker"})
    assert await client.recv_json() == {"n": "marker"}


async def test_a_sync_batch_inside_an_event_loop_points_to_the_async_twin():
    with pytest.raises(
        EmitError, match=r"^emit_channel_notifications\(\) blocks; .* await aemit_channel_notifications\(\)"
    ):
        emit_channel_notifications([(STATUS, {"n": 1})])


async def test_an_empty_batch_sends_nothing_and_needs_no_layer(client):
    await client.subscribe({"jobs": ["status_changed"]})
    await aemit_channel_notifications([])
    await asyncio.to_thread(emit_channel_notifications, [])
    await aemit_channel_notification(STATUS, {"n": "marker"})
    assert await client.recv_json() == {"n": "marker"}


async def test_a_batch_reaches_a_plain_channels_consumer_in_order_too(layer_backend):
    """A member that is no process's fan-out (a project's own consumer, a peer's relay link) gets
    a batch's messages too, in order: on Redis in the batch's second round trip."""
    from channels.layers import get_channel_layer

    layer = get_channel_layer()
    group = f"schedules-plain{time.monotonic_ns()}"
    channel = await layer.new_channel()
    await layer.group_add(group, channel)
    try:
        await aemit_channel_notifications([(group, {"n": n}) for n in range(20)])
        received = [await asyncio.wait_for(layer.receive(channel), 10) for _ in range(20)]
    finally:
        await layer.group_discard(group, channel)
    assert [json.loads(message["text"])["n"] for message in received] == list(range(20))
    assert {message["type"] for message in received} == {"internal.message"}


# --- failures, in a process of their own (its settings read the environment given) ----------

BATCH_SCRIPT = """
import json, sys, time
import django
django.setup()
from awx_ws.main.emit import emit_channel_notifications
from awx_ws.main.exceptions import BatchEmitError
batch = [("jobs-status_changed", {"n": n}) for n in range(5)] + [("control-limit_reached_1", {"n": 5})]
started = time.monotonic()
try:
    emit_channel_notifications(batch)
except BatchEmitError as exc:
    print(json.dumps({"sent": exc.sent, "unsent": exc.unsent, "unknown": exc.unknown,
                      "message": str(exc), "where": exc.cause.where, "seconds": time.monotonic() - started}))
    sys.exit(1)
"""


def run_batch(env: dict[str, str]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", BATCH_SCRIPT],
        cwd=ROOT,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    return dict(json.loads(done.stdout))


def test_a_batch_to_redis_that_is_down_fails_in_time_naming_redis_url():
    port = free_port()
    failure = run_batch({"REDIS_URL": f"redis://127.0.0.1:{port}/0", "AWX_WS_EMIT_TIMEOUT": "2"})
    # No connection was ever made: none was sent, and the error says so.
    assert (failure["sent"], failure["unsent"], failure["unknown"]) == ([], list(range(6)), [])
    assert failure["where"] == f"REDIS_URL=redis://127.0.0.1:{port}/0"
    assert failure["message"].startswith("batch of 6 notifications failed: 0 sent, 6 not sent, 0 may have")
    assert failure["seconds"] < 10


def test_a_batch_to_a_server_that_never_answers_gives_up_after_the_timeout_as_not_sent():
    with socket.socket() as silent:  # accepts, never answers: the connection's handshake never ends
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        failure = run_batch({"REDIS_URL": f"redis://127.0.0.1:{port}/0", "AWX_WS_EMIT_TIMEOUT": "1"})
    assert (failure["sent"], failure["unsent"], failure["unknown"]) == ([], list(range(6)), [])
    assert failure["seconds"] < 10


async def test_a_batch_redis_stops_answering_gives_up_after_the_timeout_and_says_any_may_have_gone(
    own_redis,
):
    redis = redis_at(own_redis.url)
    # Scripts wait, connecting does not: the batch is on its way when Redis goes silent.
    await redis.execute_command("CLIENT", "PAUSE", "60000", "WRITE")  # ended by UNPAUSE below
    try:
        failure = await asyncio.to_thread(run_batch, {"REDIS_URL": own_redis.url, "AWX_WS_EMIT_TIMEOUT": "1"})
    finally:
        await redis.execute_command("CLIENT", "UNPAUSE")
    assert (failure["sent"], failure["unsent"], failure["unknown"]) == ([], [], list(range(6)))
    assert failure["message"].startswith(
        "batch of 6 notifications failed: 0 sent, 0 not sent, 6 may have been sent"
    )
    assert failure["seconds"] < 10


async def test_a_batch_redis_refuses_is_not_sent_at_all_and_says_why(own_redis):
    redis = redis_at(own_redis.url)
    await redis.config_set("maxmemory-policy", "noeviction")
    await redis.config_set("maxmemory", "1")  # every write refused: OOM
    failure = await asyncio.to_thread(run_batch, {"REDIS_URL": own_redis.url})
    await redis.config_set("maxmemory", "0")
    assert (failure["sent"], failure["unsent"], failure["unknown"]) == ([], list(range(6)), [])
    assert failure["message"].endswith(
        "OutOfMemoryError: command not allowed when used memory > 'maxmemory'."
    )
    assert "EVAL" not in failure["message"]  # nor the payload redis-py puts in the command it names
    assert await redis.keys("asgi:history:*") == []


def test_a_batch_to_rabbitmq_that_is_down_fails_in_time_naming_rabbitmq_url():
    port = free_port()
    failure = run_batch(
        {
            "CHANNEL_LAYER_BACKEND": "rabbitmq",
            "RABBITMQ_URL": f"amqp://guest:secret@127.0.0.1:{port}",
            "AWX_WS_EMIT_TIMEOUT": "2",
        }
    )
    assert failure["sent"] == [] and sorted(failure["unsent"] + failure["unknown"]) == list(range(6))
    assert failure["where"] == f"RABBITMQ_URL=amqp://guest:***@127.0.0.1:{port}"
    assert "secret" not in failure["message"]
    assert failure["seconds"] < 10


async def test_a_first_batch_on_a_fresh_redis_loads_the_script_makes_the_origin_and_keeps_order(own_redis):
    """A Redis that never saw us has neither the group_send script nor a history origin: the
    batch runs again for what needs them, and nothing is lost, doubled or reordered."""
    await watch(own_redis.url, "jobs-status_changed")  # so its history is kept
    done = subprocess.run(
        [sys.executable, "-c", BATCH_SCRIPT],
        cwd=ROOT,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings", "REDIS_URL": own_redis.url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and done.stdout == "", done.stdout + done.stderr
    redis = redis_at(own_redis.url)
    kept = await redis.xrange("asgi:history:jobs-status_changed")
    # Each history entry keeps the message's text under `t` (redis_history.py's append).
    assert [json.loads(fields[b"t"])["n"] for _, fields in kept] == [0, 1, 2, 3, 4]
    assert await redis.exists("asgi:history-origin") == 1
    assert await redis.exists("asgi:history:control-limit_reached_1") == 0  # control keeps none
