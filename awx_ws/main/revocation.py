"""Access taken away reaches open connections, on every node, within seconds.

Where a change happens (any process using the ORM: the API, the admin, `manage.py shell`), a
signal writes an `AccessChange` row in the change's own transaction: a token deleted, a session
ended, a user saved or deleted (deactivated, password or superuser status changed), an
organization membership removed or added (which jobs' statuses it may see, audience.py), an
organization deleted. Every daphne process polls the table
every AWX_WS_REVOCATION_POLL seconds (one indexed query) and asks the open connections of the
users named to check again: a connection whose credential is gone is closed (websocket close code
4003, an SSE stream ends); one that may no longer read some of its groups leaves them and is told
with AWX's groups reply. The database is what a cluster's nodes share, so every node sees every
change. A session that simply expires is checked when its expiry date passes.

A write that bypasses the signals (`User.objects.filter(...).update(is_active=False)`, a token or
a membership deleted in SQL) writes no row. So every AWX_WS_REVOCATION_SWEEP seconds each process
also compares what its open connections were admitted with against the database, in a few bulk
queries whatever the number of connections (`sweep`): a token or session gone, a user inactive,
a password, superuser flag or organization set that changed. Only those connections are rechecked.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

from channels.db import database_sync_to_async
from django.contrib.auth import get_user_model
from django.contrib.sessions.models import Session
from django.db import DatabaseError
from django.db.models.functions import Now
from django.db.models.signals import m2m_changed, post_delete, post_save, pre_delete
from django.utils import timezone
from rest_framework.authtoken.models import Token

from awx_ws.main import metrics, protocol
from awx_ws.main.access import readable_job_ids
from awx_ws.main.audience import Viewer, viewer_of
from awx_ws.main.auth import session_expiry, still_authenticated, token_from_scope
from awx_ws.main.conf import ws_settings
from awx_ws.main.exceptions import DatabaseUnavailable
from awx_ws.main.models import AccessChange, Organization
from awx_ws.main.numbers import parse_bounded
from awx_ws.main.retry import FailureLog, spawn

logger = logging.getLogger(__name__)

# Close code of a websocket whose credential is gone (AWX has none; 4003 echoes HTTP 403).
ACCESS_REVOKED_CLOSE_CODE = 4003
# Rows are read back this far (database clock): a transaction may commit a little after it wrote.
LOOKBACK = timedelta(seconds=30)
# A connection accepted this soon after a change for its user is checked once more.
RECENT = 10.0
# Rows older than this are deleted by the next writer.
KEEP = timedelta(hours=1)
# Keys per query of a sweep (SQLite allows 32,766 parameters; PostgreSQL plans short lists best).
SWEEP_CHUNK = 500


# --- where changes happen -------------------------------------------------------------------


def record(user_ids: Iterable[int | None], reason: str) -> None:
    """Write one AccessChange per user (None: everyone), in the caller's transaction."""
    rows = [AccessChange(user_id=user_id, reason=reason) for user_id in set(user_ids)]
    if not rows:
        return
    AccessChange.objects.bulk_create(rows)
    AccessChange.objects.filter(created__lt=Now() - KEEP).delete()


def _token_deleted(sender: Any, instance: Token, **kwargs: Any) -> None:
    record([instance.user_id], "token deleted")


def _user_saved(sender: Any, instance: Any, created: bool, update_fields: Any = None, **kwargs: Any) -> None:
    # A login saves last_login only: nothing that takes access away.
    if created or (update_fields is not None and set(update_fields) <= {"last_login"}):
        return
    record([instance.pk], "user changed")


def _user_deleted(sender: Any, instance: Any, **kwargs: Any) -> None:
    record([instance.pk], "user deleted")


def _session_deleted(sender: Any, instance: Session, **kwargs: Any) -> None:
    if instance.expire_date <= timezone.now():
        return  # expired already: its connections were checked at the expiry (clearsessions)
    try:
        user_id = instance.get_decoded().get("_auth_user_id")
    except Exception:  # noqa: BLE001 (a session Django itself cannot decode holds no login)
        return
    if user_id is not None:
        record([int(user_id)], "session ended")


def _members_changed(
    sender: Any, instance: Any, action: str, reverse: bool, pk_set: Any, **kwargs: Any
) -> None:
    if action == "pre_clear":
        # After the clear the members are gone: name them now (same transaction).
        users = [instance.pk] if reverse else list(instance.members.values_list("pk", flat=True))
        record(users, "organization membership removed")
    elif action == "post_remove":
        record([instance.pk] if reverse else pk_set, "organization membership removed")
    elif action == "post_add":
        # Nothing is taken away, but the member may now see that organization's job statuses.
        record([instance.pk] if reverse else pk_set, "organization membership added")


def _organization_deleted(sender: Any, instance: Organization, **kwargs: Any) -> None:
    record([None], "organization deleted")


