"""The contract between awx_ws and a channel layer backend: what the service needs beyond
Channels' own layer API (`group_send`, `group_add`, `receive`...), declared once.

A backend subclasses its Channels layer and `ServiceLayer`, and implements every abstract member;
code outside `awx_ws.main.layers` asks the layer through these and never checks which backend it
has. Library errors stay inside the backend: a layer that cannot be reached raises
`LayerUnavailable` (exceptions.py) naming the setting at fault.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    from awx_ws.main.exceptions import LayerUnavailable
    from awx_ws.main.fanout import Fanout
    from awx_ws.main.history import GroupPosition, Replay
    from awx_ws.main.interest import InterestSink
    from awx_ws.main.retry import Round


class CountKeeper(Protocol):
    """A process's own count of its open connections (connlimit.ConnectionCounter), as a store's
    sync loop sees it."""

    def counts(self) -> dict[int, int]:
        """Open connections per user."""
        ...

    def on_missed(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call listener when a change could not be written; returns its unregistering function."""
        ...

    async def restore(self, store: ConnectionStore) -> int:
        """Write the whole count to store (under its lock); the users written."""
        ...


class ConnectionStore(Protocol):
    """Where a node keeps its open connections per user (AWX_WS_MAX_CONNECTIONS_PER_USER), shared
    by its processes; each process's share is written under `lock` together with its memory count."""

    @property
    def lock(self) -> asyncio.Lock:
        """Held while this process's share and its memory count change together."""
        ...

    async def acquire(self, user_id: int, limit: int) -> bool:
        """Count one more connection of user_id on this process; False at the node's limit."""
        ...

    async def release(self, user_id: int) -> None:
        """Take back one connection of user_id on this process."""
        ...

    async def restore(self, counts: dict[int, int]) -> int:
        """Make this process's share exactly counts (after a missed write); the users written."""
        ...

    def keep_synced(self, counter: CountKeeper) -> asyncio.Task[None] | None:
        """Start the loop that writes counter's counts again when a change was missed, or the
        store may have lost them; None when it needs none."""
        ...


@dataclass
class ProcessFigures:
    """What one live server process last wrote of itself: its figures and the groups it holds."""

    figures: dict[str, str]
    groups: set[str] = field(default_factory=set)


class NodeRecords(Protocol):
    """Records a layer with a store of its own (`keeps_records`) keeps for the node: what each
    process holds (`manage.py connections`), the relay's links (`run_wsbroadcast --status`) and
    which groups peers forward here (resumes wait on it). Failures raise LayerUnavailable."""

    async def processes(self) -> list[ProcessFigures]:
        """Every live process's figures and groups."""
        ...

    async def live_nodes(self) -> set[str]:
        """The names (AWX_WS_NODE_NAME) of the nodes with a live process on this store."""
        ...

    async def write_link_status(self, peer: str, figures: Mapping[str, str]) -> None:
        """Store one relay link's figures (kept an hour after the relay stops writing them)."""
        ...

    async def link_status(self, peer: str) -> dict[str, str]:
        """One relay link's last figures; empty when none were written."""
        ...

    async def write_peers(self, peers: Mapping[str, str]) -> None:
        """Store the relay's peers now, {peer: "static" or "discovered"} (replacing the last list)."""
        ...

    async def peers(self) -> dict[str, str]:
        """The relay's peers as it last wrote them; empty when none."""
        ...

    async def reset_forwarding(self, peer: str) -> None:
        """Forget which groups peer forwards here (its link is new)."""
        ...

    async def record_forwarding(self, peer: str, forwarding: list[str], dropped: list[str]) -> None:
        """Record the groups peer has confirmed it now forwards, and those it stopped forwarding."""
        ...

    async def forwards(self, peer: str, groups: Iterable[str]) -> bool:
        """Whether peer has confirmed it forwards every one of groups here."""
        ...

    def watch_interest(self, sink: InterestSink) -> Round:
        """A round (retry.supervise) keeping sink told of the groups this node's clients hold."""
        ...


def service_layer(layer: object) -> ServiceLayer | None:
    """layer as awx_ws's contract; None for a layer of another package (Channels' in-memory
    one, channels_redis's own), which the service can use only as Channels can."""
    return layer if isinstance(layer, ServiceLayer) else None


