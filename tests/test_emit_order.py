"""Two emitters racing on one group: every client holding a position gets each message exactly
once, in the order of its id, on the emitting node and through a peer's relay.

A resumable client's position is the last id seen per origin (history.GroupPosition), so a
message that arrives behind a newer one of its origin looks already seen and is dropped. The
order a member's queue is popped in must therefore be the order the ids were given, whichever
emitter's clock was read first and whatever runs between an emitter's round trips.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from awx_ws.main.emit import build_message
from awx_ws.main.history import GroupPosition
from awx_ws.main.layers import redis as redis_layer
from awx_ws.main.layers.redis_scripts import GROUP_SEND_FANOUT_LUA
from awx_ws.main.messages import survives_lua, with_group
from tests.client import WsClient, open_ws, redis_at
from tests.servers import ROOT
from tests.test_cluster import Node, linked_pair, members, wait_for

# Emits per emitter, each a sync emit_channel_notification as API workers posting job events make
# them, and emits a second: enough for the two emitters' scripts to interleave hundreds of times.
PER_EMITTER = 1000
RATE = 300
EMITTERS = 2
# Emitted after both emitters ended: the last message in every queue.
END = {"n": "end"}


@pytest.mark.unit
def test_only_flat_messages_are_rebuilt_in_lua():
    assert survives_lua({"type": "internal.message", "text": "{}", "relayed": True, "org": 2**52})
    assert survives_lua({"type": "t", "low": -(2**53) + 1, "empty": ""})
    for value in (None, 1.5, 1.0, {}, [], b"x", 2**53, -(2**53)):
        assert not survives_lua({"type": "t", "value": value}), value
    assert not survives_lua({1: "a"})


def clock_behind(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """The layer's emits read a clock seconds behind (another host's, or one read long before
    the script ran)."""
    monkeypatch.setattr(redis_layer, "time", SimpleNamespace(time=lambda: time.time() - seconds))


async def fanout_queue(layer: Any, member: str) -> list[dict[str, Any]]:
    """What a fan-out member's queue holds, in the order it is popped (lowest score first)."""
    redis = redis_at(layer.hosts[0]["address"])
    return [layer.deserialize(blob) for blob in await redis.zrange(f"{layer.prefix}{member}", 0, -1)]


async def test_an_emitter_whose_clock_is_behind_queues_behind_what_is_already_queued(layer, monkeypatch):
    group = "schedules-skew"
    channel = await layer.new_channel()
    await layer.group_add(group, channel)
    await layer.group_add(group, "fanout.skew")
    await layer.group_send(group, build_message(group, {"n": 1}))
    clock_behind(monkeypatch, 5)
    await layer.group_send(group, build_message(group, {"n": 2}))

    queued = await fanout_queue(layer, "fanout.skew")
    assert [json.loads(m["text"])["n"] for m in queued] == [1, 2]
    received = [await layer.receive(channel) for _ in range(2)]
    assert [json.loads(m["text"])["n"] for m in received] == [1, 2]
    assert [m["id"] for m in received] == [m["id"] for m in queued]  # ids given in that order


async def test_a_relay_links_copy_is_queued_by_the_script_that_gives_the_id(layer):
    """Another emitter's whole send may run right after this emitter's script: the copy for a
    process inbox (a peer's relay link) must be queued by then, not in a round trip after it."""
    group, channel = "schedules-between", await layer.new_channel()
    await layer.group_add(group, channel)
    await layer.group_send(group, build_message(group, {"n": 0}))  # the node's history origin
    first = with_group(group, build_message(group, {"n": 1}))
    keys, args = layer.fanout_call(group, first)
    reply = await layer.connection(0).eval(GROUP_SEND_FANOUT_LUA, len(keys), *keys, *args)
    await layer.group_send(group, build_message(group, {"n": 2}))
    assert layer.after_fanout(group, first, reply) == []  # nothing left for a second round trip
    received = [json.loads((await layer.receive(channel))["text"])["n"] for _ in range(3)]
    assert received == [0, 1, 2]


async def test_a_process_inbox_gets_one_copy_naming_each_of_its_channels(layer):
    group = "schedules-inbox"
    first, second = await layer.new_channel(), await layer.new_channel()
    for channel in (first, second):
        await layer.group_add(group, channel)
    await layer.group_send(group, build_message(group, {"n": 1}))
    for channel in (first, second):
        message = await layer.receive(channel)
        assert json.loads(message["text"]) == {"n": 1} and message["group"] == group and "id" in message
    redis = redis_at(layer.hosts[0]["address"])
    assert await redis.zcard(f"{layer.prefix}{first.split('!')[0]}!") == 0


