"""AWX's websocket subscribe protocol as pure functions: a client frame in, a plan or an error out.

Nothing here does I/O, so every rule can be tested (and fuzzed) without a server. The consumer
runs the access checks the plan asks for and applies the result.
"""

from __future__ import annotations

import hmac
import json
import re
from dataclasses import dataclass, field
from typing import Any

from awx_ws.main.exceptions import InvalidGroupName
from awx_ws.main.history import GroupPosition, PositionError
from awx_ws.main.numbers import MAX_ID, parse_id

# Channels accepts group names of these characters, shorter than 100 (channels.layers.BaseChannelLayer).
# Matched with fullmatch: `$` would also match before a final "\n" (see validate_group_name).
GROUP_NAME_RE = re.compile(r"[a-zA-Z0-9_.-]{1,99}")

# Kinds any authenticated user may join, with any item: jobs-status_changed, schedules-changed, ...
OPEN_KINDS = frozenset({"jobs", "schedules", "inventories"})

# Kinds whose items are job ids: joining needs read access to that job (AWX checked only the
# first three; we check all six). Values are awx_ws.main.models.Job.Kind values.
EVENT_KINDS: dict[str, str] = {
    "job_events": "job",
    "workflow_events": "workflow_job",
    "ad_hoc_command_events": "ad_hoc_command",
    "project_update_events": "project_update",
    "inventory_update_events": "inventory_update",
    "system_job_events": "system_job",
}

CONTROL_KIND = "control"

# Internal groups clients may never join (the peer relay's group, and anything we add later).
RESERVED_KINDS = frozenset({"broadcast", "awx_ws"})

# Largest id a job can have (a signed 64-bit primary key).
MAX_OBJECT_ID = MAX_ID

ACCESS_DENIED = "access denied to channel"


class ProtocolError(Exception):
    """A client frame we refuse as a whole; str(error) is the text of the error reply."""

    def reply(self) -> dict[str, str]:
        """The frame sent back to the client."""
        return {"error": str(self)}


@dataclass(frozen=True)
class SubscribeRequest:
    """What a valid `groups` request asks for, before the per-object access checks."""

    # Groups the user may join without a database check.
    groups: frozenset[str]
    # Event kind -> job ids that need a read check; group name is f"{kind}-{id}".
    objects: dict[str, frozenset[int]] = field(default_factory=dict)
    # Per-item refusals decided without the database (another user's control group).
    errors: tuple[str, ...] = ()
    # The client wants each message with its group and history id (`{"ids": true}`).
    ids: bool = False
    # Group -> the client's last position there: replay what it missed (implies ids).
    recover: dict[str, GroupPosition] = field(default_factory=dict)

    def requested_count(self) -> int:
        """How many distinct groups the request names."""
        return len(self.groups) + sum(len(ids) for ids in self.objects.values()) + len(self.errors)


# Group names of awx_ws's own traffic on the channel layer.
RESERVED_PREFIX = "awx_ws."


def validate_group_name(name: Any) -> str:
    """Return name if it is a group name Channels accepts and no client-reserved one; else raise."""
    if not isinstance(name, str) or not GROUP_NAME_RE.fullmatch(name):
        raise InvalidGroupName(
            f"invalid group name {name!r}: use 1-99 characters of a-z, A-Z, 0-9, '_', '.', '-'"
        )
    if name.startswith(RESERVED_PREFIX):
        # The fan-outs and the relay talk on these (interest.py): no emit may pose as them.
        raise InvalidGroupName(
            f"invalid group name {name!r}: names starting {RESERVED_PREFIX!r} are reserved"
        )
    return name


def denied_object_error(kind: str, object_id: int) -> str:
    """AWX's error text for one refused id."""
    return f"{ACCESS_DENIED} {kind} for resource id {object_id}"


def decode_frame(text: str | None, data: bytes | None, max_bytes: int) -> dict[str, Any]:
    """Decode one client frame into a JSON object, or raise ProtocolError."""
    if text is None:
        raise ProtocolError("binary frames are not supported: send JSON text")
    # len(text) <= bytes <= 4 * len(text): skip the encode for the common small frame.
    if len(text) > max_bytes or (4 * len(text) > max_bytes and len(text.encode()) > max_bytes):
        raise ProtocolError(f"frame too large: at most {max_bytes} bytes")
    try:
        message = json.loads(text)
    except RecursionError as exc:
        raise ProtocolError("invalid JSON: nested too deeply") from exc
    except ValueError as exc:
        raise ProtocolError(f"invalid JSON: {exc}") from exc
    if not isinstance(message, dict):
        raise ProtocolError("expected a JSON object")
    return message


