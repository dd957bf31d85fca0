"""The service on a Sentinel-managed Redis (REDIS_SENTINELS, REDIS_SENTINEL_MASTER): every Redis
user finds the master through the sentinels, and follows it when the master dies.

Each test has a set of its own: a master, a replica and three sentinels (tests/sentinel.py).
REDIS_URL names a port nothing listens on, so nothing can reach Redis except through them.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from awx_ws.main.layers import RedisChannelLayer
from tests.client import open_ws
from tests.factories import adb, create_token, create_user
from tests.sentinel import MASTER_NAME, Passwords, sentinel_set
from tests.servers import ROOT, Gunicorn, run_manage
from tests.sse import open_sse
from tests.waiting import eventually

pytestmark = pytest.mark.both_runners

# The emitter's pace through the failover (the figure), and its most emits (25 s): it is
# stopped once deliveries flow through the new master.
RATE = 20.0
EMITS = 500
# Emits must succeed again this soon after the master is killed.
RECOVERY = 15.0
EMIT_TIMEOUT = 5.0


@pytest.fixture
def sentinels(state_dir):
    with sentinel_set(state_dir / f"sentinels-{secrets.token_hex(3)}") as servers:
        yield servers


def manage_env(sentinels) -> dict[str, str]:
    return {**os.environ, **sentinels.env, "AWX_WS_EMIT_TIMEOUT": str(EMIT_TIMEOUT)}


def manage(sentinels, *args: str) -> str:
    """`manage.py ARGS` on the sentinels' Redis; its output (it must succeed)."""
    done = run_manage(*args, env={**sentinels.env, "AWX_WS_EMIT_TIMEOUT": str(EMIT_TIMEOUT)})
    assert done.returncode == 0, done.stderr
    return done.stdout


class Emitter:
    """tests.sentinel_emitter in a process of its own, its report read line by line."""

    def __init__(self, sentinels, group: str, count: int, first: int = 0, emit_timeout: float = EMIT_TIMEOUT):
        argv = [sys.executable, "-m", "tests.sentinel_emitter", group, str(count), str(RATE), str(first)]
        pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
        env = {**manage_env(sentinels), "AWX_WS_EMIT_TIMEOUT": str(emit_timeout)}
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, **pipes)
        self.lines: list[dict[str, Any]] = []

    def finish(self, timeout: float, early: bool = False) -> list[dict[str, Any]]:
        """Every emit's line once the run is over: after its count, or at once when early
        (SIGTERM: it stops after the emit under way)."""
        if early:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            raise AssertionError(f"the emitter did not finish in {timeout}s (an emit hung?)\n{err}") from None
        assert self.proc.returncode == 0, f"the emitter failed with something not ours:\n{err}"
        return [json.loads(line) for line in out.splitlines()]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


async def receive_numbers(client, wanted: set[int], timeout: float) -> list[int]:
    """The `n` of every message the client receives until it has all of wanted (or timeout)."""
    received: list[int] = []
    deadline = time.monotonic() + timeout
    while not wanted <= set(received) and time.monotonic() < deadline:
        try:
            message = await client.recv_json(timeout=max(0.1, deadline - time.monotonic()))
        except TimeoutError:
            break
        received.append(message["n"])
    return received


async def receive_count(client, count: int, timeout: float) -> list[int]:
    """The `n` of the next count messages the client receives."""
    async with asyncio.timeout(timeout):
        return [(await client.recv_json(timeout=timeout))["n"] for _ in range(count)]


