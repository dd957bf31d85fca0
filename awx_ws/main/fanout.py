"""Per-process fan-out: one channel-layer member per group per process, local delivery to sockets.

The Channels way puts every client connection into the Redis group and hands each message to
each consumer through its own queue, task and dispatch (channels 4.2+ also hops to a thread per
message for `aclose_old_connections`). Here a daphne process joins a group once, with one channel
of its own; one loop receives each message once and writes the same prepared websocket frame to
every local subscriber's socket. Redis work per emit is one entry per process, not per subscriber.

`Fanout` works on any channel layer with groups (the RabbitMQ one): one channel from
new_channel(), one receive loop. `RedisFanout` is the Redis layer's: a queue key of its own that it
pops in batches, and group memberships it refreshes and rewrites after a Redis restart.

The groups held here are also this node's interest for the relay (interest.py): the Redis fan-out
mirrors them into `<prefix>:interest:<client prefix>` with a change notice; the generic one
announces them on the layer itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

from channels.exceptions import StopConsumer
from redis.exceptions import RedisError

from awx_ws.main import metrics
from awx_ws.main.interest import INTEREST_REQUEST_TYPE, InterestAnnouncer, changes_channel, interest_key

if TYPE_CHECKING:
    from awx_ws.main.layers import RedisChannelLayer

logger = logging.getLogger(__name__)

# autobahn's WebSocketProtocol.STATE_OPEN
_STATE_OPEN = 3
# Messages taken from Redis per round trip while the queue is busy.
BATCH = 256


def fanout_channel(client_prefix: str) -> str:
    """The channel a process's fan-out joins groups with: `fanout.<client prefix>`."""
    return f"fanout.{client_prefix}"


async def keep_joined(layer: Any, channel: str, groups: Callable[[], Iterable[str]]) -> None:
    """Re-join channel's groups every quarter of the layer's group_expiry, until cancelled.

    channels_redis drops group members older than group_expiry (a day by default) at the next
    group_send. A consumer re-joins when it reconnects, but a process's fan-out membership, or a
    peer relay's, lives as long as the group is held, which can be longer: refresh its timestamp.
    """
    group_expiry = getattr(layer, "group_expiry", None)
    if not group_expiry:  # a layer without group expiry (RabbitMQ): memberships last as they are
        return
    interval = max(1.0, group_expiry / 4)
    while True:
        await asyncio.sleep(interval)
        for group in list(groups()):
            try:
                await layer.group_add(group, channel)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("could not refresh membership of %s in %s: %s", channel, group, exc)
                break


class Subscriber(Protocol):
    """What the fan-out needs of a client connection."""

    # daphne's websocket protocol, to write the shared prepared frame to; None to be called on
    # `deliver` instead (SSE streams, clients that want ids, a connection replaying history).
    frame_protocol: Any
    # "websocket" or "sse", for the metrics.
    transport: str

    async def deliver(self, group: str, text: str, message_id: str | None) -> None:
        """Send one message of group (payload JSON text; its history id, if it has one)."""


