"""Peer discovery through PostgreSQL, end to end: nodes with no peer list find each other through
a database of their own (started here, so it can be restarted), drop a node that dies, take it
back when it returns, keep another cluster on the same database apart, and survive a restart of
the database. Each node has its own Redis, daphne and relay, as in test_cluster.py."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from awx_ws.main.discovery import channel_name
from tests.client import WsClient, open_ws, redis_at
from tests.servers import ROOT, PostgresServer, free_port
from tests.test_cluster import Node, make_nodes, members, relay_status, wait_for
from tests.test_cluster_recovery import _is, connect, data_frames, seen_one
from tests.waiting import eventually

pytestmark = [pytest.mark.slow]

CLUSTER = "discovery-tests/" + "a long cluster id, longer than an identifier may be " * 2
OTHER_CLUSTER = "discovery-tests-other"
# Heartbeats every second: a silent node is dropped after 3 s, not 45.
SETTINGS = {
    "BROADCAST_WEBSOCKET_PEERS": "",
    "BROADCAST_WEBSOCKET_DISCOVERY": "postgres",
    "BROADCAST_WEBSOCKET_HEARTBEAT": "1",
    "BROADCAST_WEBSOCKET_PING_INTERVAL": "5",
    "BROADCAST_WEBSOCKET_BACKOFF_MAX": "2",
}


def manage(env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    return result.stdout


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    """The nodes' database: PostgreSQL of this module's own, migrated."""
    server = PostgresServer(free_port(), Path(tempfile.mkdtemp(prefix="awx_ws-discovery-pg-"))).start()
    manage({**os.environ, "DATABASE_URL": server.url}, "migrate", "-v", "0")
    yield server
    server.stop(signal.SIGINT)
    shutil.rmtree(server.data.parent, ignore_errors=True)


@pytest.fixture(scope="module")
def token(postgres: PostgresServer) -> str:
    """A user's API token in the nodes' database."""
    code = (
        "from django.contrib.auth import get_user_model; "
        "from rest_framework.authtoken.models import Token; "
        "user = get_user_model().objects.create_user('discovery', '', 'pw'); "
        "print(Token.objects.create(user=user).key)"
    )
    return manage({**os.environ, "DATABASE_URL": postgres.url}, "shell", "-c", code).split()[-1]


class Cluster:
    """Nodes of one module, started on demand; all stopped at the end."""

    def __init__(self, state_dir: Path, postgres: PostgresServer) -> None:
        self.state_dir, self.postgres = state_dir, postgres
        self.nodes: list[Node] = []
        self.started = 0.0

    def add(self, names: list[str], cluster: str = CLUSTER, **env: str) -> list[Node]:
        extra = {**SETTINGS, "DATABASE_URL": self.postgres.url, "AWX_WS_CLUSTER_ID": cluster, **env}
        nodes = make_nodes(self.state_dir, [f"disc-{name}" for name in names], extra)
        self.nodes += nodes
        for node in nodes:
            node.start()
        return nodes

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
            node.redis.stop()


@pytest.fixture(scope="module")
def cluster(state_dir: Path, postgres: PostgresServer, token: str, database: None) -> Iterator[Cluster]:
    made = Cluster(state_dir, postgres)
    try:
        made.started = time.monotonic()
        made.add(["A", "B", "C"])
        yield made
    finally:
        made.stop()


async def listed(node: Node) -> dict[str, str]:
    """The peers node's relay dials now, {address: static or discovered} (what --status reads)."""
    redis = redis_at(node.redis.url)
    try:
        return {k.decode(): v.decode() for k, v in (await redis.hgetall("asgi:relay-peers")).items()}
    finally:
        await redis.aclose()


def address(node: Node) -> str:
    return node.env["BROADCAST_WEBSOCKET_SELF"]


async def connected(node: Node, other: Node) -> bool:
    return address(other) in await listed(node) and await node.peer_state(other) == "connected"


@pytest.fixture
async def clients(cluster: Cluster, token: str) -> AsyncIterator[dict[str, WsClient]]:
    opened: dict[str, WsClient] = {}
    yield opened
    for client in opened.values():
        await client.close()


