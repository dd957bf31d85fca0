"""What a peer emits while its relay link is down reaches the clients connected here once the link
is back, exactly once and in order: after a network cut (a proxy in the link, cut and healed) and
after this node's relay is killed and restarted. Found by the soak (docs/reliability.md): before,
a client that stayed connected lost those messages without being told."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from awx_ws.main.history import RelayedSeen
from awx_ws.main.relay_catchup import catchup_floors
from tests.client import WsClient, open_ws
from tests.link_proxy import LinkProxy
from tests.sentinel import Sentinels, start_sentinels
from tests.servers import Relay, free_port
from tests.test_cluster import Node, make_nodes, wait_for
from tests.waiting import eventually

pytestmark = [pytest.mark.slow]

GROUP = "schedules-catchup"


@pytest.fixture
async def linked(state_dir: Path, database: None) -> AsyncIterator[tuple[Node, Node, LinkProxy]]:
    """Nodes A and B; A's relay reaches B through a proxy the test cuts (B is known by it)."""
    proxy = await LinkProxy(free_port(), 0).start()
    a, b = make_nodes(
        state_dir,
        [f"catchupA{proxy.port}", f"catchupB{proxy.port}"],
        # No allowance for clock skew between the nodes (one clock here): the window the tests
        # see is the rule's own, not widened by the margin.
        {"BROADCAST_WEBSOCKET_BACKOFF_MAX": "1", "AWX_WS_HISTORY_CLOCK_SKEW": "0"},
    )
    proxy.target = b.daphne_port
    a.env["BROADCAST_WEBSOCKET_PEERS"] = f"127.0.0.1:{proxy.port}"
    b.env["BROADCAST_WEBSOCKET_SELF"] = f"127.0.0.1:{proxy.port}"
    b.env["BROADCAST_WEBSOCKET_PEERS"] = f"127.0.0.1:{a.daphne_port}"
    try:
        for node in (a, b):
            await asyncio.to_thread(node.start)
        yield a, b, proxy
    finally:
        proxy.close()
        for node in (a, b):
            await asyncio.to_thread(node.stop)
            await asyncio.to_thread(node.redis.stop)


async def link_state(node: Node, proxy: LinkProxy) -> str:
    """A's relay's state of its link through the proxy (what --status prints)."""
    from tests.client import redis_at

    redis = redis_at(node.redis.url)
    try:
        value = await redis.hget(f"asgi:relay-status:127.0.0.1:{proxy.port}", "state")
    finally:
        await redis.aclose()
    return value.decode() if value else ""


async def subscribed_across(a: Node, b: Node, token: str) -> tuple[WsClient, WsClient]:
    """A plain AWX client and one with ids on A, both hearing what B emits (the interest crossed)."""
    headers = {"Authorization": f"Token {token}"}
    plain, with_ids = await open_ws(a.url, headers=headers), await open_ws(a.url, headers=headers)
    await plain.subscribe({"schedules": ["catchup"]})
    await with_ids.subscribe({"schedules": ["catchup"]}, ids=True)
    probe = 0

    async def crossed() -> bool:
        nonlocal probe
        probe += 1
        await b.emit(GROUP, {"probe": probe})
        try:
            await plain.recv_json(timeout=0.5)
        except TimeoutError:
            return False
        return True

    await wait_for(crossed, 30, "B's messages to reach A's client")
    # Read past the probes still on their way: up to a marker emitted after them.
    await b.emit(GROUP, {"n": "marker"})
    for client in (plain, with_ids):
        while payload_of(await client.recv_json(timeout=20)).get("n") != "marker":
            pass
    return plain, with_ids


def payload_of(frame: dict[str, Any]) -> dict[str, Any]:
    """A message's payload: the frame itself, or under "data" with ids."""
    payload: dict[str, Any] = frame.get("data", frame)
    return payload


