"""The floor for Python: a plain `websockets` server relaying one Redis pub/sub subscription with
`websockets.broadcast()`. No Django, no Channels. Usage: python -m bench.floor_server PORT REDIS_URL"""

from __future__ import annotations

import asyncio
import sys

from redis.asyncio import Redis
from websockets.asyncio.server import broadcast, serve

CLIENTS: set = set()


async def handler(ws) -> None:
    CLIENTS.add(ws)
    try:
        await ws.wait_closed()
    finally:
        CLIENTS.discard(ws)


async def relay(redis_url: str) -> None:
    pubsub = Redis.from_url(redis_url).pubsub()
    await pubsub.subscribe("bench")
    async for message in pubsub.listen():
        if message["type"] == "message":
            broadcast(CLIENTS, message["data"].decode())


async def main(port: int, redis_url: str) -> None:
    async with serve(handler, "127.0.0.1", port, max_queue=None):
        await relay(redis_url)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
