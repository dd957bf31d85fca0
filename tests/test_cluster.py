"""Three nodes, each with its own Redis, daphne and relay: one service, exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from redis import Redis as SyncRedis
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from awx_ws.main import peerauth
from awx_ws.main.emit import build_message
from awx_ws.main.layers import RedisChannelLayer
from tests.client import WsClient, open_ws, redis_at, refused_status
from tests.servers import ROOT, DaphneNode, RedisServer, Relay, free_ports
from tests.waiting import eventually

pytestmark = [pytest.mark.slow, pytest.mark.both_runners]

SECRET = "cluster-tests-shared-secret"


@dataclass
class Node:
    name: str
    env: dict[str, str]
    redis: RedisServer
    daphne_port: int
    workdir: Path
    runner: str = "awx_ws.server"
    daphne: DaphneNode | None = None
    relay: Relay | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.daphne_port}"

    def start(self) -> None:
        self.daphne = DaphneNode(self.workdir, self.env, port=self.daphne_port, runner=self.runner).start()
        self.relay = Relay(self.workdir, self.name, self.env).start()

    def kill(self) -> None:
        for process in (self.relay, self.daphne):
            if process is not None:
                process.kill()

    def stop(self) -> None:
        for process in (self.relay, self.daphne):
            if process is not None:
                process.stop()

    async def status(self) -> str:
        """What `run_wsbroadcast --status` prints on this node."""
        return await asyncio.to_thread(relay_status, self.env)

    async def row(self, other: Node) -> list[str]:
        """This node's status row for its link to other."""
        table = await self.status()
        for line in table.splitlines():
            if line.startswith(f"127.0.0.1:{other.daphne_port} "):
                return line.split()
        raise AssertionError(f"no row for {other.name} in:\n{table}")

    async def link_status(self, other: Node, field: str) -> str:
        """One figure of this node's link to other, as its relay writes it to Redis every second
        (what `--status` prints; read directly, the wait loops poll it cheaply)."""
        redis = redis_at(self.redis.url)
        try:
            value = await redis.hget(f"asgi:relay-status:127.0.0.1:{other.daphne_port}", field)
        finally:
            await redis.aclose()
        return value.decode() if value is not None else ""

    async def link_status_after(self, other: Node, moment: float) -> dict[str, str]:
        """This node's figures for its link to other, from a write made after moment (time.time()):
        they count everything the link had received by then. The relay writes them every second."""
        redis = redis_at(self.redis.url)
        key = f"asgi:relay-status:127.0.0.1:{other.daphne_port}"

        async def fresh() -> dict[str, str] | None:
            row = {k.decode(): v.decode() for k, v in (await redis.hgetall(key)).items()}
            return row if float(row.get("updated") or 0) > moment else None

        try:
            return await eventually(fresh, 10, f"{self.name}'s relay to write its link to {other.name}")
        finally:
            await redis.aclose()

    async def peer_state(self, other: Node) -> str:
        return await self.link_status(other, "state")

    async def received_from(self, other: Node) -> int:
        return int(await self.link_status(other, "received_last_minute") or 0)

    async def emit(self, group: str, payload: Any) -> None:
        """Emit on this node: into its own Redis, as its API or workers would (with their queue
        capacity: channels_redis's default of 100 would drop for a member that lags further)."""
        capacity = int(self.env.get("CHANNEL_LAYER_CAPACITY") or settings.CHANNEL_LAYER_CAPACITY)
        layer = RedisChannelLayer(hosts=[{"address": self.redis.url}], capacity=capacity)
        await layer.group_send(group, build_message(group, payload))
        await layer.close_pools()


