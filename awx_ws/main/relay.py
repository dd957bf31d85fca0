"""The peer relay (`manage.py run_wsbroadcast`): brings other nodes' messages into this node.

For every peer it keeps one websocket to the peer's BroadcastConsumer (/websocket/broadcast/),
tells it which groups this node's clients hold (interest.py) and injects what the peer forwards
into the local channel layer, marked `relayed` so no BroadcastConsumer here sends it on again.
Links reconnect with exponential backoff and jitter, log once per state change (AWX #7266 logged
every attempt), and keep their figures in the layer's node records (Redis) for
`run_wsbroadcast --status` (relay_status.py). Peers are BROADCAST_WEBSOCKET_PEERS (static:
dialled for good) and, with BROADCAST_WEBSOCKET_DISCOVERY=postgres, the nodes discovery.py hears
(dialled while they announce themselves: `add_peer`, `drop_peer`). On a layer without records
(RabbitMQ) interest comes from the fan-outs' announcements on the layer, and the figures are in
the metrics only. What a link says is peer_protocol.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Set as AbstractSet
from typing import Any

from websockets.asyncio.client import ClientConnection

from awx_ws.main import discovery, metrics
from awx_ws.main.conf import SettingError, ws_settings
from awx_ws.main.discovery import Discovery
from awx_ws.main.exceptions import LayerUnavailable, StartupError
from awx_ws.main.history import emitted_at
from awx_ws.main.interest import LayerInterestWatcher
from awx_ws.main.layers import NodeRecords, ServiceLayer, service_layer
from awx_ws.main.peer_protocol import (
    LINK_MAX_SIZE,
    ForwardingAck,
    configured_peers,
    interest_frames,
    open_peer,
    peer_ssl,
    read_frame,
)
from awx_ws.main.peerauth import exposed_hop, peer_url
from awx_ws.main.relay_catchup import catch_up, catchup_floors, previous_down_since
from awx_ws.main.relay_status import LinkStatus, describe
from awx_ws.main.retry import RetryPolicy, spawn, supervise

logger = logging.getLogger(__name__)

# A link that stayed up this long resets its backoff to the first step.
HEALTHY_AFTER = 30.0
# The links' figures are rewritten this often; resumes judge a relay stopped by their age.
STATUS_EVERY = 1.0


class Relay:
    """All links of this node, and the interest they keep their peers informed of."""

    def __init__(self, layer: ServiceLayer, peers: list[str], secret: str, node: str) -> None:
        self.layer = layer
        # Where the node's interest, the links' figures and the peers' acks are kept (Redis);
        # None on a layer with no store (RabbitMQ): interest then comes over the layer itself.
        self.records: NodeRecords | None = layer.records
        self.peers = peers
        self.secret = secret
        self.node = node
        # The node's interest: what its clients hold (interest.py), kept by changes.
        self.interest: set[str] = set()
        # Set once the interest was read whole (a link's catch-up needs it: relay_catchup.py).
        self.interest_read = asyncio.Event()
        self._changed = asyncio.Event()
        self.links = {peer: PeerLink(self, peer) for peer in peers}
        # Set by from_settings with BROADCAST_WEBSOCKET_DISCOVERY=postgres.
        self.discovery: Discovery | None = None
        # The links' tasks once run() has started them.
        self._tasks: dict[str, asyncio.Task[None]] | None = None

    @classmethod
    def from_settings(cls, given: Any) -> Relay:
        """Build from AWX_WS settings; StartupError with a clear message when they cannot work."""
        layer = service_layer(given)
        if layer is None:
            raise StartupError(
                "the relay needs one of awx_ws's channel layers (CHANNEL_LAYER_BACKEND), "
                f"not {type(given).__name__}"
            )
        peers = configured_peers()
        secret = ws_settings.BROADCAST_WEBSOCKET_SECRET
        discover = discovery.enabled()
        if (peers or discover) and not secret:
            raise StartupError(
                "BROADCAST_WEBSOCKET_SECRET is empty: set the same secret on every node to relay "
                f"to {', '.join(peers) or 'the nodes discovery finds'}"
            )
        # A CA bundle that cannot be read stops the relay at once (a discovered peer may be wss://).
        for peer in [*peers, *(["wss://discovered"] if discover else [])]:
            try:
                peer_ssl(peer_url(peer))
            except SettingError as exc:
                raise StartupError(str(exc)) from exc
        relay = cls(layer, peers, secret, ws_settings.NODE_NAME)
        if discover:
            relay.discovery = Discovery.from_settings(relay)
        return relay

    def add_peer(self, peer: str, seen: float) -> None:
        """Dial peer (found through discovery) if it is new; seen is when it was last heard."""
        # The same node written two ways (host:port and its URL) is one link, not two copies.
        link = next((link for link in self.links.values() if link.url == peer_url(peer)), None)
        if link is None:
            link = self.links[peer] = PeerLink(self, peer)
            link.status.source = "discovered"
            if exposed_hop(peer):
                _warn_plain_hop(peer, "BROADCAST_WEBSOCKET_SELF of that node, announced by discovery")
            if self._tasks is not None:
                self._tasks[peer] = link.start()
        link.status.last_seen = max(link.status.last_seen, seen)

    def drop_peer(self, peer: str) -> None:
        """Stop dialling a discovered peer (a static one stays)."""
        if peer in self.peers or peer not in self.links:
            return
        link = self.links.pop(peer)
        task = self._tasks.pop(peer, None) if self._tasks is not None else None
        if task is not None:
            task.cancel()
        link.status.move_to("dropped")

    def changed(self) -> asyncio.Event:
        """An event set at the next interest change (take it before reading `interest`)."""
        return self._changed

    def publish(self, interest: frozenset[str]) -> None:
        """The node's interest is now exactly interest (costs the number of groups)."""
        self.update(interest - self.interest, self.interest - interest)
        self.interest_read.set()

    def update(self, gained: AbstractSet[str], lost: AbstractSet[str]) -> None:
        """The node's interest gained and lost these groups: each link sends the change."""
        if not gained and not lost:
            return
        self.interest |= gained
        self.interest -= lost
        for link in self.links.values():
            link.note(gained, lost)
        previous, self._changed = self._changed, asyncio.Event()
        previous.set()

    async def run(self) -> None:
        """Relay until cancelled."""
        if not self.peers and self.discovery is None:
            logger.info("no peers in BROADCAST_WEBSOCKET_PEERS besides this node: nothing to relay")
            await asyncio.Event().wait()
        found = " and the nodes discovery finds" if self.discovery is not None else ""
        logger.info("relay of node %s to %s%s", self.node, ", ".join(self.peers) or "no static peer", found)
        for peer in self.peers:
            if exposed_hop(peer):
                _warn_plain_hop(peer, "BROADCAST_WEBSOCKET_PEERS")
        records = self.records
        if records is not None:
            watch = records.watch_interest(self)
        else:
            watch = LayerInterestWatcher(self.layer, self.publish).round
        tasks = [spawn("relay interest", watch, metric="relay_interest")]
        self._tasks = {peer: link.start() for peer, link in self.links.items()}
        if self.discovery is not None:
            tasks.append(self.discovery.start())
        if records is not None:
            tasks.append(
                spawn("relay status", lambda failures: self._write_status(records), metric="relay_status")
            )
        try:
            await asyncio.gather(*tasks)
        finally:
            tasks += self._tasks.values()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _write_status(self, records: NodeRecords) -> float:
        # Discovery may add or drop links meanwhile; a link is written once it has read what the
        # previous relay process wrote of it (PeerLink.restore), never over it before.
        links = list(self.links.values())
        now = time.time()
        for link in (link for link in links if link.restored):
            if link.status.state == "connected":
                link.status.last_seen = now
            await records.write_link_status(link.peer, link.status.as_mapping())
        await records.write_peers({link.peer: link.status.source for link in links})
        return STATUS_EVERY


