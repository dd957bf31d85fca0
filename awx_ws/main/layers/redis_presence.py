"""Which channel-layer processes are alive, and what the start-up purge may remove.

Every process that owns channels (daphne, later the relay) keeps a record in Redis under
`<prefix>:alive:<client prefix>`, expiring LIVENESS_TTL seconds after its last heartbeat. A
channel name `specific.<client prefix>!<id>` belongs to the process with that client prefix, so a
group member or a queued-message key is stale when its process is dead:

- no liveness record at all (it expired: the process stopped heartbeating), or
- a record written on this very node (same hostname and boot id) whose pid no longer runs (gone,
  or a zombie not reaped yet), or runs a process started at another time (pid reuse). This
  catches `kill -9` followed by a restart faster than the TTL, which is how supervisord restarts
  daphne.

A record from another node is trusted until it expires: we cannot see its process table.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import re
import socket
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
from redis.exceptions import RedisError

from awx_ws.main import metrics
from awx_ws.main.conf import ws_settings
from awx_ws.main.exceptions import RedisUnavailable, StartupError
from awx_ws.main.layers.redis_counts import forget_process
from awx_ws.main.layers.redis_keys import (
    alive_key,
    group_of_key,
    group_pattern,
    interest_key,
    process_counts_key,
    queue_patterns,
    stats_key,
)
from awx_ws.main.layers.redis_members import read_members, remove_members
from awx_ws.main.retry import Backoff, RetryPolicy, spawn
from awx_ws.main.stats import process_stats

if TYPE_CHECKING:
    from awx_ws.main.layers.redis_types import RedisLayer

logger = logging.getLogger(__name__)

# specific.<32 hex>!<anything> (channels_redis's uuid4().hex client prefix), or our fan-out's
# fanout.<32 hex> (fanout.py)
_CHANNEL_RE = re.compile(r"(?:[A-Za-z0-9_-]+\.)?([0-9a-f]{32})!.*|fanout\.([0-9a-f]{32})", re.DOTALL)
# <layer prefix>specific.<32 hex>!, its in-flight backup <...>!$inflight, or <layer prefix>fanout.<32 hex>
_QUEUE_RE = re.compile(r"(?:[A-Za-z0-9_-]+\.)?([0-9a-f]{32})!(?:\$inflight)?|fanout\.([0-9a-f]{32})")
_OWNER_RE = re.compile(r"[0-9a-f]{32}")
# Group keys the start-up purge reads per round trip.
PURGE_PAGE = 500


@cache
def node_id() -> str:
    """This machine (hostname and boot id): records from it can be checked against its pids."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = "unknown-boot"
    return f"{socket.gethostname()}/{boot}"


@dataclass(frozen=True)
class ProcessRecord:
    """What a process writes about itself into its liveness key."""

    node: str
    pid: int
    started: float = field(default=0.0)
    # The service node it serves (AWX_WS_NODE_NAME): several nodes may share one Redis (topology.py).
    name: str = ""

    @classmethod
    def current(cls) -> ProcessRecord:
        """The record of the calling process."""
        started = psutil.Process().create_time()
        return cls(node=node_id(), pid=os.getpid(), started=started, name=ws_settings.NODE_NAME)

    def dumps(self) -> str:
        """Serialise for Redis."""
        return json.dumps(asdict(self))

    @classmethod
    def loads(cls, raw: bytes | str) -> ProcessRecord | None:
        """Parse a stored record; None if it is not one of ours."""
        try:
            data = json.loads(raw)
            node, pid, started = str(data["node"]), int(data["pid"]), float(data["started"])
            return cls(node=node, pid=pid, started=started, name=str(data.get("name", "")))
        except (ValueError, KeyError, TypeError):
            return None

    def runs_here(self) -> bool:
        """True if this record's process still runs on this node (pid reuse excluded)."""
        try:
            process = psutil.Process(self.pid)
            started = process.create_time()
            # Killed but not yet reaped by its parent (a shell that has not waited, a container's
            # init that never does): a zombie holds no socket and serves nobody.
            zombie = process.status() == psutil.STATUS_ZOMBIE
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return False
        return not zombie and abs(started - self.started) < 1.0


def channel_owner(channel: str) -> str | None:
    """The client prefix of the process owning a process-specific channel name, else None."""
    match = _CHANNEL_RE.fullmatch(channel)
    return (match.group(1) or match.group(2)) if match else None


