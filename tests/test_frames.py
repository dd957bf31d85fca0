"""A received batch's frames: framed once per message, one write per socket, in batch order."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from autobahn.twisted.websocket import WebSocketServerFactory
from prometheus_client import CollectorRegistry, Counter

from awx_ws.main.frames import STATE_OPEN, FrameBatch
from awx_ws.main.metrics import Tally

pytestmark = pytest.mark.unit


@dataclass(eq=False)
class Socket:
    """daphne's protocol object as the writer sees it: writes recorded."""

    factory: Any = field(default_factory=WebSocketServerFactory)
    state: int = STATE_OPEN
    writes: list[tuple[bytes, int]] = field(default_factory=list)
    broken: bool = False

    def send_frames(self, data: bytes, count: int) -> None:
        if self.broken:
            raise ConnectionResetError("gone")
        self.writes.append((data, count))


@dataclass(eq=False)
class Member:
    frame_protocol: Any = None
    transport: str = "websocket"
    viewer: Any = None


def frame(text: str) -> bytes:
    return WebSocketServerFactory().prepareMessage(text.encode(), doNotCompress=True).payloadHybi


class Recorded:
    """A Tally's counts, read back without the metrics files."""

    def __init__(self) -> None:
        self.counts: dict[str, float] = {}

    def add(self, label: str, amount: float = 1) -> None:
        self.counts[label] = self.counts.get(label, 0) + amount


def test_each_socket_gets_its_frames_of_a_batch_in_one_write_in_order():
    a, b = Socket(), Socket()
    on_a, on_b, sse = Member(a), Member(b), Member(None, transport="sse")
    batch = FrameBatch()
    assert batch.add([on_a, on_b, sse], '{"n": 1}') == [sse]  # no frame protocol: delivered apart
    assert batch.add([on_a], '{"n": 2}') == []
    assert batch.add([on_b, on_a], '{"n": 3}') == []
    delivered, dropped = Recorded(), Recorded()
    batch.flush(delivered, dropped)  # type: ignore[arg-type]
    assert a.writes == [(frame('{"n": 1}') + frame('{"n": 2}') + frame('{"n": 3}'), 3)]
    assert b.writes == [(frame('{"n": 1}') + frame('{"n": 3}'), 2)]
    assert delivered.counts == {"websocket": 5} and dropped.counts == {}
    batch.flush(delivered, dropped)  # type: ignore[arg-type]
    assert len(a.writes) == 1  # flushed: nothing written twice


def test_a_closing_or_broken_socket_does_not_stop_the_others():
    closing, broken, fine = Socket(state=STATE_OPEN + 1), Socket(broken=True), Socket()
    batch = FrameBatch()
    batch.add([Member(closing), Member(broken), Member(fine)], "x")
    batch.add([Member(broken), Member(fine)], "y")
    delivered, dropped = Recorded(), Recorded()
    batch.flush(delivered, dropped)  # type: ignore[arg-type]
    assert closing.writes == [] and fine.writes == [(frame("x") + frame("y"), 2)]
    assert delivered.counts == {"websocket": 2} and dropped.counts == {"connection_closing": 3}


async def test_a_tally_writes_its_counts_to_the_counter_at_flush():
    registry = CollectorRegistry()
    tally = Tally(Counter("awx_ws_test_tallied", "a tallied counter", ["kind"], registry=registry), 60)
    tally.add("a")
    tally.add("a", 2)
    assert registry.get_sample_value("awx_ws_test_tallied_total", {"kind": "a"}) is None  # not yet
    tally.flush()
    assert registry.get_sample_value("awx_ws_test_tallied_total", {"kind": "a"}) == 3
