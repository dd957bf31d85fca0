"""The subscribe protocol's pure functions (protocol.py): every rule without a server."""

from __future__ import annotations

import json

import pytest

from awx_ws.main import protocol
from awx_ws.main.exceptions import InvalidGroupName
from awx_ws.main.protocol import ProtocolError, decode_frame, parse_subscribe

pytestmark = pytest.mark.unit

MAX = 100


def plan(groups: object, user_id: int = 7) -> protocol.SubscribeRequest:
    return parse_subscribe({"groups": groups}, user_id, MAX)


def refusal(groups: object) -> str:
    with pytest.raises(ProtocolError) as info:
        plan(groups)
    return str(info.value)


def test_open_kinds_become_kind_dash_item_groups():
    request = plan({"jobs": ["status_changed", "summary"], "schedules": ["changed"]})
    assert request.groups == {"jobs-status_changed", "jobs-summary", "schedules-changed"}
    assert request.objects == {}
    assert request.errors == ()


def test_event_kinds_ask_for_an_access_check_of_each_id():
    request = plan({"job_events": [42, "43", 42], "workflow_events": [5]})
    assert request.groups == frozenset()
    assert request.objects == {"job_events": {42, 43}, "workflow_events": {5}}


def test_control_group_only_for_own_user_id():
    request = plan({"control": ["limit_reached_7", "limit_reached_8"]}, user_id=7)
    assert request.groups == {"control-limit_reached_7"}
    assert request.errors == ("access denied to channel control-limit_reached_8",)


def test_empty_groups_is_a_valid_request_to_leave_everything():
    assert plan({}) == protocol.SubscribeRequest(groups=frozenset())


@pytest.mark.parametrize(
    ("groups", "error"),
    [
        ({"nope": ["x"]}, "unknown group kind 'nope'"),
        ({"broadcast": ["group_send"]}, "group kind 'broadcast' is reserved"),
        ({"jobs": "status_changed"}, "groups.jobs must be a list"),
        ({"jobs": {"a": 1}}, "groups.jobs must be a list"),
        ({"jobs": [1]}, "invalid item 1 in groups.jobs: expected a string"),
        ({"jobs": ["bad name!"]}, "invalid group name 'jobs-bad name!'"),
        ({"jobs": ["x" * 99]}, "invalid group name"),
        ({"job_events": [0]}, "invalid id 0 in groups.job_events"),
        ({"job_events": [-3]}, "invalid id -3"),
        ({"job_events": [1.5]}, "invalid id 1.5"),
        ({"job_events": [True]}, "invalid id True"),
        ({"job_events": [2**63]}, "invalid id"),
        ({"job_events": ["4x"]}, "invalid id '4x'"),
        ({"job_events": [None]}, "invalid id None"),
        ([], "groups must be an object"),
        ("jobs", "groups must be an object"),
    ],
)
def test_malformed_requests_are_refused_whole(groups, error):
    assert error in refusal(groups)


def test_more_groups_than_the_limit_are_refused():
    assert plan({"job_events": list(range(1, MAX + 1))}).objects["job_events"]
    message = refusal({"job_events": list(range(1, MAX + 2))})
    assert message == f"too many groups: {MAX + 1} requested, at most {MAX} per connection"


def test_a_frame_without_groups_is_refused():
    with pytest.raises(ProtocolError, match="expected"):
        parse_subscribe({"xrftoken": "x"}, 1, MAX)


@pytest.mark.parametrize(
    ("text", "data", "error"),
    [
        (None, b"\x00\x01", "binary frames are not supported"),
        ("not json", None, "invalid JSON"),
        ("[1, 2]", None, "expected a JSON object"),
        ("42", None, "expected a JSON object"),
        ('{"a": ', None, "invalid JSON"),
        ("[" * 100_000 + "]" * 100_000, None, "frame too large"),
        ("x" * 70_000, None, "frame too large"),
        ("\u00e9" * 40_000, None, "frame too large"),  # 80,000 bytes in 40,000 characters
    ],
)
def test_undecodable_frames(text, data, error):
    with pytest.raises(ProtocolError, match=error):
        decode_frame(text, data, 64 * 1024)


def test_deep_nesting_under_the_size_limit_is_an_error_not_a_crash():
    text = "[" * 30_000 + "]" * 30_000
    with pytest.raises(ProtocolError, match="nested too deeply"):
        decode_frame(text, None, 64 * 1024)


def test_decode_returns_the_object():
    assert decode_frame(json.dumps({"groups": {}}), None, 1024) == {"groups": {}}


def test_xrftoken_must_equal_the_csrf_cookie():
    assert protocol.xrftoken_matches({"xrftoken": "abc"}, "abc")
    assert not protocol.xrftoken_matches({"xrftoken": "abd"}, "abc")
    assert not protocol.xrftoken_matches({"xrftoken": None}, "abc")
    assert not protocol.xrftoken_matches({}, "abc")
    assert not protocol.xrftoken_matches({"xrftoken": ""}, "")
    assert not protocol.xrftoken_matches({"xrftoken": "abc"}, None)


@pytest.mark.parametrize("name", ["jobs-status_changed", "job_events-1", "a.b-c_D9"])
def test_valid_group_names(name):
    assert protocol.validate_group_name(name) == name


@pytest.mark.parametrize("name", ["", "a b", "x" * 100, "é", "a/b", None, 5])
def test_invalid_group_names(name):
    with pytest.raises(InvalidGroupName):
        protocol.validate_group_name(name)
