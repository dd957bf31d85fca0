"""The peer relay (`manage.py run_wsbroadcast`): brings other nodes' messages into this node.

For every peer it keeps one websocket to the peer's BroadcastConsumer (/websocket/broadcast/),
tells it which groups this node's clients hold (interest.py) and injects what the peer forwards
into the local channel layer, marked `relayed` so no BroadcastConsumer here sends it on again.
Links reconnect with exponential backoff and jitter, log once per state change (AWX #7266 logged
every attempt), and keep their figures in the local Redis for `run_wsbroadcast --status`. On a
layer without Redis (RabbitMQ) interest comes from the fan-outs' announcements on the layer, and
the figures are in the metrics only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from awx_ws.main import metrics, peerauth
from awx_ws.main.conf import ws_settings
from awx_ws.main.exceptions import StartupError
from awx_ws.main.history import parse_message_id
from awx_ws.main.interest import LayerInterestWatcher
from awx_ws.main.layers import RedisChannelLayer
from awx_ws.main.layers.redis_interest import watch_redis_interest
from awx_ws.main.peerauth import peer_url
from awx_ws.main.protocol import validate_group_name
from awx_ws.main.retry import RetryPolicy, spawn, supervise

logger = logging.getLogger(__name__)

# A link that stayed up this long resets its backoff to the first step.
HEALTHY_AFTER = 30.0
STATUS_EVERY = 1.0


def configured_peers() -> list[str]:
    """BROADCAST_WEBSOCKET_PEERS without this node's own entry (BROADCAST_WEBSOCKET_SELF)."""
    own = ws_settings.BROADCAST_WEBSOCKET_SELF
    return [peer for peer in ws_settings.BROADCAST_WEBSOCKET_PEERS if peer != own]


def forwarding_key(layer: RedisChannelLayer, peer: str) -> str:
    """Redis set of the groups a peer has confirmed it forwards to this node (resumes wait on it)."""
    return f"{layer.prefix}:relay-forwarding:{peer}"


def status_key(layer: RedisChannelLayer, peer: str) -> str:
    """Redis hash holding one link's figures."""
    return f"{layer.prefix}:relay-status:{peer}"


@dataclass
class LinkStatus:
    """One link's state and counters."""

    peer: str
    state: str = "connecting"
    since: float = field(default_factory=time.time)
    received_total: int = 0
    dropped_total: int = 0
    reconnects: int = 0
    last_error: str = ""
    # (second, count) buckets of the last minute
    _recent: deque[list[int]] = field(default_factory=deque)

    def __post_init__(self) -> None:
        metrics.RELAY_UP.labels(self.peer).set(0)

    def received(self) -> None:
        """Count one message."""
        self.received_total += 1
        metrics.RELAY_RECEIVED.labels(self.peer).inc()
        now = int(time.time())
        if self._recent and self._recent[-1][0] == now:
            self._recent[-1][1] += 1
        else:
            self._recent.append([now, 1])

    def last_minute(self) -> int:
        """Messages received in the last 60 seconds."""
        cutoff = int(time.time()) - 60
        while self._recent and self._recent[0][0] <= cutoff:
            self._recent.popleft()
        return sum(count for _, count in self._recent)

    def move_to(self, state: str) -> bool:
        """Change state; True when it really changed (the caller logs it)."""
        if state == self.state:
            return False
        self.state, self.since = state, time.time()
        metrics.RELAY_UP.labels(self.peer).set(1 if state == "connected" else 0)
        return True

    def as_mapping(self) -> dict[str, str]:
        """The figures as stored in Redis."""
        return {
            "peer": self.peer,
            "state": self.state,
            "since": f"{self.since:.3f}",
            "received_total": str(self.received_total),
            "received_last_minute": str(self.last_minute()),
            "dropped_total": str(self.dropped_total),
            "reconnects": str(self.reconnects),
            "last_error": self.last_error,
            "updated": f"{time.time():.3f}",
        }


def peer_ssl(url: str) -> ssl.SSLContext | None:
    """The TLS context for a wss:// peer: verified against BROADCAST_WEBSOCKET_CA_BUNDLE (or the
    system's CAs) unless BROADCAST_WEBSOCKET_VERIFY_CERT is off; None for ws://."""
    if not url.startswith("wss://"):
        return None
    bundle = ws_settings.BROADCAST_WEBSOCKET_CA_BUNDLE or None
    try:
        context = ssl.create_default_context(cafile=bundle)
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(f"BROADCAST_WEBSOCKET_CA_BUNDLE={bundle!r} cannot be read: {exc}") from exc
    if not ws_settings.BROADCAST_WEBSOCKET_VERIFY_CERT:
        # AWX's default; ours is to verify. Only for peers reached over a network one trusts.
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


