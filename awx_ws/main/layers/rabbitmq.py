"""The RabbitMQ channel layer: channels_rabbitmq with our fan-out, bounded waits and clear errors.

channels_rabbitmq gives each process one exclusive queue, bound to a direct exchange with one
routing key per group its channels hold; a group_send is one publish, with publisher confirms.
What it cannot do compared with our Redis layer, and how we handle it (docs/channels.md):
- it keeps no group state outside its connections (exclusive queues go with them), so the
  start-up purge has nothing to remove (routing.py logs and counts that);
- it keeps no history, so resumes report a reset (streams.py);
- a queue at `remote_capacity` makes RabbitMQ nack the publish: we log it and count the drop;
- the layer is bound to the event loop that created it, so sync emit runs its own layer on one
  long-lived loop thread per process (`BlockingEmitter`), never a new loop per call;
- channels_rabbitmq refuses to be made outside an event loop, which breaks AWX-style producers
  (`async_to_sync(get_channel_layer().group_send)(...)` in a worker): made there, the layer is a
  `SyncProducerLayer`, whose sends go through that same emit loop thread.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import carehare
from channels.db import database_sync_to_async
from channels_rabbitmq import core
from channels_rabbitmq.multiqueue import MultiQueue
from channels_rabbitmq.util import GroupRecipient, serialize_message
from django.core.exceptions import ImproperlyConfigured

from awx_ws.main import metrics
from awx_ws.main.conf import ws_settings
from awx_ws.main.exceptions import BatchEmitError, BrokerUnavailable, StartupError, redact_url
from awx_ws.main.fanout import Fanout
from awx_ws.main.history import GroupPosition, Replay
from awx_ws.main.layers.base import ServiceLayer
from awx_ws.main.layers.rabbitmq_sync import SyncProducerLayer, blocking_emitter, broker_unavailable
from awx_ws.main.messages import is_client_message, with_group

if TYPE_CHECKING:
    from awx_ws.main.layers.database_counts import DatabaseConnectionStore

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Seconds a group_add, group_discard or group_send waits for the broker connection (channels_rabbitmq
# waits forever: a subscribe during an outage would hang the client instead of answering it).
CONNECT_WAIT = 5.0

# What an unreachable or restarting broker raises (logfilters.BrokerReconnects shortens these);
# anything else keeps its traceback.
RECONNECT_ERRORS = (
    OSError,
    TimeoutError,
    carehare.ConnectionClosedByServer,
    carehare.ConnectionClosedByHeartbeatMonitor,
)


class RabbitmqChannelLayer(ServiceLayer, core.RabbitmqChannelLayer):
    """channels_rabbitmq's layer with our fan-out, bounded connection waits and counted drops."""

    # What clients and operators are told is unreachable; whether resumes can replay (they cannot).
    service = "RabbitMQ"
    keeps_history = False
    keeps_records = False

    def __new__(cls, *args: Any, **config: Any) -> Any:
        """The layer; from sync code (no running event loop) a SyncProducerLayer instead."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return SyncProducerLayer(**config)
        return super().__new__(cls)

    def __init__(
        self,
        host: str = "amqp://guest:guest@127.0.0.1:5672",
        local_capacity: int = 100,
        remote_capacity: int = 1000,
        prefetch_count: int | None = None,
        expiry: int = 60,
        groups_exchange: str = "groups",
        connect_wait: float = CONNECT_WAIT,
    ) -> None:
        prefetch = local_capacity if prefetch_count is None else prefetch_count
        if not 1 <= prefetch <= local_capacity:
            # Every unacknowledged message sits in the process's in-memory queue, which
            # channels_rabbitmq refuses to grow past local_capacity (it asserts).
            raise ImproperlyConfigured(
                f"RABBITMQ_PREFETCH_COUNT={prefetch} must be between 1 and "
                f"RABBITMQ_LOCAL_CAPACITY={local_capacity}"
            )
        context = ssl.create_default_context() if host.startswith("amqps://") else None
        # channels_rabbitmq 4.0.1 uses local_capacity twice: as the size of its in-memory queue and,
        # on every (re)connect, as the consumer's prefetch count. Give it the prefetch count, then
        # size the in-memory queue ourselves.
        super().__init__(
            host=host,
            local_capacity=prefetch,
            remote_capacity=remote_capacity,
            expiry=expiry,
            ssl_context=context,
            groups_exchange=groups_exchange,
        )
        self._multi_queue = MultiQueue(capacity=local_capacity)
        self.memory_capacity = local_capacity
        self.prefetch_count = prefetch
        self.connect_wait = connect_wait
        self._fanout: Fanout | None = None
        self._counts: DatabaseConnectionStore | None = None

    # channels 4.2 deprecated valid_*_name (a DeprecationWarning per call) for require_valid_*_name,
    # which channels_rabbitmq 4.0.1 still calls in group_add, group_discard, send and receive.
    def valid_group_name(self, name: str) -> bool:
        """The check channels_rabbitmq asks for, without the deprecation warning."""
        return bool(self.require_valid_group_name(name))

    def valid_channel_name(self, name: str, receive: bool = False) -> bool:
        """The check channels_rabbitmq asks for, without the deprecation warning."""
        return bool(self.require_valid_channel_name(name, receive))

    @property
    def fanout(self) -> Fanout:
        """This process's group fan-out to client sockets (created on first use, no I/O)."""
        if self._fanout is None:
            self._fanout = Fanout(self)
        return self._fanout

    @property
    def records(self) -> None:
        """None: RabbitMQ is no store; links and processes show in the metrics instead."""
        return None

    @property
    def connection_counts(self) -> DatabaseConnectionStore:
        """The node's open connections per user: in the database its processes share."""
        if self._counts is None:
            from awx_ws.main.layers.database_counts import DatabaseConnectionStore

            self._counts = DatabaseConnectionStore()
        return self._counts

    async def start_process(self, wait: float | None) -> None:
        """Wait (bounded) for the broker, then start the fan-out; there is nothing to purge, which
        is logged and counted."""
        wait = self.connect_wait if wait is None else wait
        try:
            async with asyncio.timeout(wait):
                await asyncio.shield(self.carehare_connection)
        except TimeoutError as exc:
            setting = "AWX_WS_STARTUP_LAYER_WAIT" if wait == ws_settings.STARTUP_LAYER_WAIT else "one attempt"
            raise StartupError(
                f"RabbitMQ unreachable for {wait:g}s ({setting}) at {self.describe_hosts()}"
            ) from exc
        metrics.PURGE_SKIPPED.inc()
        # Each process's queue is exclusive: RabbitMQ deletes it, and its bindings, when the
        # process's connection goes, so a killed daphne leaves nothing behind to remove.
        logger.info(
            "start-up purge skipped: the RabbitMQ layer keeps no state outside live connections (%s)",
            self.describe_hosts(),
        )
        try:
            await self.fanout.start()
        except OSError as exc:  # BrokerUnavailable too
            raise StartupError(f"the fan-out could not start on {self.describe_hosts()}: {exc}") from exc

    async def stop_process(self) -> None:
        """Stop the fan-out, take this process's connection counts back, close the connection."""
        await self.fanout.stop()
        await self.connection_counts.withdraw()
        await self.close()

    def unavailable(self, exc: BaseException) -> BrokerUnavailable:
        """exc (a lost or refused connection, or a timeout) as BrokerUnavailable naming RABBITMQ_URL."""
        return broker_unavailable(exc, self.describe_hosts)

    @classmethod
    def send_blocking(cls, group: str, message: dict[str, Any], timeout: float) -> None:
        """group_send from sync code, on the process's one emit loop thread (BlockingEmitter)."""
        try:
            blocking_emitter.call(lambda rabbitmq: rabbitmq.group_send(group, message), timeout)
        except (TimeoutError, OSError) as exc:
            raise broker_unavailable(exc, blocking_emitter.describe_hosts) from exc

    @classmethod
    def send_many_blocking(cls, messages: Sequence[tuple[str, dict[str, Any]]], timeout: float) -> None:
        """group_send_many from sync code, on the process's one emit loop thread."""
        try:
            blocking_emitter.call(lambda rabbitmq: rabbitmq.group_send_many(messages), timeout)
        except (TimeoutError, OSError) as exc:  # before any publish, or while one was under way
            cause = broker_unavailable(exc, blocking_emitter.describe_hosts)
            raise BatchEmitError(cause, sent=[], unsent=[], unknown=list(range(len(messages)))) from exc

    async def group_send_many(self, messages: Sequence[tuple[str, dict[str, Any]]]) -> None:
        """Publish each message in order, each confirmed by the broker before the next (AMQP has
        no batch that is all or none); BatchEmitError naming the ones sent when one fails."""
        for index, (group, message) in enumerate(messages):
            try:
                await self.group_send(group, message)
            except (TimeoutError, OSError) as exc:  # LayerUnavailable too
                rest = list(range(index + 1, len(messages)))
                sent = list(range(index))
                raise BatchEmitError(self.unavailable(exc), sent=sent, unsent=rest, unknown=[index]) from exc

    @classmethod
    def ping_blocking(cls, timeout: float) -> None:
        """Wait until the emit loop's connection is up (readiness)."""
        try:
            blocking_emitter.ping(timeout)
        except (TimeoutError, OSError) as exc:
            raise broker_unavailable(exc, blocking_emitter.describe_hosts) from exc

    def describe_hosts(self) -> str:
        """The broker address for messages (password redacted), naming RABBITMQ_URL."""
        return f"RABBITMQ_URL={redact_url(self.host)}"

    async def open_position(self, group: str) -> GroupPosition:
        """Nothing to resume from later but the time: every recovery will report a reset."""
        return GroupPosition(int(time.time() * 1000))

    async def read_history(
        self, group: str, position: GroupPosition, margin_ms: int = 0
    ) -> tuple[str | None, Replay]:
        """No history is kept on RabbitMQ: a reset saying so."""
        return None, Replay(reset=f"no history is kept with the {self.service} channel layer")

    async def remember_nonce(self, nonce: str, ttl: float) -> bool:
        """Remember a peer's handshake nonce on this node for ttl seconds; False if seen before.

        RabbitMQ has no shared store to keep it in: the database the node's processes share does.
        """
        remembered: bool = await database_sync_to_async(_remember_nonce_in_database)(nonce, ttl)
        return remembered

    async def connected(self) -> carehare.Connection:
        """The broker connection, waiting connect_wait seconds at most; BrokerUnavailable after."""
        try:
            # shield: the future is the layer's own, shared by every caller; a timeout must not cancel it.
            async with asyncio.timeout(self.connect_wait):
                return await asyncio.shield(self.carehare_connection)
        except TimeoutError as exc:
            raise BrokerUnavailable(
                f"no connection to RabbitMQ within {self.connect_wait:g}s at {self.describe_hosts()}"
            ) from exc

    async def group_add(self, group: str, channel: str) -> None:
        """Add channel to group; BrokerUnavailable when the broker stays unreachable."""
        await self.connected()
        await super().group_add(group, channel)

    async def group_discard(self, group: str, channel: str) -> None:
        """Remove channel from group; BrokerUnavailable when the broker stays unreachable."""
        await self.connected()
        await super().group_discard(group, channel)

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        """Publish message to group: one publish, confirmed by the broker.

        A nack means some member's queue is at remote_capacity: RabbitMQ dropped the message for
        that queue only (the others have it). channels_rabbitmq logs that without a figure; we
        count it. A connection lost mid-publish raises BrokerUnavailable instead of the silent
        loss channels_rabbitmq chooses, so an emit says it failed.
        """
        if not self.require_valid_group_name(group):
            raise TypeError(f"invalid group name {group!r}")
        message = with_group(group, message)
        body = serialize_message(GroupRecipient(group), message)
        connection = await self.connected()
        try:
            await connection.publish(body, exchange_name=self.groups_exchange, routing_key=group)
        except carehare.ServerSentNack:
            metrics.DROPPED.labels("channel_full").inc()
            # The full queue is another process's, with its own RABBITMQ_REMOTE_CAPACITY: name the
            # setting, not our value of it.
            logger.info(
                "a queue bound to group %s is full (its process's RABBITMQ_REMOTE_CAPACITY): "
                "message dropped for that queue",
                group,
            )
        except (carehare.ConnectionClosed, carehare.ChannelClosed) as exc:
            raise BrokerUnavailable(
                f"connection to RabbitMQ at {self.describe_hosts()} lost while sending to {group!r}"
            ) from exc
        if is_client_message(group, message):
            metrics.count_emitted(group)


def _remember_nonce_in_database(nonce: str, ttl: float) -> bool:
    from django.db import IntegrityError, transaction
    from django.utils import timezone

    from awx_ws.main.models import PeerNonce

    now = timezone.now()
    PeerNonce.objects.filter(expires__lte=now).delete()
    try:
        # The primary key decides, atomically, between processes racing with the same header.
        with transaction.atomic():
            PeerNonce.objects.create(nonce=nonce, expires=now + timedelta(seconds=ttl))
    except IntegrityError:
        return False
    return True
