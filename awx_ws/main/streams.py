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
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from awx_ws.main import discovery
from awx_ws.main.audience import Viewer, allowed
from awx_ws.main.conf import ws_settings
from awx_ws.main.history import GroupPosition, Replay, parse_message_id
from awx_ws.main.peer_protocol import configured_peers, fetch_history

if TYPE_CHECKING:
    from awx_ws.main.layers import NodeRecords, ServiceLayer

# The relay rewrites its links' figures every second; older than this, it is not running.
RELAY_STALE_AFTER = 5.0
LINK_DOWN = "relay link is down"

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
        records = self.layer.records
        unforwarded = await wait_until_forwarded(records, set(recover)) if records is not None else {}
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


async def cluster_peers(records: NodeRecords | None) -> list[str]:
    """The peers a resume must hear from: the static ones and, with discovery, those the relay
    found (as it last wrote them to the records). LayerUnavailable when they cannot be read."""
    peers = configured_peers()
    if records is not None and discovery.enabled():
        peers += [peer for peer in await records.peers() if peer not in peers]
    return peers


async def wait_until_forwarded(records: NodeRecords, groups: set[str]) -> dict[str, str]:
    """In a cluster, wait (RECOVER_TIMEOUT at most) until every peer forwards groups here.

    A peer starts forwarding a group when this node's relay tells it the group is wanted; until
    then a message emitted there reaches neither the live stream nor the history read before
    it. Returns {peer: why not} for peers that do not forward: a replay cannot be complete.
    LayerUnavailable when the records cannot be read.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ws_settings.RECOVER_TIMEOUT
    waiting = {peer: "this node's relay has no link to it" for peer in await cluster_peers(records)}
    failed: dict[str, str] = {}
    while waiting:
        for peer in list(waiting):
            verdict = await _forwarding_verdict(records, peer, groups)
            if verdict is None:
                del waiting[peer]
            elif verdict == LINK_DOWN:  # down now: no point waiting for it
                failed[peer] = verdict
                del waiting[peer]
            elif verdict:
                waiting[peer] = verdict
        if not waiting or loop.time() >= deadline:
            break
        await asyncio.sleep(0.02)  # polling the peer's ack in Redis, no notification exists
    failed.update(waiting)
    return failed


async def _forwarding_verdict(records: NodeRecords, peer: str, groups: set[str]) -> str | None:
    """None when peer forwards every group here, else why not: "" while its ack is awaited."""
    status = await records.link_status(peer)
    if not status or time.time() - float(status.get("updated") or 0) > RELAY_STALE_AFTER:
        return "this node's relay is not running"
    if status.get("state") == "disconnected":
        return LINK_DOWN
    if status.get("state") == "connected" and await records.forwards(peer, groups):
        return None
    return ""


async def collect_replays(layer: ServiceLayer, recover: dict[str, GroupPosition]) -> dict[str, Replay]:
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
        take(group, *await _local_history(layer, group, position))
    peers = await cluster_peers(layer.records)
    results = await asyncio.gather(*(fetch_history(peer, recover) for peer in peers))
    for peer, result in zip(peers, results, strict=True):
        for group in recover:
            take(group, *_peer_answer(peer, group, result))
    for group, position in recover.items():
        # An origin the client saw that no node answers for: its Redis was replaced, or its node
        # left the cluster; what came after the position there cannot be known.
        missing = set(position.seen) - answered[group]
        if missing and merged[group].reset is None:
            merged[group].reset = f"history of origin {', '.join(sorted(missing))} is gone"
        merged[group].entries.sort(key=lambda entry: (parse_message_id(entry[0])[1], entry[0]))
    return merged


async def _local_history(
    layer: ServiceLayer, group: str, position: GroupPosition
) -> tuple[str | None, Replay]:
    """This node's history of group after position; a reset when it cannot be read."""
    try:
        return await layer.read_history(group, position)
    except OSError as exc:  # LayerUnavailable
        # The client learns that, not Redis's words (addresses, script hashes): those are logged.
        logger.warning("history of %s unreadable for a resume: %s", group, exc)
        return None, Replay(reset="history unavailable on this node")


def _peer_answer(peer: str, group: str, result: dict[str, Any] | str) -> tuple[str | None, Replay]:
    """One peer's part of group's replay: its answer, or a reset naming the peer."""
    if isinstance(result, str):
        # The peer as configured, not the error's text (fetch_history logged that).
        return None, Replay(reset=f"peer {peer} unreachable")
    origin, replay = result.get(group, (None, Replay(reset=f"peer {peer} did not answer")))
    return origin, replay