async def subscribed(node: Node, token: str, topic: str, opened: dict[str, WsClient]) -> WsClient:
    client = opened[node.name] = await open_ws(node.url, headers={"Authorization": f"Token {token}"})
    errors, _ = await client.subscribe({"schedules": [topic.split("-", 1)[1]]})
    assert errors == []
    return client


def topic(label: str) -> str:
    return f"schedules-{label}{time.monotonic_ns()}"


async def each_hears_every_emit_once(nodes: list[Node], clients: dict[str, WsClient], group: str) -> None:
    """Each node emits once; every client gets each of the messages exactly once."""
    for node in nodes:
        await node.emit(group, {"from": node.name})
    for node in nodes:
        client = clients[node.name]
        got = sorted([(await client.recv_json(10))["from"] for _ in nodes])
        assert got == sorted(n.name for n in nodes), node.name
    for node in nodes:
        await clients[node.name].assert_silent(0.5)


async def joined_everywhere(nodes: list[Node], group: str, timeout: float) -> None:
    """Until every node's group holds its own fan-out and each other node's relay consumer."""

    async def all_joined() -> bool:
        return all([await members(node, group) == len(nodes) for node in nodes])

    await eventually(all_joined, timeout, f"{group} joined on every node by its peers")


async def test_nodes_with_no_peer_list_find_each_other_and_messages_cross_once(cluster, clients, token):
    a, b, c = cluster.nodes[:3]
    group = topic("found")
    for node in (a, b, c):
        await subscribed(node, token, group, clients)
    await joined_everywhere([a, b, c], group, 15 - (time.monotonic() - cluster.started))
    await each_hears_every_emit_once([a, b, c], clients, group)
    for node in (a, b, c):
        assert await listed(node) == {address(o): "discovered" for o in (a, b, c) if o is not node}
    table = await asyncio.to_thread(relay_status, a.env)
    assert table.splitlines()[0].split()[7:10] == ["SOURCE", "LAST", "SEEN"]
    for other in (b, c):
        row = await a.row(other)  # PEER STATE SINCE(2) RECEIVED LAST-MIN RECONNECTS SOURCE LAST-SEEN(2)
        assert (row[1], row[7], row[9]) == ("connected", "discovered", "ago"), table
    assert a.relay is not None and "peer discovery listening" in a.relay.output()


async def test_a_resume_asks_the_discovered_peers_for_their_part(cluster, token):
    a, b = cluster.nodes[:2]
    item = f"foundresume{time.monotonic_ns()}"
    group = f"schedules-{item}"
    last_id = await seen_one(a, token, item)
    # While the client is away, B emits: only B's history holds it (nobody on A wants it live).
    await wait_for(lambda: _is(members(b, group), 0), 10, "B to stop forwarding to nobody")
    await b.emit(group, {"n": "B while away"})
    on_a = await connect(a, token)
    errors, _ = await on_a.subscribe({"schedules": [item]}, recover={group: last_id})
    assert errors == []
    assert await data_frames(on_a, 1) == [{"n": "B while away"}]
    summary = await on_a.recv_json()
    assert summary["recovered"] == {group: 1} and summary["reset"] == {}
    await on_a.close()


async def test_a_killed_node_is_dropped_and_taken_back_when_it_returns(cluster, clients, token):
    a, b, c = cluster.nodes[:3]
    c.kill()

    async def c_dropped() -> bool:
        return all([address(c) not in await listed(node) for node in (a, b)])

    await eventually(c_dropped, 60, "A and B to drop the killed C")
    assert address(c) not in await asyncio.to_thread(relay_status, a.env)
    assert a.relay is not None
    assert f"peer discovery dropped {address(c)}: not heard for 3 heartbeats" in a.relay.output()
    assert await connected(a, b) and await connected(b, a)

    c.start()
    await eventually(lambda: connected(a, c), 30, "A to find C again and connect")
    await eventually(lambda: connected(c, a), 30, "C to find A and connect")
    group = topic("back")
    for node in (a, b, c):
        await subscribed(node, token, group, clients)
    await joined_everywhere([a, b, c], group, 30)
    await each_hears_every_emit_once([a, b, c], clients, group)


