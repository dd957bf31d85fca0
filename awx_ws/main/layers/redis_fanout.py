"""The Redis layer's fan-out (fanout.py): its own queue key popped in batches, memberships and the
relay's interest set written in one pipeline; Redis's errors raised as RedisUnavailable."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from awx_ws.main import metrics
from awx_ws.main.fanout import Fanout, fanout_channel
from awx_ws.main.layers.redis_interest import change_notice
from awx_ws.main.layers.redis_keys import interest_changed, interest_key, queue_key
from awx_ws.main.layers.redis_popper import QueuePopper

if TYPE_CHECKING:
    from awx_ws.main.layers.redis_types import RedisLayer

logger = logging.getLogger(__name__)

# Messages taken from Redis per round trip while the queue is busy.
BATCH = 256


class RedisFanout(Fanout):
    """The Redis layer's fan-out: its own queue key popped in batches, memberships and interest
    written in one pipeline."""

    layer: RedisLayer

    def __init__(self, layer: RedisLayer) -> None:
        super().__init__(layer)
        self._interest_key = interest_key(layer.prefix, layer.client_prefix)
        # After a resync the interest set is rewritten whole (a restarted Redis lost it).
        self._rewrite_interest = False
        self._popper: QueuePopper | None = None

    def resync(self) -> None:
        """Take every membership as unknown; rewrite them and the interest set."""
        super().resync()
        self._rewrite_interest = True

    async def _open(self) -> str:
        # Mark the process live before its name is in any group (layers/redis_presence.py).
        try:
            await self.layer.liveness.start()
        except RedisError as exc:
            raise self.layer.unavailable(exc) from exc
        # A plain (not process-specific) name gets a Redis key of its own, which only this loop
        # reads: it can pop many messages per round trip (see _receive).
        return fanout_channel(self.layer.client_prefix)

    async def _apply(self, adds: list[str], discards: list[str]) -> None:
        """One pipeline: the group memberships (as channels_redis's group_add/discard write
        them), this process's interest set, and the change notice for the relay."""
        try:
            await self._apply_pipeline(adds, discards)
        except RedisError as exc:
            raise self.layer.unavailable(exc) from exc

    async def _apply_pipeline(self, adds: list[str], discards: list[str]) -> None:
        layer, channel = self.layer, str(self.channel)
        rewrite, self._rewrite_interest = self._rewrite_interest, False
        try:
            if layer.ring_size > 1:  # group keys live on several shards: channels_redis's own calls
                await super()._apply(adds, discards)
            # MULTI/EXEC: at maxmemory Redis refuses the whole of it, so no member leaves
            # without its mark (the sync loop tries again).
            async with layer.connection(0).pipeline(transaction=True) as pipe:
                if rewrite:
                    # A restarted Redis lost our liveness record too: write it before anything that
                    # names this process (liveness.Liveness.write_into).
                    layer.liveness.write_into(pipe)
                if layer.ring_size == 1:
                    self._memberships_into(pipe, adds, discards)
                self._interest_into(pipe, adds, discards, rewrite)
                notice = change_notice(layer.client_prefix, adds, discards, reread=rewrite)
                pipe.publish(interest_changed(layer.prefix), notice)
                await pipe.execute()
        except BaseException:
            self._rewrite_interest = self._rewrite_interest or rewrite
            raise
        if rewrite:
            logger.info("fan-out %s rejoined %d groups in Redis", channel, len(self.groups))

    def _memberships_into(self, pipe: Any, adds: list[str], discards: list[str]) -> None:
        """Our channel joins adds and leaves discards (channels_redis's group sets, one shard)."""
        layer, channel, now = self.layer, str(self.channel), time.time()
        for group in adds:
            key = layer.group_key(group)
            pipe.zadd(key, {channel: now})
            pipe.expire(key, layer.group_expiry)
        for group in discards:
            layer.mark_left(pipe, group)  # first: a member never leaves unmarked
            pipe.zrem(layer.group_key(group), channel)

    def _interest_into(self, pipe: Any, adds: list[str], discards: list[str], rewrite: bool) -> None:
        """The process's interest set (redis_interest.py) follows: changed, or rewritten whole."""
        if rewrite:
            pipe.delete(self._interest_key)
            if self.groups:
                pipe.sadd(self._interest_key, *sorted(self.groups))
            return
        if adds:
            pipe.sadd(self._interest_key, *adds)
        if discards:
            pipe.srem(self._interest_key, *discards)

    async def _withdraw(self) -> None:
        """One pipeline: our memberships, interest set and queue key, then the change notice."""
        if self._popper is not None:
            popper, self._popper = self._popper, None
            await popper.close()
        try:
            await self._withdraw_pipeline()
        except RedisError as exc:
            raise self.layer.unavailable(exc) from exc

    async def _withdraw_pipeline(self) -> None:
        if self.channel is None or self.layer.ring_size > 1:
            return  # sharded: the next start-up purge removes them
        layer, channel = self.layer, self.channel
        async with layer.connection(0).pipeline(transaction=True) as pipe:
            for group in sorted(self._applied | self._uncertain):
                layer.mark_left(pipe, group)
                pipe.zrem(layer.group_key(group), channel)
            pipe.delete(self._interest_key, queue_key(layer.prefix, channel))
            pipe.publish(
                interest_changed(layer.prefix), change_notice(layer.client_prefix, [], [], reread=True)
            )
            await pipe.execute()
        self._applied.clear()

    async def _receive(self, channel: str) -> list[dict[str, Any]]:
        """Up to BATCH queued messages: one command per wake-up (redis_popper.py)."""
        client = self.layer.connection(self.layer.consistent_hash(channel))
        popper = self._popper
        if (
            popper is None
            or popper.client is not client
            or popper.key != queue_key(self.layer.prefix, channel)
        ):
            if popper is not None:
                await popper.close()  # the layer's pools were replaced (closed, another loop)
            popper = self._popper = QueuePopper(client, queue_key(self.layer.prefix, channel), BATCH)
        try:
            raw = await popper.pop()
        except (RedisError, OSError) as exc:
            raise self.layer.unavailable(exc) from exc
        messages = []
        for blob in raw:
            try:
                messages.append(self.layer.deserialize(blob))
            except Exception as exc:  # one bad message must not stop delivery of the rest
                metrics.DROPPED.labels("undeliverable").inc()
                self._delivery_errors.occurred(exc)
        return messages
