"""Producer code that predates us: Channels' own `channel_layer.group_send` with AWX's message.

AWX's emit_channel_notification, and any Channels project, sends
`{"type": "internal.message", "text": "<payload JSON>"}` to a group, with no other key. Such a
message reaches subscribers exactly as our emit's do, whoever sends it and from where: another
process (async code, or sync code through async_to_sync), or code inside daphne itself. On Redis
it gets a history id, so a stream resumes across it. Every test runs on both layers and both
runners.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest
from channels.layers import get_channel_layer

from tests.client import WsClient, open_ws
from tests.servers import ROOT, DaphneNode
from tests.sse import open_sse

pytestmark = [pytest.mark.usefixtures("fresh_in_process_layer"), pytest.mark.both_runners]


@pytest.fixture(scope="module")
def node(layer_backend: str, runner: str, node_pool: Any, layer_env: dict[str, str]) -> DaphneNode:
    """A node of the layer under test whose daphne also runs producer code (tests/producer_asgi.py)."""
    return node_pool.get(runner, layer_backend, layer_env or None, app="tests.producer_asgi:application")


@pytest.fixture
def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Token {token}"}


def awx_message(payload: Any) -> dict[str, str]:
    """What AWX's emit_channel_notification sends: no group, no id, nothing of ours."""
    return {"type": "internal.message", "text": json.dumps(payload)}


def unique(label: str) -> str:
    return f"{label}{time.monotonic_ns()}"


async def subscribed(node: DaphneNode, auth: dict[str, str], item: str, **extra: Any) -> WsClient:
    client = await open_ws(node.url, headers=auth)
    errors, reply = await client.subscribe({"schedules": [item]}, **extra)
    assert errors == [] and reply["groups_current"] == [f"schedules-{item}"]
    return client


def send_from_another_process(group: str, payload: Any, layer_env: dict[str, str]) -> None:
    """A sync producer in its own process, as a worker would: async_to_sync(group_send)."""
    code = (
        "import django, json, sys; django.setup()\n"
        "from asgiref.sync import async_to_sync\n"
        "from channels.layers import get_channel_layer\n"
        "message = {'type': 'internal.message', 'text': sys.argv[2]}\n"
        "async_to_sync(get_channel_layer().group_send)(sys.argv[1], message)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, group, json.dumps(payload)],
        cwd=ROOT,
        env={**os.environ, **layer_env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


async def send_inside_daphne(node: DaphneNode, group: str, payload: Any, via: str) -> None:
    """Producer code running in the daphne process itself (tests/producer_asgi.py)."""
    body = {"group": group, "text": json.dumps(payload), "via": via}
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.post(f"{node.http_url}/produce/", json=body)
    assert response.status_code == 202, response.text


async def test_group_send_from_this_process_reaches_the_client_as_sent(node, auth):
    item = unique("here")
    client = await subscribed(node, auth, item)
    await get_channel_layer().group_send(f"schedules-{item}", awx_message({"n": 1, "via": "await"}))
    assert await client.ws.recv() == json.dumps({"n": 1, "via": "await"})
    await client.close()


async def test_group_send_from_another_process_reaches_the_client(node, auth, layer_env):
    item = unique("worker")
    client = await subscribed(node, auth, item)
    send_from_another_process(f"schedules-{item}", {"n": 2}, layer_env)
    assert await client.recv_json() == {"n": 2}
    await client.close()


@pytest.mark.parametrize("via", ["async", "sync"])
async def test_group_send_from_inside_daphne_reaches_the_client(node, auth, via):
    item = unique(f"inside{via}")
    client = await subscribed(node, auth, item)
    await send_inside_daphne(node, f"schedules-{item}", {"n": 3, "via": via}, via)
    assert await client.recv_json() == {"n": 3, "via": via}
    await client.close()


async def test_a_group_send_message_carries_a_history_id_where_history_is_kept(node, auth, layer_backend):
    item = unique("ids")
    client = await subscribed(node, auth, item, ids=True)
    await get_channel_layer().group_send(f"schedules-{item}", awx_message({"n": 4}))
    frame = await client.recv_json()
    assert frame["group"] == f"schedules-{item}" and frame["data"] == {"n": 4}
    if layer_backend == "redis":
        assert "id" in frame  # a position the client can recover from
    else:
        assert "id" not in frame  # RabbitMQ keeps no history: nothing to resume from
    await client.close()


async def test_an_sse_stream_resumes_across_group_sends_of_every_producer(
    node, auth, layer_backend, layer_env
):
    group = f"schedules-{unique('resume')}"
    async with open_sse(node.http_url, group, headers=auth) as stream:
        await stream.wait_ready()
        await get_channel_layer().group_send(group, awx_message({"n": 0}))
        assert await stream.payloads(1) == [{"n": 0}]
        last_id = stream.last_id
    # Sent while the client is away, by three kinds of producer code.
    await get_channel_layer().group_send(group, awx_message({"n": 1}))
    send_from_another_process(group, {"n": 2}, layer_env)
    await send_inside_daphne(node, group, {"n": 3}, "sync")
    async with open_sse(node.http_url, group, headers=auth, last_event_id=last_id) as stream:
        if layer_backend == "redis":
            assert await stream.payloads(3) == [{"n": 1}, {"n": 2}, {"n": 3}]
        else:
            reset = await stream.next_event()
            assert reset.event == "stream-reset" and group in json.loads(reset.data)["groups"]
            await stream.wait_ready()
        await get_channel_layer().group_send(group, awx_message({"n": "live"}))
        assert await stream.payloads(1) == [{"n": "live"}]
        await stream.assert_silent()


async def test_messages_of_other_types_stay_with_their_own_consumers(node, auth):
    """A group our clients share with a project's own consumers: only internal.message reaches them."""
    item = unique("mixed")
    group = f"schedules-{item}"
    client = await subscribed(node, auth, item)
    layer = get_channel_layer()
    await layer.group_send(group, {"type": "chat.message", "text": "for another consumer"})
    await layer.group_send(group, {"type": "internal.message", "text": json.dumps({"n": 5})})
    # In order: had the first reached the client, it would come before this one.
    assert await client.recv_json() == {"n": 5}
    await client.close()
