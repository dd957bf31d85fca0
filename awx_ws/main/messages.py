"""What travels on the channel layer for clients: AWX's `internal.message`, and the group it names.

AWX's producers send `{"type": "internal.message", "text": "<payload JSON>"}` to a group, through
emit_channel_notification or Channels' own `channel_layer.group_send`. Both of our layers add the
group they send to (`with_group`), so every member (a process's fan-out, a peer's relay link)
knows which group a message is for, whoever sent it.
"""

from __future__ import annotations

from typing import Any

from awx_ws.main.history import SHARE_KEY
from awx_ws.main.protocol import RESERVED_PREFIX

# The message type AWX's consumers handle, and the only one delivered to clients.
CLIENT_MESSAGE_TYPE = "internal.message"


def with_group(group: str, message: dict[str, Any]) -> dict[str, Any]:
    """message as its group's members receive it: with `group` set to the group it is sent to,
    and without the emitter's history share (history.SHARE_KEY), which only the sender reads."""
    return {**without_share(message), "group": group}


def without_share(message: dict[str, Any]) -> dict[str, Any]:
    """message without the emitter's history share (the message itself when it has none)."""
    if SHARE_KEY not in message:
        return message
    return {key: value for key, value in message.items() if key != SHARE_KEY}


def is_client_message(group: str, message: dict[str, Any]) -> bool:
    """True for a message emitted on this node for clients (counted, kept in history)."""
    return (
        message.get("type") == CLIENT_MESSAGE_TYPE
        and isinstance(message.get("text"), str)
        and not message.get("relayed")
        and not group.startswith(RESERVED_PREFIX)
    )


# Integers Lua (5.1, doubles) holds exactly.
_LUA_EXACT = 2**53


def survives_lua(message: dict[str, Any]) -> bool:
    """True if Redis's Lua (cmsgpack) gives message back unchanged after unpacking it: string
    keys; text, booleans and integers it holds exactly. Not None (a Lua table drops the key), not
    floats (1.0 would come back 1), nothing nested ({} would come back [])."""
    for key, value in message.items():
        if not isinstance(key, str):
            return False
        if isinstance(value, bool | str):
            continue
        if not isinstance(value, int) or not -_LUA_EXACT < value < _LUA_EXACT:
            return False
    return True