def connect_signals() -> None:
    """Connect the recorders (AppConfig.ready)."""
    user_model = get_user_model()
    post_delete.connect(_token_deleted, sender=Token, dispatch_uid="awx_ws.revocation.token")
    post_save.connect(_user_saved, sender=user_model, dispatch_uid="awx_ws.revocation.user_saved")
    post_delete.connect(_user_deleted, sender=user_model, dispatch_uid="awx_ws.revocation.user_deleted")
    post_delete.connect(_session_deleted, sender=Session, dispatch_uid="awx_ws.revocation.session")
    m2m_changed.connect(
        _members_changed, sender=Organization.members.through, dispatch_uid="awx_ws.revocation.members"
    )
    pre_delete.connect(_organization_deleted, sender=Organization, dispatch_uid="awx_ws.revocation.org")


# --- open connections -----------------------------------------------------------------------


class Revocable(Protocol):
    """What the watcher needs of an open connection."""

    @property
    def user_id(self) -> int:
        """Whose connection this is."""

    @property
    def session_expiry(self) -> float | None:
        """When its session expires (epoch seconds); None for a token."""

    @property
    def scope(self) -> dict[str, Any]:
        """The connection's scope: its user and credential (auth.py)."""

    @property
    def viewer(self) -> Viewer | None:
        """What its user may see of jobs, as last read."""

    async def recheck(self) -> None:
        """Check the credential and the groups again; close or leave what is no longer allowed."""


def lost_groups(user: Any, groups: Iterable[str]) -> set[str]:
    """The groups of per-job kinds among groups that user may no longer read (sync: ORM)."""
    by_kind: dict[str, dict[int, str]] = {}
    for group in groups:
        kind, _, item = group.partition("-")
        job_id = parse_bounded(item, protocol.MAX_OBJECT_ID)
        if kind in protocol.EVENT_KINDS and job_id is not None:
            by_kind.setdefault(kind, {})[job_id] = group
    lost: set[str] = set()
    for kind, named in by_kind.items():
        readable = readable_job_ids(user, protocol.EVENT_KINDS[kind], named)
        lost.update(group for job_id, group in named.items() if job_id not in readable)
    return lost


async_lost_groups = database_sync_to_async(lost_groups)


@dataclass(frozen=True)
class Access:
    """What an open connection's credential allows now, read afresh."""

    user: Any
    viewer: Viewer
    session_expiry: float | None


async def reread(scope: dict[str, Any]) -> Access | None:
    """A connection's access read afresh (scope["user"] updated), or None if its credential is gone."""
    user = await still_authenticated(scope)
    if user is None:
        return None
    scope["user"] = user
    return Access(user, await viewer_of(user), await session_expiry(scope))


@dataclass(frozen=True)
class Admitted:
    """What one open connection was admitted with, as a sweep compares it with the database."""

    user_id: int
    auth: str  # "token" or "session"
    key: str | None  # the token's key, or the session's
    password: str  # the user's password hash when last read (a change ends a session)
    viewer: Viewer | None

    @classmethod
    def of(cls, connection: Revocable) -> Admitted:
        """What connection holds now."""
        scope = connection.scope
        auth = str(scope.get("auth"))
        if auth == "token":
            key = token_from_scope(scope)
        else:
            key = getattr(scope.get("session"), "session_key", None)
        return cls(connection.user_id, auth, key, str(scope["user"].password), connection.viewer)


def _chunks(items: Iterable[Any]) -> Iterable[list[Any]]:
    listed = sorted(set(items), key=str)
    for start in range(0, len(listed), SWEEP_CHUNK):
        yield listed[start : start + SWEEP_CHUNK]


def sweep(admitted: list[Admitted]) -> set[int]:
    """The indexes of admitted whose access changed in the database (sync: ORM, bulk queries)."""
    users: dict[int, tuple[bool, str]] = {}
    for ids in _chunks(a.user_id for a in admitted):
        rows = get_user_model().objects.filter(pk__in=ids, is_active=True)
        users.update(
            (pk, (superuser, password))
            for pk, superuser, password in rows.values_list("pk", "is_superuser", "password")
        )
    memberships: dict[int, set[int]] = {}
    for ids in _chunks(users):
        through = Organization.members.through.objects.filter(user_id__in=ids)
        for user_id, organization_id in through.values_list("user_id", "organization_id"):
            memberships.setdefault(user_id, set()).add(organization_id)
    tokens: dict[str, int] = {}
    for keys in _chunks(a.key for a in admitted if a.auth == "token" and a.key):
        tokens.update(Token.objects.filter(key__in=keys).values_list("key", "user_id"))
    sessions: set[str] = set()
    for keys in _chunks(a.key for a in admitted if a.auth == "session" and a.key):
        live = Session.objects.filter(session_key__in=keys, expire_date__gt=timezone.now())
        sessions.update(live.values_list("session_key", flat=True))
    stale = set()
    for index, held in enumerate(admitted):
        user = users.get(held.user_id)
        if held.auth == "token":
            credential_holds = held.key is not None and tokens.get(held.key) == held.user_id
        else:
            credential_holds = held.key in sessions and user is not None and user[1] == held.password
        now = None if user is None else Viewer(user[0], frozenset(memberships.get(held.user_id, ())))
        if user is None or not credential_holds or (held.viewer is not None and held.viewer != now):
            stale.add(index)
    return stale