def service_layer_class(backend: object) -> type[ServiceLayer] | None:
    """backend (CHANNEL_LAYERS' BACKEND, imported) if it is one of awx_ws's layer classes."""
    return backend if isinstance(backend, type) and issubclass(backend, ServiceLayer) else None


class ServiceLayer(abc.ABC):
    """What awx_ws needs of a channel layer besides Channels' API."""

    # Named to operators and clients ("Redis is unreachable"); whether resumes can replay;
    # whether each process writes its records (liveness, stats, relay status) to the layer's
    # store, where `manage.py connections` and `run_wsbroadcast --status` read them.
    service: ClassVar[str]
    keeps_history: ClassVar[bool]
    keeps_records: ClassVar[bool]

    if TYPE_CHECKING:
        # Channels' layer API, which every backend has from its Channels base class.

        async def group_send(self, group: str, message: dict[str, Any]) -> None: ...

        async def group_add(self, group: str, channel: str) -> None: ...

        async def group_discard(self, group: str, channel: str) -> None: ...

    async def group_add_many(self, groups: Sequence[str], channel: str) -> None:
        """group_add of each group (a backend may write many per round trip)."""
        for group in groups:
            await self.group_add(group, channel)

    async def group_discard_many(self, groups: Sequence[str], channel: str) -> None:
        """group_discard of each group (a backend may write many per round trip)."""
        for group in groups:
            await self.group_discard(group, channel)

    @property
    @abc.abstractmethod
    def fanout(self) -> Fanout:
        """This process's fan-out of group messages to its client sockets."""

    @property
    @abc.abstractmethod
    def connection_counts(self) -> ConnectionStore:
        """The node's open connections per user."""

    @property
    @abc.abstractmethod
    def records(self) -> NodeRecords | None:
        """The node's records in the layer's store; None when it keeps none (`keeps_records`)."""

    @abc.abstractmethod
    def describe_hosts(self) -> str:
        """Where the layer connects, passwords redacted, naming the setting (for messages)."""

    @abc.abstractmethod
    def unavailable(self, exc: BaseException) -> LayerUnavailable:
        """exc, this layer failing or not answering in time, as our error naming where."""

    @abc.abstractmethod
    async def start_process(self, wait: float | None) -> None:
        """This process's start-up work: wait up to `wait` s for the layer (None: one attempt),
        remove what dead processes left, start the fan-out; StartupError when it cannot."""

    @abc.abstractmethod
    async def stop_process(self) -> None:
        """Stop this process's loops and withdraw what it wrote (best effort, bounded)."""

    @abc.abstractmethod
    async def open_position(self, group: str) -> GroupPosition:
        """The stream position of a client subscribing to group now (after joining it)."""

    @abc.abstractmethod
    async def read_history(
        self, group: str, position: GroupPosition, margin_ms: int = 0
    ) -> tuple[str | None, Replay]:
        """(this node's origin tag or None, what it holds of group after position); a layer
        keeping no history answers a Replay with its reset reason."""

    @abc.abstractmethod
    async def remember_nonce(self, nonce: str, ttl: float) -> bool:
        """Remember a peer handshake's nonce on this node for ttl s; False if it was seen before."""

    @classmethod
    @abc.abstractmethod
    def send_blocking(cls, group: str, message: dict[str, Any], timeout: float) -> None:
        """group_send from sync code (no running event loop); LayerUnavailable when it fails."""

    @abc.abstractmethod
    async def group_send_many(self, messages: Sequence[tuple[str, dict[str, Any]]]) -> None:
        """group_send each (group, message) in order, as one batch; BatchEmitError saying which
        were sent, which not and which may have been when it fails."""

    @classmethod
    @abc.abstractmethod
    def send_many_blocking(cls, messages: Sequence[tuple[str, dict[str, Any]]], timeout: float) -> None:
        """group_send_many from sync code; BatchEmitError when it fails."""

    @classmethod
    @abc.abstractmethod
    def ping_blocking(cls, timeout: float) -> None:
        """Check the layer answers, from sync code (readiness); LayerUnavailable when it does not."""
