"""Operators' endpoints: liveness, readiness, and metrics that follow real traffic across processes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest

from tests.client import open_ws
from tests.factories import adb, create_token, create_user
from tests.servers import ROOT, DaphneNode, Gunicorn, free_port
from tests.sse import open_sse
from tests.test_cluster import members
from tests.test_cluster_recovery import pair  # noqa: F401 (the 2-node fixture)
from tests.waiting import eventually

# Its tests create users, tokens and jobs the servers read (conftest.shared_db).
pytestmark = pytest.mark.usefixtures("shared_db")

Samples = Counter[tuple[str, frozenset[tuple[str, str]]]]


async def scrape(base_url: str, headers: dict[str, str] | None = None) -> Samples:
    """Every sample of GET /api/v2/metrics, keyed by name and labels."""
    from prometheus_client.parser import text_string_to_metric_families

    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.get(f"{base_url}/api/v2/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=")
    samples: Samples = Counter()
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


class Node:
    """A node of a test's own: daphne processes and an API sharing one metrics directory that
    nothing else writes, so a figure moves only with what the test does. (The session's shared
    nodes may still be handling connections an earlier test let go of.)"""

    def __init__(self, daphne_factory: Any, state_dir: Path, env: dict[str, str] | None = None):
        metrics_dir = state_dir / f"metrics-{time.monotonic_ns()}"
        self.env = {"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), **(env or {})}
        self.daphne_factory = daphne_factory
        self.api = Gunicorn(state_dir / "logs", self.env).start()

    def daphne(self) -> DaphneNode:
        """Start a daphne process of this node."""
        return cast(DaphneNode, self.daphne_factory(self.env))

    async def scrape(self) -> Samples:
        """The node's metrics, as its API serves them."""
        return await scrape(self.api.http_url)

    async def emit(self, group: str, count: int) -> None:
        """count messages {"n": 0...} to group, emitted by a process of this node (Django's shell)."""
        code = (
            "from awx_ws.main.emit import emit_channel_notification\n"
            f"for n in range({count}): emit_channel_notification({group!r}, {{'n': n}})"
        )
        await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "manage.py", "shell", "-c", code],
            cwd=ROOT,
            env={**os.environ, **self.env},
            check=True,
            timeout=60,
        )


@pytest.fixture
def own_node(daphne_factory, state_dir, own_redis) -> Iterator[Node]:
    """A node of the test's own, on a Redis of its own."""
    node = Node(daphne_factory, state_dir, {"REDIS_URL": own_redis.url})
    yield node
    node.api.stop()


async def test_metrics_follow_connections_subscriptions_and_messages(own_node, token):
    headers = {"Authorization": f"Token {token}"}
    server = own_node.daphne()
    group = "schedules-metrics"
    before = await own_node.scrape()
    sockets = [await open_ws(server.url, headers=headers) for _ in range(3)]
    for ws in sockets:
        await ws.subscribe({"schedules": ["metrics"]})
    async with (
        open_sse(server.http_url, group, headers=headers) as one,
        open_sse(server.http_url, group, headers=headers) as two,
    ):
        await one.wait_ready()
        await two.wait_ready()
        during = await own_node.scrape()
        assert moved(before, during, "awx_ws_connections", transport="websocket") == 3
        assert moved(before, during, "awx_ws_connections", transport="sse") == 2
        assert moved(before, during, "awx_ws_subscriptions", kind="schedules") == 5

        await own_node.emit(group, 10)
        for ws in sockets:
            assert [(await ws.recv_json())["n"] for _ in range(10)] == list(range(10))
        assert await one.payloads(10) == await two.payloads(10) == [{"n": n} for n in range(10)]

        async def counted() -> Samples | None:
            # Deliveries reach the metrics within a second (metrics.Tally), not per message.
            samples = await own_node.scrape()
            websocket = moved(during, samples, "awx_ws_messages_delivered_total", transport="websocket")
            sse = moved(during, samples, "awx_ws_messages_delivered_total", transport="sse")
            return samples if websocket >= 30 and sse >= 20 else None

        after = await eventually(counted, 5, "the deliveries to be counted")
        assert moved(during, after, "awx_ws_messages_emitted_total", kind="schedules") == 10
        assert moved(during, after, "awx_ws_messages_delivered_total", transport="websocket") == 30
        assert moved(during, after, "awx_ws_messages_delivered_total", transport="sse") == 20
    for ws in sockets:
        await ws.close()

    async def settled() -> Samples | None:
        samples = await own_node.scrape()
        unsubscribed = value(samples, "awx_ws_subscriptions", kind="schedules") == value(
            before, "awx_ws_subscriptions", kind="schedules"
        )
        return samples if unsubscribed else None

    final = await eventually(settled, 10, "the closed connections' subscriptions to go")
    assert moved(before, final, "awx_ws_connections", transport="websocket") == 0
    assert moved(before, final, "awx_ws_connections", transport="sse") == 0
    assert moved(before, final, "awx_ws_subscriptions", kind="schedules") == 0


async def test_a_killed_daphne_leaves_the_gauges_and_the_next_start_purges(own_node, token):
    headers = {"Authorization": f"Token {token}"}
    before = await own_node.scrape()
    doomed = own_node.daphne()
    sockets = [await open_ws(doomed.url, headers=headers) for _ in range(2)]
    for ws in sockets:
        await ws.subscribe({"jobs": ["status_changed"]})
    assert moved(before, await own_node.scrape(), "awx_ws_connections", transport="websocket") == 2
    os.kill(doomed.pid, signal.SIGKILL)
    doomed.proc.wait(10)
    for ws in sockets:
        await ws.close()  # the server is gone: closed at once (1006)
    after_kill = await own_node.scrape()
    assert moved(before, after_kill, "awx_ws_connections", transport="websocket") == 0
    # kill -9 left the process's group membership in Redis: the next daphne's start-up purge
    # removes it and counts it.
    own_node.daphne()
    after_start = await own_node.scrape()
    assert moved(before, after_start, "awx_ws_startup_purge_removed_total", what="memberships") == 1


