"""Frames to a peer stay far under the 1 MiB its daphne accepts (peer_protocol.FRAME_BUDGET), however
much interest a node holds: a large change goes in parts, which read back to the whole change."""

from __future__ import annotations

import json
import string

import pytest

from awx_ws.main import peer_protocol as pp
from awx_ws.main.history import GroupPosition
from awx_ws.main.protocol import validate_group_name

pytestmark = pytest.mark.unit

# daphne 4.2.2's default --websocket_max_message_size (and --websocket_max_frame_size).
DAPHNE_LIMIT = 1024 * 1024
LONGEST = 99  # protocol.validate_group_name's longest name


def long_names(count: int) -> set[str]:
    """count valid group names of the longest length, `job_events-` and a padded number."""
    return {validate_group_name(f"job_events-{n:0{LONGEST - 11}d}") for n in range(count)}


def test_the_budget_is_well_under_daphnes_limit():
    assert pp.FRAME_BUDGET <= DAPHNE_LIMIT // 2


def test_100000_long_groups_of_interest_go_in_parts_under_the_budget():
    join = long_names(100_000)
    leave = {f"schedules-{n}" for n in range(5_000)}
    frames = pp.interest_frames(join, leave)
    assert len(frames) > 1
    assert all(len(frame.encode()) <= pp.FRAME_BUDGET for frame in frames)
    updates = [pp.read_request(frame) for frame in frames]
    joined = [group for update in updates for group in update.join]
    left = [group for update in updates for group in update.leave]
    # Every group once, in order, in the part that carries it: the parts make up the change.
    assert joined == sorted(join) and left == sorted(leave)
    # Full parts: no more frames than the bytes need (a part is at least half the budget).
    assert len(frames) <= 2 * sum(len(frame) for frame in frames) // pp.FRAME_BUDGET + 1


def test_the_peers_acknowledgements_are_cut_the_same_way():
    join = sorted(long_names(30_000))
    acks = [pp.read_frame(frame) for frame in pp.forwarding_frames(join, ["jobs-summary"])]
    assert len(acks) > 1
    assert all(isinstance(ack, pp.ForwardingAck) for ack in acks)
    assert [g for ack in acks for g in ack.forwarding] == join  # type: ignore[union-attr]
    assert [g for ack in acks for g in ack.dropped] == ["jobs-summary"]  # type: ignore[union-attr]
    assert all(len(frame.encode()) <= pp.FRAME_BUDGET for frame in pp.forwarding_frames(join, []))


@pytest.mark.parametrize("alphabet", ["-", "_.", string.ascii_letters + string.digits])
def test_adversarial_names_at_the_longest_length_stay_under_the_budget(alphabet):
    """Names chosen to weigh the most: the longest allowed, of characters JSON might escape."""
    names = {
        validate_group_name(("x" + alphabet * LONGEST)[: LONGEST - 6] + f"{n:06d}") for n in range(40_000)
    }
    assert len(names) == 40_000
    frames = pp.interest_frames(names, set())
    assert all(len(frame.encode()) <= pp.FRAME_BUDGET for frame in frames)
    assert sorted(g for frame in frames for g in pp.read_request(frame).join) == sorted(names)  # type: ignore[union-attr]


def test_the_budget_holds_for_any_budget_and_every_part_is_filled():
    items = [f"g{n}" * (n % 7 + 1) for n in range(2_000)]
    for budget in (64, 100, 1000, 4096):
        parts = list(pp.frames({"a": items[:1500], "b": items[1500:]}, budget))
        assert all(len(json.dumps(part)) <= budget for part in parts)
        assert [i for part in parts for i in part["a"]] == items[:1500]
        assert [i for part in parts for i in part["b"]] == items[1500:]
        # A part was closed only because the next item did not fit in it.
        for part, following in zip(parts, parts[1:], strict=False):
            first = next(iter(following["a"] or following["b"]))
            assert len(json.dumps(part)) + len(json.dumps(first)) + 2 > budget


def test_no_change_is_one_empty_update():
    assert [pp.read_request(f) for f in pp.interest_frames(set(), set())] == [pp.InterestUpdate([], [])]


def test_a_large_resume_asks_for_history_in_parts_under_the_budget():
    position = GroupPosition.parse("1700000000000,ab12cd34:1700000000000-5,ef56ab78:1700000000001-0")
    positions = {group: position for group in long_names(20_000)}
    requests = pp.history_requests(positions)
    assert len(requests) > 1
    assert all(len(request.encode()) <= pp.FRAME_BUDGET for request in requests)
    read = [pp.read_request(request) for request in requests]
    merged = {g: str(p) for request in read for g, p in request.positions.items()}  # type: ignore[union-attr]
    assert merged == {group: str(position) for group in positions}