class Fanout:
    """The groups this process's clients hold, and the one loop delivering their messages.

    This base works on any channel layer with groups: a channel from new_channel(), group_add
    and group_discard, one receive() per message; it announces its groups on the layer for the
    relay (interest.InterestAnnouncer). RedisFanout below is the Redis layer's faster variant.
    """

    def __init__(self, layer: Any) -> None:
        self.layer = layer
        self.groups: dict[str, set[Subscriber]] = {}
        self.channel: str | None = None
        self._lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        # Groups left while the layer could not be told: their memberships are removed on resync.
        self._unsynced: set[str] = set()
        self._announcer: InterestAnnouncer | None = None

    @property
    def lock(self) -> asyncio.Lock:
        """Held while group memberships change; other per-client layer work may share it."""
        return self._lock

    async def join(self, group: str, subscriber: Subscriber) -> None:
        """Deliver group's messages to subscriber from now on."""
        # One change at a time: a group_discard overtaking a later group_add would lose the group.
        async with self._lock:
            members = self.groups.get(group)
            if members is None:
                channel = await self._channel()
                await self.layer.group_add(group, channel)
                self._unsynced.discard(group)
                await self._interest_added(group)
                members = self.groups[group] = set()
            members.add(subscriber)
            metrics.SUBSCRIPTIONS.labels(metrics.group_kind(group)).inc()

    async def leave(self, group: str, subscriber: Subscriber) -> None:
        """Stop delivering group's messages to subscriber."""
        async with self._lock:
            members = self.groups.get(group)
            if members is None or subscriber not in members:
                return
            members.discard(subscriber)
            metrics.SUBSCRIPTIONS.labels(metrics.group_kind(group)).dec()
            if members:
                return
            del self.groups[group]
            try:
                if self.channel is not None:
                    await self.layer.group_discard(group, self.channel)
                await self._interest_removed(group)
            except (RedisError, OSError) as exc:
                # The client is gone either way; the layer is set right when it is back (resync).
                self._unsynced.add(group)
                metrics.REDIS_ERRORS.labels("fanout_leave").inc()
                logger.warning("could not leave %s in %s, will later: %s", group, self._service(), exc)

    async def resync(self) -> None:
        """Remove memberships of groups left while the layer was unreachable."""
        async with self._lock:
            if self.channel is None:
                return
            for group in sorted(self._unsynced - set(self.groups)):
                await self.layer.group_discard(group, self.channel)
            self._unsynced.clear()

    def _service(self) -> str:
        return str(getattr(self.layer, "service", "the channel layer"))

    async def _interest_added(self, group: str) -> None:
        if self._announcer is not None:
            self._announcer.changed()

    async def _interest_removed(self, group: str) -> None:
        if self._announcer is not None:
            self._announcer.changed()

    async def _open(self) -> str:
        """Create this process's channel (no tasks yet)."""
        channel = await self.layer.new_channel("fanout.")
        # The relay asks every process for its groups when it starts: the request comes here.
        await self.layer.group_add(InterestAnnouncer.REQUESTS, channel)
        self._announcer = InterestAnnouncer(self.layer, channel, lambda: list(self.groups))
        return str(channel)

    def _background(self) -> list[Any]:
        """Coroutines that run beside the receive loop for the life of the process."""
        work = [self._retry_unsynced()]
        if self._announcer is not None:
            work.append(self._announcer.run())
        return work

    async def _channel(self) -> str:
        if self.channel is None:
            self.channel = await self._open()
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._receive_forever())]
            self._tasks += [loop.create_task(work) for work in self._background()]
        return self.channel

    async def _retry_unsynced(self) -> None:
        while True:
            await asyncio.sleep(5.0)
            if self._unsynced:
                try:
                    await self.resync()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    logger.info("fan-out %s still cannot leave groups: %s", self.channel, exc)

    async def _receive(self, channel: str) -> list[dict[str, Any]]:
        """The next message(s) for channel."""
        return [await self.layer.receive(channel)]

    async def _receive_forever(self) -> None:
        channel = self.channel
        if channel is None:
            raise RuntimeError("fan-out loop started without a channel")
        failures = 0
        while True:
            try:
                if failures or self._unsynced:
                    await self.resync()  # the layer is back, perhaps restarted empty
                batch = await self._receive(channel)
            except asyncio.CancelledError:
                raise
            except StopConsumer:
                logger.info("fan-out %s stops: the channel layer was closed", channel)
                return
            except Exception as exc:
                failures += 1
                metrics.REDIS_ERRORS.labels("fanout_receive").inc()
                if failures == 1 or failures % 100 == 0:
                    logger.warning("fan-out receive on %s failed %d time(s): %s", channel, failures, exc)
                await asyncio.sleep(min(0.1 * 2**failures, 5.0))
                continue
            if failures:
                logger.info("fan-out receive on %s works again after %d failures", channel, failures)
            failures = 0
            for message in batch:
                try:
                    if message.get("type") == INTEREST_REQUEST_TYPE:
                        if self._announcer is not None:
                            self._announcer.changed()
                        continue
                    group = message.get("group", "")
                    members = self.groups.get(group)
                    if members:
                        await self._deliver(members, group, message["text"], message.get("id"))
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # one bad message must not stop delivery of the rest
                    metrics.DROPPED.labels("undeliverable").inc()
                    logger.warning("fan-out could not deliver a message on %s: %r", channel, exc)

    async def _deliver(self, members: set[Subscriber], group: str, text: str, message_id: str | None) -> None:
        prepared = None
        fallback = []
        # Deliveries per transport, counted once per message: a metrics write per socket would
        # cost a locked file write each (prometheus_client's multiprocess mode).
        delivered: Counter[str] = Counter()
        for subscriber in tuple(members):
            protocol = subscriber.frame_protocol
            if protocol is None:
                fallback.append(subscriber)
            elif protocol.state == _STATE_OPEN:
                # Frame once, write the same bytes to every socket (autobahn's prepared message).
                if prepared is None:
                    prepared = protocol.factory.prepareMessage(text.encode())
                try:
                    protocol.sendPreparedMessage(prepared)
                except Exception as exc:  # one broken connection must not stop the others
                    delivered["dropped"] += 1
                    logger.warning("writing to %s failed: %r", getattr(protocol, "peer", "?"), exc)
                    continue
                delivered["websocket"] += 1
        for subscriber in fallback:
            try:
                await subscriber.deliver(group, text, message_id)
            except Exception as exc:  # one broken connection must not stop the others
                delivered["dropped"] += 1
                logger.info("delivery to a closing connection failed: %s", exc)
            else:
                delivered[subscriber.transport] += 1
        dropped = delivered.pop("dropped", 0)
        if dropped:
            metrics.DROPPED.labels("connection_closing").inc(dropped)
        for transport, count in delivered.items():
            metrics.DELIVERED.labels(transport).inc(count)


