"""A client that stops reading is cut off before it grows the server's memory; others go on."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from pathlib import Path

import psutil
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from awx_ws.main.emit import aemit_channel_notification
from tests.client import emit_to, open_ws, redis_at
from tests.sse import open_sse
from tests.waiting import eventually

pytestmark = [pytest.mark.slow, pytest.mark.every_server]

MESSAGES = 600
PAYLOAD = "x" * 64 * 1024  # 600 x 64 KiB: about 38 MiB to each subscriber


def slow_closes(log: Path) -> int:
    return len(re.findall(r"WARNING .* closing slow client", log.read_text()))


async def test_a_client_that_stops_reading_is_closed_and_memory_stays_bounded(daphne_factory, token):
    server = daphne_factory({"AWX_WS_SLOW_CLIENT_MAX_BYTES": str(2 * 1024 * 1024)})
    headers = {"Authorization": f"Token {token}"}
    item = f"slow{time.monotonic_ns()}"
    # No permessage-deflate (which uvicorn and hypercorn accept): it would shrink the 64 KiB of one
    # character to nothing, and compressing 32 MiB/s costs more CPU than this machine has.
    fast = await open_ws(server.url, headers=headers, compression=None)
    await fast.subscribe({"schedules": [item]})

    # The slow client: a tiny receive buffer, and a websocket client that stops reading from the
    # socket after one unread message.
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow = await connect(
        f"{server.url}/websocket/", sock=sock, additional_headers=headers, max_queue=1, compression=None
    )
    json.loads(await slow.recv())  # accept
    await slow.send(json.dumps({"groups": {"schedules": [item]}}))
    json.loads(await slow.recv())  # groups reply

    daphne = psutil.Process(server.pid)
    rss_before = daphne.memory_info().rss

    async def read_fast() -> list[int]:
        return [(await fast.recv_json(10))["n"] for _ in range(MESSAGES)]

    reader = asyncio.create_task(read_fast())
    for n in range(MESSAGES):
        await aemit_channel_notification(f"schedules-{item}", {"n": n, "pad": PAYLOAD})
        await asyncio.sleep(0.002)  # about 32 MiB/s: a reading client keeps up
    # The fast client gets everything, in order, while the slow one is dealt with.
    assert await reader == list(range(MESSAGES))
    rss_growth = daphne.memory_info().rss - rss_before
    assert slow_closes(server.log) == 1
    # 38 MiB went to a client that read none of it; the server kept at most ~2 MiB of it.
    assert rss_growth < 16 * 1024 * 1024, f"daphne grew {rss_growth / 2**20:.1f} MiB"

    # When the slow client reads again it finds the messages it was sent, then the end.
    got = []
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            got.append(json.loads(await asyncio.wait_for(slow.recv(), 10))["n"])
    assert got == list(range(len(got))) and len(got) < MESSAGES
    # 4008 when it reads the close frame in time; otherwise the server aborted the connection.
    assert closed.value.rcvd is None or closed.value.rcvd.code == 4008
    await fast.assert_silent()
    await fast.close()


async def test_an_sse_client_that_stops_reading_is_cut_off(daphne_factory, token, redis_server):

    server = daphne_factory({"AWX_WS_SLOW_CLIENT_MAX_BYTES": str(2 * 1024 * 1024)})
    item = f"slowsse{time.monotonic_ns()}"
    group = f"schedules-{item}"
    # A raw HTTP client that sends its request and never reads the response.
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port, limit=4096, ssl=None)
    writer.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    writer.transport.pause_reading()
    writer.write(
        f"GET /api/v2/stream/?groups={group} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Token {token}\r\n\r\n".encode()
    )
    redis = redis_at(redis_server.url)
    await eventually(lambda: redis.zcard(f"asgi:group:{group}"), 20, "the stream to join its group")
    daphne = psutil.Process(server.pid)
    rss_before = daphne.memory_info().rss
    for n in range(MESSAGES):
        await aemit_channel_notification(group, {"n": n, "pad": PAYLOAD})
        await asyncio.sleep(0.002)

    async def group_left() -> bool:
        return await redis.zcard(f"asgi:group:{group}") == 0

    await eventually(group_left, 20, "the cut-off stream to let go of its group")
    assert re.findall(r"WARNING .* cutting off slow stream", server.log.read_text())
    rss_growth = daphne.memory_info().rss - rss_before
    assert rss_growth < 16 * 1024 * 1024, f"daphne grew {rss_growth / 2**20:.1f} MiB"
    writer.close()
    await redis.aclose()


async def test_clients_that_keep_reading_are_never_cut_off_however_many_messages_they_get(
    daphne_factory, token, own_redis
):
    """The limits count what waits from before each write, not the frame just written (which a
    server without direct writes always holds for a moment)."""
    server = daphne_factory({"REDIS_URL": own_redis.url, "AWX_WS_SLOW_CLIENT_MAX_MESSAGES": "20"})
    headers = {"Authorization": f"Token {token}"}
    item = f"steady{time.monotonic_ns()}"
    group = f"schedules-{item}"
    client = await open_ws(server.url, headers=headers)
    await client.subscribe({"schedules": [item]})
    async with open_sse(server.http_url, group, headers=headers) as stream:
        await stream.wait_ready()
        for n in range(200):  # ten times the limit, each read before the next is sent
            await emit_to(own_redis.url, group, {"n": n})
            assert await client.recv_json() == {"n": n}
            assert await stream.payloads(1) == [{"n": n}]
    await client.close()
    assert slow_closes(server.log) == 0
    assert "cutting off slow stream" not in server.output()
