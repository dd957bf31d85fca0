"""The fan-out's receive loop on Redis: one connection of its own, one command per wake-up.

A process's fan-out queue is usually short: with a thousand clients each on its own group, every
message wakes the loop alone. Each wake-up used to cost two commands (ZPOPMIN found nothing, then
BZPOPMIN waited), each through the pool's checkout and redis-py's retry wrapper. BZMPOP (Redis 7)
returns at once with up to `count` members when the queue has some, and waits otherwise: one
command. The connection is held by the loop between calls, so no pool checkout per message.
Redis 6 has no BZMPOP: the popper falls back to the two commands on the same connection.
"""

from __future__ import annotations

import logging
from typing import Any

from redis.exceptions import ResponseError

logger = logging.getLogger(__name__)

# Seconds a blocking pop waits before returning empty (the caller just asks again); under the
# connection's socket timeout (layers/redis.py SOCKET_TIMEOUT), so a quiet queue is not an error.
BLOCK = 5


class QueuePopper:
    """Pops a sorted-set queue in batches on one held connection of a Redis client's pool."""

    def __init__(self, client: Any, key: str, count: int) -> None:
        self.client = client
        self.key = key
        self.count = count
        self._connection: Any = None
        self._bzmpop = True

    async def pop(self) -> list[bytes]:
        """Up to count members, lowest scores first; waits up to BLOCK s for one (then [])."""
        if self._connection is None:
            self._connection = await self.client.connection_pool.get_connection()
        try:
            if self._bzmpop:
                try:
                    return await self._pop_bzmpop()
                except ResponseError as exc:
                    if "unknown command" not in str(exc).lower():
                        raise
                    self._bzmpop = False
                    logger.info("Redis has no BZMPOP (before 7.0): the fan-out pops in two commands")
            return await self._pop_two_commands()
        except BaseException:
            # Cancelled or failed mid-command: a reply may still be on its way. Never reuse it.
            await self.close()
            raise

    async def _command(self, *args: Any) -> Any:
        await self._connection.send_command(*args)
        return await self._connection.read_response()

    async def _pop_bzmpop(self) -> list[bytes]:
        reply = await self._command("BZMPOP", BLOCK, 1, self.key, "MIN", "COUNT", self.count)
        return [member for member, _score in reply[1]] if reply else []

    async def _pop_two_commands(self) -> list[bytes]:
        popped = await self._command("ZPOPMIN", self.key, self.count)
        if popped:
            return list(popped[::2])
        waited = await self._command("BZPOPMIN", self.key, BLOCK)
        return [waited[1]] if waited else []

    async def close(self) -> None:
        """Drop the held connection (a new one is taken at the next pop); never raises, so it
        cannot hide the error or cancellation that made the caller close."""
        connection, self._connection = self._connection, None
        if connection is None:
            return
        try:
            await connection.disconnect(nowait=True)
        except Exception as exc:  # a socket already broken: nothing left to close
            logger.debug("closing the fan-out's pop connection: %r", exc)
        finally:
            try:
                await self.client.connection_pool.release(connection)
            except Exception as exc:  # a pool closed meanwhile: the connection is dropped with it
                logger.debug("returning the fan-out's pop connection: %r", exc)
