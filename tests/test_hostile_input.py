"""Hostile input: a seeded fuzz of 1,200 frames, and subscribe storms. Every frame gets an error
reply or a documented close; nothing is logged at ERROR; other clients go on unaffected."""

from __future__ import annotations

import asyncio
import json
import random
import re
from collections import Counter
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from awx_ws.main.emit import aemit_channel_notification
from tests.client import open_ws
from tests.waiting import eventually

pytestmark = [pytest.mark.slow, pytest.mark.both_runners]

# Sent after each fuzz frame; its error reply, which no fuzz frame can get, ends that frame's replies.
SENTINEL = json.dumps({"groups": {"sentinel_kind": []}})
SENTINEL_ERROR = "unknown group kind 'sentinel_kind'"


def odd_names(rng: random.Random) -> list[Any]:
    return [
        "",
        " ",
        "a b",
        "../etc",
        "é",
        "\u0000",
        "x" * 120,
        "status_changed",
        rng.choice(["-", ".", "_"]) * rng.randint(1, 5),
        None,
        True,
        3.5,
        -1,
        {"nested": "object"},
        [1, 2],
        "\ud83d\ude00",
    ]


def odd_ids(rng: random.Random) -> list[Any]:
    return [
        0,
        -1,
        -(2**63),
        2**63,
        2**64 + 1,
        10**100,
        1.5,
        float("1e308"),
        "42",
        "4x",
        "",
        None,
        True,
        [],
        {},
    ]