class Liveness:
    """Keeps one channel layer's process marked alive in Redis while it runs."""

    def __init__(self, layer: RedisLayer) -> None:
        self.layer = layer
        self.key = alive_key(layer.prefix, layer.client_prefix)
        self._ready: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Write the record once (concurrent callers share the write), then refresh it in the background."""
        if self._ready is None:
            self._ready = asyncio.ensure_future(self._begin())
        ready = self._ready
        try:
            await asyncio.shield(ready)
        except Exception:
            # Let the next caller try again rather than caching the failure forever.
            if self._ready is ready:
                self._ready = None
            raise

    async def stop(self) -> None:
        """Stop refreshing and delete the record (best effort: it expires anyway)."""
        if self._task is not None:
            self._task.cancel()
            # Bounded, as the fan-out's stop (fanout.STOP_WAIT): a task cancelled inside
            # redis-py's pool was seen to stay "cancelling" for good; the record goes regardless.
            if (await asyncio.wait([self._task], timeout=5.0))[1]:
                logger.warning("the liveness heartbeat of %s did not stop within 5s", self.key)
            self._task = None
        self._ready = None
        try:
            async with asyncio.timeout(2):
                await self.layer.connection(0).delete(self.key)
        except (TimeoutError, RedisError, OSError) as exc:
            logger.warning("could not delete liveness record %s: %s", self.key, exc)

    def write_into(self, pipe: Any) -> None:
        """Queue the writes of this process's record (and its figures) on a Redis pipeline.

        The fan-out queues them first when it writes its memberships again after a Redis restart:
        until the next heartbeat, a process without a record would look dead to the relay and
        to any other process's start-up purge.
        """
        ttl_ms = int(ws_settings.LIVENESS_TTL * 1000)
        stats = stats_key(self.layer.prefix, self.layer.client_prefix)
        pipe.set(self.key, ProcessRecord.current().dumps(), px=ttl_ms)
        pipe.hset(stats, mapping=process_stats.snapshot(len(self.layer.fanout.groups)))
        pipe.pexpire(stats, ttl_ms)

    async def _write(self) -> None:
        try:
            async with self.layer.connection(0).pipeline(transaction=False) as pipe:
                self.write_into(pipe)
                await pipe.execute()
        except RedisError as exc:  # logged by the retry loop: say where, as every Redis user does
            raise self.layer.unavailable(exc) from exc

    async def _begin(self) -> None:
        await self._write()
        # Retries within the heartbeat interval: a record must never lapse for want of a retry.
        interval = ws_settings.LIVENESS_INTERVAL
        policy = RetryPolicy.from_settings()
        policy = RetryPolicy(min(policy.base, interval), min(policy.cap, interval), policy.log_every)
        self._task = spawn(f"liveness heartbeat {self.key}", self._heartbeat, policy, metric="liveness")
        logger.info("process %s is live as %s", os.getpid(), self.key)

    async def _heartbeat(self, failures: int) -> None:
        """Rewrite the record every LIVENESS_INTERVAL (with jitter); at once after a failure."""
        if not failures:
            await asyncio.sleep(ws_settings.LIVENESS_INTERVAL * random.uniform(0.9, 1.0))
        await self._write()


@dataclass
class PurgeReport:
    """What one purge removed."""

    memberships: int = 0
    queues: int = 0
    records: int = 0
    dead_processes: set[str] = field(default_factory=set)


class LivenessJudge:
    """Decides, and caches for one pass, whether the process behind a client prefix is dead."""

    def __init__(self, layer: RedisLayer) -> None:
        self.layer = layer
        self.here = node_id()
        self.cache: dict[str, bool] = {layer.client_prefix: False}

    async def dead(self, client_prefix: str) -> bool:
        """True when the process owning client_prefix is gone (see the module docstring)."""
        if client_prefix not in self.cache:
            await self.live_record(client_prefix)  # judges, and caches the verdict
        return self.cache[client_prefix]

    async def live_record(self, client_prefix: str) -> ProcessRecord | None:
        """The record of the process owning client_prefix; None when that process is gone."""
        raw: Any = await self.layer.connection(0).get(alive_key(self.layer.prefix, client_prefix))
        dead = self.cache[client_prefix] = self._judge(raw)
        return None if dead else ProcessRecord.loads(raw)

    def _judge(self, raw: bytes | None) -> bool:
        if raw is None:
            return True
        record = ProcessRecord.loads(raw)
        if record is None or record.node != self.here:
            return False
        return not record.runs_here()


async def start_process(layer: RedisLayer, wait: float | None) -> None:
    """Mark this process live, then purge state of dead ones; wait up to `wait` s for Redis
    (None: one attempt, RedisUnavailable if it fails)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + (wait or 0.0)
    backoff = Backoff(0.25, 5.0)
    while True:
        try:
            try:
                await layer.liveness.start()
            except (RedisError, OSError) as exc:
                raise RedisUnavailable(f"{layer.describe_hosts()}: {exc}") from exc
            report = await purge_stale_state(layer)
            break
        except RedisUnavailable as exc:
            if wait is None:
                raise
            delay = backoff.next_delay()
            if loop.time() + delay > deadline:
                raise StartupError(
                    f"Redis unreachable for {wait:g}s (AWX_WS_STARTUP_LAYER_WAIT), "
                    f"{backoff.failures} attempts: {exc}"
                ) from exc
            if backoff.failures == 1:
                logger.warning("waiting up to %gs for Redis: %s", wait, exc)
            await asyncio.sleep(delay)
    metrics.PURGED.labels("memberships").inc(report.memberships)
    metrics.PURGED.labels("queues").inc(report.queues)
    metrics.PURGED.labels("records").inc(report.records)
    logger.info(
        "start-up purge: removed %d group memberships, %d message queues, %d records of %d dead processes",
        report.memberships,
        report.queues,
        report.records,
        len(report.dead_processes),
    )