class RedisFanout(Fanout):
    """The Redis layer's fan-out: its own queue key popped in batches, interest kept in Redis."""

    layer: RedisChannelLayer

    def __init__(self, layer: RedisChannelLayer) -> None:
        super().__init__(layer)
        self._interest_key = interest_key(layer.prefix, layer.client_prefix)

    async def _interest_added(self, group: str) -> None:
        connection = self.layer.connection(0)
        await connection.sadd(self._interest_key, group)
        await connection.publish(changes_channel(self.layer.prefix), self.layer.client_prefix)

    async def _interest_removed(self, group: str) -> None:
        connection = self.layer.connection(0)
        await connection.srem(self._interest_key, group)
        await connection.publish(changes_channel(self.layer.prefix), self.layer.client_prefix)

    async def resync(self) -> None:
        """Write this process's memberships and interest to Redis again (after Redis came back).

        A restarted Redis has lost them (the group members, the relay's interest set); a Redis
        that was only unreachable may still hold groups left meanwhile. Both are made right.
        """
        async with self._lock:
            if self.channel is None:
                return
            for group in sorted(self.groups):
                await self.layer.group_add(group, self.channel)
            for group in sorted(self._unsynced - set(self.groups)):
                await self.layer.group_discard(group, self.channel)
            async with self.layer.connection(0).pipeline(transaction=True) as pipe:
                pipe.delete(self._interest_key)
                if self.groups:
                    pipe.sadd(self._interest_key, *sorted(self.groups))
                pipe.publish(changes_channel(self.layer.prefix), self.layer.client_prefix)
                await pipe.execute()
            self._unsynced.clear()
        logger.info("fan-out %s rejoined %d groups in Redis", self.channel, len(self.groups))

    async def _open(self) -> str:
        # Mark the process live before its name is in any group (liveness.py).
        await self.layer.liveness.start()
        # A plain (not process-specific) name gets a Redis key of its own, which only this loop
        # reads: it can pop many messages per round trip (see _receive).
        return fanout_channel(self.layer.client_prefix)

    def _background(self) -> list[Any]:
        # The loop notices a failed read and resyncs; memberships need refreshing (group_expiry).
        return [keep_joined(self.layer, str(self.channel), lambda: list(self.groups))]

    async def _receive(self, channel: str) -> list[dict[str, Any]]:
        """Up to BATCH queued messages: one round trip while busy, a blocking wait when idle."""
        key = self.layer.prefix + channel
        connection = self.layer.connection(self.layer.consistent_hash(channel))
        popped = await connection.zpopmin(key, BATCH)
        if popped:
            raw = [member for member, _score in popped]
        else:
            waited = await connection.bzpopmin(key, timeout=5)
            raw = [waited[1]] if waited else []
        messages = []
        for blob in raw:
            try:
                messages.append(self.layer.deserialize(blob))
            except Exception as exc:  # one bad message must not stop delivery of the rest
                metrics.DROPPED.labels("undeliverable").inc()
                logger.warning("fan-out could not read a message on %s: %r", channel, exc)
        return messages