def fuzz_frames(seed: int, count: int) -> list[tuple[str, Any]]:
    """(kind, frame): text frames (str), binary frames (bytes) and raw text bytes (invalid UTF-8)."""
    rng = random.Random(seed)
    kinds = [
        "jobs",
        "schedules",
        "inventories",
        "control",
        "job_events",
        "workflow_events",
        "broadcast",
        "awx_ws",
        "nope",
        "",
    ]
    frames: list[tuple[str, Any]] = []
    for _ in range(count):
        choice = rng.randrange(12)
        if choice == 0:  # malformed JSON
            text = json.dumps({"groups": {"jobs": ["status_changed"]}})
            frames.append(
                ("malformed", text[: rng.randrange(len(text))] + rng.choice(["", "}", "]", ",", "\\", '"']))
            )
        elif choice == 1:  # nested deeply
            depth = rng.choice([50, 1000, 100_000])
            frames.append(
                (
                    "nested",
                    "[" * depth + "]" * depth if rng.random() < 0.5 else '{"a":' * depth + "1" + "}" * depth,
                )
            )
        elif choice == 2:  # binary
            frames.append(("binary", rng.randbytes(rng.randrange(1, 512))))
        elif choice == 3:  # over our frame limit (64 KiB), under daphne's 1 MiB
            frames.append(("large", json.dumps({"groups": {"jobs": ["x" * rng.randrange(70_000, 200_000)]}})))
        elif choice == 4:  # 10,000 groups
            frames.append(("many", json.dumps({"groups": {"jobs": [f"g{n}" for n in range(10_000)]}})))
        elif choice == 5:  # odd group names
            frames.append(
                ("names", json.dumps({"groups": {rng.choice(kinds): [rng.choice(odd_names(rng))]}}))
            )
        elif choice == 6:  # odd ids
            frames.append(
                ("ids", json.dumps({"groups": {"job_events": [rng.choice(odd_ids(rng))]}}, allow_nan=True))
            )
        elif choice == 7:  # odd shapes
            shape = rng.choice(
                [
                    [],
                    "groups",
                    1,
                    None,
                    {"groups": []},
                    {"groups": None},
                    {"groups": {"jobs": "x"}},
                    {"nogroups": 1},
                    {"groups": {}, "recover": 5},
                    {"groups": {}, "ids": "yes"},
                ]
            )
            frames.append(("shape", json.dumps(shape)))
        elif choice == 8:  # random printable junk
            frames.append(
                ("junk", "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(1, 200))))
            )
        elif choice == 9:  # numbers and floats where objects go
            frames.append(
                (
                    "numbers",
                    json.dumps({"groups": {"job_events": [rng.uniform(-1e9, 1e9) for _ in range(5)]}}),
                )
            )
        elif choice == 10:  # recover garbage
            frames.append(
                (
                    "recover",
                    json.dumps(
                        {
                            "groups": {"jobs": ["status_changed"]},
                            "recover": {
                                "jobs-status_changed": rng.choice(
                                    ["", "x", "1,2", "1,a:b", "9" * 30, 5, None]
                                )
                            },
                        }
                    ),
                )
            )
        else:  # a valid request now and then
            frames.append(
                (
                    "valid",
                    json.dumps(
                        {"groups": {"jobs": ["status_changed"], "schedules": [f"s{rng.randrange(5)}"]}}
                    ),
                )
            )
    # The connection-ending kinds, a few of each.
    frames += [("huge", json.dumps({"groups": {"jobs": ["x" * (1024 * 1024 + 10)]}}))] * 3
    frames += [("utf8", b'{"groups": {"jobs": ["\xff\xfe"]}}')] * 3
    return frames


async def fresh(url: str, headers: dict[str, str]) -> ClientConnection:
    ws = await connect(url, additional_headers=headers, max_size=2**24)
    json.loads(await ws.recv())  # accept
    return ws


async def send(ws: ClientConnection, kind: str, frame: Any) -> None:
    if kind == "utf8":
        await ws.send(frame, text=True)  # text frame bytes, not valid UTF-8
    else:
        await ws.send(frame)


async def replies_until_sentinel(ws: ClientConnection) -> list[dict[str, Any]]:
    """The replies to one fuzz frame: everything before the sentinel's own error reply."""
    replies = []
    while True:
        reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if reply == {"error": SENTINEL_ERROR}:
            return replies
        replies.append(reply)


async def test_1200_fuzzed_frames_get_answers_or_documented_closes(daphne_factory, token):
    server = daphne_factory({"AWX_WS_SUBSCRIBE_RATE": "1000000"})
    headers = {"Authorization": f"Token {token}"}
    url = f"{server.url}/websocket/"
    watcher = await open_ws(server.url, headers=headers)
    await watcher.subscribe({"jobs": ["fuzzwatch"]})

    outcomes: Counter[str] = Counter()
    ws = await fresh(url, headers)
    for kind, frame in fuzz_frames(seed=20261124, count=1200):
        try:
            await send(ws, kind, frame)
            if kind in ("huge", "utf8"):  # these end the connection: wait for its close
                await asyncio.wait_for(ws.recv(), 10)
            await ws.send(SENTINEL)
            replies = await replies_until_sentinel(ws)
        except ConnectionClosed as closed:
            # A frame over 1 MiB or text that is not UTF-8 breaks the websocket protocol: autobahn
            # (failByDrop) drops the TCP connection without a close frame, which a client reports
            # as 1006. Nothing else may end the connection.
            assert kind in ("huge", "utf8") and closed.rcvd is None, (kind, closed)
            code = 1006
            outcomes[f"closed {code}"] += 1
            ws = await fresh(url, headers)
            continue
        assert replies, (kind, frame if len(str(frame)) < 200 else str(frame)[:200])
        last = replies[-1]
        assert "error" in last or "groups_current" in last, (kind, replies)
        outcomes["reply" if "groups_current" in last else "error"] += 1
    await ws.close()
    assert sum(outcomes.values()) == 1206
    assert outcomes["closed 1006"] == 6

    # The other client was never disturbed, and nothing went to the log at ERROR.
    await aemit_channel_notification("jobs-fuzzwatch", {"still": "here"})
    assert await watcher.recv_json() == {"still": "here"}
    await watcher.close()
    log = server.output()
    assert not re.search(r" (ERROR|CRITICAL) ", log), re.findall(r".* ERROR .*", log)[:5]
    assert "Traceback" not in log


async def test_subscribe_storms_are_refused_past_the_rate(daphne_factory, token):
    # 5 per 20 s: the bucket refills one frame every 4 s, far longer than the storm below takes
    # even on a loaded machine (with 5 per 1 s, a refill mid-storm let one frame through).
    server = daphne_factory({"AWX_WS_SUBSCRIBE_RATE": "5", "AWX_WS_SUBSCRIBE_WINDOW": "20"})
    headers = {"Authorization": f"Token {token}"}
    stormy, calm = await open_ws(server.url, headers=headers), await open_ws(server.url, headers=headers)
    for _ in range(5):
        errors, _reply = await stormy.subscribe({"jobs": ["status_changed"]})
        assert errors == []
    refused = [await stormy.request_error(json.dumps({"groups": {"jobs": ["x"]}})) for _ in range(50)]
    assert set(refused) == {"too many requests: at most 5 messages per 20 s, try again later"}
    # One log line for the burst, not fifty.
    assert server.output().count("sends frames too fast") == 1
    # Others are not held back, and the storm passes: the budget refills (one frame per 4 s).
    errors, reply = await calm.subscribe({"jobs": ["status_changed"]})
    assert errors == [] and reply["groups_current"] == ["jobs-status_changed"]

    async def accepted() -> dict | None:
        # A refused frame takes no token: asking again and again does not delay the refill.
        await stormy.send_json({"groups": {"jobs": ["status_changed", "x"]}})
        reply = await stormy.recv_json()
        return None if "error" in reply else reply

    reply = await eventually(accepted, 10, "the stormy client's budget to refill (one frame per 4 s)")
    assert reply["groups_current"] == ["jobs-status_changed", "jobs-x"]
    await stormy.close()
    await calm.close()


def test_the_frame_budget_refills_steadily_up_to_its_limit():
    from awx_ws.main.protocol import RateLimit

    rate = RateLimit(5, 20.0, now=0.0)
    assert [rate.allow(0.0) for _ in range(6)] == [True] * 5 + [False]
    assert not rate.allow(3.9)  # one frame per 4 s
    assert rate.allow(4.0) and not rate.allow(4.0)
    assert [rate.allow(1000.0) for _ in range(6)] == [True] * 5 + [False]  # never more than the limit
