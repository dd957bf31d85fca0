"""The node's open connections per user kept in the database, for layers that keep no shared
state of their own (RabbitMQ): their ConnectionStore (AWX_WS_MAX_CONNECTIONS_PER_USER).

Each daphne process has a row (`ServingProcess`) with a heartbeat, and one row per user it holds
connections of (`OpenConnections`). A node's count for a user is the sum over its processes whose
heartbeat is fresh (AWX_WS_LIVENESS_TTL), so a process killed with connections open stops counting
within the TTL, with no purge needed; its rows are deleted later by any live process's heartbeat.

Counting is one transaction per handshake, serialised per node and user so two processes cannot
both admit the last slot: SQLite's IMMEDIATE transactions (config/settings.py) take the write
lock at their start; on PostgreSQL a transaction-level advisory lock does it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from collections.abc import Awaitable, Callable, Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, ParamSpec, TypeVar

from channels.db import database_sync_to_async
from django.db import Error, connection, transaction
from django.db.models import F, Sum
from django.utils import timezone

from awx_ws.main.conf import ws_settings
from awx_ws.main.exceptions import DatabaseUnavailable
from awx_ws.main.models import OpenConnections, ServingProcess
from awx_ws.main.retry import spawn

if TYPE_CHECKING:
    from awx_ws.main.layers.base import CountKeeper

logger = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

# Seconds a stopping process waits to take its counts out of the database.
WITHDRAW_WAIT = 2.0

# A process silent for this many TTLs is gone for good: its rows are deleted, not just ignored.
FORGET_AFTER_TTLS = 10


def _serialise(node: str, user_id: int) -> None:
    """Hold the (node, user) lock until the transaction ends (PostgreSQL; SQLite holds the
    database's write lock already)."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_advisory_xact_lock(hashtext(%s))", [f"awx_ws.connections:{node}:{user_id}"]
            )


def acquire(process: str, node: str, user_id: int, limit: int, ttl: float) -> bool:
    """Count one more connection of user_id on process; False (nothing counted) at the limit."""
    now = timezone.now()
    with transaction.atomic():
        _serialise(node, user_id)
        held = OpenConnections.objects.filter(
            user_id=user_id, process__node=node, process__heartbeat__gt=now - timedelta(seconds=ttl)
        ).aggregate(n=Sum("count"))["n"]
        if (held or 0) >= limit:
            return False
        ServingProcess.objects.update_or_create(name=process, defaults={"node": node, "heartbeat": now})
        counted = OpenConnections.objects.filter(process_id=process, user_id=user_id)
        if not counted.update(count=F("count") + 1):
            OpenConnections.objects.create(process_id=process, user_id=user_id, count=1)
    return True


def release(process: str, user_id: int) -> None:
    """Take back one connection of user_id on process."""
    with transaction.atomic():
        rows = OpenConnections.objects.filter(process_id=process, user_id=user_id)
        rows.filter(count__gt=0).update(count=F("count") - 1)
        rows.filter(count=0).delete()


def beat(process: str, node: str, ttl: float, counts: Mapping[int, int], rewrite: bool) -> None:
    """Mark process alive; its rows are made to say counts when rewrite is asked for or its row
    was gone. Also deletes the rows of processes dead for FORGET_AFTER_TTLS TTLs."""
    now = timezone.now()
    with transaction.atomic():
        _, created = ServingProcess.objects.update_or_create(
            name=process, defaults={"node": node, "heartbeat": now}
        )
        if rewrite or created:
            OpenConnections.objects.filter(process_id=process).delete()
            OpenConnections.objects.bulk_create(
                OpenConnections(process_id=process, user_id=user, count=n) for user, n in counts.items() if n
            )
        gone = ServingProcess.objects.filter(heartbeat__lt=now - timedelta(seconds=FORGET_AFTER_TTLS * ttl))
        deleted, _ = gone.delete()
    if deleted:
        logger.info("forgot the connection counts of dead processes (%d rows)", deleted)


def withdraw(process: str) -> None:
    """Remove process and its counts (it stops)."""
    ServingProcess.objects.filter(name=process).delete()


def _in_database(work: Callable[P, T]) -> Callable[P, Awaitable[T]]:
    """work on Channels' database thread; Django's errors as DatabaseUnavailable naming the setting."""
    run: Callable[P, Awaitable[T]] = database_sync_to_async(work)

    async def call(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await run(*args, **kwargs)
        except Error as exc:  # DatabaseError and InterfaceError alike
            raise DatabaseUnavailable(f"connection counts not written (DATABASE_URL): {exc}") from exc

    return call


class DatabaseConnectionStore:
    """This process's share of the node's count, in the database; alive while it beats."""

    def __init__(self) -> None:
        # This process's name in the count; its row there says it is alive.
        self.process = f"{os.getpid()}-{secrets.token_hex(8)}"
        self._lock: asyncio.Lock | None = None

    @property
    def lock(self) -> asyncio.Lock:
        """One count change of this process at a time, as for Redis (made on first use)."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    async def acquire(self, user_id: int, limit: int) -> bool:
        """Count one more connection of user_id; False at the node's limit."""
        node, ttl = ws_settings.NODE_NAME, ws_settings.LIVENESS_TTL
        return await _in_database(acquire)(self.process, node, user_id, limit, ttl)

    async def release(self, user_id: int) -> None:
        """Take back one connection of user_id."""
        await _in_database(release)(self.process, user_id)

    async def restore(self, counts: dict[int, int]) -> int:
        """Make this process's share exactly counts (and mark it alive); the users written."""
        await self._beat(counts, rewrite=True)
        return len(counts)

    async def _beat(self, counts: dict[int, int], rewrite: bool) -> None:
        node, ttl = ws_settings.NODE_NAME, ws_settings.LIVENESS_TTL
        await _in_database(beat)(self.process, node, ttl, counts, rewrite)

    def keep_synced(self, counter: CountKeeper) -> asyncio.Task[None]:
        """Beat every AWX_WS_LIVENESS_INTERVAL; after a count the counter could not write, or a
        beat that failed, the beat writes the process's share again whole."""
        missed = asyncio.Event()
        forget = counter.on_missed(missed.set)

        async def heartbeat(failures: int) -> float:
            rewrite = missed.is_set() or failures > 0
            missed.clear()
            try:
                async with self.lock:
                    await self._beat(counter.counts(), rewrite)
            except BaseException:
                missed.set()  # whatever reached the database, write it all next time
                raise
            return float(ws_settings.LIVENESS_INTERVAL)

        task = spawn("connection count heartbeat", heartbeat, metric="connection_count_heartbeat")
        task.add_done_callback(lambda _: forget())
        return task

    async def withdraw(self) -> None:
        """Take this process out of the count (it stops; best effort, bounded)."""
        try:
            async with asyncio.timeout(WITHDRAW_WAIT):
                await _in_database(withdraw)(self.process)
        except (DatabaseUnavailable, TimeoutError) as exc:
            # Its heartbeat goes stale within the TTL: its count stops counting then.
            logger.warning("process %s could not take back its connection counts: %r", self.process, exc)
