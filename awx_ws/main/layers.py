"""Our channel layer: channels_redis's core layer plus a liveness record for its process."""

from __future__ import annotations

from channels_redis import core

from awx_ws.main.exceptions import redact_url
from awx_ws.main.fanout import Fanout
from awx_ws.main.liveness import Liveness


class RedisChannelLayer(core.RedisChannelLayer):
    """channels_redis core layer whose process is marked alive in Redis while it owns channels.

    The start-up purge (routing.AWXProtocolTypeRouter) removes only state of processes without a
    live record, so several daphne processes can share one Redis safely.
    """

    _liveness: Liveness | None = None
    _fanout: Fanout | None = None

    @property
    def liveness(self) -> Liveness:
        """This process's liveness record keeper (created on first use, no I/O)."""
        if self._liveness is None:
            self._liveness = Liveness(self)
        return self._liveness

    @property
    def fanout(self) -> Fanout:
        """This process's group fan-out to client sockets (created on first use, no I/O)."""
        if self._fanout is None:
            self._fanout = Fanout(self)
        return self._fanout

    async def new_channel(self, prefix: str = "specific") -> str:
        """A new process-specific channel; the process is marked alive before the name is used."""
        await self.liveness.start()
        return await super().new_channel(prefix)

    def describe_hosts(self) -> str:
        """The Redis addresses of this layer for messages (passwords redacted), naming REDIS_URL."""
        addresses = [redact_url(str(host.get("address", host))) for host in self.hosts]
        return "REDIS_URL=" + ",".join(addresses)