async def heard_on(
    cluster_id: str, postgres: PostgresServer, sender: str, count: int
) -> list[dict[str, Any]]:
    """Listen on a cluster's channel until `count` announcements of sender have been heard."""
    heard: list[Any] = []
    async with await psycopg.AsyncConnection.connect(postgres.url, autocommit=True) as conn:
        await conn.execute(f'LISTEN "{channel_name(cluster_id)}"')

        async def enough() -> bool:
            async for notice in conn.notifies(timeout=0.2):
                said = json.loads(notice.payload)
                if said["address"] == sender:
                    heard.append(said)
            return len(heard) >= count

        await eventually(enough, 20, f"{count} announcements of {sender}")
    return heard


async def test_another_cluster_on_the_same_database_stays_apart(cluster, clients, token):
    a, b, c = cluster.nodes[:3]
    (d,) = cluster.add(["D"], cluster=OTHER_CLUSTER)
    try:
        # D announces itself on its own cluster's channel, over and over...
        heard = await heard_on(OTHER_CLUSTER, cluster.postgres, address(d), 3)
        assert {said["cluster"] for said in heard} == {OTHER_CLUSTER}
        # ...and a message naming its cluster on ours is ignored, and said so.
        async with await psycopg.AsyncConnection.connect(cluster.postgres.url, autocommit=True) as conn:
            before = refused_counts(a).get("other_cluster", 0)
            stray = json.dumps(heard[-1])  # signed by D (one secret for both clusters here)
            await conn.execute("SELECT pg_notify(%s, %s)", (channel_name(CLUSTER), stray))

        async def refused_as_foreign() -> bool:
            return refused_counts(a).get("other_cluster", 0) == before + 1

        await eventually(refused_as_foreign, 10, "A to refuse D's announcement as another cluster's")
        for node in (a, b, c):
            assert address(d) not in await listed(node)
        assert await listed(d) == {}
        assert "no peers found yet" in await asyncio.to_thread(relay_status, d.env)

        group = topic("apart")
        on_a = await subscribed(a, token, group, clients)
        on_d = await subscribed(d, token, group, clients)
        await a.emit(group, {"to": "cluster one"})
        assert await on_a.recv_json(10) == {"to": "cluster one"}
        await on_d.assert_silent(1.0)
        assert await members(a, group) == 1  # no relay of D joined anything on A
    finally:
        d.stop()
        d.redis.stop()


def refused_counts(node: Node) -> dict[str, float]:
    """awx_ws_discovery_refused_total by reason, as node's relay wrote it (its own metrics dir)."""
    from prometheus_client import CollectorRegistry, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=node.env["PROMETHEUS_MULTIPROC_DIR"])
    return {
        sample.labels["reason"]: sample.value
        for family in registry.collect()
        for sample in family.samples
        if sample.name == "awx_ws_discovery_refused_total"
    }