def test_a_process_does_not_inherit_the_live_figures_of_a_dead_one_with_its_pid(tmp_path):
    # The file a process killed with -9 left behind, under the pid the next process will have.
    script = """
import os, sys
from prometheus_client.mmap_dict import MmapedDict, mmap_key
stale = MmapedDict(os.path.join(sys.argv[1], f"gauge_livesum_{os.getpid()}.db"))
key = mmap_key("awx_ws_connections", "awx_ws_connections", ["transport"], ["websocket"], "")
stale.write_value(key, 7.0, 0.0)
stale.close()
import django
django.setup()
from awx_ws.main import metrics
metrics.CONNECTIONS.labels("websocket").inc()
print(metrics.render()[0].decode())
"""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert 'awx_ws_connections{transport="websocket"} 1.0' in result.stdout.splitlines()


async def test_metrics_are_for_superusers_or_this_machine(api, shared_db):
    foreign = {"X-Forwarded-For": "203.0.113.9"}  # as our nginx passes a remote client on
    async with httpx.AsyncClient(timeout=10) as http:
        url = f"{api.http_url}/api/v2/metrics"
        assert (await http.get(url)).status_code == 200  # loopback
        assert (await http.get(url, headers=foreign)).status_code == 401
        member = await adb(create_token, await adb(create_user))
        refused = await http.get(url, headers={**foreign, "Authorization": f"Token {member}"})
        assert refused.status_code == 403
        assert refused.json() == {"detail": "metrics are for superusers, or for requests from this machine"}
        admin = await adb(create_token, await adb(create_user, superuser=True))
        assert (
            await http.get(url, headers={**foreign, "Authorization": f"Token {admin}"})
        ).status_code == 200


async def test_ping_answers_and_ready_names_what_is_down(api, state_dir):
    async with httpx.AsyncClient(timeout=10) as http:
        ping = await http.get(f"{api.http_url}/api/v2/ping/")
        assert ping.status_code == 200 and ping.json()["ping"] == "pong"
        ready = await http.get(f"{api.http_url}/api/v2/ready/")
        assert (ready.status_code, ready.json()) == (200, {"redis": "ok", "database": "ok"})

        dead_port = free_port()
        orphan = Gunicorn(state_dir / "logs", {"REDIS_URL": f"redis://127.0.0.1:{dead_port}/0"}).start()
        try:
            assert (await http.get(f"{orphan.http_url}/api/v2/ping/")).status_code == 200
            not_ready = await http.get(f"{orphan.http_url}/api/v2/ready/")
        finally:
            orphan.stop()
    assert not_ready.status_code == 503
    body: dict[str, Any] = not_ready.json()
    assert body["database"] == "ok"
    assert body["redis"].startswith(f"unreachable at REDIS_URL=redis://127.0.0.1:{dead_port}/0: ")


@pytest.mark.slow
async def test_relay_metrics_show_the_link_and_what_crossed_it(pair, token, state_dir):  # noqa: F811
    a, b = pair
    api_a = Gunicorn(state_dir / "logs", a.env).start()
    try:
        before = await scrape(api_a.http_url)
        peer_b = f"127.0.0.1:{b.daphne_port}"
        assert value(before, "awx_ws_relay_link_up", peer=peer_b) == 1
        item = f"relayed{time.monotonic_ns()}"
        on_a = await open_ws(a.url, headers={"Authorization": f"Token {token}"})
        await on_a.subscribe({"schedules": [item]})
        await eventually(lambda: members(b, f"schedules-{item}"), 20, "A's relay to ask B for the group")
        for n in range(3):
            await b.emit(f"schedules-{item}", {"n": n})
        assert [(await on_a.recv_json())["n"] for _ in range(3)] == [0, 1, 2]
        after = await scrape(api_a.http_url)
        assert moved(before, after, "awx_ws_relay_received_total", peer=peer_b) == 3
        await on_a.close()
    finally:
        api_a.stop()


def run_connections(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "manage.py", "connections", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout


async def test_the_connections_command_shows_each_process_and_its_groups(daphne_factory, token):
    server = daphne_factory()
    headers = {"Authorization": f"Token {token}"}
    item = f"cmd{time.monotonic_ns()}"
    sockets = [await open_ws(server.url, headers=headers) for _ in range(2)]
    await sockets[0].subscribe({"schedules": [item]})
    await sockets[1].subscribe({"jobs": ["status_changed"]})
    async with open_sse(server.http_url, f"schedules-{item}", headers=headers) as stream:
        await stream.wait_ready()
        expected = (str(server.pid), "2", "1", "2")
        for _ in range(50):  # figures come with the next heartbeat (every 2 s in the tests)
            output = await asyncio.to_thread(run_connections, "--groups")
            rows = [line.split() for line in output.splitlines() if line.strip()]
            if any(tuple(row[:4]) == expected for row in rows):
                break
            await asyncio.sleep(0.2)
        assert any(tuple(row[:4]) == expected for row in rows), output
        assert output.splitlines()[1].split() == [
            "PID",
            "WEBSOCKETS",
            "STREAMS",
            "GROUPS",
            "TASKS",
            "UPDATED",
        ]
        assert [f"schedules-{item}", str(server.pid)] in rows
        assert any(row[0] == "jobs-status_changed" and str(server.pid) in row[1].split(",") for row in rows)
    for ws in sockets:
        await ws.close()
