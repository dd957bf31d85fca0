"""Peer discovery through PostgreSQL (BROADCAST_WEBSOCKET_DISCOVERY=postgres).

Each node's relay LISTENs on its cluster's channel of the Django database and announces there,
with NOTIFY, the address other nodes dial to reach it (BROADCAST_WEBSOCKET_SELF):
`{"cluster", "node", "address", "action"}`, the action `hello` when it (re)connects (everyone
answers `online` at once, so a starting node knows its peers within a second, not a heartbeat),
`online` every BROADCAST_WEBSOCKET_HEARTBEAT seconds (AWX's 15 by default), `offline` when it
stops cleanly. The relay dials each node it hears (Relay.add_peer) and drops one that says
`offline` or stays silent for MISSED_HEARTBEATS heartbeats (Relay.drop_peer).

Every announcement is signed with BROADCAST_WEBSOCKET_SECRET and checked (announcements.py):
NOTIFY needs no privilege, so any role that may connect to the database could otherwise make
every node dial an address of its choosing, announce hundreds of fake peers, or say `offline` for
a real node. Checking one costs a JSON parse and one HMAC, what noise costs anyway, and a refused
hello is never answered.

The channel is named from a hash of AWX_WS_CLUSTER_ID, and every announcement carries the id
too: two clusters sharing a database never see each other (AWX #15544 picked up a neighbour's
nodes). The connection is in autocommit mode, without which notifications stay queued (AWX
#15038). A lost connection is reconnected with back-off (retry.supervise; AWX #15030 needed a
restart) and the node says hello again; while it is down no peer expires, since the silence is
ours, not theirs.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Mapping
from typing import Any, Protocol

import psycopg
from django.conf import settings
from psycopg import sql

from awx_ws.main.announcements import Announcement, AnnouncementCheck
from awx_ws.main.conf import ws_settings
from awx_ws.main.exceptions import DatabaseUnavailable, StartupError
from awx_ws.main.peerauth import peer_url
from awx_ws.main.retry import RetryPolicy, supervise

logger = logging.getLogger(__name__)

# A discovered peer not heard for this many heartbeats is dropped.
MISSED_HEARTBEATS = 3
CHANNEL_PREFIX = "awx_ws_peers_"
# PostgreSQL refuses a NOTIFY payload of 8000 bytes or more.
MAX_PAYLOAD = 7999
# Seconds an announcement may take before the connection counts as lost.
SAY_TIMEOUT = 10.0
POSTGRES_ENGINES = ("django.db.backends.postgresql", "django.contrib.gis.db.backends.postgis")
# Keys of Django's DATABASES OPTIONS that are Django's, not libpq connection parameters.
DJANGO_OPTIONS = frozenset(
    {"isolation_level", "server_side_binding", "pool", "assume_role", "cursor_factory", "context"}
)


def enabled() -> bool:
    """True when this node finds its peers through PostgreSQL (BROADCAST_WEBSOCKET_DISCOVERY)."""
    return bool(ws_settings.BROADCAST_WEBSOCKET_DISCOVERY == "postgres")


def channel_name(cluster: str) -> str:
    """The LISTEN/NOTIFY channel of a cluster: any text may be an id, an identifier is <= 63 bytes."""
    return CHANNEL_PREFIX + hashlib.sha256(cluster.encode()).hexdigest()[:32]


class PeerTable:
    """The peers heard and when (monotonic seconds): the rule for dropping silent ones."""

    def __init__(self, interval: float, missed: int = MISSED_HEARTBEATS) -> None:
        self.limit = interval * missed
        self.last_heard: dict[str, float] = {}

    def heard(self, address: str, now: float) -> bool:
        """Note address heard at now; True when it is new."""
        new = address not in self.last_heard
        self.last_heard[address] = now
        return new

    def forget(self, address: str) -> bool:
        """Forget address (it went offline); True when it was known."""
        return self.last_heard.pop(address, None) is not None

    def expired(self, now: float) -> list[str]:
        """The peers silent for longer than `missed` heartbeats at now, forgotten."""
        gone = sorted(address for address, heard in self.last_heard.items() if now - heard > self.limit)
        for address in gone:
            del self.last_heard[address]
        return gone

    def restart(self, now: float) -> None:
        """Count every known peer as heard at now (our connection was down, not they)."""
        self.last_heard = dict.fromkeys(self.last_heard, now)


class PeerSet(Protocol):
    """What discovery keeps up to date: the relay's links."""

    def add_peer(self, peer: str, seen: float) -> None:
        """Dial peer if it is new; seen (time.time()) is when it was last heard."""
        ...

    def drop_peer(self, peer: str) -> None:
        """Stop dialling peer (unless it is a static one)."""
        ...


