"""Resuming on another node of a 2-node cluster: the history of each message lives where it was
emitted, the resuming node asks its peer for its part, and nothing is missed or repeated."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from awx_ws.main.history import GroupPosition
from tests.client import WsClient, open_ws
from tests.test_cluster import Node, linked_pair, members, wait_for

# Two nodes sharing one database, as AWX nodes do: part of the PostgreSQL pass too.
pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.both_runners]


@pytest.fixture(scope="module")
def pair(state_dir: Path, database: None, runner: str) -> Iterator[tuple[Node, Node]]:
    with linked_pair(state_dir, ["pairA", "pairB"], runner) as nodes:
        yield nodes


async def connect(node: Node, token: str) -> WsClient:
    return await open_ws(node.url, headers={"Authorization": f"Token {token}"})


async def seen_one(node: Node, token: str, item: str) -> str:
    """Subscribe on node with ids, receive one message emitted there, leave: the position then."""
    client = await connect(node, token)
    await client.subscribe({"schedules": [item]}, ids=True)
    await node.emit(f"schedules-{item}", {"n": 0})
    position = (await client.recv_json())["id"]
    await client.close()
    return position


async def data_frames(client: WsClient, count: int) -> list[Any]:
    return [(await client.recv_json())["data"] for _ in range(count)]


async def test_a_client_resumes_on_the_other_node_without_loss_or_duplicates(pair, token):
    a, b = pair
    item = f"pair{time.monotonic_ns()}"
    group = f"schedules-{item}"

    last_id = await seen_one(a, token, item)

    # While the client is away, 30 messages are emitted on A; B holds none of them.
    for n in range(1, 31):
        await a.emit(group, {"n": n})
    on_b = await connect(b, token)
    errors, reply = await on_b.subscribe({"schedules": [item]}, recover={group: last_id})
    assert errors == [] and reply["groups_joined"] == [group]
    assert await data_frames(on_b, 30) == [{"n": n} for n in range(1, 31)]
    assert await on_b.recv_json() == {"recovered": {group: 30}, "reset": {}, "positions": {}}
    # Live from both nodes afterwards: B's relay has A forwarding the group already.
    await a.emit(group, {"n": "from A"})
    await b.emit(group, {"n": "from B"})
    live = [await on_b.recv_json() for _ in range(2)]
    assert sorted(frame["data"]["n"] for frame in live) == ["from A", "from B"]
    await on_b.assert_silent(0.5)
    position = GroupPosition.parse(live[-1]["id"])
    assert len(position.seen) == 2  # it has seen messages of both origins
    await on_b.close()

    # Back to A, after messages from both nodes: each node's part comes from its own history.
    await b.emit(group, {"n": "B while away"})
    await a.emit(group, {"n": "A while away"})
    on_a = await connect(a, token)
    await wait_for(lambda: _is(members(b, group), 0), 10, "B to stop forwarding to nobody")
    errors, reply = await on_a.subscribe({"schedules": [item]}, recover={group: str(position)})
    assert errors == []
    replayed = await data_frames(on_a, 2)
    assert sorted(p["n"] for p in replayed) == ["A while away", "B while away"]
    assert (await on_a.recv_json())["recovered"] == {group: 2}
    await on_a.assert_silent(0.5)
    await on_a.close()


async def test_a_peer_that_is_down_makes_the_resume_say_reset(pair, token):
    a, b = pair
    item = f"down{time.monotonic_ns()}"
    group = f"schedules-{item}"
    last_id = await seen_one(a, token, item)
    b.kill()
    try:
        on_a = await connect(a, token)
        await on_a.subscribe({"schedules": [item]}, recover={group: last_id})
        summary = await on_a.recv_json()
        # B's part cannot be known: say so rather than pretend nothing was missed.
        assert summary["recovered"] == {}
        assert summary["reset"][group].startswith(f"peer 127.0.0.1:{b.daphne_port}")
        await on_a.close()
    finally:
        b.start()


async def _is(value: Any, expected: int) -> bool:
    return await value == expected