def xrftoken_matches(message: dict[str, Any], csrf_cookie: str | None) -> bool:
    """True when the frame carries an xrftoken equal to the csrftoken cookie (constant time)."""
    token = message.get("xrftoken")
    if not csrf_cookie or not isinstance(token, str):
        return False
    return hmac.compare_digest(token.encode(), csrf_cookie.encode())


def _object_id(kind: str, item: object) -> int:
    # Accept AWX UI's numbers and their decimal strings; bool is an int subclass, refuse it.
    number = parse_id(item)
    if number is None:
        raise ProtocolError(f"invalid id {item!r} in groups.{kind}: expected a positive integer")
    return number


def _named_group(kind: str, item: Any) -> str:
    if not isinstance(item, str):
        raise ProtocolError(f"invalid item {item!r} in groups.{kind}: expected a string")
    name = f"{kind}-{item}"
    try:
        return validate_group_name(name)
    except InvalidGroupName as exc:
        raise ProtocolError(str(exc)) from exc


def _recover_positions(recover: Any) -> dict[str, GroupPosition]:
    if not isinstance(recover, dict):
        raise ProtocolError('recover must be an object of group: "<position>"')
    positions = {}
    for group, position in recover.items():
        try:
            positions[validate_group_name(group)] = GroupPosition.parse(position)
        except (InvalidGroupName, PositionError) as exc:
            raise ProtocolError(f"invalid recover entry for {group!r}: {exc}") from exc
    return positions


def _check_kind(kind: str, items: Any) -> None:
    """ProtocolError unless kind is a group kind a client may ask for, with a list of items."""
    if kind in RESERVED_KINDS:
        raise ProtocolError(f"group kind {kind!r} is reserved")
    if kind not in OPEN_KINDS and kind not in EVENT_KINDS and kind != CONTROL_KIND:
        raise ProtocolError(f"unknown group kind {kind!r}")
    if not isinstance(items, list):
        raise ProtocolError(f"groups.{kind} must be a list")


def parse_subscribe(message: dict[str, Any], user_id: int, max_groups: int) -> SubscribeRequest:
    """Turn a `{"groups": {...}}` frame into a SubscribeRequest, or raise ProtocolError."""
    if "groups" not in message:
        raise ProtocolError('unknown message: expected {"groups": {...}}')
    requested = message["groups"]
    if not isinstance(requested, dict):
        raise ProtocolError("groups must be an object of kind: [items]")
    groups: set[str] = set()
    objects: dict[str, set[int]] = {}
    errors: list[str] = []
    for kind, items in requested.items():
        _check_kind(kind, items)
        for item in items:
            if kind in EVENT_KINDS:
                objects.setdefault(kind, set()).add(_object_id(kind, item))
                continue
            name = _named_group(kind, item)
            if kind == CONTROL_KIND and item != f"limit_reached_{user_id}":
                errors.append(f"{ACCESS_DENIED} {name}")
                continue
            groups.add(name)
    recover = _recover_positions(message.get("recover", {}))
    want_ids = message.get("ids", False)
    if not isinstance(want_ids, bool):
        raise ProtocolError("ids must be true or false")
    plan = SubscribeRequest(
        groups=frozenset(groups),
        objects={kind: frozenset(ids) for kind, ids in objects.items()},
        errors=tuple(dict.fromkeys(errors)),
        ids=want_ids or bool(recover),
        recover=recover,
    )
    if plan.requested_count() > max_groups:
        raise ProtocolError(
            f"too many groups: {plan.requested_count()} requested, at most {max_groups} per connection"
        )
    return plan


class RateLimit:
    """At most `limit` events per `window` seconds, refilled continuously (a token bucket)."""

    def __init__(self, limit: int, window: float, now: float) -> None:
        self.limit = limit
        self.window = window
        self.tokens = float(limit)
        self.stamp = now

    def allow(self, now: float) -> bool:
        """Take one token if there is one."""
        self.tokens = min(self.limit, self.tokens + (now - self.stamp) * self.limit / self.window)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    def error(self) -> str:
        """The reply to a refused frame."""
        return f"too many requests: at most {self.limit} messages per {self.window:g} s, try again later"


def groups_reply(current: set[str], left: set[str], joined: set[str]) -> dict[str, list[str]]:
    """AWX's acknowledgement of a subscribe request (sorted, so replies are stable)."""
    return {
        "groups_current": sorted(current),
        "groups_left": sorted(left),
        "groups_joined": sorted(joined),
    }