def relay_status(env: dict[str, str]) -> str:
    result = subprocess.run(
        [sys.executable, "manage.py", "run_wsbroadcast", "--status"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return result.stdout


def make_nodes(
    state_dir: Path, names: list[str], extra_env: dict[str, str] | None = None, runner: str = "awx_ws.server"
) -> list[Node]:
    """Nodes peering with each other, each with its own Redis (started); daphne and relay not yet."""
    ports = free_ports(2 * len(names))
    daphne_ports, redis_ports = ports[: len(names)], ports[len(names) :]
    peers = ",".join(f"127.0.0.1:{port}" for port in daphne_ports)
    nodes = []
    for name, daphne_port, redis_port in zip(names, daphne_ports, redis_ports, strict=True):
        workdir = state_dir / f"cluster-{name}"
        redis = RedisServer(redis_port, workdir).start()
        env = {
            **os.environ,
            "REDIS_URL": redis.url,
            "BROADCAST_WEBSOCKET_PEERS": peers,
            "BROADCAST_WEBSOCKET_SECRET": SECRET,
            "BROADCAST_WEBSOCKET_SELF": f"127.0.0.1:{daphne_port}",
            "AWX_WS_NODE_NAME": name,
            # Its own var: metrics, nginx and logs per node, as on separate machines (the metrics
            # directory named too: this process's own setting would be inherited otherwise).
            "AWX_WS_VAR": str(workdir / "var"),
            "PROMETHEUS_MULTIPROC_DIR": str(workdir / "var" / "metrics"),
            **(extra_env or {}),
        }
        nodes.append(Node(name, env, redis, daphne_port, workdir, runner))
    return nodes


def wait_connected(node: Node, other: Node, timeout: float = 20.0) -> None:
    """Until node's relay reports its link to other up (the status it keeps in Redis)."""
    redis = SyncRedis.from_url(node.redis.url)
    deadline = time.monotonic() + timeout
    while redis.hget(f"asgi:relay-status:127.0.0.1:{other.daphne_port}", "state") != b"connected":
        assert time.monotonic() < deadline, f"relay link {node.name} -> {other.name} not up"
        time.sleep(0.1)
    redis.close()


@contextlib.contextmanager
def linked_pair(
    state_dir: Path, names: list[str], runner: str = "awx_ws.server", settings: dict[str, str] | None = None
) -> Iterator[tuple[Node, Node]]:
    """Two nodes started, each relay's link to the other up; stopped (and their Redis) after."""
    a, b = make_nodes(state_dir, names, settings, runner)
    try:
        for node in (a, b):
            node.start()
        wait_connected(a, b)
        wait_connected(b, a)
        yield a, b
    finally:
        for node in (a, b):
            node.stop()
            node.redis.stop()


@pytest.fixture(scope="module")
def cluster(state_dir: Path, database: None, runner: str) -> Iterator[dict[str, Node]]:
    # Pings every 5 s (a silent peer dropped within 10 s; the default 10 s gives 20 s), so the
    # frozen-peer test has room under a loaded CI machine; and a back-off capped at 2 s, so a
    # returning peer is dialled again within 2 s (the default 16 s cap makes tests wait for it).
    settings = {"BROADCAST_WEBSOCKET_PING_INTERVAL": "5", "BROADCAST_WEBSOCKET_BACKOFF_MAX": "2"}
    nodes = {node.name: node for node in make_nodes(state_dir, ["A", "B", "C"], settings, runner)}
    for node in nodes.values():
        node.start()
    yield nodes
    for node in nodes.values():
        node.stop()
        node.redis.stop()


async def members(node: Node, group: str) -> int:
    redis = redis_at(node.redis.url)
    try:
        return int(await redis.zcard(f"asgi:group:{group}"))
    finally:
        await redis.aclose()


async def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
async def clients(cluster: dict[str, Node], token: str) -> AsyncIterator[dict[str, WsClient]]:
    opened = {
        name: await open_ws(node.url, headers={"Authorization": f"Token {token}"})
        for name, node in cluster.items()
    }
    yield opened
    for client in opened.values():
        await client.close()


async def subscribe(client: WsClient, *groups: str) -> None:
    errors, reply = await client.subscribe({"schedules": [g.split("-", 1)[1] for g in groups]})
    assert errors == []


def group(label: str) -> str:
    return f"schedules-{label}{time.monotonic_ns()}"


async def test_emitted_on_one_node_reaches_the_others_exactly_once(cluster, clients):
    a, c = cluster["A"], cluster["C"]
    wide, back = group("wide"), group("back")
    await subscribe(clients["B"], wide)
    await subscribe(clients["C"], wide)
    await subscribe(clients["A"], back)
    # B's and C's relays asked A to forward `wide`: A's BroadcastConsumers joined it.
    await wait_for(lambda: _eq(members(a, wide), 2), 10, "B and C to join on A")
    await wait_for(lambda: _eq(members(c, back), 1), 10, "A to join on C")

    await a.emit(wide, {"n": 1})
    assert await clients["B"].recv_json() == {"n": 1}
    assert await clients["C"].recv_json() == {"n": 1}
    await c.emit(back, {"n": 2})
    assert await clients["A"].recv_json() == {"n": 2}
    for client in clients.values():
        await client.assert_silent(0.5)  # no second copy anywhere


async def _eq(value: Any, expected: int) -> bool:
    return await value == expected


async def test_no_subscriber_on_a_node_means_no_traffic_to_it(cluster, clients):
    a, b, c = cluster["A"], cluster["B"], cluster["C"]
    only_c, everywhere = group("onlyc"), group("all")
    await subscribe(clients["C"], only_c, everywhere)
    await subscribe(clients["B"], everywhere)
    await wait_for(lambda: _eq(members(a, only_c), 1), 10, "C to join on A")
    await wait_for(lambda: _eq(members(a, everywhere), 2), 10, "B and C to join on A")
    # Counted before this test emits: whatever earlier tests sent has reached the clients by now.
    before = time.time()
    b_before = int((await b.link_status_after(a, before))["received_total"])
    c_before = int((await c.link_status_after(a, before))["received_total"])

    for n in range(5):
        await a.emit(only_c, {"n": n})
    await a.emit(everywhere, {"n": "all"})
    assert [(await clients["C"].recv_json())["n"] for _ in range(6)] == [0, 1, 2, 3, 4, "all"]
    assert await clients["B"].recv_json() == {"n": "all"}
    # A forwards to each peer over one websocket, in order: once B's client has "all", B's relay
    # has received anything A sent it before, and a status written after now counts it.
    after = time.time()
    b_after = int((await b.link_status_after(a, after))["received_total"])
    c_after = int((await c.link_status_after(a, after))["received_total"])
    assert b_after - b_before == 1  # only the group B's client holds crossed to B
    assert c_after - c_before == 6


async def test_a_node_going_down_and_up(cluster, token):
    a, b, c = cluster["A"], cluster["B"], cluster["C"]
    headers = {"Authorization": f"Token {token}"}
    on_a, on_c = await open_ws(a.url, headers=headers), await open_ws(c.url, headers=headers)
    topic = group("outage")
    await subscribe(on_a, topic)
    await subscribe(on_c, topic)
    # Each node's group holds its own fan-out and the other's relay consumer.
    await wait_for(lambda: _eq(members(c, topic), 2), 10, "A to join on C")
    await wait_for(lambda: _eq(members(a, topic), 2), 10, "C to join on A")

    reconnects_before = int((await a.link_status_after(b, time.time()))["reconnects"])
    b.kill()
    await a.emit(topic, {"during": "outage"})
    await c.emit(topic, {"during": "outage, from C"})
    for client in (on_a, on_c):  # one local, one relayed: each once (order across nodes is free)
        got = sorted([(await client.recv_json())["during"] for _ in range(2)])
        assert got == ["outage", "outage, from C"]
        await client.assert_silent(0.3)

    async def a_sees_b_down() -> bool:
        return await a.peer_state(b) in {"disconnected", "connecting"}

    await wait_for(a_sees_b_down, 35, "A to see B down")
    assert await a.peer_state(c) == "connected"
    assert await c.peer_state(a) == "connected"

    b.start()
    on_b = await open_ws(b.url, headers=headers)
    await subscribe(on_b, topic)
    restarted = time.monotonic()

    async def b_receives_from_a() -> bool:
        await a.emit(topic, {"probe": "a"})
        try:
            return (await on_b.recv_json(timeout=1)) == {"probe": "a"}
        except TimeoutError:
            return False

    await wait_for(b_receives_from_a, 30, "B to receive from A again")

    async def a_receives_from_b() -> bool:
        await b.emit(topic, {"probe": "b"})
        while True:
            try:
                if (await on_a.recv_json(timeout=1)) == {"probe": "b"}:
                    return True
            except TimeoutError:
                return False

    await wait_for(a_receives_from_b, 30 - (time.monotonic() - restarted), "A to receive from B again")
    # Messages crossed both ways: the links were up, and statuses written from now on say so.
    both_ways = time.time()
    a_to_b = await a.link_status_after(b, both_ways)
    assert a_to_b["state"] == "connected"
    assert (await b.link_status_after(a, both_ways))["state"] == "connected"

    async def b_sees_c() -> bool:
        return await b.peer_state(c) == "connected"

    # Nothing has crossed between B and C yet: B's link to C comes up on its own time.
    await wait_for(b_sees_c, 10, "B's relay to connect to C")
    # B was down once: A's link to B came back exactly once (a flapping link would count more).
    assert int(a_to_b["reconnects"]) - reconnects_before == 1
    assert int((await a.row(b))[6]) == int(a_to_b["reconnects"])  # what --status prints
    for client in (on_a, on_b, on_c):
        await client.close()


async def handshake_status(url: str, headers: dict[str, str]) -> int:
    """101 when a relay handshake with these headers is accepted, else the HTTP status."""
    try:
        async with connect(url, additional_headers=headers, open_timeout=10):
            return 101
    except InvalidStatus as exc:
        return exc.response.status_code


async def test_peer_authentication(cluster, token):
    a = cluster["A"]
    url = f"{a.url}/websocket/broadcast/"
    own = a.env["BROADCAST_WEBSOCKET_SELF"]

    async def status(headers: dict[str, str]) -> int:
        return await handshake_status(url, headers)

    assert await status({}) == 403
    assert await status(peerauth.sign("not-the-secret", own).headers("x")) == 403
    assert await status(peerauth.sign(SECRET, own, now=time.time() - 301).headers("x")) == 403
    garbage = {"secret": "HMAC-SHA256 garbage", peerauth.AUDIENCE_HEADER: peerauth.audience_of(own)}
    assert await status(garbage) == 403
    assert await status({"secret": peerauth.sign(SECRET, own).header}) == 403  # no audience: an old relay
    good = peerauth.sign(SECRET, own).headers("x")
    assert await status(good) == 101
    assert await status(good) == 403  # the same header again is a replay
    # A normal client's token does not open the relay endpoint, nor the reserved group.
    assert (
        await refused_status(a.url, path="/websocket/broadcast/", headers={"Authorization": f"Token {token}"})
        == 403
    )
    client = await open_ws(a.url, headers={"Authorization": f"Token {token}"})
    assert await client.request_error(json.dumps({"groups": {"broadcast": ["x"]}})) == (
        "group kind 'broadcast' is reserved"
    )
    await client.close()
    assert a.daphne is not None
    log = a.daphne.output()
    assert log.count("peer relay refused") == 7  # six bad headers and the token client
    assert "wrong HMAC digest for /websocket/broadcast/ (a different secret?)" in log
    assert "away from our clock (window 300s)" in log
    assert "nonce already used on this node (a replayed header)" in log
    assert "no 'secret' header" in log
    assert "no 'x-awx-ws-audience' header" in log


async def test_a_header_captured_on_one_link_opens_no_other_node(cluster):
    a, b = cluster["A"], cluster["B"]
    # What C's relay sends B, as read off a plain ws:// link: B takes it once.
    captured = peerauth.sign(SECRET, b.env["BROADCAST_WEBSOCKET_SELF"]).headers("C")
    assert await handshake_status(f"{b.url}/websocket/broadcast/", captured) == 101
    # Replayed at a third node within the window: refused, and A says why.
    assert await handshake_status(f"{a.url}/websocket/broadcast/", captured) == 403
    # Nor does pointing its audience at A help: the digest covers the audience.
    forged = {**captured, peerauth.AUDIENCE_HEADER: peerauth.audience_of(a.env["BROADCAST_WEBSOCKET_SELF"])}
    assert await handshake_status(f"{a.url}/websocket/broadcast/", forged) == 403
    assert a.daphne is not None
    log = a.daphne.output()
    assert f"signed for {peerauth.audience_of(b.env['BROADCAST_WEBSOCKET_SELF'])}, not for this node" in log
    assert "wrong HMAC digest" in log


async def test_a_relay_drops_a_dialled_node_that_cannot_prove_the_secret(cluster, token, state_dir):
    """An impostor listed as a peer (a spoofed address) accepts any header and sends messages: the
    relay drops it before taking any, and says why."""
    from websockets.asyncio.server import ServerConnection, serve

    a = cluster["A"]
    item = f"impostor{time.monotonic_ns()}"
    group = f"schedules-{item}"
    forged = json.dumps({"group": group, "text": json.dumps({"forged": True})})

    async def impostor(ws: ServerConnection) -> None:
        # What it can say first without the secret: a made-up proof, then messages for A's clients.
        with contextlib.suppress(ConnectionClosed):  # until the relay drops it
            await ws.send(json.dumps({"proof": "0" * 64}))
            while True:
                await ws.send(forged)
                await asyncio.sleep(0.05)

    async with serve(impostor, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        # A second relay of node A (a relay under another name on A's Redis would be another node
        # sharing A's layer, which topology.py refuses).
        env = {**a.env, "BROADCAST_WEBSOCKET_PEERS": f"127.0.0.1:{port}"}
        relay = Relay(a.workdir, f"A-impostor{port}", env).start()
        try:
            on_a = await open_ws(a.url, headers={"Authorization": f"Token {token}"})
            await on_a.subscribe({"schedules": [item]})
            # (In a thread: the impostor serves on this test's event loop.)
            said = "did not prove it holds BROADCAST_WEBSOCKET_SECRET"
            assert await asyncio.to_thread(relay.wait_for_output, said, 30), relay.output()
            await on_a.assert_silent(1.0)  # nothing of the impostor's reached A's client
            await a.emit(group, {"genuine": True})
            assert await on_a.recv_json(10) == {"genuine": True}
            await on_a.close()
        finally:
            relay.stop()


def test_a_relay_without_secret_refuses_to_start(state_dir):
    env = {
        **os.environ,
        "BROADCAST_WEBSOCKET_PEERS": "127.0.0.1:1,127.0.0.1:2",
        "BROADCAST_WEBSOCKET_SECRET": "",
    }
    result = subprocess.run(
        [sys.executable, "manage.py", "run_wsbroadcast"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "BROADCAST_WEBSOCKET_SECRET is empty" in result.stderr


async def test_an_unreachable_peer_is_logged_once_not_per_attempt(state_dir):
    dead = free_ports(1)[0]
    env = {
        **os.environ,
        "BROADCAST_WEBSOCKET_PEERS": f"127.0.0.1:{dead}",
        "BROADCAST_WEBSOCKET_SECRET": SECRET,
        "BROADCAST_WEBSOCKET_BACKOFF_MAX": "1",
    }
    relay = Relay(state_dir, f"lonely-{dead}", env).start()
    redis = redis_at(env["REDIS_URL"])
    key = f"asgi:relay-status:127.0.0.1:{dead}"
    failed_at: set[bytes] = set()

    async def attempts() -> bool:
        # Each failed attempt moves the link to "disconnected" anew, with a `since` of its own;
        # the relay writes its status every second (a quicker attempt may go unseen: no matter).
        row = await redis.hgetall(key)
        if row.get(b"state") == b"disconnected":
            failed_at.add(row[b"since"])
        return len(failed_at) >= 5

    try:
        # Several attempts at a 1 s cap, seen failing in the relay's own status.
        await eventually(attempts, 30, "the relay to fail 5 attempts at the dead peer")
        table = await asyncio.to_thread(relay_status, env)
    finally:
        relay.stop()
        await redis.aclose()
    failures = [line for line in relay.output().splitlines() if "failed" in line]
    assert len(failures) == 1
    assert (
        f"relay link to 127.0.0.1:{dead} failed: ConnectionRefusedError" in failures[0]
        or "Errno 111" in failures[0]
    )
    row = next(line for line in table.splitlines() if line.startswith(f"127.0.0.1:{dead}"))
    assert row.split()[1] in {"disconnected", "connecting"}


async def test_a_relay_dialling_plain_ws_off_this_host_warns_once_per_peer_at_start(state_dir):
    local = free_ports(1)[0]
    plain = ["192.0.2.1:8051", "ws://192.0.2.2:8051/websocket/broadcast/"]  # TEST-NET: never answers
    safe = ["wss://192.0.2.3:8443/websocket/broadcast/", f"127.0.0.1:{local}", f"localhost:{local}"]
    peers = ",".join(plain + safe)
    env = {**os.environ, "BROADCAST_WEBSOCKET_PEERS": peers, "BROADCAST_WEBSOCKET_SECRET": SECRET}
    relay = Relay(state_dir, f"plain-{local}", env).start()
    redis = redis_at(env["REDIS_URL"])
    try:
        # The links' status is written once they run, after the start-up warnings.
        await eventually(
            lambda: redis.exists(f"asgi:relay-status:127.0.0.1:{local}"), 30, "the relay to run its links"
        )
    finally:
        relay.stop()
        await redis.aclose()
    warnings = [line for line in relay.output().splitlines() if "dials plain ws://" in line]
    assert len(warnings) == len(plain), warnings
    for peer, line in zip(plain, warnings, strict=True):
        assert "WARNING" in line and f"relay to {peer} dials plain ws:// (BROADCAST_WEBSOCKET_PEERS)" in line


async def test_a_frozen_peer_is_noticed_by_pings(cluster):
    """SIGSTOP keeps the TCP connection open: only the pings can tell the peer is gone."""
    a, c = cluster["A"], cluster["C"]
    assert await a.peer_state(c) == "connected"
    os.killpg(c.daphne.pid, signal.SIGSTOP)
    try:

        async def a_sees_c_down() -> bool:
            return await a.peer_state(c) != "connected"

        await wait_for(a_sees_c_down, 30, "A to drop its link to the frozen C")
        assert "keepalive ping timeout" in " ".join(await a.row(c))
    finally:
        os.killpg(c.daphne.pid, signal.SIGCONT)

    async def a_sees_c_back() -> bool:
        return await a.peer_state(c) == "connected"

    await wait_for(a_sees_c_back, 30, "A to reconnect to C")
