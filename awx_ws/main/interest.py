"""Which groups this node's clients hold: what the relay asks peers to forward.

Each daphne process's fan-out (fanout.py) mirrors the groups its client connections hold into a
Redis set `<prefix>:interest:<client prefix>`, announcing changes on the pub/sub channel
`<prefix>:interest-changed`. The relay takes the union over live processes
(liveness.py decides which are live), so peer subscriptions of BroadcastConsumers never count:
a node that merely forwards a group does not ask its other peers for it.

A layer without Redis (RabbitMQ) has no such store: there the fan-outs announce their groups on
the layer itself (InterestAnnouncer) and the relay listens (watch_layer_interest).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from awx_ws.main.liveness import LivenessJudge

if TYPE_CHECKING:
    from awx_ws.main.layers import RedisChannelLayer

logger = logging.getLogger(__name__)

# The relay recomputes interest at every change notice, and at least this often (missed notices).
INTEREST_RESYNC = 5.0


def interest_key(layer_prefix: str, client_prefix: str) -> str:
    """Redis set of one process's client-held groups."""
    return f"{layer_prefix}:interest:{client_prefix}"


def changes_channel(layer_prefix: str) -> str:
    """Pub/sub channel announcing that some process's interest set changed."""
    return f"{layer_prefix}:interest-changed"


async def node_interest(layer: RedisChannelLayer) -> set[str]:
    """Every group some live process of this node's Redis holds for a client."""
    judge = LivenessJudge(layer)
    connection = layer.connection(0)
    groups: set[str] = set()
    prefix = f"{layer.prefix}:interest:"
    async for key in connection.scan_iter(match=prefix + "*", count=500):
        owner = key.decode()[len(prefix) :]
        if await judge.dead(owner):
            continue
        groups.update(member.decode() for member in await connection.smembers(key))
    return groups


async def watch_redis_interest(layer: RedisChannelLayer, publish: Callable[[frozenset[str]], None]) -> None:
    """Publish the node's interest from Redis at every change notice and every INTEREST_RESYNC."""
    failures = 0
    while True:
        pubsub = layer.connection(0).pubsub()
        try:
            await pubsub.subscribe(changes_channel(layer.prefix))
            while True:
                publish(frozenset(await node_interest(layer)))
                failures = 0
                # Wait for a change notice (or the periodic resync), then drain the burst.
                await pubsub.get_message(ignore_subscribe_messages=True, timeout=INTEREST_RESYNC)
                while await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.01):
                    pass
        except asyncio.CancelledError:
            raise
        except (RedisError, OSError) as exc:
            failures += 1
            if failures == 1:
                logger.warning("relay cannot read this node's interest from Redis: %s", exc)
            await asyncio.sleep(min(2.0**failures, 10.0))
        finally:
            await pubsub.aclose()


# Layers without a shared store (RabbitMQ): every process's fan-out announces its groups on the
# layer itself, at each change (debounced) and every ANNOUNCE_EVERY seconds; the relay keeps each
# announcement for its ttl, so the groups of a process that died without a word fall away.
INTEREST_GROUP = "awx_ws.interest"
INTEREST_TYPE = "awx_ws.interest"
INTEREST_REQUEST_TYPE = "awx_ws.interest_request"
ANNOUNCE_EVERY = 5.0
# A burst of joins (500 clients arriving) makes one announcement, not one per join.
DEBOUNCE = 0.05


class InterestAnnouncer:
    """One fan-out's announcements of the groups it holds (see INTEREST_GROUP)."""

    # The group every fan-out's channel joins, so a starting relay can ask them all at once.
    REQUESTS = "awx_ws.interest-requests"

    def __init__(self, layer: Any, channel: str, groups: Callable[[], list[str]]) -> None:
        self.layer = layer
        self.channel = channel
        self.groups = groups
        self._changed = asyncio.Event()

    def changed(self) -> None:
        """Announce soon (the groups changed, or a relay asked)."""
        self._changed.set()

    async def run(self) -> None:
        """Announce until cancelled."""
        failures = 0
        while True:
            try:
                await asyncio.wait_for(self._changed.wait(), ANNOUNCE_EVERY)
            except TimeoutError:
                pass
            self._changed.clear()
            message = {
                "type": INTEREST_TYPE,
                "process": self.channel,
                "groups": sorted(self.groups()),
                "ttl": 3 * ANNOUNCE_EVERY,
            }
            try:
                await self.layer.group_send(INTEREST_GROUP, message)
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                if failures == 1 or failures % 100 == 0:
                    logger.warning(
                        "could not announce %s's groups (%d failures): %s", self.channel, failures, exc
                    )
                self._changed.set()  # try again after the backoff
                await asyncio.sleep(min(0.1 * 2**failures, ANNOUNCE_EVERY))
            await asyncio.sleep(DEBOUNCE)


async def watch_layer_interest(layer: Any, publish: Callable[[frozenset[str]], None]) -> None:
    """Publish the union of the groups live processes announce on the layer (InterestAnnouncer)."""
    failures = 0
    while True:
        try:
            channel = await layer.new_channel("relay.")
            await layer.group_add(INTEREST_GROUP, channel)
            await layer.group_send(InterestAnnouncer.REQUESTS, {"type": INTEREST_REQUEST_TYPE})
            break
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            failures += 1
            if failures == 1:
                logger.warning("relay cannot listen for this node's interest: %s", exc)
            await asyncio.sleep(min(2.0**failures, 10.0))
    held: dict[str, tuple[frozenset[str], float]] = {}
    loop = asyncio.get_running_loop()
    while True:
        try:
            message = await asyncio.wait_for(layer.receive(channel), ANNOUNCE_EVERY)
        except TimeoutError:
            message = None
        now = loop.time()
        if message is not None and message.get("type") == INTEREST_TYPE:
            try:
                groups = frozenset(str(group) for group in message["groups"])
                held[str(message["process"])] = (groups, now + float(message["ttl"]))
            except (KeyError, TypeError, ValueError) as exc:
                logger.warning("ignoring a malformed interest announcement: %s", exc)
        for process in [process for process, (_, expires) in held.items() if expires < now]:
            del held[process]
        publish(frozenset().union(*(groups for groups, _ in held.values())))
