"""The AWX_WS settings namespace: every default written once, read from the environment, validated.

`SETTINGS` is the one table: for each setting its environment variable, its default, how the
variable's text is read and what a valid value is. config/settings.py puts what the environment
gives into `settings.AWX_WS` (`from_environment`), and validates the whole namespace at start
(`validate`): a bad value stops the process with the variable's name and the value, before any
connection is accepted or any emit is tried. Code reads values through `ws_settings`, which falls
back to the defaults here; tests override them with `override_settings(AWX_WS={...})`, which is
validated the same way.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed

from awx_ws.main.setting_rules import (
    Check,
    boolean,
    comma_list,
    flag,
    history_kinds,
    int_at_least,
    integer,
    json_value,
    number,
    one_of,
    peers,
    rate,
    seconds,
    string,
    text,
)


class SettingError(ImproperlyConfigured):
    """One AWX_WS setting is malformed; the message names its environment variable and value."""


# --- the table -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One AWX_WS setting: where it comes from, its default, and what a valid value is."""

    env: str
    # The value when the environment does not give one (a callable gets the environment).
    default: Any
    read: Callable[[str], Any]
    check: Check
    help: str
    # The variable's former name, still read when the new one is unset (for one release).
    deprecated_env: str = ""

    def default_for(self, environ: Mapping[str, str]) -> Any:
        """The default value (computed from the environment where it depends on it)."""
        return self.default(environ) if callable(self.default) else self.default


def _own_relay_address(environ: Mapping[str, str]) -> str:
    return f"127.0.0.1:{environ.get('AWX_WS_DAPHNE_PORT') or '8051'}"


def _hostname(environ: Mapping[str, str]) -> str:
    return socket.gethostname()


def _s(
    env: str, default: Any, read: Callable[[str], Any], check: Check, help: str, deprecated_env: str = ""
) -> Setting:
    return Setting(env, default, read, check, help, deprecated_env)


