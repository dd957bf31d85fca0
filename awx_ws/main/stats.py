"""What a server process holds right now, published beside its liveness record.

Each daphne process writes these figures to `<prefix>:process-stats:<client prefix>` with every
liveness heartbeat (layers/redis_presence.py), so operators and tests can see per process how many sockets,
streams, groups and asyncio tasks it holds, without attaching to it.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass


@dataclass
class ProcessStats:
    """Counters of open client connections in this process."""

    websockets: int = 0
    streams: int = 0

    def snapshot(self, groups: int) -> dict[str, str]:
        """The figures as stored in Redis, with the number of groups the fan-out holds."""
        return {
            "pid": str(os.getpid()),
            "websockets": str(self.websockets),
            "streams": str(self.streams),
            "groups": str(groups),
            "tasks": str(len(asyncio.all_tasks())),
            "updated": f"{time.time():.3f}",
        }


process_stats = ProcessStats()
