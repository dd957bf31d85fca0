"""The peer protocol: what both ends of a relay link say, and how a node dials a peer.

A link is a websocket from one node's relay (relay.py) to a peer's BroadcastConsumer
(/websocket/broadcast/), authenticated both ways (peerauth.py). Frames, all JSON text:

- peer → dialer, first: `{"proof": ...}`, the peer holds the secret too;
- dialer → peer: `{"join": [groups], "leave": [groups]}`, a change of what this node's clients
  hold (a new link starts empty: its first changes join the node's whole interest);
- peer → dialer: `{"forwarding": [groups], "dropped": [groups]}`, that change is applied;
- peer → dialer: `{"group": g, "text": payload, "id": message id or absent}`, a message emitted
  on the peer;
- dialer → peer: `{"history": [{"group", "position"}]}`, a resume's request, answered by
  `{"history": [{"group", "origin", "entries": [[id, text]], "reset"}]}` on a short-lived link.

Every frame the dialer sends stays under FRAME_BUDGET, far below the 1 MiB daphne accepts: a
change of interest too large for one frame goes as several changes (`frames`), each applied and
acknowledged on its own, in order. A group counts as forwarded (streams.wait_until_forwarded)
once the acknowledgement of its own part is in, so a half-sent interest promises nothing it
has not got. The peer answers each part with an acknowledgement of that part (cut the same way)
and each history request with one reply. Parts are ordinary frames: a peer of an earlier
release applies and answers them one by one just the same, and an earlier dialer, which sent a
change whole, reached any peer only while it fitted in 1 MiB (no more nor less than before).

Both ends build and read frames only here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import ssl
from collections.abc import AsyncIterator, Iterator
from collections.abc import Set as AbstractSet
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import WebSocketException

from awx_ws.main import peerauth
from awx_ws.main.conf import SettingError, ws_settings
from awx_ws.main.history import GroupPosition, Replay, parse_message_id
from awx_ws.main.peerauth import peer_url
from awx_ws.main.protocol import validate_group_name

logger = logging.getLogger(__name__)

# A frame larger than this closes a link (a history reply may carry a whole window of a group).
LINK_MAX_SIZE = 2**24
HISTORY_MAX_SIZE = 2**26
# The most a frame to a peer may weigh. daphne 4.2.2 and later drop an incoming websocket
# message over 1 MiB (--websocket_max_message_size, its fix for a denial-of-service report):
# sent whole, a node's interest (13,000 long group names, 50,000 `job_events-<id>` groups, or
# what two users arrange on purpose) was dropped with its link at every reconnect. A quarter of
# that leaves room for a peer that lowered its limit, and keeps each part's work on the peer,
# and its acknowledgement, small (about 12,000 ordinary groups).
FRAME_BUDGET = 256 * 1024
# Strings JSON writes as they are, between quotes.
_PLAIN = re.compile(r"[A-Za-z0-9_.\-]*")


def configured_peers() -> list[str]:
    """BROADCAST_WEBSOCKET_PEERS without this node's own entry (BROADCAST_WEBSOCKET_SELF)."""
    own = ws_settings.BROADCAST_WEBSOCKET_SELF
    return [peer for peer in ws_settings.BROADCAST_WEBSOCKET_PEERS if peer != own]


# --- frames a peer (BroadcastConsumer) reads and writes ---------------------------------------


@dataclass
class InterestUpdate:
    """The dialer's groups to join and leave."""

    join: list[str]
    leave: list[str]


@dataclass
class HistoryRequest:
    """The dialer's resume: positions per group."""

    positions: dict[str, GroupPosition]


def read_request(text: str | None) -> InterestUpdate | HistoryRequest:
    """A frame from the dialer; ValueError (or KeyError, TypeError) when it is malformed."""
    frame = json.loads(text or "")
    if "history" in frame:
        items = frame["history"]
        return HistoryRequest(
            {validate_group_name(item["group"]): GroupPosition.parse(item["position"]) for item in items}
        )
    join, leave = list(frame.get("join", [])), list(frame.get("leave", []))
    for group in [*join, *leave]:
        validate_group_name(group)
    return InterestUpdate(join, leave)


def proof_frame(proof: str) -> str:
    """The peer's first frame."""
    return json.dumps({"proof": proof})


def forwarding_frames(join: list[str], leave: list[str]) -> list[str]:
    """The peer's acknowledgement of an interest update, in frames under FRAME_BUDGET."""
    return [json.dumps(part) for part in frames({"forwarding": sorted(join), "dropped": sorted(leave)})]


def message_frame(event: dict[str, Any]) -> str:
    """A group message (an `internal.message` event) forwarded to the dialer."""
    forwarded = {"group": event["group"], "text": event["text"]}
    if "id" in event:
        forwarded["id"] = event["id"]
    return json.dumps(forwarded)


def history_frame(answers: dict[str, tuple[str | None, Replay]]) -> str:
    """The peer's answer to a HistoryRequest: {group: (origin, replay)}."""
    items = [
        {"group": group, "origin": origin, "entries": replay.entries, "reset": replay.reset}
        for group, (origin, replay) in answers.items()
    ]
    return json.dumps({"history": items})


# --- frames the dialer (relay.py, streams.py) reads and writes --------------------------------


@dataclass
class ForwardingAck:
    """The peer now forwards `forwarding` here and no longer `dropped`."""

    forwarding: list[str]
    dropped: list[str]


@dataclass
class RelayedMessage:
    """A message emitted on the peer, its origin's history id kept."""

    group: str
    text: str
    message_id: str | None


