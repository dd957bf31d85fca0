"""The peer protocol's frames (pure rules): what one end writes, the other reads back unchanged,
and a malformed frame is refused with an error the link handler logs (not a crash)."""

from __future__ import annotations

import json

import pytest

from awx_ws.main import peer_protocol as pp
from awx_ws.main.history import GroupPosition, Replay

pytestmark = pytest.mark.unit


def test_an_interest_update_reads_back_as_sent():
    [frame] = pp.interest_frames({"jobs-status_changed", "job_events-42"}, {"job_events-7"})
    request = pp.read_request(frame)
    assert request == pp.InterestUpdate(join=["job_events-42", "jobs-status_changed"], leave=["job_events-7"])


def test_a_history_request_reads_back_with_its_positions():
    frame = json.dumps({"history": [{"group": "job_events-42", "position": "1700000000000"}]})
    request = pp.read_request(frame)
    assert isinstance(request, pp.HistoryRequest)
    assert str(request.positions["job_events-42"]) == str(GroupPosition.parse("1700000000000"))


@pytest.mark.parametrize(
    "frame",
    ["", "not json", '{"join": ["bad group name with spaces"]}', '{"history": [{"group": "jobs-x"}]}'],
)
def test_a_malformed_request_is_refused(frame):
    with pytest.raises((ValueError, KeyError, TypeError)):
        pp.read_request(frame)


def test_a_forwarded_message_keeps_its_group_text_and_id():
    event = {
        "type": "internal.message",
        "group": "jobs-status_changed",
        "text": '{"a": 1}',
        "id": "ab12cd34:1700000000000-0",
    }
    read = pp.read_frame(pp.message_frame(event))
    assert read == pp.RelayedMessage("jobs-status_changed", '{"a": 1}', "ab12cd34:1700000000000-0")


def test_a_message_without_history_id_reads_back_without_one():
    read = pp.read_frame(pp.message_frame({"group": "jobs-status_changed", "text": "{}"}))
    assert read == pp.RelayedMessage("jobs-status_changed", "{}", None)


def test_an_acknowledgement_reads_back_as_the_groups_applied():
    [frame] = pp.forwarding_frames(["b", "a"], ["c"])
    read = pp.read_frame(frame)
    assert read == pp.ForwardingAck(forwarding=["a", "b"], dropped=["c"])


@pytest.mark.parametrize(
    "frame",
    [
        '{"group": "jobs-status_changed", "text": 5}',
        '{"group": "jobs-status_changed"}',
        '{"group": "jobs-status_changed", "text": "{}", "id": "not an id"}',
        "[]",
    ],
)
def test_a_malformed_frame_from_a_peer_is_refused(frame):
    with pytest.raises((ValueError, KeyError, TypeError)):
        pp.read_frame(frame)


def test_a_history_answer_carries_origin_entries_and_reset():
    frame = pp.history_frame(
        {
            "jobs-x": ("ab12cd34", Replay([("ab12cd34:1700000000000-0", "{}")])),
            "jobs-y": (None, Replay(reset="gone")),
        }
    )
    items = {item["group"]: item for item in json.loads(frame)["history"]}
    assert items["jobs-x"] == {
        "group": "jobs-x",
        "origin": "ab12cd34",
        "entries": [["ab12cd34:1700000000000-0", "{}"]],
        "reset": None,
    }
    assert items["jobs-y"]["reset"] == "gone" and items["jobs-y"]["entries"] == []


def test_an_unreadable_ca_bundle_is_a_setting_error_naming_the_variable(tmp_path):
    from django.test import override_settings

    from awx_ws.main.conf import SettingError
    from awx_ws.main.exceptions import StartupError

    missing = tmp_path / "missing.pem"
    with override_settings(AWX_WS={"BROADCAST_WEBSOCKET_CA_BUNDLE": str(missing)}):
        with pytest.raises(
            SettingError, match=rf"^BROADCAST_WEBSOCKET_CA_BUNDLE='{missing}' cannot be read"
        ) as raised:
            pp.peer_ssl("wss://b.example:8443/websocket/broadcast/")
        assert not isinstance(raised.value, StartupError)  # a dial at run time is no start-up
        assert pp.peer_ssl("ws://b.example:8051/websocket/broadcast/") is None