async def purge_stale_state(layer: RedisLayer) -> PurgeReport:
    """Remove group memberships, queued messages and records of dead processes; never of live ones."""
    try:
        return await _purge(layer)
    except (RedisError, OSError) as exc:
        raise RedisUnavailable(
            f"start-up purge could not use Redis ({layer.describe_hosts()}): {exc}"
        ) from exc


async def _purge(layer: RedisLayer) -> PurgeReport:
    report = PurgeReport()
    verdicts = LivenessJudge(layer)
    for index in range(layer.ring_size):
        connection = layer.connection(index)
        report.memberships += await _purge_memberships(layer, connection, verdicts)
        report.queues += await _purge_queues(layer, connection, verdicts)
    report.records += await _purge_records(layer, verdicts)
    for client_prefix, dead in verdicts.cache.items():
        if dead:
            report.dead_processes.add(client_prefix)
            # A same-node record of a dead pid may still be there; drop it now.
            report.records += await layer.connection(0).delete(alive_key(layer.prefix, client_prefix))
    return report


async def _purge_memberships(layer: RedisLayer, connection: Any, verdicts: LivenessJudge) -> int:
    """Remove dead processes' channels from the group sets of one shard; how many."""
    removed = 0
    page: list[bytes] = []
    # SCAN, not KEYS: KEYS blocks Redis for every other client while it walks the keyspace.
    async for key in connection.scan_iter(match=group_pattern(layer.prefix), count=PURGE_PAGE):
        page.append(key)
        if len(page) >= PURGE_PAGE:
            removed += await _purge_page(layer, connection, verdicts, page)
            page = []
    return removed + await _purge_page(layer, connection, verdicts, page)


async def _purge_page(layer: RedisLayer, connection: Any, verdicts: LivenessJudge, keys: list[bytes]) -> int:
    """_purge_memberships for one page of group keys, in two round trips (redis_members.py)."""
    stale: dict[str, list[bytes]] = {}
    for key, held in zip(keys, await read_members(connection, keys), strict=True):
        for member in held:
            owner = channel_owner(member.decode("utf-8", "replace"))
            if owner is not None and await verdicts.dead(owner):
                group = group_of_key(layer.prefix, key.decode("utf-8", "replace"))
                stale.setdefault(group, []).append(member)
    if not stale:
        return 0
    # The dead process's clients may resume elsewhere: the group's history goes on a while. Each
    # group is marked before its members go, so a refused mark leaves them in place. The marks
    # live on the first shard: with several, they are written there first.
    together = layer.ring_size == 1
    if not together:
        async with layer.connection(0).pipeline(transaction=False) as pipe:
            for group in stale:
                layer.mark_left(pipe, group)
            await pipe.execute()
    # What ZREM removed, not what we found: another process purging at the same time (several
    # daphnes started together) must not make both count the same member.
    return await remove_members(layer, connection, stale, mark=together)


async def _purge_queues(layer: RedisLayer, connection: Any, verdicts: LivenessJudge) -> int:
    """Delete dead processes' channel queues on one shard; how many."""
    removed = 0
    queue_prefix = layer.prefix.encode()
    for pattern in queue_patterns(layer.prefix):
        async for key in connection.scan_iter(match=pattern, count=500):
            if not key.startswith(queue_prefix):
                continue
            match = _QUEUE_RE.fullmatch(key[len(queue_prefix) :].decode("utf-8", "replace"))
            if match and await verdicts.dead(match.group(1) or match.group(2)):
                removed += await connection.delete(key)  # 0 if a purge beside us was first
    return removed


async def _purge_records(layer: RedisLayer, verdicts: LivenessJudge) -> int:
    """Drop dead processes' interest sets and connection counts; how many."""
    removed = 0
    connection = layer.connection(0)
    # Interest sets (redis_interest.py) of dead processes would make the relay ask for dead groups.
    interest_prefix = interest_key(layer.prefix, "").encode()
    async for key in connection.scan_iter(match=interest_key(layer.prefix, "*"), count=500):
        owner = key[len(interest_prefix) :].decode("utf-8", "replace")
        if _OWNER_RE.fullmatch(owner) and await verdicts.dead(owner):
            removed += await connection.delete(key)
    # Connection counts (redis_counts.py) of dead processes would hold their users' slots for good.
    counts_prefix = process_counts_key(layer.prefix, "").encode()
    async for key in connection.scan_iter(match=process_counts_key(layer.prefix, "*"), count=500):
        owner = key[len(counts_prefix) :].decode("utf-8", "replace")
        if _OWNER_RE.fullmatch(owner) and await verdicts.dead(owner):
            await forget_process(layer, owner)
            removed += 1
    return removed