def _warn_plain_hop(peer: str, setting: str) -> None:
    logger.warning(
        "relay to %s dials plain ws:// (%s): a man-in-the-middle on that hop can hold back a fresh "
        "relay header and use it once as this node; use wss:// between machines",
        peer,
        setting,
    )


class PeerLink:
    """The connection to one peer: keeps it up, keeps it informed, injects what it sends."""

    def __init__(self, relay: Relay, peer: str) -> None:
        self.relay = relay
        self.peer = peer
        self.url = peer_url(peer)
        self.status = LinkStatus(peer)
        self._failing = False
        self._connected_once = False
        # Whether the previous relay process's view of this link was read (restore()).
        self.restored = False
        # Changes of the node's interest not yet sent to the peer: group -> joined (True) or left.
        self._pending: dict[str, bool] = {}
        # The groups the peer confirmed it forwards, and has not dropped since, on any link.
        self._forwarded: set[str] = set()

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

    async def restore(self) -> None:
        """Take over from the previous relay process the moment this link went down for it
        (relay_catchup.previous_down_since): what the peer emitted since is caught up."""
        if not self.restored and self.relay.records is not None:
            self.status.down_since = await previous_down_since(self.relay.records, self.peer)
        self.restored = True

    async def _session(self, failures: int) -> None:
        """One connection to the peer, served until it ends (which is a failure: retried)."""
        await self.restore()
        self.status.move_to("connecting")
        ping = ws_settings.BROADCAST_WEBSOCKET_PING_INTERVAL
        async with open_peer(
            self.peer,
            self.relay.secret,
            self.relay.node,
            ping_interval=ping,
            ping_timeout=ping,
            max_size=LINK_MAX_SIZE,
        ) as ws:
            if self.relay.records is not None:
                # A new link starts with nothing forwarded; the interest sent next rebuilds it.
                await self.relay.records.reset_forwarding(self.peer)
            if self._connected_once:
                self.status.reconnects += 1
                metrics.RELAY_RECONNECTS.labels(self.peer).inc()
            self._connected_once = True
            self.status.move_to("connected")
            self.status.last_error = ""
            await self._write_status_now()
            self._failing = False
            logger.info("relay link to %s connected", self.peer)
            await self._serve(ws)
        raise ConnectionError("peer closed the link")

    async def _write_status_now(self) -> None:
        """Write the link's figures at once (not at the next second): a relay killed the moment
        after leaves its successor the right point to catch up from."""
        if self.relay.records is None:
            return
        try:
            await self.relay.records.write_link_status(self.peer, self.status.as_mapping())
        except LayerUnavailable as exc:
            logger.info("relay link to %s: its status is not written yet: %s", self.peer, exc)

    def _lost(self, exc: BaseException) -> None:
        """Record why the link is down; log once per state change, not per attempt (AWX #7266)."""
        self.status.last_error = describe(exc)
        was_up = self.status.state == "connected"
        if was_up and not self.status.down_since:
            self.status.down_since = time.time()
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
            down_since = self.status.down_since
            if down_since and self.relay.layer.keeps_history:
                with contextlib.suppress(TimeoutError):  # catch up on what is known by then
                    async with asyncio.timeout(ws_settings.RECOVER_TIMEOUT):
                        await self.relay.interest_read.wait()
                newest = self.status.newest_emitted
                floors = catchup_floors(set(self.relay.interest), down_since, self._forwarded, newest)
                buffered = await catch_up(self.peer, floors, ws.recv, self._confirmed, self._inject_entry)
                for frame in buffered:
                    await self._inject(frame)
            self.status.down_since = 0.0
            async for frame in ws:
                await self._inject(frame)
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)

    def note(self, gained: AbstractSet[str], lost: AbstractSet[str]) -> None:
        """Remember a change of the node's interest for the next interest frame (the last word
        on each group wins)."""
        for group in gained:
            self._pending[group] = True
        for group in lost:
            self._pending[group] = False

    async def _send_interest(self, ws: ClientConnection) -> None:
        """Tell the peer the node's interest, then each change: work in proportion to it."""
        sent: set[str] = set()
        self._pending = dict.fromkeys(self.relay.interest, True)  # a new link starts empty
        while True:
            changed = self.relay.changed()
            pending, self._pending = self._pending, {}
            join = {group for group, held in pending.items() if held and group not in sent}
            leave = {group for group, held in pending.items() if not held and group in sent}
            if join or leave:
                # In parts under the peer's frame limit (peer_protocol.FRAME_BUDGET), each a change
                # of its own that the peer acknowledges on its own.
                for frame in interest_frames(join, leave):
                    await ws.send(frame)
                sent |= join
                sent -= leave
            await changed.wait()

    async def _inject(self, frame: str | bytes) -> None:
        try:
            read = read_frame(frame)
        except (ValueError, KeyError, TypeError) as exc:
            self.status.dropped_total += 1
            metrics.DROPPED.labels("relay_malformed").inc()
            logger.warning("relay link to %s sent a malformed message: %s", self.peer, exc)
            return
        if isinstance(read, ForwardingAck):
            await self._confirmed(read.forwarding, read.dropped)
            return
        await self._inject_entry(read.group, read.text, read.message_id)

    async def _inject_entry(self, group: str, text: str, message_id: str | None) -> None:
        """Send one of the peer's messages to the group here, marked relayed."""
        message = {"type": "internal.message", "text": text, "group": group, "relayed": True}
        if message_id is not None:
            message["id"] = message_id  # the origin's history id, kept for resuming clients here
        try:
            await self.relay.layer.group_send(group, message)
        except (LayerUnavailable, OSError) as exc:
            metrics.layer_error("relay_inject")
            if self.relay.layer.keeps_history:
                # The local layer is down (a Sentinel failover, a Redis restart): the link starts
                # again once it is back and catches up from here (relay_catchup.py), rather than
                # drop what the peer sends meanwhile while the link looks healthy.
                self.status.down_since = self.status.down_since or time.time()
                raise ConnectionError(
                    f"could not inject into the local {self.relay.layer.service}: {exc}"
                ) from exc
            self.status.dropped_total += 1
            metrics.DROPPED.labels("relay_inject_failed").inc()
            if self.status.dropped_total == 1 or self.status.dropped_total % 1000 == 0:
                logger.error(
                    "relay could not inject into the local %s (%d dropped): %s",
                    self.relay.layer.service,
                    self.status.dropped_total,
                    exc,
                )
            return
        self.status.received(emitted_at(message_id))

    async def _confirmed(self, forwarding: list[str], dropped: list[str]) -> None:
        """Record which groups the peer now forwards here (streams.wait_until_forwarded reads it)."""
        self._forwarded.update(forwarding)
        self._forwarded.difference_update(dropped)
        if self.relay.records is None:
            return  # no history on this layer: no resume waits for it
        try:
            await self.relay.records.record_forwarding(self.peer, forwarding, dropped)
        except LayerUnavailable as exc:
            # Resuming clients then wait for it in vain and report a reset: nothing is lost.
            logger.warning("relay could not record what %s forwards: %s", self.peer, exc)