async def test_a_database_login_without_the_secret_steers_no_node(cluster, clients, token):
    """A role that may only log in (no table rights) can LISTEN and NOTIFY on the cluster's
    channel: it announces a bait address, 200 fake peers and `offline` for a real node, and
    replays a genuine announcement. No node acts on any of it."""
    a, b, c = cluster.nodes[:3]
    postgres = cluster.postgres
    async with await psycopg.AsyncConnection.connect(postgres.url, autocommit=True) as owner:
        await owner.execute("DROP ROLE IF EXISTS intruder")
        await owner.execute("CREATE ROLE intruder LOGIN")
    dialled: list[int] = []

    async def bait_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        dialled.append(1)
        writer.close()

    bait = await asyncio.start_server(bait_handler, "127.0.0.1", 0)
    bait_address = f"127.0.0.1:{bait.sockets[0].getsockname()[1]}"
    before = refused_counts(a)
    assert a.relay is not None
    logged_before = a.relay.output().count("peer discovery refused announcements")
    channel = channel_name(CLUSTER)
    intruder_url = postgres.url.replace("postgres@", "intruder@", 1)
    try:
        async with await psycopg.AsyncConnection.connect(intruder_url, autocommit=True) as conn:
            await conn.execute(f'LISTEN "{channel}"')
            genuine = None
            while genuine is None:  # bounded: B says online every second; the wait is 20 s at most
                async with asyncio.timeout(20):
                    async for notice in conn.notifies(stop_after=1):
                        said = json.loads(notice.payload)
                        genuine = notice.payload if said["address"] == address(b) else None
            fakes = [{"cluster": CLUSTER, "node": "bait", "address": bait_address, "action": "hello"}]
            fakes += [
                {
                    "cluster": CLUSTER,
                    "node": f"fake{n}",
                    "address": f"127.0.0.{2 + n % 200}:9",
                    "action": "online",
                }
                for n in range(200)
            ]
            offline = {**json.loads(genuine), "address": address(c), "node": c.name, "action": "offline"}
            for payload in [*(json.dumps(f) for f in fakes), json.dumps(offline), genuine]:
                await conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))

        async def all_refused() -> bool:
            now = refused_counts(a)
            moved = {reason: now.get(reason, 0) - before.get(reason, 0) for reason in now}
            return moved.get("unsigned") == 201 and moved.get("forged") == 1 and moved.get("replayed") == 1

        await eventually(all_refused, 20, "A to refuse every announcement of the intruder")
        assert dialled == []  # nobody dialled the bait
        for node in (a, b, c):
            assert set(await listed(node)) == {address(o) for o in (a, b, c) if o is not node}
        assert await connected(a, c) and await connected(b, c)  # the forged offline dropped nobody
        assert a.relay is not None
        logged = a.relay.output().count("peer discovery refused announcements") - logged_before
        assert logged <= 1  # 203 refusals: at most one line a minute
        group = topic("intruded")
        for node in (a, b, c):
            await subscribed(node, token, group, clients)
        await joined_everywhere([a, b, c], group, 30)
        await each_hears_every_emit_once([a, b, c], clients, group)
    finally:
        bait.close()
        await bait.wait_closed()
        async with await psycopg.AsyncConnection.connect(postgres.url, autocommit=True) as owner:
            await owner.execute("DROP ROLE IF EXISTS intruder")


async def test_a_database_restart_is_survived(cluster, clients, token):
    a, b, c = cluster.nodes[:3]
    cluster.postgres.stop(signal.SIGINT)
    for node in (a, b, c):
        assert node.relay is not None
        lost = "peer discovery lost the database"
        assert await asyncio.to_thread(node.relay.wait_for_output, lost, 20), node.relay.output()
    cluster.postgres.start()
    # The nodes kept each other through the outage: its silence was the database's, not theirs.
    assert await listed(a) == {address(b): "discovered", address(c): "discovered"}

    # E joins after the restart (heard only on the new connections), with A as a static peer too,
    # written as a URL: one link to A all the same (each message once, below).
    a_url = f"ws://{address(a)}/websocket/broadcast/"
    (e,) = cluster.add(["E"], BROADCAST_WEBSOCKET_PEERS=a_url)
    try:
        for node in (a, b, c):
            await eventually(lambda node=node: connected(node, e), 30, f"{node.name} to find E")
        for node in (b, c):
            await eventually(lambda node=node: connected(e, node), 30, f"E to find {node.name}")

        async def static_link_up() -> bool:
            redis = redis_at(e.redis.url)
            try:
                return await redis.hget(f"asgi:relay-status:{a_url}", "state") == b"connected"
            finally:
                await redis.aclose()

        await eventually(static_link_up, 30, "E's static link to A")
        assert await listed(e) == {a_url: "static", address(b): "discovered", address(c): "discovered"}
        group = topic("restart")
        for node in (a, b, c, e):
            await subscribed(node, token, group, clients)
        await joined_everywhere([a, b, c, e], group, 30)
        await each_hears_every_emit_once([a, b, c, e], clients, group)
        assert a.relay is not None and a.relay.output().count("peer discovery listening") == 2
    finally:
        e.stop()
        e.redis.stop()
    cluster.nodes.remove(e)


def test_discovery_refuses_a_database_that_is_not_postgresql(state_dir):
    env = {
        **os.environ,
        **SETTINGS,
        "DATABASE_URL": f"sqlite:///{state_dir / 'discovery.sqlite3'}",
        "BROADCAST_WEBSOCKET_SELF": "127.0.0.1:1",
    }
    result = subprocess.run(
        [sys.executable, "manage.py", "run_wsbroadcast"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert "BROADCAST_WEBSOCKET_DISCOVERY='postgres' needs the database" in result.stderr
    assert "not django.db.backends.sqlite3" in result.stderr