@asynccontextmanager
async def open_peer(peer: str, secret: str, node: str, **options: Any) -> AsyncIterator[ClientConnection]:
    """A websocket to peer's BroadcastConsumer, once the peer has proved it holds the secret
    (peerauth.py); PeerAuthError when it does not. options go to websockets' connect."""
    credentials = peerauth.sign(secret, peer)
    url = peer_url(peer)
    options.setdefault("open_timeout", 10)
    async with connect(url, ssl=peer_ssl(url), additional_headers=credentials.headers(node), **options) as ws:
        try:
            async with asyncio.timeout(options["open_timeout"]):
                first = await ws.recv()
            offered = json.loads(first).get("proof")
        except (ValueError, AttributeError, TimeoutError) as exc:
            raise peerauth.PeerAuthError(f"{peer} sent no proof first ({type(exc).__name__})") from exc
        peerauth.check_proof(secret, credentials, offered)
        yield ws


def describe(exc: BaseException) -> str:
    """A one-line reason for a failed or lost link."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"TLS certificate not trusted: {exc.verify_message} (the peer's certificate must be signed "
            "by a CA in BROADCAST_WEBSOCKET_CA_BUNDLE, or the system's CAs)"
        )
    if isinstance(exc, InvalidStatus):
        code = exc.response.status_code
        hint = (
            " (check BROADCAST_WEBSOCKET_SECRET, that the peer's BROADCAST_WEBSOCKET_SELF is this entry, "
            "or whether the peer has started)"
            if code == 403
            else ""
        )
        return f"HTTP {code} at handshake{hint}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class Relay:
    """All links of this node, and the interest they keep their peers informed of."""

    def __init__(self, layer: Any, peers: list[str], secret: str, node: str) -> None:
        self.layer = layer
        # Redis keeps the node's interest, the links' figures and the peers' acks; other layers don't.
        self.redis: RedisChannelLayer | None = layer if isinstance(layer, RedisChannelLayer) else None
        self.peers = peers
        self.secret = secret
        self.node = node
        self.interest: frozenset[str] = frozenset()
        self._changed = asyncio.Event()
        self.links = [PeerLink(self, peer) for peer in peers]

    @classmethod
    def from_settings(cls, layer: Any) -> Relay:
        """Build from AWX_WS settings; StartupError with a clear message when they cannot work."""
        if not hasattr(layer, "fanout"):
            raise StartupError(
                "the relay needs one of awx_ws's channel layers (CHANNEL_LAYER_BACKEND), "
                f"not {type(layer).__name__}"
            )
        peers = configured_peers()
        secret = ws_settings.BROADCAST_WEBSOCKET_SECRET
        if peers and not secret:
            raise StartupError(
                "BROADCAST_WEBSOCKET_SECRET is empty: set the same secret on every node to relay "
                f"to {', '.join(peers)}"
            )
        for peer in peers:
            peer_ssl(peer_url(peer))  # a CA bundle that cannot be read stops the relay at once
        return cls(layer, peers, secret, ws_settings.NODE_NAME)

    def changed(self) -> asyncio.Event:
        """An event set at the next interest change (take it before reading `interest`)."""
        return self._changed

    def _publish(self, interest: frozenset[str]) -> None:
        if interest != self.interest:
            self.interest = interest
            previous, self._changed = self._changed, asyncio.Event()
            previous.set()

    async def run(self) -> None:
        """Relay until cancelled."""
        if not self.peers:
            logger.info("no peers in BROADCAST_WEBSOCKET_PEERS besides this node: nothing to relay")
            await asyncio.Event().wait()
        logger.info("relay of node %s to %s", self.node, ", ".join(self.peers))
        if self.redis is not None:
            watch = watch_redis_interest(self.redis, self._publish)
        else:
            watch = LayerInterestWatcher(self.layer, self._publish).round
        tasks = [spawn("relay interest", watch, metric="relay_interest")]
        tasks += [link.start() for link in self.links]
        if self.redis is not None:
            redis = self.redis
            tasks.append(
                spawn("relay status", lambda failures: self._write_status(redis), metric="relay_status")
            )
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _write_status(self, redis: RedisChannelLayer) -> float:
        for link in self.links:
            key = status_key(redis, link.peer)
            await redis.connection(0).hset(key, mapping=link.status.as_mapping())
            await redis.connection(0).expire(key, 3600)
        return STATUS_EVERY


class PeerLink:
    """The connection to one peer: keeps it up, keeps it informed, injects what it sends."""

    def __init__(self, relay: Relay, peer: str) -> None:
        self.relay = relay
        self.peer = peer
        self.url = peer_url(peer)
        self.status = LinkStatus(peer)
        self._failing = False
        self._connected_once = False

    def start(self) -> asyncio.Task[None]:
        """Keep the link up until cancelled: connect, serve, back off (1 s doubling to
        BROADCAST_WEBSOCKET_BACKOFF_MAX, with jitter; from 1 s again after a healthy link)."""
        policy = RetryPolicy(
            1.0, ws_settings.BROADCAST_WEBSOCKET_BACKOFF_MAX, RetryPolicy.from_settings().log_every
        )
        work = supervise(
            f"relay link to {self.peer}",
            self._session,
            policy,
            on_failure=self._lost,
            healthy_after=HEALTHY_AFTER,
            metric="relay_link",
            report_expected=False,  # _lost logs once per state change
        )
        return asyncio.get_running_loop().create_task(work, name=f"relay link {self.peer}")

    async def _session(self, failures: int) -> None:
        """One connection to the peer, served until it ends (which is a failure: retried)."""
        self.status.move_to("connecting")
        ping = ws_settings.BROADCAST_WEBSOCKET_PING_INTERVAL
        async with open_peer(
            self.peer,
            self.relay.secret,
            self.relay.node,
            ping_interval=ping,
            ping_timeout=ping,
            max_size=2**24,
        ) as ws:
            redis = self.relay.redis
            if redis is not None:
                # A new link starts with nothing forwarded; the interest sent next rebuilds it.
                await redis.connection(0).delete(forwarding_key(redis, self.peer))
            if self._connected_once:
                self.status.reconnects += 1
                metrics.RELAY_RECONNECTS.labels(self.peer).inc()
            self._connected_once = True
            self.status.move_to("connected")
            self.status.last_error = ""
            self._failing = False
            logger.info("relay link to %s connected", self.peer)
            await self._serve(ws)
        raise ConnectionError("peer closed the link")

    def _lost(self, exc: BaseException) -> None:
        """Record why the link is down; log once per state change, not per attempt (AWX #7266)."""
        self.status.last_error = describe(exc)
        was_up = self.status.state == "connected"
        self.status.move_to("disconnected")
        if was_up:
            logger.warning("relay link to %s lost: %s; reconnecting", self.peer, self.status.last_error)
        elif not self._failing:
            logger.warning(
                "relay link to %s failed: %s; retrying with backoff up to %gs",
                self.peer,
                self.status.last_error,
                ws_settings.BROADCAST_WEBSOCKET_BACKOFF_MAX,
            )
        self._failing = not was_up

    async def _serve(self, ws: ClientConnection) -> None:
        sender = asyncio.create_task(self._send_interest(ws))
        try:
            async for frame in ws:
                await self._inject(frame)
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)

    async def _send_interest(self, ws: ClientConnection) -> None:
        sent: frozenset[str] = frozenset()
        while True:
            changed = self.relay.changed()
            current = self.relay.interest
            join, leave = current - sent, sent - current
            if join or leave:
                await ws.send(json.dumps({"join": sorted(join), "leave": sorted(leave)}))
                sent = current
            await changed.wait()

    async def _inject(self, frame: str | bytes) -> None:
        try:
            data = json.loads(frame)
            if "forwarding" in data:
                await self._confirmed(data["forwarding"], data.get("dropped", []))
                return
            group, text = validate_group_name(data["group"]), data["text"]
            if not isinstance(text, str):
                raise TypeError("text is not a string")
            message_id = data.get("id")
            if message_id is not None:
                parse_message_id(message_id)
        except (ValueError, KeyError, TypeError) as exc:
            self.status.dropped_total += 1
            metrics.DROPPED.labels("relay_malformed").inc()
            logger.warning("relay link to %s sent a malformed message: %s", self.peer, exc)
            return
        message = {"type": "internal.message", "text": text, "group": group, "relayed": True}
        if message_id is not None:
            message["id"] = message_id  # the origin's history id, kept for resuming clients here
        try:
            await self.relay.layer.group_send(group, message)
        except (RedisError, OSError) as exc:
            self.status.dropped_total += 1
            metrics.DROPPED.labels("relay_inject_failed").inc()
            metrics.REDIS_ERRORS.labels("relay_inject").inc()
            if self.status.dropped_total == 1 or self.status.dropped_total % 1000 == 0:
                logger.error(
                    "relay could not inject into the local %s (%d dropped): %s",
                    getattr(self.relay.layer, "service", "channel layer"),
                    self.status.dropped_total,
                    exc,
                )
            return
        self.status.received()

    async def _confirmed(self, forwarding: list[str], dropped: list[str]) -> None:
        """Record which groups the peer now forwards here (streams.wait_until_forwarded reads it)."""
        redis = self.relay.redis
        if redis is None:
            return  # no history on this layer: no resume waits for it
        key = forwarding_key(redis, self.peer)
        connection = redis.connection(0)
        try:
            if dropped:
                await connection.srem(key, *dropped)
            if forwarding:
                await connection.sadd(key, *forwarding)
        except (RedisError, OSError) as exc:
            # Resuming clients then wait for it in vain and report a reset: nothing is lost.
            logger.warning("relay could not record what %s forwards: %s", self.peer, exc)
