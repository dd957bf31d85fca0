"""Which groups this node's clients hold: what the relay asks peers to forward.

On Redis each process's fan-out mirrors its client-held groups into Redis and the relay reads
their union (layers/redis_interest.py), so peer subscriptions of BroadcastConsumers never count:
a node that merely forwards a group does not ask its other peers for it. A layer without such a
store (RabbitMQ) has the fan-outs announce their groups on the layer itself (InterestAnnouncer,
here) and the relay listens (LayerInterestWatcher).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from collections.abc import Set as AbstractSet
from typing import Any, Protocol

logger = logging.getLogger(__name__)

# Layers without a shared store (RabbitMQ): every process's fan-out announces its groups on the
# layer itself, at each change (debounced) and every ANNOUNCE_EVERY seconds; the relay keeps each
# announcement for its ttl, so the groups of a process that died without a word fall away.
INTEREST_GROUP = "awx_ws.interest"
INTEREST_TYPE = "awx_ws.interest"
INTEREST_REQUEST_TYPE = "awx_ws.interest_request"
ANNOUNCE_EVERY = 5.0
# A burst of joins (500 clients arriving) makes one announcement, not one per join.
DEBOUNCE = 0.05


class InterestSink(Protocol):
    """Where the node's interest goes (the relay): whole, or as a change."""

    def publish(self, interest: frozenset[str]) -> None:
        """The node's interest is now exactly interest."""

    def update(self, gained: AbstractSet[str], lost: AbstractSet[str]) -> None:
        """The node's interest gained and lost these groups."""


class NodeInterest:
    """The node's interest kept as the union of its processes' groups, by counting holders: one
    process's join or leave changes it in time proportional to the change, however many groups
    the node holds (10,000 `job_events-<id>` groups are an ordinary AWX day)."""

    def __init__(self) -> None:
        self.by_process: dict[str, set[str]] = {}
        # group -> how many processes hold it; its keys are the node's interest.
        self.holders: dict[str, int] = {}

    @property
    def groups(self) -> frozenset[str]:
        """The node's interest (a copy: costs the number of groups)."""
        return frozenset(self.holders)

    def change(self, process: str, join: Iterable[str], leave: Iterable[str]) -> tuple[set[str], set[str]]:
        """Apply one process's joins, then its leaves; the groups the node gained and lost."""
        held = self.by_process.setdefault(process, set())
        gained: set[str] = set()
        lost: set[str] = set()
        for group in join:
            if group not in held:
                held.add(group)
                count = self.holders.get(group, 0)
                self.holders[group] = count + 1
                if count == 0:
                    gained.add(group)
        for group in leave:
            if group in held:
                held.discard(group)
                count = self.holders[group] - 1
                if count:
                    self.holders[group] = count
                else:
                    del self.holders[group]
                    lost.add(group)
        if not held:
            del self.by_process[process]
        both = gained & lost  # joined and left in one change: no change for the node
        return gained - both, lost - both

    def replace(self, process: str, groups: AbstractSet[str]) -> tuple[set[str], set[str]]:
        """The process holds exactly groups now; the node's gains and losses."""
        held = self.by_process.get(process, set())
        return self.change(process, groups - held, held - groups)


class InterestAnnouncer:
    """One fan-out's announcements of the groups it holds (see INTEREST_GROUP)."""

    # The group every fan-out's channel joins, so a starting relay can ask them all at once.
    REQUESTS = "awx_ws.interest-requests"

    def __init__(self, layer: Any, channel: str, groups: Callable[[], list[str]]) -> None:
        self.layer = layer
        self.channel = channel
        self.groups = groups
        self._changed = asyncio.Event()

    def changed(self) -> None:
        """Announce soon (the groups changed, or a relay asked)."""
        self._changed.set()

    async def round(self, failures: int) -> float:
        """One announcement, after a change or ANNOUNCE_EVERY (at once after a failed one)."""
        if not failures:
            try:
                async with asyncio.timeout(ANNOUNCE_EVERY):  # not wait_for: see fanout._sync_round
                    await self._changed.wait()
            except TimeoutError:
                pass
        self._changed.clear()
        message = {
            "type": INTEREST_TYPE,
            "process": self.channel,
            "groups": sorted(self.groups()),
            "ttl": 3 * ANNOUNCE_EVERY,
        }
        await self.layer.group_send(INTEREST_GROUP, message)
        return DEBOUNCE


class LayerInterestWatcher:
    """The relay's view of the groups live processes announce on the layer (InterestAnnouncer)."""

    def __init__(self, layer: Any, publish: Callable[[frozenset[str]], None]) -> None:
        self.layer = layer
        self.publish = publish
        self.channel: str | None = None
        self.held: dict[str, tuple[frozenset[str], float]] = {}

    async def round(self, failures: int) -> None:
        """Listen (again, after a failure: the layer may have lost our binding) and publish the union."""
        if self.channel is None:
            self.channel = await self.layer.new_channel("relay.")
        await self.layer.group_add(INTEREST_GROUP, self.channel)
        await self.layer.group_send(InterestAnnouncer.REQUESTS, {"type": INTEREST_REQUEST_TYPE})
        loop = asyncio.get_running_loop()
        while True:
            try:
                async with asyncio.timeout(ANNOUNCE_EVERY):
                    message = await self.layer.receive(self.channel)
            except TimeoutError:
                message = None
            now = loop.time()
            if message is not None and message.get("type") == INTEREST_TYPE:
                try:
                    groups = frozenset(str(group) for group in message["groups"])
                    self.held[str(message["process"])] = (groups, now + float(message["ttl"]))
                except (KeyError, TypeError, ValueError) as exc:
                    logger.warning("ignoring a malformed interest announcement: %s", exc)
            for process in [process for process, (_, expires) in self.held.items() if expires < now]:
                del self.held[process]
            self.publish(frozenset().union(*(groups for groups, _ in self.held.values())))
