"""At most AWX_WS_MAX_CONNECTIONS_PER_USER open connections per user and node (websocket and SSE
together); past it the handshake is refused with 403.

The count is the node's, shared by its daphne processes in the store its channel layer provides
(`layer.connection_counts`: Redis hashes, or the database on RabbitMQ, which keeps no shared
state). Each process also keeps its own count in memory, the truth for its open connections: when
the store may have missed a change (it was away, or restarted empty), the process's share is
written again whole from it, by the loop the store runs (`keep_synced`, started with the fan-out).
Until then the node may count too few, which lets a user past the limit for a while, or too many,
refusing one early.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

from awx_ws.main.conf import ws_settings
from awx_ws.main.exceptions import DatabaseUnavailable, LayerUnavailable
from awx_ws.main.layers import ConnectionStore, service_layer

logger = logging.getLogger(__name__)


def store_of(layer: Any) -> ConnectionStore | None:
    """The layer's connection store; None for a layer of another package (counted per process)."""
    service = service_layer(layer)
    return service.connection_counts if service is not None else None


class ConnectionCounter:
    """This process's side of the count: its open connections per user, and their share of the
    node's count."""

    def __init__(self) -> None:
        self._local: Counter[int] = Counter()
        self._missed: list[Callable[[], None]] = []
        # Releases of handshakes cancelled while their count was being written (kept referenced).
        self._pending: set[asyncio.Task[None]] = set()

    def counts(self) -> dict[int, int]:
        """This process's open connections per user."""
        return dict(self._local)

    def on_missed(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call listener (sync, no I/O) whenever a change could not be written to the store;
        returns the function that unregisters it."""
        self._missed.append(listener)

        def forget() -> None:
            if listener in self._missed:
                self._missed.remove(listener)

        return forget

    def _mark_missed(self) -> None:
        for listener in list(self._missed):
            listener()

    async def acquire(self, layer: Any, user_id: int) -> bool:
        """Count one more connection of user_id; False (nothing counted) at the limit."""
        # Shielded: daphne cancels a handshake whose client went away, and a count written by then
        # must be taken back, not left behind for good.
        work = asyncio.ensure_future(self._acquire(store_of(layer), user_id))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            work.add_done_callback(lambda done: self._release_if_counted(done, layer, user_id))
            raise

    def _release_if_counted(self, done: asyncio.Future[bool], layer: Any, user_id: int) -> None:
        if done.cancelled() or done.exception() is not None or not done.result():
            return
        task = asyncio.ensure_future(self.release(layer, user_id))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _acquire(self, store: ConnectionStore | None, user_id: int) -> bool:
        limit: int = ws_settings.MAX_CONNECTIONS_PER_USER
        if store is None:
            counted = self._local[user_id] < limit
        else:
            try:
                # The memory count changes under the store's lock with the store's, so a restore
                # never writes a count a change is about to alter again.
                async with store.lock:
                    counted = await store.acquire(user_id, limit)
                    if counted:
                        self._local[user_id] += 1
                    return counted
            except (LayerUnavailable, DatabaseUnavailable) as exc:
                # The connection cannot be served without its layer anyway; it is counted in
                # memory, and in the node's count again once the store is back.
                logger.warning("connection of user %s not counted on the node: %s", user_id, exc)
                self._mark_missed()
                counted = True
        if counted:
            self._local[user_id] += 1
        return counted

    def _forget_one(self, user_id: int) -> None:
        self._local[user_id] -= 1
        if not self._local[user_id]:
            del self._local[user_id]

    async def release(self, layer: Any, user_id: int) -> None:
        """Take back one connection of user_id (it closed)."""
        if self._local[user_id] <= 0:
            return
        store = store_of(layer)
        if store is None:
            self._forget_one(user_id)
            return
        try:
            async with store.lock:
                self._forget_one(user_id)
                await store.release(user_id)
        except (LayerUnavailable, DatabaseUnavailable) as exc:
            logger.warning("closed connection of user %s not uncounted on the node: %s", user_id, exc)
            self._mark_missed()

    async def restore(self, store: ConnectionStore) -> int:
        """Write this process's open connections into the node's count again; the users written."""
        async with store.lock:
            return await store.restore(self.counts())


counter = ConnectionCounter()
