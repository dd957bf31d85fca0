"""Per-process fan-out: one channel-layer member per group per process, local delivery to sockets.

The Channels way puts every client connection into the Redis group and hands each message to
each consumer through its own queue, task and dispatch (channels 4.2+ also hops to a thread per
message for `aclose_old_connections`). Here a daphne process joins a group once, with one channel
of its own; one loop receives each message once and hands it to every local subscriber: the same
prepared websocket frame written to every socket under awx_ws.server, or the ordinary ASGI send
(`Subscriber.deliver`) under plain daphne, whose send never waits for the socket. (A server whose
send waits until the client reads would let one slow client hold up the others: only daphne and
awx_ws.server are supported.) Redis work per emit is one entry per process, not per subscriber.

Membership is race-free by construction. Which local subscribers hold which group changes only
synchronously (`join`'s first step, `leave`, `release`: no await, so no cancellation or reordering
can cut one in half). One sync loop makes the layer match: it adds the process's membership of a
group some subscriber holds and removes that of a group nobody holds, whatever order connect,
subscribe, replace and close came in (a client may close before its subscribe was answered; daphne
may cancel a consumer mid-join). `join` waits until the membership is in place, so a subscribe
reply means delivery. A failed sync is retried, with the groups' layer state taken as unknown.

`Fanout` works on any channel layer with groups (the RabbitMQ one): one channel from
new_channel(), one receive loop. `RedisFanout` (layers/redis_fanout.py) is the Redis layer's: a
queue key of its own that it pops in batches, memberships written in one pipeline, and its groups
mirrored into `<prefix>:interest:<client prefix>` for the relay (interest.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from channels.exceptions import StopConsumer

from awx_ws.main import metrics
from awx_ws.main.audience import JobOrganizations, Viewer, allowed
from awx_ws.main.frames import FrameBatch
from awx_ws.main.history import RelayedSeen
from awx_ws.main.interest import INTEREST_REQUEST_TYPE, InterestAnnouncer
from awx_ws.main.membership import refresh_interval
from awx_ws.main.messages import CLIENT_MESSAGE_TYPE
from awx_ws.main.retry import FailureLog, spawn

logger = logging.getLogger(__name__)

# Seconds the fan-out's loops get to end once cancelled, at a process's stop.
STOP_WAIT = 5.0


def fanout_channel(client_prefix: str) -> str:
    """The channel a process's fan-out joins groups with: `fanout.<client prefix>`."""
    return f"fanout.{client_prefix}"


class Subscriber(Protocol):
    """What the fan-out needs of a client connection."""

    # daphne's websocket protocol, to write the shared prepared frame to (awx_ws.server); None to
    # be called on `deliver` instead (any other server, SSE streams, clients that want ids).
    frame_protocol: Any
    # "websocket" or "sse", for the metrics.
    transport: str
    # What its user may see of jobs (audience.py); None: every job (no user behind it).
    viewer: Viewer | None

    async def deliver(self, group: str, text: str, message_id: str | None) -> None:
        """Send one message of group (payload JSON text; its history id, if it has one)."""


