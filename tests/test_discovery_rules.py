"""Peer discovery's pure rules (discovery.py): channel names, announcements, the expiry of silent
peers, and what the relay does with what discovery tells it."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest

from awx_ws.main import discovery
from awx_ws.main.announcements import Announcement, AnnouncementCheck
from awx_ws.main.conf import SettingError, validate
from awx_ws.main.discovery import CHANNEL_PREFIX, PeerTable, channel_name, connect_args
from awx_ws.main.relay import Relay

pytestmark = pytest.mark.unit


def test_a_channel_name_is_a_short_identifier_of_its_cluster_only():
    long_id = 'a cluster id with spaces, quotes " and ünïcode ' * 10
    for cluster in ("default", "x", long_id):
        name = channel_name(cluster)
        assert name.startswith(CHANNEL_PREFIX)
        assert len(name.encode()) <= 63 and name.isascii() and name.replace("_", "").isalnum()
        assert name == channel_name(cluster)
    assert len({channel_name(c) for c in ("default", "Default", "default ", long_id)}) == 4


SECRET = "discovery-rules-secret"
WINDOW = 300.0
NOW = 1_800_000_000.0


def check() -> AnnouncementCheck:
    return AnnouncementCheck("one", SECRET, WINDOW)


def signed(now: float = NOW, secret: str = SECRET, **fields: str) -> str:
    """A payload signed as a node holding secret signs it, with fields changed before signing."""
    base = {"cluster": "one", "node": "b", "address": "10.0.0.2:8051", "action": "online"}
    return Announcement(**{**base, **fields}).payload(secret, now)


def tampered(payload: str, **fields: str) -> str:
    """payload with fields changed after signing."""
    return json.dumps({**json.loads(payload), **fields})


def test_an_announcement_reads_back():
    sent = Announcement("one", "b", "wss://b.example/websocket/broadcast/", "hello")
    assert check().read(sent.payload(SECRET, NOW), NOW + 1) == sent


@pytest.mark.parametrize(
    ("payload", "reason", "logged"),
    [
        ("{not json", "malformed", "not JSON"),
        ("[1, 2]", "malformed", "without cluster, node, address, action"),
        (json.dumps({"cluster": "one", "node": "b", "address": "x:1"}), "malformed", "without"),
        (
            json.dumps({"cluster": "one", "node": "b", "address": "x:1", "action": "hello"}),
            "unsigned",
            "no time",
        ),
        (signed(cluster="two"), "other_cluster", "node 'b' of cluster 'two' (this node is in 'one')"),
        (signed(secret="another"), "forged", "wrong MAC"),
        (tampered(signed(), address="10.6.6.6:8051"), "forged", "wrong MAC"),
        (tampered(signed(), action="offline"), "forged", "wrong MAC"),
        (tampered(signed(), cluster="two"), "other_cluster", "of cluster 'two'"),
        (signed(now=NOW - WINDOW - 1), "stale", "301s from our clock (window 300s)"),
        (signed(now=NOW + WINDOW + 1), "stale", "from our clock"),
        (signed(action="reboot"), "invalid", "unknown action 'reboot'"),
        (signed(address="not an address"), "invalid", "is neither host:port nor"),
    ],
)
def test_an_announcement_that_does_not_verify_is_refused_counted_and_logged(payload, reason, logged, caplog):
    from awx_ws.main import metrics

    before = metrics.DISCOVERY_REFUSED.labels(reason)._value.get()
    with caplog.at_level(logging.INFO, logger="awx_ws.main.announcements"):
        assert check().read(payload, NOW) is None
    assert logged in caplog.text
    assert f"1 {reason}" in caplog.text
    assert all(record.levelno <= logging.WARNING for record in caplog.records)
    assert metrics.DISCOVERY_REFUSED.labels(reason)._value.get() == before + 1


def test_an_announcement_heard_twice_is_a_replay():
    reader, payload = check(), signed()
    assert reader.read(payload, NOW) is not None
    assert reader.read(payload, NOW + 1) is None  # the same nonce, within the window
    assert reader.read(signed(), NOW + 1) is not None  # the node's next one has a nonce of its own


def test_refusals_are_logged_at_most_once_a_minute(caplog):
    reader = check()
    with caplog.at_level(logging.INFO, logger="awx_ws.main.announcements"):
        for n in range(1000):  # a flood from a role that may NOTIFY
            assert (
                reader.read(
                    signed(secret="guess", node=f"fake{n}", address=f"10.9.{n // 250}.{n % 250}:1"), NOW
                )
                is None
            )
    assert len(caplog.records) == 1


def test_nonces_are_kept_only_for_the_window():
    reader = check()
    for n in range(100):
        assert reader.read(signed(now=NOW + n), NOW + n) is not None
    assert len(reader._nonces) == 100
    assert reader.read(signed(now=NOW + 1000), NOW + 1000) is not None
    assert len(reader._nonces) == 1  # the others expired with the window


def test_a_peer_silent_for_three_heartbeats_expires():
    table = PeerTable(interval=15)
    assert table.heard("a:1", 100.0) is True
    assert table.heard("b:1", 100.0) is True
    assert table.heard("a:1", 130.0) is False
    assert table.expired(145.0) == []  # b missed two heartbeats: still there
    assert table.expired(145.1) == ["b:1"]  # a third: gone, and forgotten
    assert table.expired(175.0) == []
    assert table.expired(175.1) == ["a:1"]
    assert table.last_heard == {}


def test_a_peer_that_went_offline_is_forgotten_once():
    table = PeerTable(interval=1)
    table.heard("a:1", 0.0)
    assert table.forget("a:1") is True
    assert table.forget("a:1") is False
    assert table.expired(100.0) == []


def test_after_our_own_outage_every_known_peer_gets_a_fresh_start():
    table = PeerTable(interval=1)
    table.heard("a:1", 0.0)
    table.heard("b:1", 2.0)
    table.restart(50.0)  # the connection was down from 2 to 50: nobody expired for it
    assert table.expired(52.0) == []
    assert table.expired(53.5) == ["a:1", "b:1"]


def test_connection_parameters_come_from_the_django_database():
    database = {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": "awx",
        "USER": "awx",
        "PASSWORD": "",
        "HOST": "db.example",
        "PORT": 5433,
        "OPTIONS": {"sslmode": "require", "isolation_level": 1, "pool": True},
    }
    assert connect_args(database) == {
        "connect_timeout": 10,
        "application_name": "awx_ws peer discovery",
        "sslmode": "require",
        "dbname": "awx",
        "user": "awx",
        "host": "db.example",
        "port": 5433,
    }


def test_discovery_needs_a_known_choice_and_an_address_of_its_own():
    with pytest.raises(
        SettingError, match="BROADCAST_WEBSOCKET_DISCOVERY='dns': must be one of static, postgres"
    ):
        validate({"BROADCAST_WEBSOCKET_DISCOVERY": "dns"}, environ={})
    with pytest.raises(
        SettingError, match="BROADCAST_WEBSOCKET_DISCOVERY='postgres' needs BROADCAST_WEBSOCKET_SELF"
    ):
        validate({"BROADCAST_WEBSOCKET_DISCOVERY": "postgres"}, environ={})
    validate({"BROADCAST_WEBSOCKET_DISCOVERY": "postgres", "BROADCAST_WEBSOCKET_SELF": "a:8051"}, environ={})
    with pytest.raises(SettingError, match="AWX_WS_CLUSTER_ID='  ': must not be empty"):
        validate({"CLUSTER_ID": "  "}, environ={})
    with pytest.raises(SettingError, match="BROADCAST_WEBSOCKET_HEARTBEAT=0"):
        validate({"BROADCAST_WEBSOCKET_HEARTBEAT": 0}, environ={})


def test_discovery_refuses_a_database_that_is_not_postgresql():
    sqlite = {"ENGINE": "django.db.backends.sqlite3", "NAME": "db.sqlite3"}
    with pytest.raises(
        discovery.StartupError, match="needs the database .* PostgreSQL, not django.db.backends.sqlite3"
    ):
        discovery.require_postgresql(sqlite)
    discovery.require_postgresql({"ENGINE": "django.db.backends.postgresql", "NAME": "awx_ws"})


def test_the_relay_dials_discovered_peers_and_never_drops_a_static_one():
    relay = Relay(SimpleNamespace(records=None), ["static:1"], "secret", "a")  # type: ignore[arg-type]
    relay.add_peer("found:1", 100.0)
    relay.add_peer("static:1", 200.0)  # also announced: stays static
    relay.add_peer("ws://static:1/websocket/broadcast/", 210.0)  # the same node as a URL: one link
    assert {peer: link.status.source for peer, link in relay.links.items()} == {
        "static:1": "static",
        "found:1": "discovered",
    }
    assert relay.links["static:1"].status.last_seen == 210.0
    relay.add_peer("found:1", 150.0)
    assert relay.links["found:1"].status.last_seen == 150.0
    relay.drop_peer("static:1")
    relay.drop_peer("found:1")
    relay.drop_peer("never-heard:1")
    assert list(relay.links) == ["static:1"]


class Peers:
    """What the relay would be told."""

    def __init__(self) -> None:
        self.told: list[tuple[str, str]] = []

    def add_peer(self, peer: str, seen: float) -> None:
        self.told.append(("add", peer))

    def drop_peer(self, peer: str) -> None:
        self.told.append(("drop", peer))


def test_what_is_heard_is_told_to_the_relay_and_a_hello_is_answered():
    peers = Peers()
    found = discovery.Discovery(peers, {}, "one", "a", "10.0.0.1:8051", 1, SECRET, WINDOW)

    def hear(*announced: tuple[str, str]) -> bool:
        payloads = [
            Announcement("one", "n", address, action).payload(SECRET) for address, action in announced
        ]
        return found._hear(payloads)

    assert hear(("10.0.0.2:8051", "online")) is False
    assert hear(("10.0.0.3:8051", "hello")) is True  # a starting node: everyone answers at once
    # Its own announcements, however its address is written, are not a peer.
    assert hear(("10.0.0.1:8051", "hello"), ("ws://10.0.0.1:8051/websocket/broadcast/", "online")) is False
    gone = ("10.0.0.2:8051", "offline")
    assert hear(gone, gone, ("10.0.0.9:1", "offline")) is False  # dropped once; unknown: nothing
    assert peers.told == [("add", "10.0.0.2:8051"), ("add", "10.0.0.3:8051"), ("drop", "10.0.0.2:8051")]
    assert set(found.table.last_heard) == {"10.0.0.3:8051"}
    # Unsigned, or signed with another secret: neither dialled nor answered.
    unsigned = json.dumps({"cluster": "one", "node": "x", "address": "10.6.6.6:1", "action": "hello"})
    forged = Announcement("one", "x", "10.6.6.7:1", "hello").payload("a guess")
    assert found._hear([unsigned, forged]) is False
    assert len(peers.told) == 3
