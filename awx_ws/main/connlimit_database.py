"""The node's count of open connections per user kept in the database, for layers that keep no
shared state of their own (RabbitMQ): connlimit.py's store there.

Each daphne process has a row (`ServingProcess`) with a heartbeat, and one row per user it holds
connections of (`OpenConnections`). A node's count for a user is the sum over its processes whose
heartbeat is fresh (AWX_WS_LIVENESS_TTL), so a process killed with connections open stops counting
within the TTL, with no purge needed; its rows are deleted later by any live process's heartbeat.

Counting is one transaction per handshake, serialised per node and user so two processes cannot
both admit the last slot: SQLite's IMMEDIATE transactions (config/settings.py) take the write
lock at their start; on PostgreSQL a transaction-level advisory lock does it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import timedelta

from django.db import connection, transaction
from django.db.models import F, Sum
from django.utils import timezone

from awx_ws.main.models import OpenConnections, ServingProcess

logger = logging.getLogger(__name__)

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
