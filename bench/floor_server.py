"""The floor for Python: a plain `websockets` server relaying Redis pub/sub with `websockets.broadcast()`.
No Django, no Channels. Usage: python -m bench.floor_server PORT REDIS_URL

A client connecting to `/?group=<name>` is attached to group <name>. The server holds one Redis
pub/sub subscription per group that has clients (channel <name>), all on one PubSub connection:
subscribed when the group's first client comes, unsubscribed when its last one leaves. Each
message on a channel goes to that group's clients with one broadcast(). Fan-out (many clients, one
group) and own-group (one group per client) are the same program.
"""

from __future__ import annotations

import asyncio
import sys
from urllib.parse import parse_qs, urlsplit

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from websockets.asyncio.server import ServerConnection, broadcast, serve

# group name -> its connected clients; a group is here exactly while it has clients.
GROUPS: dict[str, set[ServerConnection]] = {}


def group_of(ws: ServerConnection) -> str:
    """The group named by the request's `?group=`."""
    assert ws.request is not None
    return parse_qs(urlsplit(ws.request.path).query)["group"][0]


async def handler(ws: ServerConnection, pubsub: PubSub) -> None:
    """Attach the client to its group for as long as it is connected."""
    group = group_of(ws)
    members = GROUPS.setdefault(group, set())
    members.add(ws)
    try:
        if len(members) == 1:  # the group's first client (commands go out in call order)
            await pubsub.subscribe(group)
        await ws.wait_closed()
    finally:
        members.discard(ws)
        if not members and GROUPS.get(group) is members:
            del GROUPS[group]
            await pubsub.unsubscribe(group)


async def relay(pubsub: PubSub) -> None:
    """Each message on a group's channel to that group's clients."""
    while True:
        message = await pubsub.get_message(timeout=None)
        if message is not None and message["type"] == "message":
            members = GROUPS.get(message["channel"].decode())
            if members:
                broadcast(members, message["data"].decode())


async def main(port: int, redis_url: str) -> None:
    """Serve on port until stopped."""
    pubsub = Redis.from_url(redis_url).pubsub()
    await pubsub.connect()  # the one connection, before any subscription (the relay reads it)
    async with serve(lambda ws: handler(ws, pubsub), "127.0.0.1", port, max_queue=None):
        await relay(pubsub)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
