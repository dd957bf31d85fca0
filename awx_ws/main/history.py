"""Per-group message history: what each group kind keeps, and the ids and positions that resume
a stream (pure rules; the Redis layer stores it, layers/redis_history.py).

Design (docs/channels.md, "Resumable streams"):

- Each node's Redis has an *origin* tag: a random name created the first time the node emits
  (`<prefix>:history-origin`). A flushed or replaced Redis gets a new tag, so ids of the old one
  can never be mistaken for ids of the new one.
- Emitting to a group whose kind keeps history appends the payload to the stream
  `<prefix>:history:<group>` in the *emitting* node's Redis (XADD, trimmed by length and age) in
  the same Lua script that queues it for delivery, so stream order is delivery order. The
  message id is `<origin>:<stream id>`, for example `1f0c9a7e:1732406400123-0`.
- A relayed message keeps its origin's id and is not stored again: a group's history lives on
  the node that emitted it, and a node resuming a client asks its peers for their part.
- A client's position in one group is a *floor* (when it subscribed, in ms) plus the last id
  seen from each origin: `1732406400000,1f0c9a7e:1732406400123-0`. Resuming replays, from every
  origin, what comes after its component (or after the floor, when nothing of that origin was
  seen). Positions of several groups (an SSE stream) join as `group@position;group@position`.
- The node's total (HISTORY_TOTAL_BYTES) is shared out by *share*: each stream counts against the
  share of its last writer, an organization (`org-3`, given by the emitter) or else its group's
  kind. Past the total, the share holding the most bytes gives first, so a flood of one
  organization or kind empties its own streams before anybody else's (layers/redis_history.py).
- Only groups someone could resume keep history: those with a member now, or whose last member
  left within the history age (resumable_for). An emit to a group nobody watched in that time
  costs what an emit without history costs.
"""

from __future__ import annotations

import math
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from django.core.signals import setting_changed

from awx_ws.main.conf import ws_settings
from awx_ws.main.exceptions import InvalidHistoryShare
from awx_ws.main.numbers import parse_bounded, parse_digits

# Largest sequence number of a Redis stream id: "<ms>-<this>" sorts after every id of that ms.
MAX_SEQ = 2**64 - 1
# A Redis stream origin (redis_history.py): ASCII letters and digits, never "é" or "١".
_ORIGIN_RE = re.compile(r"[A-Za-z0-9]{1,16}")


# The message key an emitter names a history share in (emit.py); the layer takes it off the message.
SHARE_KEY = "history_share"
_SHARE_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class PositionError(ValueError):
    """A stream position or message id a client sent that we cannot read."""


@dataclass(frozen=True)
class HistoryPolicy:
    """How much of one group kind's history Redis keeps."""

    length: int
    age: float
    # Bytes of payload text kept per group at most (HISTORY_MAX_BYTES); the newest entry always.
    max_bytes: int = 0
    # Bytes kept by all groups of the node together (HISTORY_TOTAL_BYTES); 0: no bound.
    total_bytes: int = 0


def history_policy(group: str) -> HistoryPolicy | None:
    """The history kept for group's kind (HISTORY_LENGTH/AGE, HISTORY_KINDS), None if none.

    Asked on every emit, so each kind's answer is kept until AWX_WS changes. The values were
    validated at start (conf.validate): nothing here can fail on a bad setting.
    """
    kind = group.split("-", 1)[0]
    try:
        return _policies[kind]
    except KeyError:
        policy = _policies[kind] = _policy_of(kind)
        return policy


_policies: dict[str, HistoryPolicy | None] = {}


def _policy_of(kind: str) -> HistoryPolicy | None:
    chosen = ws_settings.HISTORY_KINDS.get(kind, {})
    if chosen is None:
        return None
    length = chosen.get("length", ws_settings.HISTORY_LENGTH)
    age = chosen.get("age", ws_settings.HISTORY_AGE)
    return HistoryPolicy(
        int(length), float(age), int(ws_settings.HISTORY_MAX_BYTES), int(ws_settings.HISTORY_TOTAL_BYTES)
    )


def _forget_policies(*, setting: str, **kwargs: Any) -> None:
    if setting == "AWX_WS":
        _policies.clear()


setting_changed.connect(_forget_policies)


def validate_share(share: Any) -> str:
    """share, if it is a history share's name; InvalidHistoryShare if not."""
    if not isinstance(share, str) or not _SHARE_RE.fullmatch(share):
        raise InvalidHistoryShare(
            f"invalid history share {share!r}: 1 to 64 ASCII letters, digits, '_', '.' or '-'"
        )
    return share


def history_share(group: str, share: Any = None) -> str:
    """The share group's history counts against: share when given (checked), else the group's kind."""
    return group.split("-", 1)[0] if share is None else validate_share(share)


def organization_share(organization_id: int | None) -> str | None:
    """The history share of an organization's messages (None: no organization, the kind's)."""
    return None if organization_id is None else f"org-{organization_id}"


def resumable_for(policy: HistoryPolicy) -> int:
    """Seconds a group's history is still kept after its last subscriber left: a client holding
    a position may resume within the history age, and a peer's read reaches HISTORY_CLOCK_SKEW
    further back. A group nobody watched for that long keeps none (nobody could resume it)."""
    return math.ceil(policy.age + float(ws_settings.HISTORY_CLOCK_SKEW)) + 1


def parse_stream_id(text: str) -> tuple[int, int]:
    """(ms, seq) of a Redis stream id `<ms>-<seq>`; PositionError if it is not one."""
    ms_text, sep, seq_text = text.partition("-")
    ms, seq = parse_digits(ms_text, 15), parse_bounded(seq_text, MAX_SEQ)
    if not sep or ms is None or seq is None:
        raise PositionError(f"invalid stream id {text!r}: expected <ms>-<seq>")
    return ms, seq


