"""What a peer emitted while its relay link was down: fetched from its history once the link is
back, injected before anything live, and never delivered twice.

Without it a link that drops (a network cut, the peer's daphne or this node's relay restarting)
loses, silently, every message the peer emitted meanwhile for the clients connected here: they
stay connected and never resume, so history never reached them (the soak found it: status changes
lost across a 6 s cut; Centrifugo documents the same silent loss, centrifugal/centrifugo#1189).

How:
- the link notes when it went down (`down_since`); a relay that starts reads when its previous
  process last saw the link connected (the link status it wrote every second); for the groups the
  peer was forwarding, the window starts earlier when the newest message the link had delivered
  was emitted before that: a loaded peer forwards seconds late, and what it emitted after that
  message was still on its way when the link dropped (the soak found it: a status change emitted
  4 s before node C's Redis failed over never reached A or B);
- on reconnect, once the peer has confirmed it forwards the node's groups (live frames meanwhile
  are buffered), the link reads the peer's history of those groups from `down_since` minus
  AWX_WS_HISTORY_CLOCK_SKEW, as a resuming client would, and injects it in order; then the
  buffered frames, then live;
- the window overlaps what was delivered before the loss on purpose: each fan-out drops a relayed
  message it has already delivered (`history.RelayedSeen`: the ids each group and origin
  delivered lately), so a message comes once whichever way it arrived;
- a peer whose history no longer reaches back (trimmed, its Redis replaced) is logged and
  counted (`awx_ws_relay_catchup_total{outcome}`): clients there are not told, as AWX's are not.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from awx_ws.main import metrics
from awx_ws.main.conf import ws_settings
from awx_ws.main.exceptions import LayerUnavailable
from awx_ws.main.history import GroupPosition
from awx_ws.main.peer_protocol import ForwardingAck, fetch_history, read_frame

if TYPE_CHECKING:
    from awx_ws.main.layers.base import NodeRecords

logger = logging.getLogger(__name__)


async def previous_down_since(records: NodeRecords, peer: str) -> float:
    """Since when the previous relay process of this node had not received peer's messages (0:
    no previous process, or one of an older release): its last write while connected, or when
    the link went down, or, never up in that process, when it began dialling."""
    try:
        previous = await records.link_status(peer)
    except LayerUnavailable as exc:
        logger.warning("relay link to %s: the previous relay's link status is unreadable: %s", peer, exc)
        return 0.0
    try:
        if previous.get("state") == "connected":
            return float(previous["updated"])
        if previous:
            return float(previous.get("down_since") or 0) or float(previous["since"])
    except (KeyError, ValueError):
        pass
    return 0.0


Confirmed = Callable[[list[str], list[str]], Awaitable[None]]


def catchup_floors(
    groups: set[str], down_since: float, forwarded: set[str], newest_emitted: float
) -> dict[str, float]:
    """From when each group's messages may be missing here: since the link went down; for a group
    the peer was forwarding, since the newest message the link delivered if that is earlier."""
    early = min(down_since, newest_emitted) if newest_emitted else down_since
    return {group: early if group in forwarded else down_since for group in groups}


async def catch_up(
    peer: str,
    floors: dict[str, float],
    receive: Callable[[], Awaitable[str | bytes]],
    confirmed: Confirmed,
    inject_entry: Callable[[str, str, str], Awaitable[None]],
) -> list[str | bytes]:
    """Inject what peer emitted to each group since its floor (catchup_floors); the live frames
    that came meanwhile (to be injected next, in order)."""
    groups = set(floors)
    buffered = await _until_forwarded(peer, groups, receive, confirmed)
    skew = ws_settings.HISTORY_CLOCK_SKEW
    positions = {group: GroupPosition(int((floor - skew) * 1000)) for group, floor in floors.items()}
    started = time.monotonic()
    answer = await fetch_history(peer, positions) if groups else {}
    if isinstance(answer, str):
        metrics.RELAY_CATCHUP.labels("unavailable").inc()
        logger.warning(
            "relay link to %s: its history is unavailable (%s): what it emitted meanwhile is lost here",
            peer,
            answer,
        )
        return buffered
    injected = gone = 0
    for group, (_origin, replay) in sorted(answer.items()):
        if replay.reset is not None:
            gone += 1
        for message_id, text in replay.entries:
            await inject_entry(group, text, message_id)
            injected += 1
    metrics.RELAY_CATCHUP.labels("reset" if gone else "complete").inc()
    log = logger.warning if gone else logger.info
    log(
        "relay link to %s caught up: %d messages of %d groups in %.2fs%s",
        peer,
        injected,
        len(groups),
        time.monotonic() - started,
        f"; {gone} groups no longer reach back that far in its history" if gone else "",
    )
    return buffered


async def _until_forwarded(
    peer: str, groups: set[str], receive: Callable[[], Awaitable[str | bytes]], confirmed: Confirmed
) -> list[str | bytes]:
    """Read frames until the peer has confirmed it forwards groups (AWX_WS_RECOVER_TIMEOUT at
    most: its history is read anyway then); the live frames read meanwhile."""
    buffered: list[str | bytes] = []
    waiting = set(groups)
    try:
        async with asyncio.timeout(ws_settings.RECOVER_TIMEOUT):
            while waiting:
                frame = await receive()
                read = _ack(frame)
                if read is None:
                    buffered.append(frame)
                    continue
                await confirmed(read.forwarding, read.dropped)
                waiting -= {*read.forwarding, *read.dropped}
    except TimeoutError:
        logger.warning(
            "relay link to %s: %d groups not confirmed in %gs (AWX_WS_RECOVER_TIMEOUT); catching up anyway",
            peer,
            len(waiting),
            ws_settings.RECOVER_TIMEOUT,
        )
    return buffered


def _ack(frame: str | bytes) -> ForwardingAck | None:
    try:
        read: Any = read_frame(frame)
    except (ValueError, KeyError, TypeError):
        return None  # injected (and reported) in order with the rest
    return read if isinstance(read, ForwardingAck) else None