async def test_a_message_lua_cannot_pack_unchanged_still_arrives_unchanged_and_in_order(layer, monkeypatch):
    """Nested values, floats and None take the second round trip, as channels_redis sends them."""
    group, channel = "control-x", await layer.new_channel()
    await layer.group_add(group, channel)
    odd = {"type": "control.message", "nested": {}, "ratio": 1.0, "none": None, "big": 2**60}
    await layer.group_send(group, odd)
    clock_behind(monkeypatch, 5)
    await layer.group_send(group, {"type": "control.message", "n": 2})
    assert await layer.receive(channel) == {**odd, "group": group}
    assert await layer.receive(channel) == {"type": "control.message", "n": 2, "group": group}


@pytest.fixture(scope="module")
def pair(state_dir: Path, database: None) -> Iterator[tuple[Node, Node]]:
    # A relay link drains its inbox more slowly than two emitters fill it on this machine, and
    # channels_redis drops past the inbox's capacity (docs/reliability.md, Open): room for every
    # message of the test here, so that what is checked is the order, whatever the machine's load.
    settings = {"CHANNEL_LAYER_CAPACITY": str(2 * EMITTERS * PER_EMITTER)}
    with linked_pair(state_dir, ["orderA", "orderB"], settings=settings) as nodes:
        yield nodes


def start_emitter(node: Node, group: str, first: int) -> subprocess.Popen[str]:
    """PER_EMITTER emits to group on node at RATE a second, numbered from first."""
    command = [sys.executable, "-m", "tests.sentinel_emitter", group, str(PER_EMITTER), str(RATE), str(first)]
    return subprocess.Popen(command, cwd=ROOT, env=node.env, stdout=subprocess.PIPE, text=True)


async def collect(client: WsClient, until: Any, into: list[dict[str, Any]]) -> None:
    """Frames of client into `into`, up to and including the one whose payload is `until`; at
    most 30 s without a frame."""
    while True:
        try:
            frame = await client.recv_json(timeout=30)
        except TimeoutError:
            return  # check_delivery reports it, with what did arrive
        into.append(frame)
        if frame["data"] == until:
            return


def check_delivery(frames: list[dict[str, Any]], where: str) -> None:
    assert frames and frames[-1]["data"] == END, f"{where}: no end marker after {len(frames)} frames"
    numbers = [frame["data"]["n"] for frame in frames[:-1]]
    expected = {first + n for first in range(0, EMITTERS * 10**6, 10**6) for n in range(PER_EMITTER)}
    missing, repeated = expected - set(numbers), len(numbers) - len(set(numbers))
    assert not missing and not repeated, (
        f"{where}: {len(missing)} missing (e.g. {sorted(missing)[:5]}), {repeated} repeated"
    )
    # Each frame's id is the client's position after it: one origin here, the emitting node's.
    positions = [GroupPosition.parse(frame["id"]).seen for frame in frames]
    assert all(len(seen) == 1 for seen in positions)
    ids = [next(iter(seen.values())) for seen in positions]
    assert all(b > a for a, b in zip(ids, ids[1:], strict=False)), f"{where}: a position went back"
    for first in range(0, EMITTERS * 10**6, 10**6):
        own = [n for n in numbers if first <= n < first + 10**6]
        assert own == sorted(own), f"{where}: an emitter's messages out of its own order"


@pytest.mark.slow
async def test_racing_emitters_reach_every_position_holder_once_and_in_id_order(pair, token):
    a, b = pair
    item = f"race{time.monotonic_ns()}"
    group = f"schedules-{item}"
    headers = {"Authorization": f"Token {token}"}
    local, relayed = await open_ws(b.url, headers=headers), await open_ws(a.url, headers=headers)
    for client in (local, relayed):
        errors, _reply = await client.subscribe({"schedules": [item]}, ids=True)
        assert errors == []

    async def forwarded() -> bool:  # B's fan-out and A's relay link are members on B
        return await members(b, group) == 2

    await wait_for(forwarded, 20, "A's relay to have B forward the group")
    frames: dict[str, list[dict[str, Any]]] = {"local": [], "relayed": []}
    receivers = [
        asyncio.create_task(collect(client, END, frames[name]))
        for name, client in (("local", local), ("relayed", relayed))
    ]
    emitters = [start_emitter(b, group, first) for first in range(0, EMITTERS * 10**6, 10**6)]
    try:
        outputs = await asyncio.gather(*(asyncio.to_thread(p.communicate, timeout=120) for p in emitters))
        for process, (stdout, _stderr) in zip(emitters, outputs, strict=True):
            assert process.returncode == 0
            lines = [json.loads(line) for line in stdout.splitlines()]
            assert len(lines) == PER_EMITTER and not any(line["error"] for line in lines)
        # After both emitters: the last in every queue, so everything before it has arrived.
        await b.emit(group, END)
        await asyncio.wait(receivers, timeout=90)
    finally:
        for process in emitters:
            process.kill()
            process.wait()
        for task in receivers:
            task.cancel()
        await asyncio.gather(*receivers, return_exceptions=True)
        await local.close()
        await relayed.close()
    check_delivery(frames["local"], "on the emitting node")
    check_delivery(frames["relayed"], "through the relay")