def _new_changes(seen: set[int]) -> tuple[list[tuple[int, int | None]], set[int]]:
    """(the changes not seen before as (id, user id), the ids now within the lookback)."""
    rows = list(AccessChange.objects.filter(created__gte=Now() - LOOKBACK).values_list("id", "user_id"))
    return [row for row in rows if row[0] not in seen], {row[0] for row in rows}


class Watcher:
    """This process's open connections by user, and the loop that rechecks them."""

    def __init__(self) -> None:
        self._by_user: dict[int, set[Revocable]] = {}
        self._seen: set[int] = set()
        # When a change for a user (None: everyone) was last read, by the loop's clock.
        self._recent: dict[int | None, float] = {}
        self._task: asyncio.Task[None] | None = None
        self._rechecks: set[asyncio.Task[None]] = set()
        # When the next sweep is due; set by the first round (no setting read at import).
        self._next_sweep: float | None = None
        self._failures = FailureLog("access recheck", 60.0, logger)

    def add(self, connection: Revocable) -> None:
        """Watch an accepted connection (starts the loop on first use)."""
        self._by_user.setdefault(connection.user_id, set()).add(connection)
        if self._task is None or self._task.done():
            self._task = spawn("access revocation", self._round, metric="access_revocation")
        # A change read between this connection's authentication and now was not its to see:
        # check it once more (the window is a handshake long).
        since = time.monotonic() - RECENT
        if max(self._recent.get(connection.user_id, 0.0), self._recent.get(None, 0.0)) > since:
            task = asyncio.ensure_future(self._recheck(connection))
            self._rechecks.add(task)
            task.add_done_callback(self._rechecks.discard)

    def discard(self, connection: Revocable) -> None:
        """Stop watching a connection (it closed)."""
        held = self._by_user.get(connection.user_id)
        if held is not None:
            held.discard(connection)
            if not held:
                del self._by_user[connection.user_id]

    async def stop(self) -> None:
        """Stop the loop (server shutdown)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _round(self, failures: int) -> float:
        try:
            changes, self._seen = await database_sync_to_async(_new_changes)(self._seen)
        except DatabaseError as exc:
            raise DatabaseUnavailable(f"cannot read access changes (DATABASE_URL): {exc}") from exc
        users = {user_id for _, user_id in changes}
        now = time.monotonic()
        self._recent = {u: t for u, t in self._recent.items() if t > now - RECENT}
        self._recent.update(dict.fromkeys(users, now))
        due: set[Revocable] = set()
        if None in users:
            due.update(c for held in self._by_user.values() for c in held)
        for user_id in users - {None}:
            due.update(self._by_user.get(user_id, ()))
        now = time.time()
        due.update(
            c
            for held in self._by_user.values()
            for c in held
            if c.session_expiry is not None and c.session_expiry <= now
        )
        for connection in due:
            await self._recheck(connection)
        if self._next_sweep is None:
            self._next_sweep = time.monotonic() + float(ws_settings.REVOCATION_SWEEP)
        if ws_settings.REVOCATION_SWEEP and time.monotonic() >= self._next_sweep:
            await self._sweep(due)
        return float(ws_settings.REVOCATION_POLL)

    async def _sweep(self, checked: set[Revocable]) -> None:
        """Recheck the connections whose access changed without a recorded change."""
        self._next_sweep = time.monotonic() + float(ws_settings.REVOCATION_SWEEP)
        connections = [c for held in self._by_user.values() for c in held if c not in checked]
        if not connections:
            return
        started = time.perf_counter()
        try:
            stale = await database_sync_to_async(sweep)([Admitted.of(c) for c in connections])
        except DatabaseError as exc:
            raise DatabaseUnavailable(f"cannot sweep open connections' access (DATABASE_URL): {exc}") from exc
        metrics.ACCESS_SWEEP_SECONDS.observe(time.perf_counter() - started)
        if stale:
            count, total = len(stale), len(connections)
            logger.info("access sweep: %d of %d open connections changed without a record", count, total)
        for index in sorted(stale):
            await self._recheck(connections[index])

    async def _recheck(self, connection: Revocable) -> None:
        try:
            await connection.recheck()
        except Exception as exc:  # one connection's failure must not stop the others' checks
            self._failures.occurred(exc)


watcher = Watcher()
