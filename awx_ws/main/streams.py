"""Resumable subscriptions: positions per group, replay of missed messages, then live ones.

Shared by the SSE endpoint (sse.py) and websocket clients that ask for ids or recovery
(consumers.py). A `Stream` joins groups on the process's fan-out like any connection, but it is
called for every message (`deliver`) instead of receiving the shared prepared frame, so it can
track each group's position and hold live messages back while the missed ones are replayed.

Order of a recovery, so that nothing falls between replay and live delivery:
1. hold live messages of the recovering groups in a buffer, and join the groups;
2. in a cluster, wait until every connected peer forwards the groups here (relay acks);
3. read the history after the client's position from this node and from every peer;
4. send the replay, then the buffered live messages that come after it (ids decide), then live.

`join`, `fetch`, `replay` and `release` are those steps; the caller talks to its client between
them (the SSE `stream-reset` event, the websocket's acknowledgements).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError
from websockets.exceptions import WebSocketException

from awx_ws.main import peerauth
from awx_ws.main.audience import Viewer, allowed
from awx_ws.main.conf import ws_settings
from awx_ws.main.exceptions import StartupError
from awx_ws.main.history import GroupPosition, Replay, parse_message_id
from awx_ws.main.relay import STATUS_EVERY, configured_peers, forwarding_key, open_peer, status_key

if TYPE_CHECKING:
    from awx_ws.main.layers import RedisChannelLayer

logger = logging.getLogger(__name__)

# (group, payload JSON text, message id or None, the group's position after it or None)
Sender = Callable[[str, str, str | None, GroupPosition | None], Awaitable[None]]


@dataclass(eq=False)  # identity: the fan-out keeps subscribers in sets
class Stream:
    """One client's resumable subscription: positions, the replay buffer, dedupe by id."""

    # Any of our layers; only the Redis one keeps history (`keeps_history`).
    layer: Any
    send: Sender
    # "websocket" or "sse", for the metrics.
    transport: str = "websocket"
    positions: dict[str, GroupPosition] = field(default_factory=dict)
    # Groups whose live messages are held back while their history is replayed.
    _held: dict[str, list[tuple[str, str | None]]] = field(default_factory=dict)

    # Subscriber protocol (fanout.py): every message comes through deliver().
    frame_protocol: Any = None
    # What the client's user may see of jobs (audience.py): live messages are filtered by the
    # fan-out, replayed ones here.
    viewer: Viewer | None = None

    async def deliver(self, group: str, text: str, message_id: str | None) -> None:
        """A live message from the fan-out: hold it during a replay, drop it if already sent."""
        held = self._held.get(group)
        if held is not None:
            held.append((text, message_id))
            return
        await self._send_live(group, text, message_id)

    async def _send_live(self, group: str, text: str, message_id: str | None) -> None:
        position = self.positions.get(group)
        if message_id is not None and position is not None:
            # The same message can come twice at a replay's edge (history and live): ids decide.
            if not position.is_new(message_id):
                return
            position = self.positions[group] = position.advanced(message_id)
        await self.send(group, text, message_id, position)

    async def join(self, groups: set[str], hold: frozenset[str] = frozenset()) -> None:
        """Join groups not held yet, live from now; hold back live messages of `hold` for a replay."""
        for group in hold:
            self._held.setdefault(group, [])
        fanout = self.layer.fanout
        for group in sorted(groups):
            await fanout.join(group, self)
        if not self.layer.keeps_history:
            # Nothing to resume from later but the time: every recovery will report a reset.
            now_ms = int(time.time() * 1000)
            for group in groups:
                self.positions[group] = GroupPosition(now_ms)
            return
        # One client's set-up at a time, as the joins above: 500 clients arriving together would
        # otherwise open as many pooled Redis connections as run at once, and keep them.
        async with fanout.lock:
            for group in sorted(groups):
                # Taken after joining, so nothing between the two is lost to the client.
                self.positions[group] = await self.layer.open_position(group)

    async def fetch(self, recover: dict[str, GroupPosition]) -> dict[str, Replay]:
        """What the cluster holds after each position (a Replay with `reset` where it cannot)."""
        if not self.layer.keeps_history:
            reason = f"no history is kept with the {self.layer.service} channel layer (CHANNEL_LAYER_BACKEND)"
            return {group: Replay(reset=reason) for group in recover}
        unforwarded = await wait_until_forwarded(self.layer, set(recover))
        replays = await collect_replays(self.layer, recover)
        for peer, reason in sorted(unforwarded.items()):
            for replay in replays.values():
                # Live messages from that peer would not arrive: nothing can be promised.
                replay.reset = replay.reset or f"peer {peer}: {reason}"
        return replays

    async def replay(self, recover: dict[str, GroupPosition], replays: dict[str, Replay]) -> dict[str, int]:
        """Send the missed messages of each group that can be replayed; {group: messages sent}."""
        sent: dict[str, int] = {}
        for group in sorted(recover):
            replay = replays[group]
            if replay.reset is not None:
                continue  # live from the position taken at join; the client was told to refetch
            position = self.positions[group] = recover[group]
            sent[group] = 0
            for message_id, text in replay.entries:
                if position.is_new(message_id):
                    position = self.positions[group] = position.advanced(message_id)
                    if not await self._may_see(group, text):
                        continue  # another organization's job: passed over, as live
                    await self.send(group, text, message_id, position)
                    sent[group] += 1
        return sent

    async def _may_see(self, group: str, text: str) -> bool:
        if self.viewer is None:
            return True
        filtered, organization = await allowed(group, text, self.layer.fanout.job_organizations)
        return not filtered or self.viewer.may_see(organization)

    async def release(self) -> None:
        """Send what was held back (what the replay did not already cover), then go live."""
        for group in sorted(self._held):
            held = self._held[group]
            # Messages arriving while we send are appended to this same list, then it is retired.
            index = 0
            while index < len(held):
                text, message_id = held[index]
                index += 1
                await self._send_live(group, text, message_id)
            self._held.pop(group, None)

    def leave_all(self) -> None:
        """Leave every group (whatever happened before; synchronous, so nothing cuts it short)."""
        self.positions = {}
        self._held.clear()
        self.layer.fanout.release(self)

    def leave(self, group: str) -> None:
        """Leave one group."""
        self.positions.pop(group, None)
        self._held.pop(group, None)
        self.layer.fanout.leave(group, self)