async def numbers(client: WsClient, count: int) -> list[Any]:
    """The next count messages' n."""
    return [payload_of(await client.recv_json(timeout=20)).get("n") for _ in range(count)]


async def cut_until_down(a: Node, proxy: LinkProxy) -> None:
    """Cut the link and wait until A's relay says it is down."""
    proxy.cut()

    async def down() -> bool:
        return await link_state(a, proxy) != "connected"

    await wait_for(down, 20, "A's link to B to go down")


async def then_live(b: Node, plain: WsClient, with_ids: WsClient) -> None:
    """Both clients get 1, 2 and 3 once and in order, then what B emits next."""
    assert await numbers(plain, 3) == [1, 2, 3]
    assert await numbers(with_ids, 3) == [1, 2, 3]
    await b.emit(GROUP, {"n": 4})
    assert await numbers(plain, 1) == [4]
    assert await numbers(with_ids, 1) == [4]


async def test_messages_emitted_during_a_cut_arrive_once_the_link_heals(linked, token):
    a, b, proxy = linked
    plain, with_ids = await subscribed_across(a, b, token)
    await b.emit(GROUP, {"n": 0})
    assert await numbers(plain, 1) == [0]
    assert await numbers(with_ids, 1) == [0]
    await cut_until_down(a, proxy)
    for n in (1, 2, 3):
        await b.emit(GROUP, {"n": n})
    proxy.heal()
    # Caught up in order and once (0 is in the catch-up's window too: delivered once all the
    # same); then live, with nothing in between.
    await then_live(b, plain, with_ids)


async def test_messages_still_on_their_way_when_the_link_drops_arrive_once_it_heals(linked, token):
    # A loaded peer forwards late (the soak: a status change emitted 4 s before node C's Redis
    # failed over never reached A or B): what it emitted before the link dropped, but had not
    # delivered yet, is caught up too.
    a, b, proxy = linked
    plain, with_ids = await subscribed_across(a, b, token)
    proxy.hold()  # B's frames stop short of A, the link still up
    for n in (1, 2, 3):
        await b.emit(GROUP, {"n": n})
    await cut_until_down(a, proxy)  # and what was held is gone with it
    proxy.heal()
    await then_live(b, plain, with_ids)


async def test_a_restarted_relay_catches_up_what_its_predecessor_missed(linked, token):
    a, b, proxy = linked
    plain, with_ids = await subscribed_across(a, b, token)
    await b.emit(GROUP, {"n": 0})
    assert await numbers(plain, 1) == [0]
    assert await numbers(with_ids, 1) == [0]
    assert a.relay is not None
    await asyncio.to_thread(a.relay.kill)  # -9: it writes nothing more
    for n in (1, 2, 3):
        await b.emit(GROUP, {"n": n})
    a.relay = await asyncio.to_thread(Relay(a.workdir, a.name, a.env).start)
    assert await numbers(plain, 3) == [1, 2, 3]
    assert await numbers(with_ids, 3) == [1, 2, 3]
    await b.emit(GROUP, {"n": 4})
    assert await numbers(plain, 1) == [4]
    assert await numbers(with_ids, 1) == [4]


@pytest.fixture
async def on_sentinel(state_dir: Path, database: None) -> AsyncIterator[tuple[Node, Node, Sentinels]]:
    """Node A on a Sentinel set (a master and a replica), node B on a Redis of its own."""
    sentinels = await asyncio.to_thread(start_sentinels, state_dir / f"catchup-sentinels-{free_port()}")
    a, b = make_nodes(state_dir, [f"failoverA{sentinels.master.port}", f"failoverB{sentinels.master.port}"])
    a.env.update(sentinels.env)
    try:
        for node in (a, b):
            await asyncio.to_thread(node.start)
        yield a, b, sentinels
    finally:
        for node in (a, b):
            await asyncio.to_thread(node.stop)
            await asyncio.to_thread(node.redis.stop)
        await asyncio.to_thread(sentinels.stop)


