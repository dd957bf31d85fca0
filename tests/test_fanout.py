"""The fan-out's membership rule, driven in-process against a real Redis: a process is a member of
a group, and lists it in its interest set, exactly while some local subscriber holds it, whatever
order joins, leaves and cancellations come in."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from awx_ws.main.layers import RedisChannelLayer
from awx_ws.main.membership import keep_joined
from tests.client import redis_at


@dataclass(eq=False)
class Subscriber:
    """A client connection as the fan-out sees one, recording what it is given."""

    frame_protocol: Any = None
    transport: str = "websocket"
    viewer: Any = None
    received: list[tuple[str, str]] = field(default_factory=list)

    async def deliver(self, group: str, text: str, message_id: str | None) -> None:
        self.received.append((group, text))


async def redis_view(layer: RedisChannelLayer, redis: Any) -> tuple[set[str], set[str]]:
    """(groups Redis lists this process's fan-out in, groups in its interest set)."""
    member = f"fanout.{layer.client_prefix}".encode()
    groups = set()
    async for key in redis.scan_iter(match="asgi:group:*"):
        if await redis.zscore(key, member) is not None:
            groups.add(key.decode().removeprefix("asgi:group:"))
    interest = {g.decode() for g in await redis.smembers(f"asgi:interest:{layer.client_prefix}")}
    return groups, interest


async def settled(layer: RedisChannelLayer, redis: Any, timeout: float = 10.0) -> tuple[set[str], set[str]]:
    """Redis's view once it matches what local subscribers hold (or the timeout ends)."""
    deadline = time.monotonic() + timeout
    while True:
        view = await redis_view(layer, redis)
        held = set(layer.fanout.groups)
        if view == (held, held) or time.monotonic() > deadline:
            return view
        await asyncio.sleep(0.02)


async def test_a_join_returns_once_redis_delivers_the_group_here(layer, own_redis):
    redis = redis_at(own_redis.url)
    subscriber = Subscriber()
    await layer.fanout.join("jobs-joined", subscriber)
    assert await redis_view(layer, redis) == ({"jobs-joined"}, {"jobs-joined"})
    layer.fanout.leave("jobs-joined", subscriber)
    assert await settled(layer, redis) == (set(), set())


async def test_joins_leaves_and_cancellations_in_any_order_leave_redis_matching(layer, own_redis):
    redis = redis_at(own_redis.url)
    rng = random.Random(77)
    groups = [f"schedules-race{n}" for n in range(8)]
    subscribers = [Subscriber() for _ in range(60)]

    async def client(subscriber: Subscriber, seed: int) -> None:
        own = random.Random(seed)
        for _ in range(40):
            group = own.choice(groups)
            action = own.random()
            if action < 0.5:
                join = asyncio.ensure_future(layer.fanout.join(group, subscriber))
                if own.random() < 0.4:
                    # Cancelled mid-join, as daphne cancels a consumer whose client went away.
                    await asyncio.sleep(own.random() / 1000)
                    join.cancel()
                try:
                    await join
                except asyncio.CancelledError:
                    pass
            elif action < 0.8:
                layer.fanout.leave(group, subscriber)
            else:
                layer.fanout.release(subscriber)
            await asyncio.sleep(0)

    await asyncio.gather(*(client(s, rng.randrange(2**32)) for s in subscribers))
    held = set(layer.fanout.groups)
    assert held  # some subscribers still hold groups: both directions are checked
    assert await settled(layer, redis) == (held, held)

    # What Redis says is what the fan-out does: held groups deliver, to their holders only.
    for group in groups:
        await layer.group_send(group, {"type": "internal.message", "text": f'"{group}"'})
    deadline = time.monotonic() + 10
    expected = {s: {g for g in held if s in layer.fanout.groups[g]} for s in subscribers}
    while any({g for g, _ in s.received} != expected[s] for s in subscribers):
        assert time.monotonic() < deadline, "not every holder got its groups' messages"
        await asyncio.sleep(0.02)

    for subscriber in subscribers:
        layer.fanout.release(subscriber)
    assert await settled(layer, redis) == (set(), set())


async def test_a_restart_of_redis_brings_back_the_fanout_and_every_kept_consumer_group(layer, own_redis):
    # Only one consumer of a process sees Redis go away (the one holding channels_redis's shared
    # receive); a peer relay's consumer that did not would wait on a channel whose groups are gone.
    subscriber = Subscriber()
    await layer.fanout.join("jobs-restarted", subscriber)
    relay_channel = await layer.new_channel()
    await layer.group_add("schedules-kept", relay_channel)
    refresher = keep_joined(layer, relay_channel, lambda: {"schedules-kept"})
    assert refresher is not None
    try:
        own_redis.kill()
        own_redis.start()  # empty
        redis = redis_at(own_redis.url)
        deadline = time.monotonic() + 15
        while not (
            await redis.zscore("asgi:group:schedules-kept", relay_channel) is not None
            and await redis_view(layer, redis) == ({"jobs-restarted"}, {"jobs-restarted"})
        ):
            assert time.monotonic() < deadline, "memberships not written again after the restart"
            await asyncio.sleep(0.05)
        await layer.group_send("schedules-kept", {"type": "internal.message", "text": '"kept"'})
        received = await asyncio.wait_for(layer.receive(relay_channel), 10)
        assert (received["group"], received["text"]) == ("schedules-kept", '"kept"')
        await redis.aclose()
    finally:
        refresher.cancel()
        with pytest.raises(asyncio.CancelledError):
            await refresher
