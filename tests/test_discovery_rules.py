"""Peer discovery's pure rules (discovery.py): channel names, announcements, the expiry of silent
peers, and what the relay does with what discovery tells it."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest

from awx_ws.main import discovery
from awx_ws.main.conf import SettingError, validate
from awx_ws.main.discovery import (
    CHANNEL_PREFIX,
    Announcement,
    PeerTable,
    channel_name,
    connect_args,
    parse_announcement,
)
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


def said(**fields: str) -> str:
    return json.dumps(
        {"cluster": "one", "node": "b", "address": "10.0.0.2:8051", "action": "online", **fields}
    )


def test_an_announcement_reads_back():
    sent = Announcement("one", "b", "wss://b.example/websocket/broadcast/", "hello")
    assert parse_announcement(sent.payload(), "one") == sent


@pytest.mark.parametrize(
    ("payload", "logged"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "without cluster, node, address, action"),
        (json.dumps({"cluster": "one", "node": "b", "action": "online"}), "without cluster"),
        (said(address=7), "without cluster"),  # type: ignore[arg-type]
        (said(cluster="two"), "node 'b' of cluster 'two' (this node is in 'one')"),
        (said(action="reboot"), "unknown action 'reboot'"),
        (said(address="not an address"), "is neither host:port nor"),
    ],
)
def test_a_bad_or_foreign_announcement_is_ignored_and_logged(payload, logged, caplog):
    with caplog.at_level(logging.INFO, logger="awx_ws.main.discovery"):
        assert parse_announcement(payload, "one") is None
    assert logged in caplog.text
    assert all(record.levelno >= logging.INFO for record in caplog.records)


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
    found = discovery.Discovery(peers, {}, "one", "a", "10.0.0.1:8051", interval=1)

    def hear(*announced: tuple[str, str]) -> bool:
        payloads = [Announcement("one", "n", address, action).payload() for address, action in announced]
        return found._hear(payloads)

    assert hear(("10.0.0.2:8051", "online")) is False
    assert hear(("10.0.0.3:8051", "hello")) is True  # a starting node: everyone answers at once
    # Its own announcements, however its address is written, are not a peer.
    assert hear(("10.0.0.1:8051", "hello"), ("ws://10.0.0.1:8051/websocket/broadcast/", "online")) is False
    gone = ("10.0.0.2:8051", "offline")
    assert hear(gone, gone, ("10.0.0.9:1", "offline")) is False  # dropped once; unknown: nothing
    assert peers.told == [("add", "10.0.0.2:8051"), ("add", "10.0.0.3:8051"), ("drop", "10.0.0.2:8051")]
    assert set(found.table.last_heard) == {"10.0.0.3:8051"}
