"""Which groups this node's clients hold, on Redis: what the relay asks peers to forward.

Each daphne process's fan-out (redis_fanout.py) mirrors the groups its client connections hold
into a Redis set `<prefix>:interest:<client prefix>`, and announces each change on the pub/sub
channel `<prefix>:interest-changed` with what changed: `{"process", "join", "leave"}`, or
`{"process", "reread": true}` when its set was rewritten whole (after a Redis restart, at
shutdown). The relay reads every live process's set once, then follows the announcements
(interest.NodeInterest): one subscribe or leave costs it the change, not all the node's groups.
Every INTEREST_RESYNC it drops processes that died (redis_presence.py decides) and reads again
those that came back, and every FULL_RESYNC it reads all the sets again, in case an announcement
was lost.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING, Any

from awx_ws.main.interest import InterestSink, NodeInterest
from awx_ws.main.layers.redis_keys import interest_changed, interest_key
from awx_ws.main.layers.redis_presence import LivenessJudge
from awx_ws.main.retry import Round, raise_if_cancelled

if TYPE_CHECKING:
    from awx_ws.main.layers.redis_types import RedisLayer

logger = logging.getLogger(__name__)

# How often the relay drops the interest of processes that died without a word.
INTEREST_RESYNC = 5.0
# How often it reads every process's set again (a lost announcement heals within this time).
FULL_RESYNC = 300.0


async def node_interest(layer: RedisLayer) -> NodeInterest:
    """Every group some live process of this node's Redis holds for a client, by process."""
    judge = LivenessJudge(layer)
    connection = layer.connection(0)
    state = NodeInterest()
    prefix = interest_key(layer.prefix, "")
    async for key in connection.scan_iter(match=prefix + "*", count=500):
        owner = key.decode()[len(prefix) :]
        if await judge.dead(owner):
            continue
        state.replace(owner, {member.decode() for member in await connection.smembers(key)})
    return state


def change_notice(process: str, join: list[str], leave: list[str], reread: bool) -> str:
    """The announcement of one process's interest change (the fan-out sends it)."""
    if reread:
        return json.dumps({"process": process, "reread": True})
    return json.dumps({"process": process, "join": join, "leave": leave})


async def _apply_notice(layer: RedisLayer, state: NodeInterest, data: Any, sink: InterestSink) -> None:
    """Apply one announcement to state and tell sink what the node gained and lost."""
    text = data.decode() if isinstance(data, bytes) else str(data)
    try:
        notice = json.loads(text)
        process = str(notice["process"])
        reread = bool(notice.get("reread"))
    except (ValueError, TypeError, KeyError):
        # A bare client prefix: a fan-out of an earlier release, which says only who changed.
        notice, process, reread = {}, text, True
    if reread or process not in state.by_process:
        # A process seen for the first time (or again, after it was taken for dead) may hold
        # more than this change: read its whole set.
        await _reread(layer, state, process, sink)
        return
    gained, lost = state.change(process, notice.get("join", ()), notice.get("leave", ()))
    if gained or lost:
        sink.update(gained, lost)


async def _reread(layer: RedisLayer, state: NodeInterest, process: str, sink: InterestSink) -> None:
    """Take one process's whole set as what it holds; tell sink what the node gained and lost."""
    members = await layer.connection(0).smembers(interest_key(layer.prefix, process))
    gained, lost = state.replace(process, {member.decode() for member in members})
    if gained or lost:
        sink.update(gained, lost)


async def _check_liveness(
    layer: RedisLayer, state: NodeInterest, dropped: set[str], sink: InterestSink
) -> None:
    """Drop the groups of processes that died; read again those of dropped ones that are back
    (a heartbeat refused at maxmemory, a loop stalled past the record's TTL)."""
    judge = LivenessJudge(layer)
    for process in list(state.by_process):
        if await judge.dead(process):
            dropped.add(process)
            gained, lost = state.replace(process, set())
            logger.info("relay: process %s is gone, and with it %d groups", process, len(lost))
            if gained or lost:
                sink.update(gained, lost)
    for process in list(dropped):
        if await judge.dead(process):
            if not await layer.connection(0).exists(interest_key(layer.prefix, process)):
                dropped.discard(process)  # purged: it will not come back
            continue
        dropped.discard(process)
        await _reread(layer, state, process, sink)


def watch_redis_interest(layer: RedisLayer, sink: InterestSink) -> Round:
    """A round (retry.supervise) that keeps sink told of the node's interest, until its pub/sub
    connection fails (then it starts again from the sets)."""

    async def watch(failures: int) -> None:
        pubsub = layer.connection(0).pubsub()
        loop = asyncio.get_running_loop()
        try:
            # Subscribed before reading (Redis confirmed it): a change made during the read is
            # announced after it.
            await pubsub.subscribe(interest_changed(layer.prefix))
            async with asyncio.timeout(INTEREST_RESYNC):
                while (await pubsub.get_message(timeout=INTEREST_RESYNC) or {}).get("type") != "subscribe":
                    pass
            state, dropped = await node_interest(layer), set[str]()
            sink.publish(state.groups)
            check_at, full_at = loop.time() + INTEREST_RESYNC, loop.time() + FULL_RESYNC
            while True:
                raise_if_cancelled()  # a cancel redis-py's send swallowed (retry.py)
                wait = max(0.0, check_at - loop.time())
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=wait)
                if message is not None:
                    await _apply_notice(layer, state, message["data"], sink)
                now = loop.time()
                if now >= full_at:
                    state, dropped = await node_interest(layer), set()
                    sink.publish(state.groups)
                    check_at, full_at = now + INTEREST_RESYNC, now + FULL_RESYNC
                elif now >= check_at:
                    await _check_liveness(layer, state, dropped, sink)
                    check_at = now + INTEREST_RESYNC
        finally:
            await pubsub.aclose()

    return watch