def parse_message_id(text: str) -> tuple[str, tuple[int, int]]:
    """(origin, (ms, seq)) of a message id `<origin>:<ms>-<seq>`."""
    origin, sep, stream_id = text.partition(":")
    if not sep or not _ORIGIN_RE.fullmatch(origin):
        raise PositionError(f"invalid message id {text!r}: expected <origin>:<ms>-<seq>")
    return origin, parse_stream_id(stream_id)


def emitted_at(message_id: str | None) -> float | None:
    """When a message was emitted (epoch seconds, its origin's clock) by its id; None without a
    valid one."""
    if message_id is None:
        return None
    try:
        return parse_message_id(message_id)[1][0] / 1000
    except PositionError:
        return None


@dataclass(frozen=True)
class GroupPosition:
    """How far a client got in one group: a floor in ms, and the last id seen per origin."""

    floor: int
    seen: dict[str, tuple[int, int]] = field(default_factory=dict)

    def after(self, origin: str) -> tuple[int, int]:
        """The stream id after which origin's entries are new to the client."""
        if origin in self.seen:
            return self.seen[origin]
        # Nothing of this origin seen yet: everything from the floor's millisecond on is new.
        return (self.floor - 1, MAX_SEQ)

    def is_new(self, message_id: str) -> bool:
        """True if the message with this id comes after the position."""
        origin, stream_id = parse_message_id(message_id)
        return stream_id > self.after(origin)

    def advanced(self, message_id: str) -> GroupPosition:
        """The position after the message with this id."""
        origin, stream_id = parse_message_id(message_id)
        if stream_id <= self.seen.get(origin, (0, 0)):
            return self
        return GroupPosition(self.floor, {**self.seen, origin: stream_id})

    def __str__(self) -> str:
        parts = [str(self.floor)] + [f"{o}:{ms}-{seq}" for o, (ms, seq) in sorted(self.seen.items())]
        return ",".join(parts)

    @classmethod
    def parse(cls, text: Any) -> GroupPosition:
        """Read `<floor>[,<origin>:<ms>-<seq>]...`; PositionError if it is not one."""
        if not isinstance(text, str) or not text or len(text) > 1024:
            raise PositionError(f"invalid position {text!r}: expected <floor ms>[,<origin>:<ms>-<seq>]...")
        floor, *components = text.split(",")
        floor_ms = parse_digits(floor, 15)
        if floor_ms is None:
            raise PositionError(f"invalid position {text!r}: it must start with a time in ms")
        seen = {}
        for component in components:
            origin, stream_id = parse_message_id(component)
            seen[origin] = stream_id
        return cls(floor_ms, seen)


def format_stream_position(positions: dict[str, GroupPosition]) -> str:
    """One id covering several groups (an SSE stream's `id:`): `group@position;...`."""
    return ";".join(f"{group}@{position}" for group, position in sorted(positions.items()))


def parse_stream_position(text: str) -> dict[str, GroupPosition]:
    """The per-group positions of an SSE `Last-Event-ID`; PositionError if it is not one."""
    if len(text) > 64 * 1024:
        raise PositionError("position too long")
    positions = {}
    for part in filter(None, text.split(";")):
        group, sep, position = part.partition("@")
        if not sep:
            raise PositionError(f"invalid stream position part {part!r}: expected <group>@<position>")
        positions[group] = GroupPosition.parse(position)
    return positions


@dataclass
class Replay:
    """What one origin (or all of them, merged) holds after a position."""

    # (message id, payload JSON text), in stream order
    entries: list[tuple[str, str]] = field(default_factory=list)
    # Why the history cannot reach back to the position (None when it can).
    reset: str | None = None


class RelayedSeen:
    """Per group and origin, the relayed message ids a fan-out delivered lately: a relayed message
    among them, or older than every one of them, was delivered already (a relay's catch-up
    overlaps what came live); a new one is delivered even when it comes behind a newer one.

    An origin's messages can reach a peer a few out of id order: channels_redis scores a
    process's inbox by the sender's clock, and two API workers emitting to one group at the same
    moment may take their stream ids in the other order. Dropping everything at or before the
    newest id lost such a message on every peer (the soak: 1 status change in 400).
    """

    # Ids kept per group and origin: far more than a reordering spans; older ones are summed up
    # by the newest id that left the window.
    RECENT = 256

    def __init__(self) -> None:
        self._seen: dict[str, dict[str, _Recent]] = {}

    def first_time(self, group: str, message_id: str) -> bool:
        """True (and remembered) if this relayed message is new to the group here."""
        try:
            origin, stream_id = parse_message_id(message_id)
        except PositionError:
            return True  # not an id we can order: deliver, as before
        origins = self._seen.setdefault(group, {})
        recent = origins.get(origin)
        if recent is None:
            recent = origins[origin] = _Recent()
        return recent.add(stream_id, self.RECENT)

    def forget(self, group: str) -> None:
        """The group has no member here any more."""
        self._seen.pop(group, None)


class _Recent:
    """The ids lately delivered from one origin to one group, and the newest one forgotten."""

    __slots__ = ("floor", "ids", "order")

    def __init__(self) -> None:
        self.ids: set[tuple[int, int]] = set()
        self.order: deque[tuple[int, int]] = deque()
        self.floor = (-1, -1)

    def add(self, stream_id: tuple[int, int], keep: int) -> bool:
        """True if stream_id is new (and now remembered)."""
        if stream_id <= self.floor or stream_id in self.ids:
            return False
        self.ids.add(stream_id)
        self.order.append(stream_id)
        if len(self.order) > keep:
            oldest = self.order.popleft()
            self.ids.discard(oldest)
            self.floor = max(self.floor, oldest)
        return True
