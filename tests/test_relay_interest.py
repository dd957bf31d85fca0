"""The relay's view of what this node's clients hold: read once, then followed change by change, so
a subscribe or leave with 10,000 groups held costs the change, not all the groups."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from collections.abc import Set as AbstractSet

import pytest

from awx_ws.main.interest import NodeInterest
from awx_ws.main.layers import RedisChannelLayer, redis_interest
from tests.client import open_ws, redis_at
from tests.test_fanout import Subscriber
from tests.waiting import eventually

# --- the bookkeeping (pure) -------------------------------------------------------------------


@pytest.mark.unit
def test_a_group_stays_while_any_process_holds_it():
    node = NodeInterest()
    assert node.change("a", ["jobs-x", "jobs-y"], []) == ({"jobs-x", "jobs-y"}, set())
    assert node.change("b", ["jobs-x"], []) == (set(), set())  # already the node's
    assert node.change("a", [], ["jobs-x", "jobs-y"]) == (set(), {"jobs-y"})
    assert node.groups == {"jobs-x"}
    assert node.replace("b", set()) == (set(), {"jobs-x"})
    assert node.by_process == {} and node.groups == frozenset()


@pytest.mark.unit
def test_a_join_and_leave_in_one_change_is_no_change_for_the_node():
    node = NodeInterest()
    assert node.change("a", ["jobs-x"], ["jobs-x"]) == (set(), set())
    assert node.change("a", ["jobs-x", "jobs-x"], []) == ({"jobs-x"}, set())  # counted once
    assert node.change("a", [], ["jobs-z"]) == (set(), set())  # never held


# --- the watcher on a real Redis ------------------------------------------------------------


class Sink:
    """The relay as the watcher sees it: the whole interest, then changes."""

    def __init__(self) -> None:
        self.interest: set[str] = set()
        self.wholes = 0
        self.changes: list[tuple[set[str], set[str]]] = []

    def publish(self, interest: frozenset[str]) -> None:
        self.interest = set(interest)
        self.wholes += 1

    def update(self, gained: AbstractSet[str], lost: AbstractSet[str]) -> None:
        self.interest |= gained
        self.interest -= lost
        self.changes.append((set(gained), set(lost)))


@pytest.fixture
async def watching(own_redis, monkeypatch) -> AsyncIterator[Sink]:
    """The relay's interest watcher on a layer of its own (as the relay process has), on the
    test's Redis, checking for dead processes every 0.2 s."""
    monkeypatch.setattr(redis_interest, "INTEREST_RESYNC", 0.2)
    relay_layer = RedisChannelLayer(hosts=[{"address": own_redis.url}])
    sink = Sink()
    task = asyncio.create_task(redis_interest.watch_redis_interest(relay_layer, sink)(0))
    # Subscribed to the notices, and the sets read once: from here on every change is a notice.
    await eventually(lambda: sink.wholes, 10, "the watcher's first read")
    yield sink
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await relay_layer.close_pools()


async def test_with_10000_groups_held_a_change_reads_no_set_again(layer, own_redis):
    holder = Subscriber()
    many = [f"job_events-{n}" for n in range(10_000)]
    await asyncio.gather(*(layer.fanout.join(group, holder) for group in many))
    sink = Sink()
    watcher = asyncio.create_task(redis_interest.watch_redis_interest(layer, sink)(0))
    redis = redis_at(own_redis.url)
    try:
        await eventually(lambda: len(sink.interest) == 10_000, 20, "the watcher's first read")
        await redis.config_resetstat()

        newcomer = Subscriber()
        await layer.fanout.join("job_events-new", newcomer)
        layer.fanout.leave("job_events-0", holder)
        await eventually(lambda: "job_events-0" not in sink.interest, 10, "the leave to reach the relay")
        assert sink.changes == [({"job_events-new"}, set()), (set(), {"job_events-0"})]
        assert sink.interest == {*many[1:], "job_events-new"}
        assert sink.wholes == 1
        calls = await redis.info("commandstats")
        # The relay read no process's set, and walked no keys, for either change.
        assert "cmdstat_smembers" not in calls and "cmdstat_scan" not in calls, calls
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        await redis.aclose()


async def test_a_notice_of_an_earlier_release_rereads_that_process_only(layer, own_redis, watching):
    await layer.liveness.start()  # a live process whose fan-out says only who changed
    redis = redis_at(own_redis.url)
    try:
        await redis.sadd(f"asgi:interest:{layer.client_prefix}", "jobs-old-style")
        await redis.publish("asgi:interest-changed", layer.client_prefix)
        await eventually(lambda: watching.changes, 10, "the notice to reach the relay")
        assert watching.changes == [({"jobs-old-style"}, set())]
    finally:
        await redis.aclose()


async def test_a_killed_daphnes_groups_leave_the_node_interest(
    daphne_factory, own_redis, token, layer, watching
):
    server = daphne_factory({"REDIS_URL": own_redis.url})
    client = await open_ws(server.url, headers={"Authorization": f"Token {token}"})
    await client.subscribe({"schedules": ["doomed"]})
    await eventually(lambda: "schedules-doomed" in watching.interest, 10, "the subscribe to reach the relay")
    os.kill(server.pid, signal.SIGKILL)
    server.proc.wait(10)
    await eventually(
        lambda: "schedules-doomed" not in watching.interest, 10, "the dead process's groups to go"
    )
    assert watching.changes[-1] == (set(), {"schedules-doomed"})
    await client.close()


async def test_a_process_taken_for_dead_is_read_again_when_its_record_is_back(layer, watching):
    holder = Subscriber()
    await layer.fanout.join("jobs-back", holder)
    await eventually(lambda: "jobs-back" in watching.interest, 10, "the join to reach the relay")
    await layer.liveness.stop()  # its record lapses (a heartbeat refused at maxmemory, say)
    await eventually(lambda: "jobs-back" not in watching.interest, 10, "the process to be taken for dead")
    await layer.liveness.start()  # the heartbeat is back; the process changed nothing meanwhile
    await eventually(lambda: "jobs-back" in watching.interest, 10, "its groups to be read again")