def connect_args(database: Mapping[str, Any]) -> dict[str, Any]:
    """psycopg's connection parameters for a Django DATABASES entry."""
    given = {
        "dbname": database.get("NAME"),
        "user": database.get("USER"),
        "password": database.get("PASSWORD"),
        "host": database.get("HOST"),
        "port": database.get("PORT"),
    }
    options = {k: v for k, v in (database.get("OPTIONS") or {}).items() if k not in DJANGO_OPTIONS}
    args = {"connect_timeout": 10, "application_name": "awx_ws peer discovery", **options}
    args.update({key: value for key, value in given.items() if value not in (None, "")})
    return args


def require_postgresql(database: Mapping[str, Any]) -> None:
    """StartupError unless the Django DATABASES entry is PostgreSQL (LISTEN/NOTIFY is its own)."""
    engine = database.get("ENGINE", "")
    if engine not in POSTGRES_ENGINES:
        raise StartupError(
            "BROADCAST_WEBSOCKET_DISCOVERY='postgres' needs the database (DATABASE_URL) to be "
            f"PostgreSQL, not {engine}: use BROADCAST_WEBSOCKET_DISCOVERY=static with "
            "BROADCAST_WEBSOCKET_PEERS instead"
        )


class Discovery:
    """One node's announcements, and what it hears of the others, over one LISTEN connection."""

    def __init__(
        self,
        peers: PeerSet,
        args: dict[str, Any],
        cluster: str,
        node: str,
        address: str,
        interval: float,
        secret: str,
        window: float,
    ) -> None:
        self.peers = peers
        self.args = args
        self.cluster, self.node, self.address = cluster, node, address
        self.interval = interval
        self.secret = secret
        self.check = AnnouncementCheck(cluster, secret, window)
        self.channel = channel_name(cluster)
        self.table = PeerTable(interval)
        self.where = f"{args.get('host', 'localhost')}:{args.get('port', 5432)}/{args.get('dbname', '')}"
        self._failing = False

    @classmethod
    def from_settings(cls, peers: PeerSet) -> Discovery:
        """Discovery as AWX_WS configures it; StartupError when the database is not PostgreSQL."""
        database = settings.DATABASES["default"]
        require_postgresql(database)
        found = cls(
            peers,
            connect_args(database),
            ws_settings.CLUSTER_ID,
            ws_settings.NODE_NAME,
            ws_settings.BROADCAST_WEBSOCKET_SELF,
            ws_settings.BROADCAST_WEBSOCKET_HEARTBEAT,
            ws_settings.BROADCAST_WEBSOCKET_SECRET,
            ws_settings.BROADCAST_WEBSOCKET_NONCE_WINDOW,
        )
        if len(found.say("online").encode()) > MAX_PAYLOAD:
            raise StartupError(
                "AWX_WS_CLUSTER_ID, AWX_WS_NODE_NAME and BROADCAST_WEBSOCKET_SELF are too long for "
                f"a PostgreSQL notification ({MAX_PAYLOAD} bytes at most)"
            )
        return found

    def say(self, action: str) -> str:
        """This node's announcement (a signed payload)."""
        return Announcement(self.cluster, self.node, self.address, action).payload(self.secret)

    def start(self) -> asyncio.Task[None]:
        """Keep listening and announcing until cancelled (reconnecting with back-off)."""
        policy = RetryPolicy(
            min(1.0, self.interval),
            ws_settings.BROADCAST_WEBSOCKET_BACKOFF_MAX,
            RetryPolicy.from_settings().log_every,
        )
        work = supervise(
            "peer discovery",
            self._session,
            policy,
            on_failure=self._lost,
            metric="relay_discovery",
            report_expected=False,  # _lost logs once per state change
        )
        return asyncio.get_running_loop().create_task(work, name="peer discovery")

    async def _session(self, failures: int) -> None:
        """One connection, served until it fails (which supervise retries)."""
        try:
            conn = await psycopg.AsyncConnection.connect(**self.args, autocommit=True)
        except psycopg.Error as exc:
            raise self._unavailable(exc) from exc
        try:
            await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
            self.table.restart(time.monotonic())  # a fresh start for everyone after our outage
            await self._announce(conn, "hello")
            self._connected()
            try:
                await self._listen(conn)
            except asyncio.CancelledError:
                await self._farewell(conn)
                raise
        except psycopg.Error as exc:
            raise self._unavailable(exc) from exc
        finally:
            await conn.close()

    async def _listen(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Hear the others, answer hellos, heartbeat and drop the silent, until the connection fails."""
        beat = time.monotonic() + self.interval
        while True:
            # notifies() holds the connection: what arrives is handled after it returns.
            wait = max(0.0, beat - time.monotonic())
            payloads = [notice.payload async for notice in conn.notifies(timeout=wait, stop_after=1)]
            answer = self._hear(payloads)
            if time.monotonic() >= beat:
                beat = time.monotonic() + self.interval
                answer = True
                for address in self.table.expired(time.monotonic()):
                    logger.warning(
                        "peer discovery dropped %s: not heard for %d heartbeats", address, MISSED_HEARTBEATS
                    )
                    self.peers.drop_peer(address)
            if answer:
                await self._announce(conn, "online")

    def _hear(self, payloads: list[str]) -> bool:
        """Apply what was heard; True when a node asked for an answer (a hello)."""
        answer = False
        for payload in payloads:
            said = self.check.read(payload, time.time())
            if said is None or peer_url(said.address) == peer_url(self.address):
                continue  # this node's own words (a relay dialling itself would double every message)
            if said.action == "offline":
                if self.table.forget(said.address):
                    logger.info("peer discovery dropped %s: node %s went offline", said.address, said.node)
                    self.peers.drop_peer(said.address)
                continue
            if self.table.heard(said.address, time.monotonic()):
                logger.info("peer discovery found node %s at %s", said.node, said.address)
            self.peers.add_peer(said.address, time.time())
            answer = answer or said.action == "hello"
        return answer

    async def _announce(self, conn: psycopg.AsyncConnection[Any], action: str) -> None:
        async with asyncio.timeout(SAY_TIMEOUT):
            await conn.execute("SELECT pg_notify(%s, %s)", (self.channel, self.say(action)))

    async def _farewell(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Say offline on a clean stop, so peers drop this node at once (best effort)."""
        try:
            async with asyncio.timeout(2.0):
                await conn.execute("SELECT pg_notify(%s, %s)", (self.channel, self.say("offline")))
        except (psycopg.Error, TimeoutError, OSError) as exc:
            logger.info("peer discovery could not say offline: %s", exc)

    def _unavailable(self, exc: psycopg.Error) -> DatabaseUnavailable:
        return DatabaseUnavailable(
            f"peer discovery (BROADCAST_WEBSOCKET_DISCOVERY=postgres) cannot use the database "
            f"{self.where} (DATABASE_URL): {type(exc).__name__}: {str(exc).strip()}"
        )

    def _connected(self) -> None:
        """Log the (re)connection once."""
        logger.info(
            "peer discovery listening on %s for cluster %r; announcing %s",
            self.where,
            self.cluster,
            self.address,
        )
        self._failing = False

    def _lost(self, exc: BaseException) -> None:
        """Log the first failure of a burst, not every attempt."""
        if not self._failing:
            logger.warning(
                "peer discovery lost the database: %s; reconnecting with back-off up to %gs "
                "(known peers are kept meanwhile)",
                exc,
                ws_settings.BROADCAST_WEBSOCKET_BACKOFF_MAX,
            )
        self._failing = True