async def wait_until_forwarded(layer: RedisChannelLayer, groups: set[str]) -> dict[str, str]:
    """In a cluster, wait until every peer forwards groups here; {peer: why not} for those that
    do not (see _wait_until_forwarded); RedisUnavailable when Redis fails."""
    try:
        return await _wait_until_forwarded(layer, groups)
    except RedisError as exc:
        raise layer.unavailable(exc) from exc


async def _wait_until_forwarded(layer: RedisChannelLayer, groups: set[str]) -> dict[str, str]:
    """In a cluster, wait (RECOVER_TIMEOUT at most) until every peer forwards groups here.

    A peer starts forwarding a group when this node's relay tells it the group is wanted; until
    then a message emitted there reaches neither the live stream nor the history read before
    it. Returns {peer: why not} for peers that do not forward: a replay cannot be complete.
    """
    connection = layer.connection(0)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ws_settings.RECOVER_TIMEOUT
    waiting = {peer: "this node's relay has no link to it" for peer in configured_peers()}
    failed: dict[str, str] = {}
    while waiting:
        for peer in list(waiting):
            state, updated = await connection.hmget(status_key(layer, peer), ["state", "updated"])
            if state is None or time.time() - float(updated or 0) > 5 * STATUS_EVERY:
                waiting[peer] = "this node's relay is not running"
            elif state == b"disconnected":  # down now: no point waiting for it
                failed[peer] = "relay link is down"
                del waiting[peer]
            elif state == b"connected" and all(
                await connection.smismember(forwarding_key(layer, peer), sorted(groups))
            ):
                del waiting[peer]
        if not waiting or loop.time() >= deadline:
            break
        await asyncio.sleep(0.02)
    failed.update(waiting)
    return failed


async def collect_replays(layer: RedisChannelLayer, recover: dict[str, GroupPosition]) -> dict[str, Replay]:
    """What every node of the cluster holds after each position, merged in time order."""
    merged = {group: Replay() for group in recover}
    answered: dict[str, set[str]] = {group: set() for group in recover}

    def take(group: str, origin: str | None, replay: Replay) -> None:
        if replay.reset is not None:
            merged[group].reset = merged[group].reset or replay.reset
        merged[group].entries.extend(replay.entries)
        if origin:
            answered[group].add(origin)

    for group, position in recover.items():
        try:
            origin, replay = await layer.read_history(group, position)
        except OSError as exc:  # LayerUnavailable
            # The client learns that, not Redis's words (addresses, script hashes): those are logged.
            logger.warning("history of %s unreadable for a resume: %s", group, exc)
            origin, replay = None, Replay(reset="history unavailable on this node")
        take(group, origin, replay)
    peers = configured_peers()
    results = await asyncio.gather(*(fetch_from_peer(peer, recover) for peer in peers))
    for peer, result in zip(peers, results, strict=True):
        for group in recover:
            if isinstance(result, str):
                # The peer as configured, not the error's text (fetch_from_peer logged that).
                take(group, None, Replay(reset=f"peer {peer} unreachable"))
            else:
                origin, replay = result.get(group, (None, Replay(reset=f"peer {peer} did not answer")))
                take(group, origin, replay)
    for group, position in recover.items():
        # An origin the client saw that no node answers for: its Redis was replaced, or its node
        # left the cluster; what came after the position there cannot be known.
        missing = set(position.seen) - answered[group]
        if missing and merged[group].reset is None:
            merged[group].reset = f"history of origin {', '.join(sorted(missing))} is gone"
        merged[group].entries.sort(key=lambda entry: (parse_message_id(entry[0])[1], entry[0]))
    return merged


async def fetch_from_peer(peer: str, recover: dict[str, GroupPosition]) -> dict[str, Any] | str:
    """{group: (origin, Replay)} from one peer's BroadcastConsumer, or why it failed."""
    request = {"history": [{"group": g, "position": str(p)} for g, p in sorted(recover.items())]}
    secret, node = ws_settings.BROADCAST_WEBSOCKET_SECRET, ws_settings.NODE_NAME
    try:
        async with asyncio.timeout(ws_settings.RECOVER_TIMEOUT):
            async with open_peer(peer, secret, node, max_size=2**26) as ws:
                await ws.send(json.dumps(request))
                reply = json.loads(await ws.recv())
    except (
        OSError,
        TimeoutError,
        WebSocketException,
        peerauth.PeerAuthError,
        ValueError,
        StartupError,
    ) as exc:
        logger.info("history of peer %s unavailable: %s", peer, exc)
        return str(exc) or type(exc).__name__
    results: dict[str, Any] = {}
    for item in reply.get("history", []):
        entries = [(str(message_id), str(text)) for message_id, text in item.get("entries", [])]
        results[item["group"]] = (item.get("origin"), Replay(entries, item.get("reset")))
    return results