async def test_a_failover_loses_no_acknowledged_emit_and_keeps_clients_connected(
    sentinels, daphne_factory, token
):
    node = daphne_factory(sentinels.env)
    group = f"schedules-failover{secrets.token_hex(3)}"
    client = await open_ws(node.url, headers={"Authorization": f"Token {token}"})
    await client.subscribe({"schedules": [group.split("-", 1)[1]]})

    # Emits wait for the promoted master as long as this test waits for the sentinels to promote it.
    emitter = Emitter(sentinels, group, EMITS, emit_timeout=RECOVERY)
    try:
        # Deliveries flow through the first master...
        before = await receive_numbers(client, set(range(20)), timeout=10)
        assert set(range(20)) <= set(before)
        sentinels.wait_replicated()  # the subscription too: a replica in service has it
        killed_at = time.time()
        sentinels.master.kill()  # SIGKILL: no goodbye to anyone
        # ...and through the replica the sentinels promote.
        await eventually(lambda: sentinels.master_port() == sentinels.replica.port, timeout=RECOVERY)
        # 40 deliveries through the new master (2 s of emits), then the emitter stops.
        after = await receive_count(client, 40, timeout=RECOVERY + 10)
        lines = emitter.finish(timeout=RECOVERY + 10, early=True)
    finally:
        emitter.stop()

    assert [line["n"] for line in lines] == list(range(len(lines)))
    # None hung: an emit either succeeds or raises within the emit timeout (plus a connect).
    slowest = max(lines, key=lambda line: line["took"])
    assert slowest["took"] < RECOVERY + 2.5, slowest
    # None failed, but the one emit that may have been on the wire when the master died (it may
    # have been applied: trying it again could send it twice): an emit made while the sentinels
    # promote the replica waits for it instead of failing, as a job runner's would be lost.
    failed = [line for line in lines if line["error"]]
    on_the_wire = [
        line for line in failed if line["at"] < killed_at + 1 and line["at"] + line["took"] > killed_at
    ]
    assert failed == on_the_wire and len(failed) <= 1, failed
    assert all(line["error"].startswith("RedisUnavailable: ") for line in failed), failed
    waited = [line for line in lines if line["at"] > killed_at and line["took"] > 1]
    assert waited, "no emit was made while the master was down: the test proved nothing"

    # Every acknowledged emit was delivered, once, on the connection opened before the failover.
    acknowledged = {line["n"] for line in lines if not line["error"]}
    received = before + after
    received += await receive_numbers(client, acknowledged - set(received), timeout=10)
    assert acknowledged <= set(received), sorted(acknowledged - set(received))[:10]
    assert len(received) == len(set(received)), "a message was delivered twice"
    assert set(received) <= set(range(len(lines)))
    await client.assert_silent(0.5)


async def test_the_start_up_purge_and_the_sync_emit_find_the_master_through_the_sentinels(
    sentinels, daphne_factory, token
):
    group = f"schedules-sentinelpurge{secrets.token_hex(3)}"
    master = Redis(port=sentinels.master.port)
    try:
        first = daphne_factory(sentinels.env)
        client = await open_ws(first.url, headers={"Authorization": f"Token {token}"})
        await client.subscribe({"schedules": [group.split("-", 1)[1]]})
        (dead_member,) = await master.zrange(f"asgi:group:{group}", 0, -1)
        first.kill()  # its membership and liveness record stay behind in the master

        second = daphne_factory(sentinels.env)  # its start-up purge removes them
        assert await master.zrange(f"asgi:group:{group}", 0, -1) == []
        dead = dead_member.decode().split(".", 1)[1]
        assert not await master.exists(f"asgi:alive:{dead}")

        client = await open_ws(second.url, headers={"Authorization": f"Token {token}"})
        await client.subscribe({"schedules": [group.split("-", 1)[1]]})
        manage(sentinels, "emit", group, '{"n": 7}')
        assert (await client.recv_json())["n"] == 7
        # Channels' own group_send, from a producer whose layer names the sentinels, not an address.
        host = {"sentinels": [("127.0.0.1", s.port) for s in sentinels.sentinels], "master_name": MASTER_NAME}
        producer = RedisChannelLayer(hosts=[host])
        try:
            await producer.group_send(group, {"type": "internal.message", "text": '{"n": 8}'})
        finally:
            await producer.close_pools()
        assert (await client.recv_json())["n"] == 8

        # The operator's view reads the same master: the second daphne, holding the group.
        async def listed() -> bool:
            shown = await asyncio.to_thread(manage, sentinels, "connections", "--groups")
            return [group, str(second.pid)] in [line.split() for line in shown.splitlines()]

        await eventually(listed, timeout=10)
    finally:
        await master.aclose()


