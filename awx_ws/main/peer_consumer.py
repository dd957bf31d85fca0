"""BroadcastConsumer: a peer node's relay link, server side (/websocket/broadcast/).

The peer's relay (relay.py on that node) asks for the groups its clients hold; this consumer
joins them here and forwards what this node emits, and answers history requests for resumes.
The frames are peer_protocol.py's; auth.PeerAuthMiddleware admitted the peer.
"""

from __future__ import annotations

import logging
from typing import Any

from channels.generic.websocket import AsyncWebsocketConsumer

from awx_ws.main import peer_protocol, topology
from awx_ws.main.conf import ws_settings
from awx_ws.main.history import GroupPosition, Replay
from awx_ws.main.layers import service_layer
from awx_ws.main.membership import keep_joined

logger = logging.getLogger(__name__)

# Groups left per call when the link ends: what is left stays known if the leave is cut short.
LEAVE_BATCH = 1000


class BroadcastConsumer(AsyncWebsocketConsumer):
    """A peer node's relay: joins the groups it asks for here and forwards what this node emits.

    Messages that came from a peer (marked `relayed` by our relay) are never forwarded again: one
    hop, so no loops and no duplicates. auth.PeerAuthMiddleware admitted the peer.
    """

    joined: set[str]

    async def connect(self) -> None:
        """Accept the authenticated peer, unless it is a node on this node's own channel layer."""
        self.joined = set()
        reason = await self._shares_our_layer()
        if reason is not None:
            await self.accept()
            await self.send(text_data=peer_protocol.refusal_frame(reason, self.scope["peer_proof"]))
            await self.close(code=4409)
            return
        self._refresher = keep_joined(self.channel_layer, self.channel_name, lambda: self.joined)
        await self.accept()
        # First frame: proof that this node holds the secret, for this handshake (peerauth.py).
        await self.send(text_data=peer_protocol.proof_frame(self.scope["peer_proof"]))
        logger.info("peer relay %s connected from %s", self.scope.get("peer"), self.scope.get("client"))

    async def _shares_our_layer(self) -> str | None:
        """Why this peer must not relay here (it lives on our channel layer: every message would
        arrive twice, topology.py), or None."""
        layer = service_layer(self.channel_layer)
        peer = self.scope.get("peer")
        if layer is None or peer is None:
            return None
        try:
            if peer not in await topology.other_nodes_on(layer):
                return None
        except OSError as exc:  # LayerUnavailable: the link's own group joins will say so too
            logger.info("peer relay %s: could not check for a shared layer: %s", peer, exc)
            return None
        reason = topology.shared_layer_message("the relay", layer, {ws_settings.NODE_NAME})
        logger.warning("peer relay %s refused: it shares this node's channel layer", peer)
        return reason

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Run the consumer; however it ends (a crash when Redis restarts too), leave its groups."""
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._leave_all()

    async def disconnect(self, code: int) -> None:
        """Leave every group joined for the peer."""
        await self._leave_all()
        logger.info("peer relay %s disconnected (%s)", self.scope.get("peer"), code)

    async def _leave_all(self) -> None:
        refresher = getattr(self, "_refresher", None)
        if refresher is not None:
            refresher.cancel()  # a dead channel must not be re-added every refresh
        held: set[str] = getattr(self, "joined", set())
        try:
            # In batches, each forgotten once discarded: a cancel half-way leaves the rest for the
            # next try (disconnect, then the end of __call__).
            pending = sorted(held)
            for start in range(0, len(pending), LEAVE_BATCH):
                batch = pending[start : start + LEAVE_BATCH]
                await self.channel_layer.group_discard_many(batch, self.channel_name)
                held.difference_update(batch)
        except OSError as exc:  # LayerUnavailable
            # Redis lost them already (a restart), or drops them at group_expiry.
            logger.info("peer relay %s: could not leave its groups: %s", self.scope.get("peer"), exc)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        """Apply an interest update, or answer a history request (peer_protocol.py)."""
        try:
            request = peer_protocol.read_request(text_data)
        except (ValueError, AttributeError, TypeError, KeyError) as exc:
            logger.warning("peer relay %s sent a bad update: %s", self.scope.get("peer"), exc)
            return
        if isinstance(request, peer_protocol.HistoryRequest):
            await self._answer_history(request.positions)
            return
        join, leave = request.join, request.leave
        # In bulk (ServiceLayer.group_add_many): a new link's interest may be 100,000 groups.
        leaving = sorted(set(leave) & self.joined)
        await self.channel_layer.group_discard_many(leaving, self.channel_name)
        self.joined.difference_update(leaving)
        joining = sorted(set(join) - self.joined)
        self.joined.update(joining)  # first: if the write fails half-way, the leave covers it
        await self.channel_layer.group_add_many(joining, self.channel_name)
        # The peer's resuming clients wait for this: from here on, these groups are forwarded.
        for frame in peer_protocol.forwarding_frames(join, leave):
            await self.send(text_data=frame)
        logger.debug("peer relay %s now holds %d groups", self.scope.get("peer"), len(self.joined))

    async def _answer_history(self, positions: dict[str, GroupPosition]) -> None:
        """This node's part of a peer's recovery: its own history after each position."""
        margin = int(ws_settings.HISTORY_CLOCK_SKEW * 1000)
        answers: dict[str, tuple[str | None, Replay]] = {}
        for group, position in positions.items():
            if not self.channel_layer.keeps_history:
                answers[group] = (
                    None,
                    Replay(reset=f"{ws_settings.NODE_NAME}'s channel layer keeps no history"),
                )
                continue
            try:
                answers[group] = await self.channel_layer.read_history(group, position, margin)
            except OSError as exc:  # LayerUnavailable
                logger.warning("history of %s unreadable for peer %s: %s", group, self.scope.get("peer"), exc)
                answers[group] = (None, Replay(reset="history unavailable on a peer node"))
        await self.send(text_data=peer_protocol.history_frame(answers))

    async def internal_message(self, event: dict[str, Any]) -> None:
        """Forward a message emitted on this node to the peer; drop ones that came from a peer."""
        if event.get("relayed") or "group" not in event:
            return
        await self.send(text_data=peer_protocol.message_frame(event))
