"""Prometheus metrics of every awx_ws process, summed per node by `GET /api/v2/metrics`.

Daphne, the gunicorn workers and the relay are separate processes. prometheus_client's
multiprocess mode has each of them write its values to files in PROMETHEUS_MULTIPROC_DIR (set by
config/settings.py, under AWX_WS_VAR); the endpoint reads and sums them. Gauges of live state
(connections, subscriptions, relay links) count only processes that still run: files of dead
processes are retired at each scrape, so a daphne killed with -9 does not haunt the figures.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
from pathlib import Path

import psutil
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

CONNECTIONS = Gauge(
    "awx_ws_connections",
    "Open client connections",
    ["transport"],
    multiprocess_mode="livesum",
)
SUBSCRIPTIONS = Gauge(
    "awx_ws_subscriptions",
    "Group subscriptions held by client connections, by group kind",
    ["kind"],
    multiprocess_mode="livesum",
)
EMITTED = Counter("awx_ws_messages_emitted", "Messages emitted on this node, by group kind", ["kind"])
DELIVERED = Counter("awx_ws_messages_delivered", "Messages written to client connections", ["transport"])
DROPPED = Counter("awx_ws_messages_dropped", "Messages dropped, by reason", ["reason"])
EVENTS_NOT_SENT = Counter(
    "awx_ws_job_events_not_sent",
    "Job events stored but not sent to the websocket: over the rate, or with nothing to show",
    ["reason"],
)
HELD_BACK_NOTICES = Counter(
    "awx_ws_held_back_notices",
    "Notices naming job events held back over the rate: with a request's events, or by the timer",
    ["sent_by"],
)
UNPLACED_JOB_MESSAGES = Counter(
    "awx_ws_unplaced_job_messages",
    "Job status messages whose unified_job_id names no job: shown to superusers only",
)
ACCESS_SWEEP_SECONDS = Histogram(
    "awx_ws_access_sweep_seconds",
    "Time a process took to compare its open connections' access with the database (revocation.py)",
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0),
)
DISCOVERY_REFUSED = Counter(
    "awx_ws_discovery_refused",
    "Peer discovery announcements not acted on, by reason (unsigned, forged, stale, replayed, ...)",
    ["reason"],
)
SLOW_CLIENT_CLOSES = Counter(
    "awx_ws_slow_client_closes", "Client connections closed because they stopped reading"
)
ACCESS_REVOKED = Counter(
    "awx_ws_access_revoked",
    "Connections closed (what=closed), or groups they left (what=groups_left), as access went",
    ["transport", "what"],
)
REPLAYED = Counter("awx_ws_history_replayed", "Missed messages replayed to resuming clients", ["transport"])
RESETS = Counter("awx_ws_history_resets", "Groups a resume could not replay (stream-reset)", ["transport"])
LAYER_ERRORS = Counter(
    "awx_ws_channel_layer_errors",
    "Failed channel-layer operations (Redis or RabbitMQ), by what failed",
    ["operation"],
)
# Its former name, which counted RabbitMQ's failures too; kept, counting the same, for one release.
REDIS_ERRORS_DEPRECATED = Counter(
    "awx_ws_redis_errors", "Deprecated: awx_ws_channel_layer_errors (removed next release)", ["operation"]
)
BACKGROUND_FAILURES = Counter(
    "awx_ws_background_failures",
    "Failed rounds of background loops (retried with back-off, see retry.py), by loop",
    ["task"],
)
PURGED = Counter(
    "awx_ws_startup_purge_removed", "Stale channel-layer state removed by start-up purges", ["what"]
)
PURGE_SKIPPED = Counter(
    "awx_ws_startup_purge_skipped",
    "Start-ups whose channel layer keeps no state outside its connections to purge (RabbitMQ)",
)
RELAY_UP = Gauge(
    "awx_ws_relay_link_up",
    "1 while this node's relay link to a peer is connected",
    ["peer"],
    multiprocess_mode="livemax",
)
RELAY_RECEIVED = Counter("awx_ws_relay_received", "Messages received from a peer's relay link", ["peer"])
RELAY_CATCHUP = Counter(
    "awx_ws_relay_catchup",
    "Relay link catch-ups after a loss, by outcome: complete, reset (a peer's history no longer "
    "reached back), unavailable",
    ["outcome"],
)
RELAY_RECONNECTS = Counter("awx_ws_relay_reconnects", "Relay links re-established after a loss", ["peer"])

# gauge_livesum_1234.db and the like: files of live-state gauges of one process
_LIVE_FILE = re.compile(r"gauge_live[a-z]*_([0-9]+)\.db")


class Tally:
    """Counts of one labelled counter kept in memory and written at most once per `interval`.

    A multiprocess counter's inc() is a labels() lookup and a write to a memory-mapped file: per
    delivered message it showed in the own-group profile (docs/performance.md). The fan-out adds
    here instead; a timer on the event loop writes the sums, so a scrape is at most `interval`
    behind, and flush() writes what is left at shutdown.
    """

    def __init__(self, counter: Counter, interval: float = 1.0) -> None:
        self.counter = counter
        self.interval = interval
        self._pending: dict[str, float] = {}
        self._timer: asyncio.TimerHandle | None = None

    def add(self, label: str, amount: float = 1) -> None:
        """Count amount under label (written within `interval`)."""
        self._pending[label] = self._pending.get(label, 0) + amount
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.interval, self.flush)

    def flush(self) -> None:
        """Write the pending counts now."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, {}
        for label, amount in pending.items():
            self.counter.labels(label).inc(amount)


def layer_error(operation: str) -> None:
    """Count a failed channel-layer operation (under both names while the old one lives)."""
    LAYER_ERRORS.labels(operation).inc()
    REDIS_ERRORS_DEPRECATED.labels(operation).inc()


def count_emitted(group: str) -> None:
    """Count one client message emitted to group (awx_ws_messages_emitted, by kind)."""
    _emitted(group.split("-", 1)[0]).inc()


@functools.cache  # per emit, labels() costs more than the inc(): find each kind's child once
def _emitted(kind: str) -> Counter:
    return EMITTED.labels(kind)


def group_kind(group: str) -> str:
    """The kind part of a group name (`job_events` of `job_events-42`)."""
    return group.split("-", 1)[0]


def forget_previous_owner_of_this_pid(directory: str | Path) -> None:
    """Drop live-state gauge files left under this process's pid (call before any value is made).

    prometheus_client reopens an existing file of the same pid and carries on from its values: a
    process killed with -9 whose files no scrape has retired yet would lend its connections and
    subscriptions to a newcomer that gets its pid, for the newcomer's whole life.
    """
    multiprocess.mark_process_dead(os.getpid(), str(directory))


def live_file_pid(name: str) -> int | None:
    """The pid of a live-state gauge file's process (gauge_livesum_1234.db), else None."""
    match = _LIVE_FILE.fullmatch(name)
    return int(match[1]) if match else None


def retire_dead_processes(directory: str | Path) -> list[int]:
    """Drop live-state gauge files of processes that no longer run here; their pids."""
    dead = set()
    for name in os.listdir(directory):
        pid = live_file_pid(name)
        if pid is not None and not psutil.pid_exists(pid):
            dead.add(pid)
    for pid in dead:
        multiprocess.mark_process_dead(pid, str(directory))
    return sorted(dead)


def render() -> tuple[bytes, str]:
    """The node's metrics in Prometheus's text format, and its content type."""
    directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    retire_dead_processes(directory)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)
    return generate_latest(registry), CONTENT_TYPE_LATEST
