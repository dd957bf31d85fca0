"""Our channel layer: channels_redis's core layer with liveness, fan-out and a leaner group_send."""

from __future__ import annotations

import logging
import math
import os
import secrets
import threading
import time
from collections.abc import Sequence
from typing import Any

from channels.layers import get_channel_layer
from django.core.exceptions import ImproperlyConfigured

# A blocking client for sync callers only: emit refuses to run on a thread with an event loop.
from redis import Redis as BlockingRedis
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from awx_ws.main import metrics, retry
from awx_ws.main.exceptions import RedisUnavailable, StartupError
from awx_ws.main.history import SHARE_KEY, GroupPosition, Replay, history_policy, history_share, resumable_for
from awx_ws.main.layers import redis_batch, redis_connect, redis_history, redis_keys, redis_presence
from awx_ws.main.layers.base import ServiceLayer
from awx_ws.main.layers.redis_counts import RedisConnectionStore
from awx_ws.main.layers.redis_fanout import RedisFanout
from awx_ws.main.layers.redis_history import ensure_origin, total_keys
from awx_ws.main.layers.redis_members import add_many, discard_many, mark_keep
from awx_ws.main.layers.redis_presence import Liveness
from awx_ws.main.layers.redis_receive import CancelSafeReceiveLayer
from awx_ws.main.layers.redis_records import RedisRecords
from awx_ws.main.layers.redis_scripts import (
    GROUP_SEND_FANOUT_LUA,
    GROUP_SEND_LUA,
    eval_fanout_blocking,
    inbox_capacity,
    lua_packs_messages,
)
from awx_ws.main.messages import is_client_message, with_group

logger = logging.getLogger(__name__)

# Loops that talk to Redis directly (presence, interest, the relay's records) may meet redis-py's
# errors, which are not OSErrors: a lost Redis is still an outage, not a bug, to retry.py.
retry.expect(RedisError)

# Connections per Redis host and process, unless the host says "max_connections" (REDIS_MAX_CONNECTIONS).
DEFAULT_MAX_CONNECTIONS = 50
# Seconds a caller waits for a free pooled connection before ConnectionError.
POOL_WAIT = 10.0
# Seconds an async Redis reply may take (blocking pops wait 5 s at most) before TimeoutError.
SOCKET_TIMEOUT = 30.0


