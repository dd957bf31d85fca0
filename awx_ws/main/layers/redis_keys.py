"""Every Redis key and pub/sub channel the service uses, in one place.

All of them start with the layer's prefix (CHANNEL_LAYER_PREFIX, "asgi" by default), so one Redis
can hold several deployments side by side. Three kinds are channels_redis's own and only read
here: `<prefix>:group:<name>` (a group's members), `<prefix><channel>` (a channel's queue), and the
`<prefix>fanout.<...>` queues our fan-out receives on (a process-specific channel name).
`redis-cli --scan --pattern 'asgi*'` lists them all.
"""

from __future__ import annotations

# --- channels_redis's own keys (read by the start-up purge) ----------------------------------


def group_pattern(prefix: str) -> str:
    """SCAN pattern of channels_redis's group member sets (`_group_key`)."""
    return f"{prefix}:group:*"


def queue_patterns(prefix: str) -> tuple[str, ...]:
    """SCAN patterns of channel queues that name their process: `<prefix>...!...` (channels_redis's
    process-specific channels) and `<prefix>fanout.*` (the fan-out's)."""
    return (f"{prefix}*!*", f"{prefix}fanout.*")


def queue_key(prefix: str, channel: str) -> str:
    """The list holding one channel's queued messages (channels_redis's format)."""
    return prefix + channel


# --- one server process's records (redis_presence.py, stats.py, redis_interest.py) -----------


def alive_key(prefix: str, client_prefix: str) -> str:
    """One process's liveness record (a string with a TTL)."""
    return f"{prefix}:alive:{client_prefix}"


def stats_key(prefix: str, client_prefix: str) -> str:
    """One process's figures (a hash, written with its heartbeat)."""
    return f"{prefix}:process-stats:{client_prefix}"


def interest_key(prefix: str, client_prefix: str) -> str:
    """The groups one process holds for its clients (a set)."""
    return f"{prefix}:interest:{client_prefix}"


def interest_changed(prefix: str) -> str:
    """Pub/sub channel announcing that some process's interest set changed."""
    return f"{prefix}:interest-changed"


# --- connection counts (redis_counts.py) ------------------------------------------------------


def user_counts_key(prefix: str) -> str:
    """The node's open connections per user (a hash)."""
    return f"{prefix}:user-connections"


def process_counts_key(prefix: str, client_prefix: str) -> str:
    """One process's open connections per user (a hash)."""
    return f"{prefix}:connections:{client_prefix}"


# --- history (redis_history.py) ---------------------------------------------------------------


def stream_key(prefix: str, group: str) -> str:
    """The stream holding a group's history on this node."""
    return f"{prefix}:history:{group}"


def origin_key(prefix: str) -> str:
    """The string naming this Redis's origin tag (message ids carry it)."""
    return f"{prefix}:history-origin"


def watched_key(prefix: str, group: str) -> str:
    """A group whose last member left lately (a string with a TTL): its history is still kept,
    for the clients that may resume it (redis_history.py)."""
    return f"{prefix}:watched:{group}"


def group_of_key(prefix: str, key: str) -> str:
    """The group name in one of channels_redis's group member set keys (group_pattern)."""
    return key.removeprefix(f"{prefix}:group:")


def history_total_keys(prefix: str) -> list[str]:
    """Each stream's bytes (hash), their sum (string), when each stream expires (sorted set; and
    `<it>:<share>` per share), each stream's share (hash) and each share's bytes (sorted set)."""
    return [
        f"{prefix}:history-sizes",
        f"{prefix}:history-total",
        f"{prefix}:history-expiry",
        f"{prefix}:history-owners",
        f"{prefix}:history-shares",
    ]


# --- the relay and peers (redis_records.py, redis.py) -----------------------------------------


def link_status_key(prefix: str, peer: str) -> str:
    """One relay link's figures (a hash the relay rewrites every second)."""
    return f"{prefix}:relay-status:{peer}"


def relay_peers_key(prefix: str) -> str:
    """The relay's peers now, each static or discovered (a hash the relay rewrites every second)."""
    return f"{prefix}:relay-peers"


def forwarding_key(prefix: str, peer: str) -> str:
    """The groups a peer has confirmed it forwards to this node (a set resumes wait on)."""
    return f"{prefix}:relay-forwarding:{peer}"


def nonce_key(prefix: str, nonce: str) -> str:
    """A peer handshake's nonce, remembered against replays (a string with a TTL)."""
    return f"{prefix}:peer-nonce:{nonce}"
