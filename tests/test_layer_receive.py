"""A consumer cancelled while its receive() pops the process's inbox does not take another
consumer's message with it (layers/redis_receive.py). daphne cancels a consumer whose client left;
the soak lost relayed status changes to every peer at once when a peer's short history-reading
connection ended at that moment, holding the pop of the live relay links' message."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

from redis import Redis

from tests.waiting import eventually


def send_from_another_process(url: str, channel: str, message: dict[str, Any]) -> None:
    """Send as another process would, while this test's event loop stands still."""
    from awx_ws.main.layers import RedisChannelLayer

    async def send() -> None:
        other = RedisChannelLayer(hosts=[{"address": url}])
        try:
            await other.send(channel, message)
        finally:
            await other.close_pools()

    thread = threading.Thread(target=asyncio.run, args=(send(),))
    thread.start()
    thread.join()


async def popping_receive(layer: Any, channel: str) -> asyncio.Future[Any]:
    """A receive of channel that holds the inbox's receive lock: its BZPOPMIN is out."""
    popping = asyncio.ensure_future(layer.receive(channel))

    async def pops() -> bool:
        return layer.receive_lock is not None and layer.receive_lock.locked()

    await eventually(pops, 5, "the receive to hold the lock")
    return popping


async def test_a_receive_cancelled_mid_pop_loses_no_message_of_another_consumer(layer, own_redis):
    leaving, staying = await layer.new_channel(), await layer.new_channel()
    popping = await popping_receive(layer, leaving)
    waiting = asyncio.ensure_future(layer.receive(staying))
    inbox = layer.prefix + layer.non_local_name(staying)
    # Without letting this loop run: the message reaches Redis, which hands it to the blocked pop
    # at once (the inbox is empty again), and the pop's caller is cancelled before it reads it,
    # as daphne cancels a consumer whose client has gone.
    send_from_another_process(own_redis.url, staying, {"type": "test.message", "n": 1})
    with Redis.from_url(own_redis.url) as sync:
        assert sync.zcard(inbox) == 0
    popping.cancel()
    assert (await asyncio.wait_for(waiting, 10))["n"] == 1
    # Nothing left over: a later message arrives on its own.
    await layer.send(staying, {"type": "test.message", "n": 2})
    assert (await asyncio.wait_for(layer.receive(staying), 10))["n"] == 2


async def test_a_pop_no_receive_took_over_ends_with_the_layer(layer):
    leaving = await layer.new_channel()
    popping = await popping_receive(layer, leaving)
    popping.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await popping
    # Its pop waits for the next receive of the inbox; with none, closing the layer ends it
    # (no task pending on a closed pool when the loop ends).
    left = list(layer._left_pops.values())
    assert len(left) == 1 and not left[0].done()
    await layer.close_pools()
    assert left[0].cancelled()
