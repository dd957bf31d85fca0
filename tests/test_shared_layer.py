"""Several nodes on one Redis, without relays: the layer carries every message between them.

Two daphne nodes (AWX_WS_NODE_NAME A and B) share the test's own Redis. What holds: every client
gets each message once whichever node it is on and whoever emits; a stream resumes on the other
node; a node's start-up purge leaves the other node's live state alone. Relay peers on a shared
layer would deliver twice, and are refused: at daphne's and the relay's start, and by a node
that is dialled by a relay living on its own layer.
"""

from __future__ import annotations

import asyncio
import os
import secrets

import pytest

from awx_ws.main.layers.redis_presence import ProcessRecord
from tests.client import emit_to, open_ws, redis_at
from tests.servers import DaphneNode, Relay, free_port, run_manage
from tests.sse import open_sse

pytestmark = pytest.mark.both_runners

SECRET = "shared-layer-test-secret"
REFUSED = "is shared with node(s)"


@pytest.fixture
def start_node(daphne_factory, own_redis):
    """Start a daphne of node `name` on the test's own Redis."""

    def start(name: str, wait: bool = True, **env: str):
        return daphne_factory({"REDIS_URL": own_redis.url, "AWX_WS_NODE_NAME": name, **env}, wait=wait)

    return start


def item_of(group: str) -> str:
    return group.split("-", 1)[1]


async def test_each_client_gets_each_message_once_whichever_node_it_is_on(start_node, own_redis, token):
    a, b = start_node("A"), start_node("B")
    group = f"schedules-shared{secrets.token_hex(3)}"
    headers = {"Authorization": f"Token {token}"}
    on_a = await open_ws(a.url, headers=headers)
    on_b = await open_ws(b.url, headers=headers)
    for client in (on_a, on_b):
        await client.subscribe({"schedules": [item_of(group)]})

    # Channels' own group_send through the layer, as any producer does...
    await emit_to(own_redis.url, group, {"n": 1})
    # ...and the service's sync emit from a process of its own.
    emitted = await asyncio.to_thread(run_manage, "emit", group, '{"n": 2}', env={"REDIS_URL": own_redis.url})
    assert emitted.returncode == 0, emitted.stderr
    for client in (on_a, on_b):
        assert [await client.recv_json(), await client.recv_json()] == [{"n": 1}, {"n": 2}]
        await client.assert_silent(1.0)  # no second copy from anywhere


async def test_a_stream_resumes_on_the_other_node(start_node, own_redis, token):
    a, b = start_node("A"), start_node("B")
    group = f"schedules-sharedsse{secrets.token_hex(3)}"
    auth = {"Authorization": f"Token {token}"}
    async with open_sse(a.http_url, group, headers=auth) as stream:
        await stream.wait_ready()
        await emit_to(own_redis.url, group, {"n": 0})
        assert await stream.payloads(1) == [{"n": 0}]
        last_id = stream.last_id
    for n in range(1, 6):  # missed while away
        await emit_to(own_redis.url, group, {"n": n})
    async with open_sse(b.http_url, group, headers=auth, last_event_id=last_id) as stream:
        assert await stream.payloads(5) == [{"n": n} for n in range(1, 6)]
        await emit_to(own_redis.url, group, {"n": 6})
        assert await stream.payloads(1) == [{"n": 6}]
        await stream.assert_silent(0.5)


async def test_a_node_started_after_another_was_killed_purges_only_the_dead_ones_state(
    start_node, own_redis, token
):
    a, b = start_node("A"), start_node("B")
    group = f"schedules-sharedpurge{secrets.token_hex(3)}"
    headers = {"Authorization": f"Token {token}"}
    on_a = await open_ws(a.url, headers=headers)
    await on_a.subscribe({"schedules": [item_of(group)]})
    on_b = await open_ws(b.url, headers=headers)
    await on_b.subscribe({"schedules": [item_of(group)]})
    redis = redis_at(own_redis.url)
    try:
        members = set(await redis.zrange(f"asgi:group:{group}", 0, -1))
        assert len(members) == 2
        a.kill()  # SIGKILL: its membership and record stay behind

        start_node("A")  # A again: its start-up purge removes the dead A's state, not B's
        left = set(await redis.zrange(f"asgi:group:{group}", 0, -1))
        assert len(left) == 1 and left < members
        (alive,) = left
        record = ProcessRecord.loads(await redis.get(f"asgi:alive:{alive.decode().split('.', 1)[1]}"))
        assert record is not None and record.name == "B"
        await emit_to(own_redis.url, group, {"after": "the purge"})
        assert await on_b.recv_json() == {"after": "the purge"}
    finally:
        await redis.aclose()


def test_relay_peers_on_a_shared_layer_are_refused_at_start(start_node, own_redis, state_dir):
    b = start_node("B")
    peers = {"BROADCAST_WEBSOCKET_PEERS": b.self_address, "BROADCAST_WEBSOCKET_SECRET": SECRET}

    # daphne: our runner exits, plain daphne refuses connections while it retries; both say why.
    a = start_node("A", wait=False, **peers)
    assert a.wait_for_output(REFUSED, 30), a.output()
    assert "a relay would deliver each one twice" in a.output()

    relay = run_manage("run_wsbroadcast", env={"REDIS_URL": own_redis.url, "AWX_WS_NODE_NAME": "A", **peers})
    assert relay.returncode == 1
    assert "run_wsbroadcast of node 'A' refused to start" in relay.stderr
    assert f"{REFUSED} B" in relay.stderr


async def test_a_node_refuses_a_relay_from_a_node_on_its_own_layer(
    start_node, own_redis, state_dir, runner, token
):
    # Started before B exists, A's daphne and relay see no other node on their layer...
    b_port = free_port()
    peers = {"BROADCAST_WEBSOCKET_SECRET": SECRET, "BROADCAST_WEBSOCKET_PEERS": f"127.0.0.1:{b_port}"}
    a = start_node("A", **peers)
    env = {**os.environ, "REDIS_URL": own_redis.url, "AWX_WS_NODE_NAME": "A", **peers}
    relay = Relay(state_dir / "logs", f"A-shared{secrets.token_hex(3)}", env).start()
    b_env = {"REDIS_URL": own_redis.url, "AWX_WS_NODE_NAME": "B", "BROADCAST_WEBSOCKET_SECRET": SECRET}
    b = DaphneNode(state_dir / "logs", b_env, port=b_port, runner=runner)
    try:
        assert await asyncio.to_thread(relay.wait_for_output, f"127.0.0.1:{b_port}", 30), relay.output()
        # ...then B starts on the same Redis, and refuses A's relay when it dials.
        await asyncio.to_thread(b.start)
        said = f"127.0.0.1:{b_port} refused this relay"
        assert await asyncio.to_thread(relay.wait_for_output, said, 30), relay.output()
        assert "a relay would deliver each one twice" in relay.output()

        group = f"schedules-sharedrelay{secrets.token_hex(3)}"
        on_b = await open_ws(b.url, headers={"Authorization": f"Token {token}"})
        await on_b.subscribe({"schedules": [item_of(group)]})
        await emit_to(own_redis.url, group, {"once": True})
        assert await on_b.recv_json() == {"once": True}
        await on_b.assert_silent(1.0)
        assert a.proc is not None and a.proc.poll() is None
    finally:
        relay.stop()
        b.stop()