class RedisChannelLayer(ServiceLayer, CancelSafeReceiveLayer):
    """channels_redis core layer, storing the same keys and messages, with three additions.

    - Its process is marked alive in Redis while it owns channels; the start-up purge
      (routing.AWXProtocolTypeRouter) removes only state of processes without a live record.
    - `fanout` delivers group messages to this process's client sockets (fanout.py).
    - `group_send` takes one Redis round trip instead of four, and `group_send_blocking` does
      the same from sync code without an event loop (emit_channel_notification). Either way, and
      whoever calls it, a client message gets its history id, reaches the relay and is counted.
    """

    # What clients and operators are told is unreachable; whether resumes can replay (they can).
    service = "Redis"
    keeps_history = True
    keeps_records = True
    _liveness: Liveness | None = None
    _fanout: RedisFanout | None = None
    _counts: RedisConnectionStore | None = None
    _blocking: dict[int, BlockingRedis] | None = None
    _blocking_pid: int = 0
    _blocking_lock = threading.Lock()

    @property
    def liveness(self) -> Liveness:
        """This process's liveness record keeper (created on first use, no I/O)."""
        if self._liveness is None:
            self._liveness = Liveness(self)
        return self._liveness

    @property
    def fanout(self) -> RedisFanout:
        """This process's group fan-out to client sockets (created on first use, no I/O)."""
        if self._fanout is None:
            self._fanout = RedisFanout(self)
        return self._fanout

    @property
    def records(self) -> RedisRecords:
        """The node's records in this Redis: process figures, relay links, peer acks."""
        return RedisRecords(self)

    @property
    def connection_counts(self) -> RedisConnectionStore:
        """The node's open connections per user, in this Redis (redis_counts.py)."""
        if self._counts is None:
            self._counts = RedisConnectionStore(self)
        return self._counts

    async def start_process(self, wait: float | None) -> None:
        """Mark this process live, purge what dead ones left (redis_presence.py), start the fan-out."""
        await redis_presence.start_process(self, wait)
        try:
            await self.fanout.start()
        except (RedisError, OSError) as exc:
            raise StartupError(f"the fan-out could not start on {self.describe_hosts()}: {exc}") from exc

    async def stop_process(self) -> None:
        """Stop the fan-out (withdrawing its memberships) and this process's liveness record."""
        await self.fanout.stop()
        await self.liveness.stop()

    async def new_channel(self, prefix: str = "specific") -> str:
        """A new process-specific channel; the process is marked alive before the name is used."""
        try:
            await self.liveness.start()
            channel: str = await super().new_channel(prefix)
            return channel
        except RedisError as exc:
            raise self.unavailable(exc) from exc

    # channels_redis's API, with Redis's errors as RedisUnavailable (naming REDIS_URL): code
    # beyond the layers knows nothing of redis-py.

    async def group_add(self, group: str, channel: str) -> None:
        """channels_redis's group_add; RedisUnavailable when Redis fails."""
        try:
            await super().group_add(group, channel)
        except RedisError as exc:
            raise self.unavailable(exc) from exc

    async def group_discard(self, group: str, channel: str) -> None:
        """channels_redis's group_discard (and the leave's mark, mark_left); RedisUnavailable when
        Redis fails."""
        try:
            if history_policy(group) is not None:
                # The mark first: if it is refused (maxmemory), the member stays, never unmarked.
                async with self.connection(0).pipeline(transaction=False) as pipe:  # history's Redis
                    self.mark_left(pipe, group)
                    await pipe.execute()
            await super().group_discard(group, channel)
        except RedisError as exc:
            raise self.unavailable(exc) from exc

    async def group_add_many(self, groups: Sequence[str], channel: str) -> None:
        """group_add of each group, many per round trip (redis_members.py); RedisUnavailable."""
        if self.ring_size > 1:  # group keys on several shards: channels_redis's own calls
            await super().group_add_many(groups, channel)
        else:
            await add_many(self, channel, groups)

    async def group_discard_many(self, groups: Sequence[str], channel: str) -> None:
        """group_discard of each group, many per round trip (redis_members.py); RedisUnavailable."""
        if self.ring_size > 1:
            await super().group_discard_many(groups, channel)
        else:
            await discard_many(self, channel, groups)

    async def send(self, channel: str, message: dict[str, Any]) -> None:
        """channels_redis's send; RedisUnavailable when Redis fails."""
        try:
            await super().send(channel, message)
        except RedisError as exc:
            raise self.unavailable(exc) from exc

    async def receive(self, channel: str) -> dict[str, Any]:
        """channels_redis's receive; RedisUnavailable when Redis fails."""
        try:
            message: dict[str, Any] = await super().receive(channel)
            return message
        except RedisError as exc:
            raise self.unavailable(exc) from exc

    def create_pool(self, index: int) -> Any:
        """A bounded pool per Redis host: at the limit callers wait for a free connection.

        channels_redis's pool opens a connection for every concurrent caller and keeps them all,
        so a burst of 500 subscribing clients would leave 500 idle connections to Redis. A host
        named by sentinels gets the same bound, and follows its master (redis_connect.py).
        """
        host = dict(self.hosts[index])
        host.setdefault("max_connections", DEFAULT_MAX_CONNECTIONS)
        host.setdefault("timeout", POOL_WAIT)
        # A connection whose peer vanished without a reset (a network partition) would otherwise
        # hang its caller, and with it the fan-out's loops, for good. Longer than any blocking pop.
        host.setdefault("socket_timeout", SOCKET_TIMEOUT)
        return redis_connect.async_pool(host)

    def group_key(self, group: str) -> str:
        """The Redis key of group's members (channels_redis's format, `<prefix>:group:<name>`)."""
        # channels_redis keeps this private (and returns bytes); it is read here only, and
        # tests/test_private_apis.py fails loudly if its format moves.
        return bytes(self._group_key(group)).decode()

    def describe_hosts(self) -> str:
        """Where this layer's Redis is, for messages (no passwords), naming the settings that say so."""
        return ",".join(redis_connect.describe(host) for host in self.hosts)

    async def open_position(self, group: str) -> GroupPosition:
        """The position of a client subscribing to group now (redis_history.py)."""
        return await redis_history.open_position(self, group)

    async def read_history(
        self, group: str, position: GroupPosition, margin_ms: int = 0
    ) -> tuple[str | None, Replay]:
        """This Redis's origin tag and what it holds of group after position (redis_history.py)."""
        return await redis_history.read_local(self, group, position, margin_ms)

    async def remember_nonce(self, nonce: str, ttl: float) -> bool:
        """Remember a peer's handshake nonce on this node for ttl seconds; False if seen before."""
        key = redis_keys.nonce_key(self.prefix, nonce)
        try:
            return bool(await self.connection(0).set(key, 1, nx=True, ex=max(1, math.ceil(ttl))))
        except RedisError as exc:
            raise self.unavailable(exc) from exc

    def group_send_plan(self, others: list[bytes], message: dict[str, Any]) -> Any:
        """(keys, args) of GROUP_SEND_LUA for the members the fan-out script handed back."""
        channel_names = [member.decode("utf8") for member in others]
        _, messages, capacities = self._map_channel_keys_to_connection(channel_names, message)
        keys = list(messages)
        args = [messages[key] for key in keys] + [capacities[key] for key in keys]
        return keys, [*args, time.time(), self.expiry]

    def report_over_capacity(self, over: int, group: str) -> None:
        if over:
            metrics.DROPPED.labels("channel_full").inc(over)
            # The same drop channels_redis makes at capacity (see channels_redis#212): say so.
            logger.info("%s channels over capacity in group %s: message dropped for them", over, group)

    def fanout_call(
        self, group: str, message: dict[str, Any], share: str | None = None
    ) -> tuple[list[str], list[Any]]:
        """(keys, args) of GROUP_SEND_FANOUT_LUA; keys name the history stream when one is kept,
        counted against share (the emitter's, history.SHARE_KEY; by default the group's kind)."""
        share = history_share(group, share)
        now = time.time()
        keys = [self.group_key(group)]
        args: list[Any] = [self.serialize(message), now, self.expiry, int(now) - self.group_expiry]
        args += [self.get_capacity("fanout.any"), self.prefix, inbox_capacity(self, message)]
        args += [getattr(self._serializer, "random_prefix_length", 0)]  # a custom serializer's: none
        # A relayed message already has its origin's id; its history lives on the origin node.
        policy = history_policy(group) if is_client_message(group, message) and "id" not in message else None
        if policy is not None:
            if not lua_packs_messages(self):
                raise ImproperlyConfigured(
                    "history needs the msgpack serializer without symmetric_encryption_keys "
                    "(CHANNEL_LAYERS); or set AWX_WS['HISTORY_KINDS'] entries to None"
                )
            keys += [
                redis_keys.watched_key(self.prefix, group),
                redis_keys.stream_key(self.prefix, group),
                redis_keys.origin_key(self.prefix),
                *total_keys(self),
            ]
            ttl = max(1, math.ceil(policy.age))
            args += [policy.length, policy.age, ttl, policy.max_bytes]
            args += [policy.total_bytes, resumable_for(policy), share]
        return keys, args

    def mark_left(self, pipe: Any, group: str) -> None:
        """Queue the mark of a member leaving group: its history is kept a while longer for the
        clients that may resume it (GROUP_SEND_FANOUT_LUA). Nothing for kinds without history."""
        keep = mark_keep(group)
        if keep:
            pipe.set(redis_keys.watched_key(self.prefix, group), 1, ex=keep)

    def after_fanout(self, group: str, message: dict[str, Any], reply: Any) -> list[bytes]:
        """Report drops, put the history id into message; the members still to be sent to."""
        others: list[bytes]  # the Lua script's second reply: the members' channel names
        over, others, message_id = reply
        self.report_over_capacity(int(over), group)
        if message_id:
            message["id"] = message_id.decode()
        if is_client_message(group, message):
            metrics.count_emitted(group)
        return others

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        """Send message to every member of group (see GROUP_SEND_FANOUT_LUA); RedisUnavailable
        when Redis fails."""
        try:
            await self._group_send(group, message)
        except (RedisError, OSError) as exc:
            raise self.unavailable(exc) from exc

    async def _group_send(self, group: str, message: dict[str, Any]) -> None:
        if not self.require_valid_group_name(group):
            raise TypeError(f"invalid group name {group!r}")
        share = message.get(SHARE_KEY)
        message = with_group(group, message)
        if self.ring_size > 1:  # fan-out keys may live on other shards: channels_redis's way
            await super().group_send(group, message)
            if is_client_message(group, message):
                metrics.count_emitted(group)
            return
        connection = self.connection(0)
        keys, args = self.fanout_call(group, message, share)
        try:
            reply = await connection.eval(GROUP_SEND_FANOUT_LUA, len(keys), *keys, *args)
        except ResponseError as exc:
            if not str(exc).startswith("NOORIGIN"):
                raise
            await ensure_origin(self)  # first message this Redis keeps history for
            reply = await connection.eval(GROUP_SEND_FANOUT_LUA, len(keys), *keys, *args)
        others = self.after_fanout(group, message, reply)
        if others:
            keys, plan_args = self.group_send_plan(others, message)
            over = await connection.eval(GROUP_SEND_LUA, len(keys), *keys, *plan_args)
            self.report_over_capacity(over, group)

    def blocking_client(self, index: int, timeout: float) -> BlockingRedis:
        with self._blocking_lock:
            # A forked child (a gunicorn worker) must not share its parent's sockets.
            if self._blocking is None or self._blocking_pid != os.getpid():
                self._blocking, self._blocking_pid = {}, os.getpid()
            if index not in self._blocking:
                host = dict(self.hosts[index])
                host.setdefault("socket_timeout", timeout)
                host.setdefault("max_connections", DEFAULT_MAX_CONNECTIONS)
                # Threads wait (up to the emit timeout) for a free connection and for Redis to answer.
                host["timeout"] = host["reconnect_within"] = timeout
                self._blocking[index] = BlockingRedis(connection_pool=redis_connect.sync_pool(host))
            return self._blocking[index]

    @classmethod
    def _default(cls) -> RedisChannelLayer:
        """This process's default layer (sync code may make it: it opens nothing until used)."""
        layer = get_channel_layer()
        if not isinstance(layer, cls):
            raise ImproperlyConfigured(f"CHANNEL_LAYERS names {type(layer).__name__}, not {cls.__name__}")
        return layer

    def unavailable(self, exc: BaseException) -> RedisUnavailable:
        """exc (redis-py's, or a timeout) as RedisUnavailable naming REDIS_URL."""
        if isinstance(exc, RedisUnavailable) and exc.where:
            return exc
        timed_out = isinstance(redis_connect.behind(exc), TimeoutError | RedisTimeoutError)
        return RedisUnavailable(redis_connect.explain(exc), where=self.describe_hosts(), timed_out=timed_out)

    @classmethod
    def ping_blocking(cls, timeout: float) -> None:
        """PING the first Redis host from sync code (readiness); RedisUnavailable when it fails."""
        layer = cls._default()
        try:
            with redis_connect.at_once():  # a probe answers now: only emits wait for Redis
                layer.blocking_client(0, timeout).ping()
        except (RedisError, OSError) as exc:
            raise layer.unavailable(exc) from exc

    @classmethod
    def send_blocking(cls, group: str, message: dict[str, Any], timeout: float) -> None:
        """group_send from sync code (group_send_blocking); RedisUnavailable when it fails."""
        layer = cls._default()
        try:
            layer.group_send_blocking(group, message, timeout)
        except (RedisError, OSError) as exc:
            raise layer.unavailable(exc) from exc

    async def group_send_many(self, messages: Sequence[tuple[str, dict[str, Any]]]) -> None:
        """Send each (group, message) in order, in one round trip (redis_batch.py)."""
        await redis_batch.send(self, messages)

    @classmethod
    def send_many_blocking(cls, messages: Sequence[tuple[str, dict[str, Any]]], timeout: float) -> None:
        """group_send_many from sync code, on the pooled blocking connection."""
        redis_batch.send_blocking(cls._default(), messages, timeout)

    def group_send_blocking(self, group: str, message: dict[str, Any], timeout: float) -> None:
        """group_send for sync code: a pooled blocking connection, no event loop, same round trips."""
        if not self.require_valid_group_name(group):
            raise TypeError(f"invalid group name {group!r}")
        if self.ring_size > 1:
            raise TypeError("sync emit supports one Redis host (channels_redis sharding is not supported)")
        share = message.get(SHARE_KEY)
        message = with_group(group, message)
        connection = self.blocking_client(0, timeout)
        keys, args = self.fanout_call(group, message, share)
        try:
            reply = eval_fanout_blocking(connection, keys, args)
        except ResponseError as exc:
            if not str(exc).startswith("NOORIGIN"):
                raise
            # First message this Redis keeps history for (see redis_history.ensure_origin).
            connection.set(redis_keys.origin_key(self.prefix), secrets.token_hex(4), nx=True)
            reply = eval_fanout_blocking(connection, keys, args)
        others = self.after_fanout(group, message, reply)
        if others:
            keys, plan_args = self.group_send_plan(others, message)
            over = connection.eval(GROUP_SEND_LUA, len(keys), *keys, *plan_args)
            self.report_over_capacity(int(over), group)  # type: ignore[arg-type]