class Fanout:
    """The groups this process's clients hold, the loop that keeps the layer in step with them,
    and the one loop delivering their messages.

    This base works on any channel layer with groups: a channel from new_channel(), group_add
    and group_discard, one receive() per message; it announces its groups on the layer for the
    relay (interest.InterestAnnouncer). RedisFanout (layers/redis_fanout.py) is the Redis layer's
    faster variant.
    """

    def __init__(self, layer: Any) -> None:
        self.layer = layer
        # What local subscribers hold: group -> subscribers, and each subscriber's groups.
        self.groups: dict[str, set[Subscriber]] = {}
        self._held: dict[Subscriber, set[str]] = {}
        self.channel: str | None = None
        # The layer's side: groups it holds our membership of; groups whose state there is unknown
        # (a sync failed half-way, or the layer may have restarted); groups to look at next sync,
        # and those the running sync is applying.
        self._applied: set[str] = set()
        self._uncertain: set[str] = set()
        self._dirty: set[str] = set()
        self._in_flight: set[str] = set()
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._wake = asyncio.Event()
        # When every membership is next re-added (refresh_interval; None: the layer needs none).
        self._next_refresh: float | None = None
        self._lock = asyncio.Lock()
        self._started: asyncio.Future[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._announcer: InterestAnnouncer | None = None
        self._delivery_errors = FailureLog("fan-out delivery", 60.0, logger)
        self._skipped = FailureLog("fan-out input", 60.0, logger)
        self._resync_listeners: list[Callable[[], None]] = []
        self.job_organizations = JobOrganizations()
        self._relayed = RelayedSeen()  # a relay's catch-up overlaps what came live
        self._delivered = metrics.Tally(metrics.DELIVERED)
        self._dropped = metrics.Tally(metrics.DROPPED)

    @property
    def lock(self) -> asyncio.Lock:
        """Serialises per-client set-up work on the layer (streams' positions) to bound connections."""
        return self._lock

    # --- start and stop ------------------------------------------------------------------------

    async def start(self) -> None:
        """Open this process's channel and start its loops (once; concurrent callers share it)."""
        if self._started is None:
            self._started = asyncio.ensure_future(self._start())
        started = self._started
        try:
            await asyncio.shield(started)
        except Exception:
            if self._started is started:
                self._started = None  # the next caller tries again
            raise

    async def _start(self) -> None:
        self.channel = await self._open()
        self._tasks = [
            spawn("fan-out receive", self._receive_round, metric="fanout_receive"),
            spawn("fan-out sync", self._sync_round, metric="fanout_sync"),
        ]
        if self._announcer is not None:
            self._tasks.append(spawn("interest announcer", self._announcer.round, metric="interest_announce"))

    def adopt(self, task: asyncio.Task[None]) -> None:
        """Stop task (a loop that lives with the fan-out's, started after it) when they stop."""
        self._tasks.append(task)

    async def stop(self) -> None:
        """Stop the loops and withdraw this process's memberships (at shutdown; best effort)."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        # Bounded: a receive loop cancelled within moments of its start was seen to stay
        # "cancelling" for good inside redis-py's pool (a worker whose master died while it
        # started); the withdrawal below must happen all the same.
        ended, stuck = await asyncio.wait(tasks, timeout=STOP_WAIT) if tasks else (set(), set())
        for task in ended:  # retrieved, as gather would: supervise logged any failure already
            if not task.cancelled():
                task.exception()
        if stuck:
            logger.warning(
                "fan-out %s: %s did not stop within %gs",
                self.channel,
                sorted(t.get_name() for t in stuck),
                STOP_WAIT,
            )
        self._started = None
        self._delivered.flush()
        self._dropped.flush()
        try:
            async with asyncio.timeout(2):
                await self._withdraw()
        except Exception as exc:  # the next start-up purge removes what is left
            logger.warning("fan-out %s could not withdraw its memberships: %r", self.channel, exc)

    async def _withdraw(self) -> None:
        """Remove this process's memberships from the layer (RabbitMQ: its queue goes with it)."""

    async def _open(self) -> str:
        """Create this process's channel (no tasks yet)."""
        channel = await self.layer.new_channel("fanout.")
        # The relay asks every process for its groups when it starts: the request comes here.
        await self.layer.group_add(InterestAnnouncer.REQUESTS, channel)
        self._announcer = InterestAnnouncer(self.layer, channel, lambda: list(self.groups))
        return str(channel)

    # --- what local subscribers hold (synchronous: nothing can interrupt a change) --------------

    async def join(self, group: str, subscriber: Subscriber) -> None:
        """Deliver group's messages to subscriber; returns once the layer delivers them here.

        Raises the layer's error when the membership cannot be made; the subscriber then does not
        hold the group, and neither does it when the caller is cancelled while waiting.
        """
        await self.start()
        self._hold(group, subscriber)
        if group in self._applied and not {group} & (self._dirty | self._in_flight | self._uncertain):
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(group, []).append(waiter)
        self._mark(group)
        try:
            await waiter
        except BaseException:
            self.leave(group, subscriber)
            raise

    def leave(self, group: str, subscriber: Subscriber) -> None:
        """Stop delivering group's messages to subscriber (the layer follows in the background)."""
        members = self.groups.get(group)
        if members is None or subscriber not in members:
            return
        members.discard(subscriber)
        held = self._held.get(subscriber)
        if held is not None:
            held.discard(group)
            if not held:
                del self._held[subscriber]
        metrics.SUBSCRIPTIONS.labels(metrics.group_kind(group)).dec()
        if not members:
            del self.groups[group]
            self._relayed.forget(group)
            self._mark(group)

    def release(self, subscriber: Subscriber) -> None:
        """Leave every group subscriber holds (a connection that ended, however it ended)."""
        for group in sorted(self._held.get(subscriber, ())):
            self.leave(group, subscriber)

    def _hold(self, group: str, subscriber: Subscriber) -> None:
        members = self.groups.setdefault(group, set())
        if subscriber not in members:
            members.add(subscriber)
            self._held.setdefault(subscriber, set()).add(group)
            metrics.SUBSCRIPTIONS.labels(metrics.group_kind(group)).inc()

    def _mark(self, group: str) -> None:
        self._dirty.add(group)
        self._wake.set()

    def resync(self) -> None:
        """Take every membership as unknown and write them all again (the layer may have restarted)."""
        everything = set(self.groups) | self._applied
        self._uncertain |= everything
        self._dirty |= everything
        self._wake.set()
        for listener in list(self._resync_listeners):
            listener()

    def on_resync(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call listener (sync, no I/O) at every resync; returns the function that unregisters it."""
        self._resync_listeners.append(listener)

        def forget() -> None:
            if listener in self._resync_listeners:
                self._resync_listeners.remove(listener)

        return forget

    # --- the sync loop -------------------------------------------------------------------------

    async def _sync_round(self, failures: int) -> None:
        """Wait for changes (or the refresh time), then make the layer's memberships match."""
        await self._wait_for_changes()
        batch, self._dirty = self._dirty, set()
        unsure = self._uncertain
        adds = sorted(g for g in batch if g in self.groups and (g not in self._applied or g in unsure))
        discards = sorted(g for g in batch if g not in self.groups and (g in self._applied or g in unsure))
        self._in_flight = batch
        try:
            if adds or discards:
                await self._apply(adds, discards)
        except BaseException as exc:
            # What reached the layer is unknown: look at all of it again next round.
            self._uncertain.update(adds, discards)
            self._applied.update(adds)
            self._dirty |= batch
            if isinstance(exc, Exception):
                self._fail_waiters(adds, exc)
            raise
        finally:
            self._in_flight = set()
        self._applied.update(adds)
        self._applied.difference_update(discards)
        self._uncertain.difference_update(adds)
        self._uncertain.difference_update(discards)
        self._release_waiters(batch)

    async def _wait_for_changes(self) -> None:
        """Until a group is dirty, or the memberships are due a refresh (then all are dirty)."""
        loop = asyncio.get_running_loop()
        interval = refresh_interval(self.layer)
        if self._next_refresh is None and interval is not None:
            self._next_refresh = loop.time() + interval
        if not self._dirty:
            try:
                # asyncio.timeout, not wait_for: Python 3.11's wait_for swallows a cancellation
                # that arrives as the event is set, and the task would never stop.
                async with asyncio.timeout_at(self._next_refresh):
                    await self._wake.wait()
            except TimeoutError:
                pass
        if interval is not None and self._next_refresh is not None and loop.time() >= self._next_refresh:
            # Refresh the join time of every membership (channels_redis's group_expiry), on time
            # however busy the process is: a wake-up for each change does not postpone it.
            self._uncertain |= self._applied
            self._dirty |= self._applied
            self._next_refresh = loop.time() + interval
        self._wake.clear()

    def _release_waiters(self, batch: set[str]) -> None:
        """Wake the joins and leaves of batch that the layer now matches."""
        for group in batch & set(self._waiters):
            # A group held again while its removal was being applied is dirty again: its waiters
            # wait for the next round.
            if group not in self.groups or (group in self._applied and group not in self._dirty):
                for waiter in self._waiters.pop(group):
                    if not waiter.done():
                        waiter.set_result(None)

    def _fail_waiters(self, groups: Iterable[str], exc: Exception) -> None:
        for group in groups:
            for waiter in self._waiters.pop(group, ()):
                if not waiter.done():
                    waiter.set_exception(exc)

    async def _apply(self, adds: list[str], discards: list[str]) -> None:
        """Add this process's membership of adds to the layer, remove that of discards."""
        for group in adds:
            await self.layer.group_add(group, self.channel)
        for group in discards:
            await self.layer.group_discard(group, self.channel)
        if self._announcer is not None:
            self._announcer.changed()

    # --- the receive loop ----------------------------------------------------------------------

    async def _receive(self, channel: str) -> list[dict[str, Any]]:
        """The next message(s) for channel."""
        return [await self.layer.receive(channel)]

    async def _receive_round(self, failures: int) -> None:
        """Receive the next message(s) and deliver them; after a failure, resync first."""
        channel = self.channel
        if channel is None:
            raise RuntimeError("fan-out loop started without a channel")
        if failures:
            self.resync()  # the layer is back, perhaps restarted empty
        try:
            batch = await self._receive(channel)
        except StopConsumer:
            logger.info("fan-out %s stops: the channel layer was closed", channel)
            await asyncio.Event().wait()  # closed for good: idle until cancelled
            return
        frames = FrameBatch()
        for message in batch:
            try:
                await self._dispatch(message, frames)
            except Exception as exc:  # one bad message must not stop delivery of the rest
                metrics.DROPPED.labels("undeliverable").inc()
                self._delivery_errors.occurred(exc)
        frames.flush(self._delivered, self._dropped)  # one write per socket for the batch

    async def _dispatch(self, message: dict[str, Any], frames: FrameBatch) -> None:
        kind = message.get("type")
        if kind == INTEREST_REQUEST_TYPE:
            if self._announcer is not None:
                self._announcer.changed()
            return
        if kind != CLIENT_MESSAGE_TYPE:
            # Another consumer's message in a group our clients share: not for websocket clients.
            logger.debug("fan-out skips a %r message: only %s reaches clients", kind, CLIENT_MESSAGE_TYPE)
            return
        group, text = message.get("group"), message.get("text")
        if not isinstance(group, str) or not isinstance(text, str):
            metrics.DROPPED.labels("malformed").inc()
            problem = "no group (not sent through awx_ws's channel layer)" if group is None else "no text"
            self._skipped.occurred(ValueError(f"a {CLIENT_MESSAGE_TYPE} message with {problem}: dropped"))
            return
        members = self.groups.get(group)
        if members:
            message_id = message.get("id") if isinstance(message.get("id"), str) else None
            if message_id and message.get("relayed") and not self._relayed.first_time(group, message_id):
                return self._dropped.add("relayed_twice")
            filtered, organization = await allowed(group, text, self.job_organizations)
            if filtered:  # a job's status: only to those who may see the job (audience.py)
                members = {m for m in members if m.viewer is None or m.viewer.may_see(organization)}
            await self._deliver(members, group, text, message_id, frames)

    async def _deliver(
        self, members: set[Subscriber], group: str, text: str, message_id: str | None, frames: FrameBatch
    ) -> None:
        # Counted in the tallies, written to the metrics once a second (metrics.Tally).
        others = frames.add(tuple(members), text)
        if others:
            # Written before any other delivery is awaited: a connection switching to a stream
            # meanwhile (consumers._use_stream) must not get a later message before an earlier one.
            frames.flush(self._delivered, self._dropped)
        for subscriber in others:
            try:
                await subscriber.deliver(group, text, message_id)
            except Exception as exc:  # one broken connection must not stop the others
                self._dropped.add("connection_closing")
                logger.info("delivery to a closing connection failed: %s", exc)
            else:
                self._delivered.add(subscriber.transport)