SETTINGS: dict[str, Setting] = {
    "MAX_GROUPS_PER_CONNECTION": _s(
        "AWX_WS_MAX_GROUPS_PER_CONNECTION", 100, integer, int_at_least(1),
        "Groups one websocket connection may hold at once.",
    ),
    "MAX_FRAME_BYTES": _s(
        "AWX_WS_MAX_FRAME_BYTES", 64 * 1024, integer, int_at_least(64),
        "Largest inbound text frame parsed; larger frames get an error reply.",
    ),
    "EMIT_TIMEOUT": _s(
        "AWX_WS_EMIT_TIMEOUT", 5.0, number, seconds(),
        "Seconds an emit may take before EmitError (the channel layer down or unreachable).",
    ),
    "EMIT_RATE": _s(
        "AWX_WS_EMIT_RATE", "1200/min", text, rate,
        "Per-user rate of POST /api/v2/emit/ (DRF rate syntax).",
    ),
    "LOGIN_FAILURE_RATE": _s(
        "AWX_WS_LOGIN_FAILURE_RATE", "10/min", text, rate,
        "Failed password logins allowed per client address and per username (then 429).",
    ),
    "EVENT_STDOUT_MAX_BYTES_DISPLAY": _s(
        "AWX_WS_EVENT_STDOUT_MAX_BYTES_DISPLAY", 1024, integer, int_at_least(0),
        "Characters of a job event's stdout in its websocket message (AWX's setting; 0: all).",
    ),
    "MAX_REQUEST_BYTES": _s(
        "AWX_WS_MAX_REQUEST_BYTES", 4 * 1024 * 1024, integer, int_at_least(1024),
        "Largest request body the API reads (413 past it); nginx's client_max_body_size matches.",
    ),
    "MAX_CONNECTIONS_PER_USER": _s(
        "AWX_WS_MAX_CONNECTIONS_PER_USER", 100, integer, int_at_least(1),
        "Open connections (websocket and SSE together) a user may hold on a node; more are refused (403).",
    ),
    "REVOCATION_POLL": _s(
        "AWX_WS_REVOCATION_POLL", 1.0, number, seconds(),
        "Seconds between a daphne process's reads of access changes (revoked tokens, sessions, "
        "memberships); open connections learn of one within this time.",
    ),
    "REVOCATION_SWEEP": _s(
        "AWX_WS_REVOCATION_SWEEP", 30.0, number, seconds(zero=True),
        "Seconds between a daphne process's comparisons of its open connections' access with the "
        "database, for writes that record no change (a bulk UPDATE, SQL); 0 turns them off.",
    ),
    "MAX_WEBSOCKET_EVENT_RATE": _s(
        "AWX_WS_MAX_WEBSOCKET_EVENT_RATE", 30, integer, int_at_least(0),
        "Job events per second per job sent to the websocket (AWX's setting; 0: no limit); the "
        "outline events always go, the rest stay in the REST API.",
    ),
    "STARTUP_LAYER_WAIT": _s(
        "AWX_WS_STARTUP_LAYER_WAIT", 60.0, number, seconds(zero=True),
        "Seconds a starting server waits for its channel layer (Redis or RabbitMQ).",
        deprecated_env="AWX_WS_STARTUP_REDIS_WAIT",
    ),
    "LIVENESS_TTL": _s(
        "AWX_WS_LIVENESS_TTL", 30.0, number, seconds(),
        "A process's liveness record (in Redis; its connection count's heartbeat in the database "
        "on RabbitMQ) expires this many seconds after its last heartbeat.",
    ),
    "LIVENESS_INTERVAL": _s(
        "AWX_WS_LIVENESS_INTERVAL", 10.0, number, seconds(),
        "Seconds between liveness heartbeats (at most half of AWX_WS_LIVENESS_TTL).",
    ),
    "BROADCAST_WEBSOCKET_PEERS": _s(
        "BROADCAST_WEBSOCKET_PEERS", [], comma_list, peers,
        "Peer nodes the relay dials: host:port (ws://host:port/websocket/broadcast/) or full URLs.",
    ),
    "BROADCAST_WEBSOCKET_SECRET": _s(
        "BROADCAST_WEBSOCKET_SECRET", "", text, string(),
        "Shared HMAC key of the cluster; empty refuses every peer.",
    ),
    "BROADCAST_WEBSOCKET_SELF": _s(
        "BROADCAST_WEBSOCKET_SELF", _own_relay_address, text, string(),
        "This node's entry in BROADCAST_WEBSOCKET_PEERS as other nodes write it: never dialled; "
        "peers sign their relay headers for it.",
    ),
    "BROADCAST_WEBSOCKET_VERIFY_CERT": _s(
        "BROADCAST_WEBSOCKET_VERIFY_CERT", True, boolean, flag,
        "Verify peers' TLS certificates on wss:// links (AWX does not by default; we do).",
    ),
    "BROADCAST_WEBSOCKET_CA_BUNDLE": _s(
        "BROADCAST_WEBSOCKET_CA_BUNDLE", "", text, string(),
        "CA bundle (PEM) for wss:// peers; the system's CAs when empty.",
    ),
    "BROADCAST_WEBSOCKET_NONCE_WINDOW": _s(
        "BROADCAST_WEBSOCKET_NONCE_WINDOW", 300.0, number, seconds(),
        "Seconds a peer's nonce may be away from our clock.",
    ),
    "BROADCAST_WEBSOCKET_BACKOFF_MAX": _s(
        "BROADCAST_WEBSOCKET_BACKOFF_MAX", 16.0, number, seconds(),
        "Relay reconnect back-off: 1 s doubling to this many seconds, with jitter.",
    ),
    "BROADCAST_WEBSOCKET_PING_INTERVAL": _s(
        "BROADCAST_WEBSOCKET_PING_INTERVAL", 10.0, number, seconds(),
        "Seconds between pings on a relay link; a peer silent for twice this is dropped.",
    ),
    "BROADCAST_WEBSOCKET_DISCOVERY": _s(
        "BROADCAST_WEBSOCKET_DISCOVERY", "static", text, one_of("static", "postgres"),
        "How the relay finds its peers: static (BROADCAST_WEBSOCKET_PEERS only) or postgres "
        "(nodes announce themselves over the PostgreSQL database, as well as the static peers).",
    ),
    "BROADCAST_WEBSOCKET_HEARTBEAT": _s(
        "BROADCAST_WEBSOCKET_HEARTBEAT", 15.0, number, seconds(),
        "Seconds between a node's discovery announcements; a peer silent for 3 of them is dropped.",
    ),
    "CLUSTER_ID": _s(
        "AWX_WS_CLUSTER_ID", "default", text, string(empty=False),
        "The cluster a node belongs to: discovery only sees nodes of the same id on the database.",
    ),
    "HISTORY_LENGTH": _s(
        "AWX_WS_HISTORY_LENGTH", 1000, integer, int_at_least(1),
        "Messages of history kept per group for resuming streams.",
    ),
    "HISTORY_AGE": _s(
        "AWX_WS_HISTORY_AGE", 3600.0, number, seconds(),
        "Seconds of history kept per group.",
    ),
    "HISTORY_MAX_BYTES": _s(
        "AWX_WS_HISTORY_MAX_BYTES", 1024 * 1024, integer, int_at_least(0),
        "Bytes of message text one group's history keeps at most (oldest go first; the newest "
        "always stays); 0: no byte bound.",
    ),
    "HISTORY_TOTAL_BYTES": _s(
        "AWX_WS_HISTORY_TOTAL_BYTES", 256 * 1024 * 1024, integer, int_at_least(0),
        "Bytes of message text all groups' history keeps at most on a node: past it, whole groups' "
        "history goes, those to expire soonest first; 0: no total bound.",
    ),
    "HISTORY_KINDS": _s(
        "AWX_WS_HISTORY_KINDS", {"control": None}, json_value, history_kinds,
        'Per group kind: {"kind": {"length": n, "age": s}} or {"kind": null} for no history (JSON).',
    ),
    "HISTORY_CLOCK_SKEW": _s(
        "AWX_WS_HISTORY_CLOCK_SKEW", 1.0, number, seconds(zero=True),
        "Seconds a peer node's clock may lag ours; resuming replays that much earlier from it.",
    ),
    "RECOVER_TIMEOUT": _s(
        "AWX_WS_RECOVER_TIMEOUT", 5.0, number, seconds(),
        "Seconds a resume may wait for peers (their history, their relay forwarding the group).",
    ),
    "SSE_KEEPALIVE": _s(
        "AWX_WS_SSE_KEEPALIVE", 15.0, number, seconds(),
        "Seconds between keep-alive comments on an idle SSE stream.",
    ),
    "SSE_RETRY": _s(
        "AWX_WS_SSE_RETRY", 1.0, number, seconds(zero=True),
        "Seconds a browser's EventSource waits before reconnecting (the stream's retry:).",
    ),
    "SLOW_CLIENT_MAX_BYTES": _s(
        "AWX_WS_SLOW_CLIENT_MAX_BYTES", 8 * 1024 * 1024, integer, int_at_least(1),
        "A client with more unread bytes than this is cut off (websocket close 4008, SSE ends).",
    ),
    "SLOW_CLIENT_MAX_MESSAGES": _s(
        "AWX_WS_SLOW_CLIENT_MAX_MESSAGES", 10_000, integer, int_at_least(1),
        "A websocket with more unread messages than this is closed with 4008.",
    ),
    "SUBSCRIBE_RATE": _s(
        "AWX_WS_SUBSCRIBE_RATE", 20, integer, int_at_least(1),
        "Subscribe frames one websocket may send per AWX_WS_SUBSCRIBE_WINDOW seconds.",
    ),
    "SUBSCRIBE_WINDOW": _s(
        "AWX_WS_SUBSCRIBE_WINDOW", 10.0, number, seconds(),
        "The window of AWX_WS_SUBSCRIBE_RATE, in seconds.",
    ),
    "NODE_NAME": _s(
        "AWX_WS_NODE_NAME", _hostname, text, string(empty=False),
        "This node's name in logs and peer headers (the hostname by default).",
    ),
    "RETRY_DELAY": _s(
        "AWX_WS_RETRY_DELAY", 0.1, number, seconds(),
        "First back-off step of background loops after a failure (retry.py), in seconds.",
    ),
    "RETRY_MAX_DELAY": _s(
        "AWX_WS_RETRY_MAX_DELAY", 5.0, number, seconds(),
        "Largest back-off step of background loops, in seconds.",
    ),
    "RETRY_LOG_EVERY": _s(
        "AWX_WS_RETRY_LOG_EVERY", 60.0, number, seconds(),
        "While a background loop keeps failing, one log line per this many seconds.",
    ),
}  # fmt: skip


