"""channels_redis's receive, without the message a cancelled receive took with it.

A process's specific channels (`specific.<prefix>!<id>`: every consumer's channel) share one Redis
inbox. Whichever receive() holds channels_redis's receive lock pops that inbox for all of them
(`receive_single`) and routes what it popped to each channel's buffer. `receive_single` pops with
BZPOPMIN and only then copies the message to its backup queue, so a receive cancelled between
the two loses the message, and the message may be another consumer's. daphne cancels a consumer
whose client has gone (and kills one that takes too long to stop), so this happens at every
disconnect that comes at the wrong moment (see channels_redis#366, and django/channels#1683:
gaps seen only while other clients connect and disconnect in a loop). The soak lost relayed
status changes this way: a peer's short history-reading connection ended while it held the
lock, and the message it had popped was for the live relay links in the same process, to every
peer at once.

Here a pop goes on in a task of its own when its caller is cancelled, and the next receive of the
inbox (whoever holds the lock next) takes its result instead of popping again: nothing is lost,
and nothing is reordered. `receive_single` is channels_redis's private API, used here only;
tests/test_private_apis.py fails loudly if it moves.
"""

from __future__ import annotations

import asyncio
from typing import Any

from channels_redis import core

Popped = tuple[Any, dict[str, Any]]


class CancelSafeReceiveLayer(core.RedisChannelLayer):  # type: ignore[misc]
    """channels_redis's RedisChannelLayer whose inbox pops survive their caller's cancellation."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The pop of each process inbox whose caller was cancelled, for the next caller.
        self._left_pops: dict[str, asyncio.Task[Popped]] = {}

    async def receive_single(self, channel: str) -> Popped:
        """channels_redis's receive_single; on a process inbox, a pop left by a cancelled caller
        is finished and handed to the next."""
        if not channel.endswith("!"):  # a plain channel: each receive pops for itself
            popped: Popped = await super().receive_single(channel)
            return popped
        task = self._left_pops.pop(channel, None)
        if task is None or task.cancelled():
            task = asyncio.ensure_future(super().receive_single(channel))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            # The receive lock goes to the next caller, and with it this pop (or what it popped).
            if not task.cancelled() and (not task.done() or task.exception() is None):
                self._left_pops[channel] = task
            raise

    async def close_pools(self) -> None:
        """Cancel the pops no receive took over (nobody is left to receive), then close the pools."""
        left = list(self._left_pops.values())
        self._left_pops.clear()
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)
        await super().close_pools()
