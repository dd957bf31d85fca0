"""A node whose clients hold 100,000 groups: its relay's link to a peer comes up whole, and comes
back after the relay or the peer's daphne restarts, with messages crossing both ways.

Sent in one frame, that much interest (some 2.8 MB) is over the 1 MiB a peer's daphne accepts
(peer_protocol.FRAME_BUDGET): the peer dropped it with the link at every reconnect, and nothing
emitted there reached the node again."""

from __future__ import annotations

import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.client import WsClient, open_ws, redis_at
from tests.servers import Process
from tests.test_cluster import Node, make_nodes, wait_for

pytestmark = pytest.mark.slow

GROUPS = 100_000
ITEM = "held"  # the groups are schedules-held000000 ... schedules-held099999
# The first, a middle and the last group in the order the relay sends them: each in another part.
PROBES = [f"{ITEM}{n:06d}" for n in (0, GROUPS // 2, GROUPS - 1)]


@pytest.fixture(scope="module")
def pair(state_dir: Path, database: None) -> Iterator[tuple[Node, Node]]:
    # A back-off capped at 2 s: a returning peer is dialled again within 2 s.
    settings = {"BROADCAST_WEBSOCKET_BACKOFF_MAX": "2"}
    a, b = make_nodes(state_dir, ["wideA", "wideB"], settings)
    try:
        for node in (a, b):
            node.start()
        yield a, b
    finally:
        for node in (a, b):
            node.stop()
            node.redis.stop()


@pytest.fixture
def holder(pair: tuple[Node, Node]) -> Iterator[Process]:
    """A process of node A holding the 100,000 groups (tests/interest_holder.py)."""
    a, _ = pair
    argv = [sys.executable, "-m", "tests.interest_holder", f"schedules-{ITEM}", str(GROUPS)]
    process = Process("interest-holder", argv, a.workdir / "interest-holder.log", a.env).start()
    try:
        assert process.wait_for_output(f"holding {GROUPS}", 120), process.output()
        yield process
    finally:
        process.stop()


async def subscribed(node: Node, token: str) -> WsClient:
    """A client of node holding the probe groups (all within A's 100,000)."""
    client = await open_ws(node.url, headers={"Authorization": f"Token {token}"})
    errors, _ = await client.subscribe({"schedules": PROBES})
    assert errors == []
    return client


async def arrives(sender: Node, client: WsClient, group: str, label: str) -> None:
    """Emit on sender until client has it (the link may still be coming up)."""
    payload = {"probe": label}

    async def once() -> bool:
        await sender.emit(group, payload)
        try:
            while (await client.recv_json(timeout=1)) != payload:
                pass  # an earlier probe's copy
            return True
        except TimeoutError:
            return False

    await wait_for(once, 90, f"{label} to arrive")


async def forwarded_to(node: Node, other: Node) -> int:
    """How many groups other has acknowledged forwarding to node (what resumes wait on)."""
    redis = redis_at(node.redis.url)
    try:
        return int(await redis.scard(f"asgi:relay-forwarding:127.0.0.1:{other.daphne_port}"))
    finally:
        await redis.aclose()


async def both_ways(a: Node, b: Node, on_a: WsClient, on_b: WsClient, stage: str) -> None:
    """Messages cross A→B and B→A for groups spread over A's interest; B forwards all of it."""
    for item in PROBES:
        await arrives(b, on_a, f"schedules-{item}", f"{stage}: B to A, {item}")
        await arrives(a, on_b, f"schedules-{item}", f"{stage}: A to B, {item}")

    # The probes crossed on the link up now (a new link starts with no acknowledgement), and B
    # acknowledges every part of A's interest on it.
    async def all_forwarded() -> bool:
        return await forwarded_to(a, b) == GROUPS

    await wait_for(all_forwarded, 90, f"{stage}: B to acknowledge all {GROUPS} groups")


@pytest.fixture
async def clients(pair: tuple[Node, Node], token: str) -> AsyncIterator[list[WsClient]]:
    a, b = pair
    opened = [await subscribed(a, token), await subscribed(b, token)]
    yield opened
    for client in opened:
        await client.close()


async def test_100000_groups_of_interest_cross_after_either_side_restarts(pair, holder, clients, token):
    a, b = pair
    on_a, on_b = clients
    started = time.monotonic()
    await both_ways(a, b, on_a, on_b, "first")
    print(f"100,000 groups forwarded {time.monotonic() - started:.1f}s after they were held")

    # The dialling side: A's relay process restarts and sends the whole interest again.
    assert a.relay is not None
    a.relay.stop()
    a.relay.start()
    started = time.monotonic()
    await both_ways(a, b, on_a, on_b, "relay restarted")
    print(f"relay restart: 100,000 groups forwarded again in {time.monotonic() - started:.1f}s")

    # The serving side: B's daphne restarts; A's relay dials it again, and B's client comes back.
    assert b.daphne is not None
    b.daphne.stop()
    # Its start-up purge may first remove the 100,000 memberships the stopped process's link held
    # (a leave cut short by the shutdown): a page of 500 group keys per two round trips, seconds.
    began = time.monotonic()
    b.daphne.start()
    print(f"peer restart: listening after {time.monotonic() - began:.1f}s")
    started = time.monotonic()
    await on_b.close()  # closed by the restart already
    on_b = clients[1] = await subscribed(b, token)
    await both_ways(a, b, on_a, on_b, "peer restarted")
    print(f"peer restart: 100,000 groups forwarded again in {time.monotonic() - started:.1f}s")