def _describe(name: str, value: Any) -> str:
    """`AWX_WS_X='value'`: the environment variable and the value at fault."""
    shown = repr(value) if isinstance(value, str) else json.dumps(value, default=repr)
    return f"{SETTINGS[name].env}={shown}"


def require_rate(env: str, value: str) -> str:
    """value if it is a DRF rate; SettingError naming env otherwise (rates outside AWX_WS)."""
    problem = rate(value)
    if problem:
        raise SettingError(f"{env}={value!r}: {problem}")
    return value


def from_environment(environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """The AWX_WS values the environment gives (unset or empty variables are left out)."""
    values: dict[str, Any] = {}
    for name, setting in SETTINGS.items():
        env = setting.env
        if env not in environ and setting.deprecated_env in environ:
            env = setting.deprecated_env
        raw = environ.get(env)
        if raw is None or (raw == "" and setting.read is not text):
            continue
        try:
            values[name] = setting.read(raw)
        except ValueError as exc:
            raise SettingError(f"{env}={raw!r} cannot be read: {exc}") from exc
    return values


def deprecated_in_use(environ: Mapping[str, str] = os.environ) -> list[str]:
    """One line per former variable name the environment still uses (logged once at start)."""
    return [
        f"{s.deprecated_env} is deprecated and will be ignored in the next release: use {s.env}"
        for s in SETTINGS.values()
        if s.deprecated_env and s.deprecated_env in environ
    ]


def validate(values: Mapping[str, Any], environ: Mapping[str, str] = os.environ) -> None:
    """Refuse unknown names and bad values of settings.AWX_WS (defaults filled in), naming each."""
    unknown = sorted(set(values) - set(SETTINGS))
    if unknown:
        raise SettingError(
            f"AWX_WS has unknown setting(s) {', '.join(unknown)}; known: {', '.join(SETTINGS)}"
        )
    merged = {name: values.get(name, setting.default_for(environ)) for name, setting in SETTINGS.items()}
    for name, setting in SETTINGS.items():
        problem = setting.check(merged[name])
        if problem:
            raise SettingError(f"{_describe(name, merged[name])}: {problem} ({setting.help})")
    if merged["LIVENESS_INTERVAL"] * 2 > merged["LIVENESS_TTL"]:
        # A record must survive a missed heartbeat, or another daphne's start-up purge could take
        # a live process for dead and remove its subscriptions.
        raise SettingError(
            f"AWX_WS_LIVENESS_INTERVAL={merged['LIVENESS_INTERVAL']:g} must be at most half of "
            f"AWX_WS_LIVENESS_TTL={merged['LIVENESS_TTL']:g}"
        )
    if 0 < merged["HISTORY_TOTAL_BYTES"] < merged["HISTORY_MAX_BYTES"]:
        raise SettingError(
            f"AWX_WS_HISTORY_TOTAL_BYTES={merged['HISTORY_TOTAL_BYTES']} must be 0 or at least "
            f"AWX_WS_HISTORY_MAX_BYTES={merged['HISTORY_MAX_BYTES']}"
        )
    if merged["BROADCAST_WEBSOCKET_DISCOVERY"] == "postgres" and "BROADCAST_WEBSOCKET_SELF" not in values:
        # The default (127.0.0.1:<daphne port>) is not an address other machines can dial.
        raise SettingError(
            "BROADCAST_WEBSOCKET_DISCOVERY='postgres' needs BROADCAST_WEBSOCKET_SELF: the address "
            "other nodes dial to reach this one (host:port or a ws:// / wss:// URL), which it announces"
        )
    if merged["RETRY_DELAY"] > merged["RETRY_MAX_DELAY"]:
        raise SettingError(
            f"AWX_WS_RETRY_DELAY={merged['RETRY_DELAY']:g} must not exceed "
            f"AWX_WS_RETRY_MAX_DELAY={merged['RETRY_MAX_DELAY']:g}"
        )


class WsSettings:
    """Attribute access to settings.AWX_WS with defaults; unknown names are an AttributeError."""

    def __init__(self) -> None:
        self._cache: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        if name not in SETTINGS:
            raise AttributeError(f"unknown AWX_WS setting {name!r}")
        if name not in self._cache:
            given = getattr(settings, "AWX_WS", {})
            self._cache[name] = given[name] if name in given else SETTINGS[name].default_for(os.environ)
        return self._cache[name]

    def reload(self) -> None:
        """Forget cached values (after override_settings)."""
        self._cache.clear()


ws_settings = WsSettings()


def _reload(*, setting: str, enter: bool = True, value: Any = None, **kwargs: Any) -> None:
    if setting == "AWX_WS":
        if enter and value is not None:
            validate(value)  # overrides are held to the same rules as the environment
        ws_settings.reload()


setting_changed.connect(_reload)