async def test_a_peers_messages_during_a_local_failover_arrive_once_it_is_over(on_sentinel, token):
    """A's relay cannot inject B's messages while A's Redis fails over: the link starts again
    and catches them up, instead of dropping them while it looks healthy (the soak found it)."""
    a, b, sentinels = on_sentinel
    plain, with_ids = await subscribed_across(a, b, token)
    await b.emit(GROUP, {"n": 0})
    assert await numbers(plain, 1) == [0]
    assert await numbers(with_ids, 1) == [0]
    await asyncio.to_thread(sentinels.wait_replicated)  # the subscriptions too
    await asyncio.to_thread(sentinels.master.kill)
    for n in (1, 2, 3):  # while A has no master, and after
        await b.emit(GROUP, {"n": n})
    await eventually(lambda: sentinels.master_port() == sentinels.replica.port, timeout=30)
    await b.emit(GROUP, {"n": 4})
    assert await numbers(plain, 4) == [1, 2, 3, 4]
    assert await numbers(with_ids, 4) == [1, 2, 3, 4]
    await b.emit(GROUP, {"n": 5})
    assert await numbers(plain, 1) == [5]


@pytest.mark.unit
def test_a_fanout_delivers_a_relayed_message_once_whichever_way_it_came():
    seen = RelayedSeen()
    assert seen.first_time("g", "aaaaaaaa:100-0")
    assert seen.first_time("g", "aaaaaaaa:100-1")
    assert not seen.first_time("g", "aaaaaaaa:100-1")  # the catch-up's overlap
    assert seen.first_time("g", "bbbbbbbb:50-0")  # another origin counts on its own
    assert seen.first_time("other", "aaaaaaaa:1-0")  # and another group
    seen.forget("g")
    assert seen.first_time("g", "aaaaaaaa:100-1")  # no member held it any more


@pytest.mark.unit
def test_a_relayed_message_that_comes_behind_a_newer_one_is_delivered_once():
    # Two workers emitting to one group at once can reach a peer out of id order (the soak lost
    # such a status change on every peer): late is not the same as delivered.
    seen = RelayedSeen()
    assert seen.first_time("g", "aaaaaaaa:101-0")
    assert seen.first_time("g", "aaaaaaaa:100-0")
    assert not seen.first_time("g", "aaaaaaaa:100-0")
    assert not seen.first_time("g", "aaaaaaaa:101-0")


@pytest.mark.unit
def test_what_is_older_than_the_ids_a_fanout_keeps_counts_as_delivered():
    seen = RelayedSeen()
    newest = RelayedSeen.RECENT + 10
    for ms in range(1, newest + 1):
        assert seen.first_time("g", f"aaaaaaaa:{ms}-0")
    # A catch-up reaching back past the window re-reads what was delivered then: not again.
    assert not seen.first_time("g", "aaaaaaaa:5-0")
    assert not seen.first_time("g", "aaaaaaaa:0-7")
    # Within it, what came is known one by one.
    assert not seen.first_time("g", f"aaaaaaaa:{newest}-0")
    assert seen.first_time("g", f"aaaaaaaa:{newest}-1")


@pytest.mark.unit
def test_the_catch_up_reaches_back_to_the_newest_delivered_message_for_groups_that_were_forwarded():
    floors = catchup_floors({"held", "new"}, down_since=100.0, forwarded={"held"}, newest_emitted=95.5)
    # What the peer emitted after the newest message delivered may have been on its way; a group
    # joined while the link was down is read from the loss only (its clients came after).
    assert floors == {"held": 95.5, "new": 100.0}
    # Nothing delivered yet, or the newest message later than the loss: from the loss.
    assert catchup_floors({"held"}, 100.0, {"held"}, 0.0) == {"held": 100.0}
    assert catchup_floors({"held"}, 100.0, {"held"}, 101.0) == {"held": 100.0}
