"""Every pattern that validates input matches the whole text: a trailing line break or a Unicode
digit gets through none of them (one test per validator)."""

from __future__ import annotations

import pytest

from awx_ws.main import setting_rules
from awx_ws.main.exceptions import InvalidGroupName
from awx_ws.main.history import GroupPosition, PositionError, parse_message_id, parse_stream_id
from awx_ws.main.layers.redis_presence import channel_owner
from awx_ws.main.metrics import live_file_pid
from awx_ws.main.numbers import parse_bounded, parse_digits
from awx_ws.main.protocol import validate_group_name

pytestmark = pytest.mark.unit

HEX = "0123456789abcdef" * 2
TRAILERS = ["\n", "\r\n", " ", "\x00"]
NOT_ASCII_DIGITS = ["²", "١", "１", "𝟠", "+1", "-1", " 1", "1 ", "1\n", "0x1", "1_0", ""]


@pytest.mark.parametrize("text", NOT_ASCII_DIGITS)
def test_numbers_are_ascii_digits_only(text):
    assert parse_digits(text, 20) is None
    assert parse_bounded(text, 10**20) is None


def test_numbers_have_bounds():
    assert parse_digits("123", 3) == 123
    assert parse_digits("1234", 3) is None
    assert parse_digits("9" * 400, 400) is not None and parse_digits("9" * 401, 400) is None
    assert parse_bounded("65535", 65535) == 65535
    assert parse_bounded("65536", 65535) is None
    assert parse_bounded("0", 1) == 0
    assert parse_digits(12, 5) is None  # only text is read


@pytest.mark.parametrize("trailer", TRAILERS)
def test_group_names_match_in_full(trailer):
    assert validate_group_name("jobs-status_changed") == "jobs-status_changed"
    with pytest.raises(InvalidGroupName):
        validate_group_name(f"jobs-status_changed{trailer}")


@pytest.mark.parametrize("text", ["1²-0", "1-0\n", "١-0", "1-²", "9" * 16 + "-0", f"1-{2**64}"])
def test_stream_ids_are_ascii_numbers_within_bounds(text):
    with pytest.raises(PositionError):
        parse_stream_id(text)
    assert parse_stream_id(f"1-{2**64 - 1}") == (1, 2**64 - 1)


@pytest.mark.parametrize("origin", ["é", "١", "ab\n", "a" * 17, "a-b", ""])
def test_message_id_origins_are_ascii_letters_and_digits(origin):
    with pytest.raises(PositionError):
        parse_message_id(f"{origin}:1-0")
    assert parse_message_id("Ab9:1-0") == ("Ab9", (1, 0))


@pytest.mark.parametrize("floor", NOT_ASCII_DIGITS)
def test_position_floors_are_ascii_numbers(floor):
    with pytest.raises(PositionError):
        GroupPosition.parse(f"{floor},abc:1-0")


@pytest.mark.parametrize("trailer", TRAILERS)
def test_drf_rates_match_in_full(trailer):
    assert setting_rules.rate("1200/min") is None
    assert setting_rules.rate(f"1200/min{trailer}") is not None
    assert setting_rules.rate("１２/min") is not None


@pytest.mark.parametrize("trailer", TRAILERS)
def test_peer_addresses_match_in_full(trailer):
    assert setting_rules.peers(["node2:8051", "wss://node3.example/"]) is None
    assert setting_rules.peers([f"node2:8051{trailer}"]) is not None
    assert setting_rules.peers([f"wss://node3.example/{trailer}"]) is not None
    assert setting_rules.peers(["node2:٨٠٥١"]) is not None


@pytest.mark.parametrize("trailer", TRAILERS)
def test_channel_owners_match_in_full(trailer):
    assert channel_owner(f"fanout.{HEX}") == HEX
    assert channel_owner(f"specific.{HEX}!abc") == HEX
    assert channel_owner(f"fanout.{HEX}{trailer}") is None


@pytest.mark.parametrize("trailer", TRAILERS)
def test_metrics_live_files_match_in_full(trailer):
    assert live_file_pid("gauge_livesum_1234.db") == 1234
    assert live_file_pid(f"gauge_livesum_1234.db{trailer}") is None
    assert live_file_pid("gauge_livesum_١٢.db") is None


def test_history_shares_are_ascii_names_checked_before_anything_is_sent():
    from awx_ws.main.emit import build_message, emit_on_commit
    from awx_ws.main.exceptions import InvalidHistoryShare
    from awx_ws.main.history import history_share, organization_share

    assert history_share("job_events-42") == "job_events"
    assert history_share("job_events-42", "org-3") == "org-3"
    assert organization_share(3) == "org-3" and organization_share(None) is None
    assert build_message("job_events-42", {}, "org-3")["history_share"] == "org-3"
    assert "history_share" not in build_message("job_events-42", {})
    for bad in ["", "org 3", "org-3\n", "é", "x" * 65, 3, b"org-3"]:
        with pytest.raises(InvalidHistoryShare):
            history_share("job_events-42", bad)
        with pytest.raises(InvalidHistoryShare):
            build_message("job_events-42", {}, bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidHistoryShare):  # at once, not after the commit
            emit_on_commit([("job_events-42", {})], share=bad)  # type: ignore[arg-type]
