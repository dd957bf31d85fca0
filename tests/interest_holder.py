"""`python -m tests.interest_holder PREFIX COUNT`: one process of a node whose fan-out holds COUNT
groups `PREFIX<n>` (n zero-padded to 6 digits) for a subscriber of its own, as a daphne process
holding that many clients' groups would. It prints `holding COUNT` once the layer has the
memberships, holds them until SIGTERM, then withdraws them (the fan-out's stop) and exits.

The node is the one the environment names (REDIS_URL, AWX_WS_NODE_NAME): the groups become that
node's interest, which its relay asks the peers to forward.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import Any

import django


class Holder:
    """A subscriber as the fan-out sees one: it counts what it is given."""

    frame_protocol: Any = None
    transport = "websocket"
    viewer: Any = None
    received = 0

    async def deliver(self, group: str, text: str, message_id: str | None) -> None:
        """Count a message."""
        self.received += 1


async def hold(prefix: str, count: int) -> None:
    """Join, say so, wait for SIGTERM, leave."""
    from channels.layers import get_channel_layer

    layer: Any = get_channel_layer()
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    holder = Holder()
    await asyncio.gather(*(layer.fanout.join(f"{prefix}{n:06d}", holder) for n in range(count)))
    print(f"holding {count}", flush=True)
    await stopping.wait()
    await layer.stop_process()
    await layer.close_pools()


def main() -> None:
    """Hold the groups the command line names."""
    prefix, count = sys.argv[1], int(sys.argv[2])
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    django.setup()
    asyncio.run(hold(prefix, count))


if __name__ == "__main__":
    main()
