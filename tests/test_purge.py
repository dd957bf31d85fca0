"""The start-up purge: state of dead processes goes, state of live ones stays.

Each test has a Redis of its own (own_redis): what a purge removes is counted exactly.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import signal
import time

import httpx
import pytest

from awx_ws.main.layers.redis_presence import ProcessRecord, node_id
from tests.client import emit_to, open_ws, redis_at
from tests.sse import open_sse
from tests.waiting import eventually

pytestmark = pytest.mark.every_server


@pytest.fixture
async def redis(own_redis):
    connection = redis_at(own_redis.url)
    yield connection
    await connection.aclose()


@pytest.fixture
def start_daphne(daphne_factory, own_redis):
    """Start a server (the module's runner) on the test's own Redis, on a port of its own or on
    the one given."""
    return lambda port=None: daphne_factory({"REDIS_URL": own_redis.url}, port=port)


async def no_blocked_client(redis) -> bool:
    """True when no client of this Redis waits in a blocking command (INFO clients)."""
    return (await redis.info("clients"))["blocked_clients"] == 0


def owner(channel: bytes) -> str:
    """The client prefix in specific.<prefix>!<id> or fanout.<prefix>."""
    return channel.decode().split(".", 1)[1].split("!", 1)[0]


async def test_state_of_a_killed_daphne_is_gone_after_restart(start_daphne, own_redis, token, redis):
    first = start_daphne()
    group = f"schedules-purge{secrets.token_hex(4)}"
    client = await open_ws(first.url, headers={"Authorization": f"Token {token}"})
    await client.subscribe({"schedules": [group.split("-", 1)[1]]})
    members = await redis.zrange(f"asgi:group:{group}", 0, -1)
    assert len(members) == 1
    dead = owner(members[0])

    assert members[0] == f"fanout.{dead}".encode()  # the process's fan-out channel
    first.kill()  # SIGKILL: no chance to clean up
    # Its fan-out was waiting in BZPOPMIN. Until Redis has read the killed process's closed
    # socket, that client still counts as blocked, and Redis would hand it the message below (to
    # be lost with it) instead of queueing it: wait until Redis has let the dead client go.
    await eventually(lambda: no_blocked_client(redis), 10, "Redis to drop the killed process's receive")
    await emit_to(own_redis.url, group, {"queued": "for a dead consumer"})
    assert await redis.exists(f"asgifanout.{dead}")
    # Its liveness record has not expired yet: the pid check is what finds it dead.
    assert await redis.exists(f"asgi:alive:{dead}")

    second = start_daphne()
    assert await redis.zrange(f"asgi:group:{group}", 0, -1) == []
    assert not await redis.exists(f"asgifanout.{dead}")
    assert not await redis.exists(f"asgi:alive:{dead}")
    # Exactly the dead process's state: one membership, one queue, its records.
    assert "removed 1 group memberships, 1 message queues" in second.output()


async def test_kill_9_of_the_servers_pid_leaves_no_state_behind(start_daphne, token, redis):
    # What a user does: `kill -9` the pid they started (not its process group), then start the
    # server again on the same port. hypercorn serves from a worker process its master spawned:
    # the worker must not live on as an orphan that holds the port, serves, and stays "alive".
    first = start_daphne()
    group = f"schedules-pid{secrets.token_hex(4)}"
    clients = [await open_ws(first.url, headers={"Authorization": f"Token {token}"}) for _ in range(20)]
    for client in clients:
        await client.subscribe({"schedules": [group.split("-", 1)[1]]})
    [member] = await redis.zrange(f"asgi:group:{group}", 0, -1)

    os.kill(first.pid, signal.SIGKILL)
    for client in clients:  # every process that served them is gone: their connections end
        await asyncio.wait_for(client.ws.wait_closed(), 30)
    await asyncio.to_thread(first.wait_group_gone, 30)

    second = start_daphne(port=first.port)
    assert await redis.zrange(f"asgi:group:{group}", 0, -1) == []
    assert not await redis.exists(f"asgi:alive:{owner(member)}")
    client = await open_ws(second.url, headers={"Authorization": f"Token {token}"})
    await client.subscribe({"schedules": [group.split("-", 1)[1]]})
    [served] = await redis.zrange(f"asgi:group:{group}", 0, -1)
    assert owner(served) != owner(member)


@pytest.mark.slow  # the server's behaviour, not the database's: not in the PostgreSQL pass
@pytest.mark.parametrize("runner", ["uvicorn"], indirect=True)
async def test_a_uvicorn_worker_whose_master_was_killed_ends_even_with_a_stream_open(
    daphne_factory, own_redis, token, redis
):
    """`uvicorn --workers 2` (with one, uvicorn serves from its own process), its master killed,
    perhaps while a worker still starts: each worker sees it gone, withdraws its state and asks
    uvicorn to stop, whose graceful shutdown would wait for ever on an open event stream; they
    end anyway, and the port is free."""
    first = daphne_factory({"REDIS_URL": own_redis.url}, options=("--workers", "2"))
    group = f"schedules-workers{secrets.token_hex(4)}"
    headers = {"Authorization": f"Token {token}"}
    async with open_sse(first.http_url, group, headers=headers) as stream:
        await stream.wait_ready()
        [member] = await redis.zrange(f"asgi:group:{group}", 0, -1)
        os.kill(first.pid, signal.SIGKILL)
        with pytest.raises((httpx.HTTPError, StopAsyncIteration)):
            while True:  # keep-alives until the worker is gone, then the stream breaks
                await stream.next_event(timeout=60)
    await asyncio.to_thread(first.wait_group_gone, 30)
    assert await redis.zrange(f"asgi:group:{group}", 0, -1) == []  # withdrawn by the worker itself
    assert not await redis.exists(f"asgi:alive:{owner(member)}")
    assert "the server's master process" in first.output()
    second = daphne_factory({"REDIS_URL": own_redis.url}, port=first.port)  # the port is free
    assert "removed 0 group memberships" in second.output()


async def test_a_second_daphne_leaves_clients_of_the_first_alone(start_daphne, own_redis, token, redis):
    first = start_daphne()
    group = f"schedules-live{secrets.token_hex(4)}"
    client = await open_ws(first.url, headers={"Authorization": f"Token {token}"})
    await client.subscribe({"schedules": [group.split("-", 1)[1]]})
    before = await redis.zrange(f"asgi:group:{group}", 0, -1)

    second = start_daphne()
    assert "start-up purge: removed 0 group memberships, 0 message queues" in second.output()
    assert await redis.zrange(f"asgi:group:{group}", 0, -1) == before
    await emit_to(own_redis.url, group, {"still": "here"})
    assert await client.recv_json() == {"still": "here"}
    await client.close()


async def test_other_nodes_processes_count_until_their_record_expires(start_daphne, redis):
    group = f"jobs-remote{secrets.token_hex(4)}"
    remote, vanished, same_node_dead = (secrets.token_hex(16) for _ in range(3))
    await redis.set(
        f"asgi:alive:{remote}",
        ProcessRecord(node="another-host/boot", pid=1, started=time.time()).dumps(),
        ex=60,
    )
    # pid 1 runs here, but it was not started at this time: a reused pid is not our process.
    await redis.set(
        f"asgi:alive:{same_node_dead}",
        json.dumps({"node": node_id(), "pid": 1, "started": 12345.0}),
        ex=60,
    )
    now = time.time()
    await redis.zadd(
        f"asgi:group:{group}",
        {f"specific.{p}!{secrets.token_hex(8)}": now for p in (remote, vanished, same_node_dead)},
    )
    await redis.zadd(f"asgispecific.{vanished}!", {b"message": now})
    await redis.zadd(f"asgifanout.{vanished}", {b"message": now})  # its fan-out queue (fanout.py)
    await redis.zadd(f"asgispecific.{remote}!", {b"message": now})

    start_daphne()
    left = [owner(member) for member in await redis.zrange(f"asgi:group:{group}", 0, -1)]
    assert left == [remote]
    assert await redis.exists(f"asgispecific.{remote}!")
    assert not await redis.exists(f"asgispecific.{vanished}!")
    assert not await redis.exists(f"asgifanout.{vanished}")
    assert not await redis.exists(f"asgi:alive:{same_node_dead}")


async def test_unrelated_keys_are_never_touched(start_daphne, redis):
    keys = {"asgi-settings": "1", "asgix!": "2", "asgi:other": "3", "myapp:asgi:group": "4"}
    await redis.mset(keys)
    await redis.zadd("asgi:group:unrelated", {"not-a-process-channel": time.time()})
    start_daphne()
    assert await redis.mget(list(keys)) == [value.encode() for value in keys.values()]
    assert await redis.zrange("asgi:group:unrelated", 0, -1) == [b"not-a-process-channel"]


async def test_a_live_daphne_keeps_its_record_fresh(start_daphne, redis):
    server = start_daphne()
    keys = [key async for key in redis.scan_iter(match="asgi:alive:*")]
    records = [ProcessRecord.loads(await redis.get(key)) for key in keys]
    # The process that serves: the server's own, or the worker it started (hypercorn).
    [record] = [record for record in records if record]
    assert record.pid in [process.pid for process in server.group()]
    ours = keys[0]
    first_ttl = await redis.pttl(ours)
    previous = first_ttl

    async def refreshed() -> bool:
        nonlocal previous
        ttl = await redis.pttl(ours)
        went_up, previous = ttl > previous, ttl
        return went_up

    # The TTL only falls between heartbeats; one that rises was renewed (every 2 s in the tests'
    # settings: within two intervals, with room for a loaded machine).
    await eventually(refreshed, 5, "the heartbeat to renew the process's record")
    assert await redis.pttl(ours) > first_ttl - 1000


async def test_daphnes_starting_together_count_each_removal_once(daphne_factory, own_redis, redis):
    # A dead process of this node (its pid was not started then) in many groups: purges that
    # overlap find the same members, but only one of them removes each.
    dead = secrets.token_hex(16)
    await redis.set(f"asgi:alive:{dead}", json.dumps({"node": node_id(), "pid": 1, "started": 1.0}))
    async with redis.pipeline(transaction=False) as pipe:
        for n in range(300):
            pipe.zadd(f"asgi:group:jobs-together{n}", {f"fanout.{dead}": time.time()})
        await pipe.execute()

    servers = [daphne_factory({"REDIS_URL": own_redis.url}, wait=False) for _ in range(3)]
    removed = 0
    for server in servers:
        assert await asyncio.to_thread(server.wait_for_output, "start-up purge: removed", 30)
        removed += int(re.findall(r"start-up purge: removed (\d+) group memberships", server.output())[0])
    assert removed == 300
    assert [key async for key in redis.scan_iter(match="asgi:group:jobs-together*")] == []
