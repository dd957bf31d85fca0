"""The start-up purge: state of dead processes goes, state of live ones stays."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time

import pytest

from awx_ws.main.emit import aemit_channel_notification
from awx_ws.main.liveness import ProcessRecord, node_id
from tests.client import open_ws, redis_at

pytestmark = pytest.mark.both_runners


@pytest.fixture
async def redis(redis_server):
    connection = redis_at(redis_server.url)
    yield connection
    await connection.aclose()


def owner(channel: bytes) -> str:
    """The client prefix in specific.<prefix>!<id> or fanout.<prefix>."""
    return channel.decode().split(".", 1)[1].split("!", 1)[0]


async def test_state_of_a_killed_daphne_is_gone_after_restart(daphne_factory, token, redis):
    first = daphne_factory()
    group = f"schedules-purge{secrets.token_hex(4)}"
    client = await open_ws(first.url, headers={"Authorization": f"Token {token}"})
    await client.subscribe({"schedules": [group.split("-", 1)[1]]})
    members = await redis.zrange(f"asgi:group:{group}", 0, -1)
    assert len(members) == 1
    dead = owner(members[0])

    assert members[0] == f"fanout.{dead}".encode()  # the process's fan-out channel
    first.kill()  # SIGKILL: no chance to clean up
    await aemit_channel_notification(group, {"queued": "for a dead consumer"})
    assert await redis.exists(f"asgifanout.{dead}")
    # Its liveness record has not expired yet: the pid check is what finds it dead.
    assert await redis.exists(f"asgi:alive:{dead}")

    second = daphne_factory()
    assert await redis.zrange(f"asgi:group:{group}", 0, -1) == []
    assert not await redis.exists(f"asgifanout.{dead}")
    assert not await redis.exists(f"asgi:alive:{dead}")
    # Other tests' dead processes may be purged too: at least ours was counted.
    report = re.search(r"removed (\d+) group memberships, (\d+) message queues", second.output())
    assert report is not None
    assert int(report[1]) >= 1
    assert int(report[2]) >= 1


async def test_a_second_daphne_leaves_clients_of_the_first_alone(daphne_factory, token, redis):
    first = daphne_factory()
    group = f"schedules-live{secrets.token_hex(4)}"
    client = await open_ws(first.url, headers={"Authorization": f"Token {token}"})
    await client.subscribe({"schedules": [group.split("-", 1)[1]]})
    before = await redis.zrange(f"asgi:group:{group}", 0, -1)

    second = daphne_factory()
    assert "start-up purge" in second.output()
    assert await redis.zrange(f"asgi:group:{group}", 0, -1) == before
    await aemit_channel_notification(group, {"still": "here"})
    assert await client.recv_json() == {"still": "here"}
    await client.close()


async def test_other_nodes_processes_count_until_their_record_expires(daphne_factory, redis):
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

    daphne_factory()
    left = [owner(member) for member in await redis.zrange(f"asgi:group:{group}", 0, -1)]
    assert left == [remote]
    assert await redis.exists(f"asgispecific.{remote}!")
    assert not await redis.exists(f"asgispecific.{vanished}!")
    assert not await redis.exists(f"asgifanout.{vanished}")
    assert not await redis.exists(f"asgi:alive:{same_node_dead}")
    await redis.delete(f"asgi:group:{group}", f"asgispecific.{remote}!", f"asgi:alive:{remote}")


async def test_unrelated_keys_are_never_touched(daphne_factory, redis):
    keys = {"asgi-settings": "1", "asgix!": "2", "asgi:other": "3", "myapp:asgi:group": "4"}
    await redis.mset(keys)
    await redis.zadd("asgi:group:unrelated", {"not-a-process-channel": time.time()})
    daphne_factory()
    assert await redis.mget(list(keys)) == [value.encode() for value in keys.values()]
    assert await redis.zrange("asgi:group:unrelated", 0, -1) == [b"not-a-process-channel"]
    await redis.delete(*keys, "asgi:group:unrelated")


async def test_a_live_daphne_keeps_its_record_fresh(daphne_factory, redis):
    server = daphne_factory()
    keys = [key async for key in redis.scan_iter(match="asgi:alive:*")]
    records = [ProcessRecord.loads(await redis.get(key)) for key in keys]
    assert server.pid in [record.pid for record in records if record]
    ours = next(key for key, record in zip(keys, records, strict=True) if record and record.pid == server.pid)
    first_ttl = await redis.pttl(ours)
    await asyncio.sleep(2.5)  # one heartbeat interval in the tests' settings (2 s)
    assert await redis.pttl(ours) > first_ttl - 1000