def read_frame(frame: str | bytes) -> ForwardingAck | RelayedMessage:
    """A frame from the peer on a relay link; ValueError (or KeyError, TypeError) when malformed."""
    data = json.loads(frame)
    if "forwarding" in data:
        return ForwardingAck(list(data["forwarding"]), list(data.get("dropped", [])))
    group, text = validate_group_name(data["group"]), data["text"]
    if not isinstance(text, str):
        raise TypeError("text is not a string")
    message_id = data.get("id")
    if message_id is not None:
        parse_message_id(message_id)
    return RelayedMessage(group, text, message_id)


def frames(lists: dict[str, list[Any]], budget: int = FRAME_BUDGET) -> Iterator[dict[str, list[Any]]]:
    """lists cut, in order, into frames ({key: part of its list}) whose JSON stays within budget
    bytes (one item heavier than budget goes alone); one empty frame when all are empty."""
    part: dict[str, list[Any]] = {key: [] for key in lists}
    empty = size = len(json.dumps(part))
    for key, items in lists.items():
        for item in items:
            # json.dumps escapes non-ASCII (ensure_ascii): characters are bytes; ", " between items.
            # A group name (validated: ASCII letters, digits, -_.) is itself in quotes: no dumps
            # per item for the 100,000 of a large interest on the relay's event loop.
            weight = (
                len(item) + 2 if isinstance(item, str) and _PLAIN.fullmatch(item) else len(json.dumps(item))
            )
            if size + weight + (2 if part[key] else 0) > budget and size > empty:
                yield part
                part, size = {key: [] for key in lists}, empty
            size += weight + (2 if part[key] else 0)
            part[key].append(item)
    yield part


def interest_frames(join: AbstractSet[str], leave: AbstractSet[str]) -> list[str]:
    """An interest update for the peer, as changes in frames under FRAME_BUDGET (groups sorted)."""
    return [json.dumps(part) for part in frames({"join": sorted(join), "leave": sorted(leave)})]


def history_requests(positions: dict[str, GroupPosition]) -> list[str]:
    """A resume's request for the peer, in frames under FRAME_BUDGET; each is answered alone."""
    items = [{"group": g, "position": str(p)} for g, p in sorted(positions.items())]
    return [json.dumps(part) for part in frames({"history": items})]


def peer_ssl(url: str) -> ssl.SSLContext | None:
    """The TLS context for a wss:// peer: verified against BROADCAST_WEBSOCKET_CA_BUNDLE (or the
    system's CAs) unless BROADCAST_WEBSOCKET_VERIFY_CERT is off; None for ws://. SettingError
    when the bundle cannot be read."""
    if not url.startswith("wss://"):
        return None
    bundle = ws_settings.BROADCAST_WEBSOCKET_CA_BUNDLE or None
    try:
        context = ssl.create_default_context(cafile=bundle)
    except (OSError, ssl.SSLError) as exc:
        raise SettingError(f"BROADCAST_WEBSOCKET_CA_BUNDLE={bundle!r} cannot be read: {exc}") from exc
    if not ws_settings.BROADCAST_WEBSOCKET_VERIFY_CERT:
        # AWX's default; ours is to verify. Only for peers reached over a network one trusts.
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class PeerRefused(Exception):
    """The peer admitted the relay and then refused to serve it, saying why (refusal_frame)."""


def refusal_frame(reason: str, proof: str) -> str:
    """The peer's first frame when it will not serve this relay: its proof, and why (a refusal
    counts only from a peer that proved it holds the secret)."""
    return json.dumps({"proof": proof, "refused": reason})


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
                first = json.loads(await ws.recv())
            offered = first.get("proof")
        except (ValueError, AttributeError, TimeoutError, TypeError) as exc:
            raise peerauth.PeerAuthError(f"{peer} sent no proof first ({type(exc).__name__})") from exc
        peerauth.check_proof(secret, credentials, offered)
        if "refused" in first:
            raise PeerRefused(f"{peer} refused this relay: {first['refused']}")
        yield ws


async def fetch_history(peer: str, positions: dict[str, GroupPosition]) -> dict[str, Any] | str:
    """{group: (origin, Replay)} from one peer, or why it failed (logged at INFO)."""
    secret, node = ws_settings.BROADCAST_WEBSOCKET_SECRET, ws_settings.NODE_NAME
    try:
        async with asyncio.timeout(ws_settings.RECOVER_TIMEOUT):
            async with open_peer(peer, secret, node, max_size=HISTORY_MAX_SIZE) as ws:
                requests = history_requests(positions)
                for request in requests:  # the peer answers them in order, one reply each
                    await ws.send(request)
                replies = [json.loads(await ws.recv()) for _ in requests]
    except (
        OSError,
        TimeoutError,
        WebSocketException,
        peerauth.PeerAuthError,
        PeerRefused,
        ValueError,
        SettingError,
    ) as exc:
        logger.info("history of peer %s unavailable: %s", peer, exc)
        return str(exc) or type(exc).__name__
    results: dict[str, Any] = {}
    try:
        for item in (item for reply in replies for item in reply.get("history", [])):
            entries = [(str(message_id), str(text)) for message_id, text in item.get("entries", [])]
            results[item["group"]] = (item.get("origin"), Replay(entries, item.get("reset")))
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        logger.warning("peer %s answered a history request with a malformed reply: %s", peer, exc)
        return f"malformed reply ({type(exc).__name__})"
    return results