async def test_the_api_finds_the_master_for_readiness_throttles_and_emits(
    sentinels, daphne_factory, state_dir, shared_db
):
    staff = await adb(create_user, superuser=True)
    key = await adb(create_token, staff)
    api = Gunicorn(state_dir / "logs", {**sentinels.env, "AWX_WS_EMIT_RATE": "3/min"}).start()
    master = Redis(port=sentinels.master.port)
    try:
        node = daphne_factory(sentinels.env)
        group = f"schedules-sentinelapi{secrets.token_hex(3)}"
        client = await open_ws(node.url, headers={"Authorization": f"Token {key}"})
        await client.subscribe({"schedules": [group.split("-", 1)[1]]})
        headers = {"Authorization": f"Token {key}"}
        async with httpx.AsyncClient(base_url=api.http_url, headers=headers) as http:
            ready = await http.get("/api/v2/ready/")
            assert ready.status_code == 200, ready.text
            codes = [
                (await http.post("/api/v2/emit/", json={"group": group, "payload": {"n": n}})).status_code
                for n in range(4)
            ]
        assert codes == [202, 202, 202, 429]
        assert [(await client.recv_json())["n"] for _ in range(3)] == [0, 1, 2]
        # The throttle's counts are in the master, shared by every worker (not in the process).
        assert [key async for key in master.scan_iter("awx_ws-cache:*")]
    finally:
        await master.aclose()
        api.stop()


def emitted_all(sentinels, group: str, numbers: range) -> None:
    """Emit each of numbers (as {"n": n}) through the sentinels; every emit must succeed."""
    lines = Emitter(sentinels, group, len(numbers), first=numbers.start).finish(timeout=60)
    assert [(line["n"], line["error"]) for line in lines] == [(n, None) for n in numbers]


async def test_a_stream_resumes_across_a_failover_from_the_replicas_history(sentinels, daphne_factory, token):
    node = daphne_factory(sentinels.env)
    group = f"schedules-sentinelsse{secrets.token_hex(3)}"
    auth = {"Authorization": f"Token {token}"}
    async with open_sse(node.http_url, group, headers=auth) as stream:
        await stream.wait_ready()
        await asyncio.to_thread(emitted_all, sentinels, group, range(1))
        assert await stream.payloads(1) == [{"n": 0}]
        last_id = stream.last_id
    # Missed while away: three before the failover, three after it.
    await asyncio.to_thread(emitted_all, sentinels, group, range(1, 4))
    sentinels.wait_replicated()
    sentinels.master.kill()
    await eventually(lambda: sentinels.master_port() == sentinels.replica.port, timeout=RECOVERY)
    await asyncio.to_thread(emitted_all, sentinels, group, range(4, 7))
    async with open_sse(node.http_url, group, headers=auth, last_event_id=last_id) as stream:
        assert await stream.payloads(6) == [{"n": n} for n in range(1, 7)]
        await stream.assert_silent(0.5)


async def test_the_master_and_the_sentinels_may_each_ask_for_a_password(state_dir, daphne_factory, token):
    passwords = Passwords(master=secrets.token_hex(8), sentinels=secrets.token_hex(8))
    with sentinel_set(state_dir / f"sentinels-{secrets.token_hex(3)}", passwords) as sentinels:
        node = daphne_factory(sentinels.env)
        group = f"schedules-sentinelauth{secrets.token_hex(3)}"
        client = await open_ws(node.url, headers={"Authorization": f"Token {token}"})
        await client.subscribe({"schedules": [group.split("-", 1)[1]]})
        await asyncio.to_thread(manage, sentinels, "emit", group, '{"n": 1}')
        assert await client.recv_json() == {"n": 1}

        wrong = {**sentinels.env, "REDIS_SENTINEL_PASSWORD": "not-the-password"}
        refused = await asyncio.to_thread(run_manage, "emit", group, '{"n": 2}', env=wrong)
        assert refused.returncode == 1
        assert f"Redis at REDIS_SENTINELS={sentinels.env['REDIS_SENTINELS']}" in refused.stderr
        assert "the sentinels refused the password (REDIS_SENTINEL_PASSWORD)" in refused.stderr
        await client.assert_silent(0.5)
