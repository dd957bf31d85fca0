"""The AWX_WS settings table (conf.py): defaults written once, environment read, values validated."""

from __future__ import annotations

import os

import pytest
from django.conf import settings
from django.test import override_settings

from awx_ws.main import conf
from awx_ws.main.conf import SETTINGS, SettingError, from_environment, validate, ws_settings
from awx_ws.main.history import HistoryPolicy, history_policy

pytestmark = pytest.mark.unit


def test_every_default_is_valid():
    validate({}, environ={})


def test_every_setting_has_its_own_variable():
    variables = [setting.env for setting in SETTINGS.values()]
    assert len(set(variables)) == len(variables)
    assert all(name.startswith(("AWX_WS_", "BROADCAST_WEBSOCKET_")) for name in variables)


def test_the_environment_gives_typed_values_and_leaves_out_unset_ones():
    environ = {
        "AWX_WS_EMIT_TIMEOUT": "2.5",
        "AWX_WS_SUBSCRIBE_RATE": "7",
        "BROADCAST_WEBSOCKET_PEERS": "a:8051, wss://b/websocket/broadcast/,",
        "BROADCAST_WEBSOCKET_VERIFY_CERT": "no",
        "AWX_WS_HISTORY_KINDS": '{"jobs": {"length": 10}}',
        "AWX_WS_HISTORY_AGE": "",  # empty: the default
    }
    assert from_environment(environ) == {
        "EMIT_TIMEOUT": 2.5,
        "SUBSCRIBE_RATE": 7,
        "BROADCAST_WEBSOCKET_PEERS": ["a:8051", "wss://b/websocket/broadcast/"],
        "BROADCAST_WEBSOCKET_VERIFY_CERT": False,
        "HISTORY_KINDS": {"jobs": {"length": 10}},
    }


@pytest.mark.parametrize(
    ("variable", "text", "says"),
    [
        ("AWX_WS_EMIT_TIMEOUT", "soon", "AWX_WS_EMIT_TIMEOUT='soon' cannot be read"),
        ("AWX_WS_EMIT_TIMEOUT", "nan", "AWX_WS_EMIT_TIMEOUT='nan' cannot be read"),
        ("AWX_WS_SUBSCRIBE_RATE", "2.5", "AWX_WS_SUBSCRIBE_RATE='2.5' cannot be read"),
        (
            "BROADCAST_WEBSOCKET_VERIFY_CERT",
            "maybe",
            "BROADCAST_WEBSOCKET_VERIFY_CERT='maybe' cannot be read",
        ),
        ("AWX_WS_HISTORY_KINDS", "{nope", "AWX_WS_HISTORY_KINDS='{nope' cannot be read"),
    ],
)
def test_unreadable_text_is_refused_naming_the_variable_and_the_text(variable, text, says):
    with pytest.raises(SettingError) as refused:
        from_environment({variable: text})
    assert says in str(refused.value)


@pytest.mark.parametrize(
    ("values", "says"),
    [
        ({"EMIT_TIMEOUT": 0}, "AWX_WS_EMIT_TIMEOUT=0: must be greater than 0"),
        ({"EMIT_TIMEOUT": "5"}, "AWX_WS_EMIT_TIMEOUT='5': must be a number of seconds"),
        ({"SUBSCRIBE_RATE": 0}, "AWX_WS_SUBSCRIBE_RATE=0: must be at least 1"),
        ({"SUBSCRIBE_RATE": True}, "AWX_WS_SUBSCRIBE_RATE=true: must be an integer"),
        ({"EMIT_RATE": "lots"}, "AWX_WS_EMIT_RATE='lots': must be a DRF rate"),
        ({"NODE_NAME": " "}, "AWX_WS_NODE_NAME=' ': must not be empty"),
        ({"BROADCAST_WEBSOCKET_PEERS": ["node-b"]}, "'node-b' is neither host:port nor"),
        ({"HISTORY_KINDS": []}, "AWX_WS_HISTORY_KINDS=[]: must be a JSON object"),
        ({"HISTORY_KINDS": {"jobs": {"size": 3}}}, "'jobs': expected null or"),
        ({"HISTORY_KINDS": {"jobs": {"age": -1}}}, "'jobs': age must be greater than 0"),
        ({"LIVENESS_TTL": 10, "LIVENESS_INTERVAL": 6}, "AWX_WS_LIVENESS_INTERVAL=6 must be at most half"),
        (
            {"RETRY_DELAY": 2, "RETRY_MAX_DELAY": 1},
            "AWX_WS_RETRY_DELAY=2 must not exceed AWX_WS_RETRY_MAX_DELAY=1",
        ),
        (
            {"HISTORY_MAX_BYTES": 4096, "HISTORY_TOTAL_BYTES": 1024},
            "AWX_WS_HISTORY_TOTAL_BYTES=1024 must be 0 or at least AWX_WS_HISTORY_MAX_BYTES=4096",
        ),
        ({"EMIT_TIMEUOT": 1}, "AWX_WS has unknown setting(s) EMIT_TIMEUOT"),
    ],
)
def test_bad_values_are_refused_naming_the_variable_and_the_value(values, says):
    with pytest.raises(SettingError) as refused:
        validate(values, environ={})
    assert says in str(refused.value)


def test_settings_hold_only_what_the_environment_gives():
    """Defaults live in conf.SETTINGS alone; settings.AWX_WS carries the environment's values."""
    given = {name for name, setting in SETTINGS.items() if os.environ.get(setting.env)}
    assert set(settings.AWX_WS) == given
    assert ws_settings.LIVENESS_TTL == float(os.environ["AWX_WS_LIVENESS_TTL"])  # the tests' own
    assert ws_settings.HISTORY_LENGTH == SETTINGS["HISTORY_LENGTH"].default


def test_overrides_are_read_and_held_to_the_same_rules():
    # override_settings, not pytest-django's `settings`: the test is about entering and leaving an
    # override (the value comes back; a bad one is refused on entry).
    with override_settings(AWX_WS={"SUBSCRIBE_RATE": 3}):
        assert ws_settings.SUBSCRIBE_RATE == 3
    assert ws_settings.SUBSCRIBE_RATE == SETTINGS["SUBSCRIBE_RATE"].default
    with pytest.raises(SettingError, match="AWX_WS_SUBSCRIBE_RATE=-3: must be at least 1"):
        with override_settings(AWX_WS={"SUBSCRIBE_RATE": -3}):
            pass


def test_history_policies_are_kept_per_kind_and_follow_an_override():
    """history_policy answers each kind from memory on every emit, and forgets when AWX_WS changes."""
    default = history_policy("schedules-1")
    assert default is not None and default.length == SETTINGS["HISTORY_LENGTH"].default
    assert history_policy("schedules-2") is default
    kinds = {"schedules": {"length": 5, "age": 60}, "jobs": None}
    with override_settings(AWX_WS={**settings.AWX_WS, "HISTORY_KINDS": kinds}):
        assert history_policy("schedules-1") == HistoryPolicy(
            5, 60.0, ws_settings.HISTORY_MAX_BYTES, ws_settings.HISTORY_TOTAL_BYTES
        )
        assert history_policy("jobs-1") is None
    assert history_policy("schedules-1") == default
    assert history_policy("jobs-1") is not None


def test_a_renamed_variable_is_still_read_under_its_former_name_and_said_to_be_deprecated():
    assert conf.from_environment({"AWX_WS_STARTUP_REDIS_WAIT": "7"}) == {"STARTUP_LAYER_WAIT": 7.0}
    both = {"AWX_WS_STARTUP_LAYER_WAIT": "3", "AWX_WS_STARTUP_REDIS_WAIT": "7"}
    assert conf.from_environment(both) == {"STARTUP_LAYER_WAIT": 3.0}  # the new name wins
    assert conf.deprecated_in_use({"AWX_WS_STARTUP_LAYER_WAIT": "3"}) == []
    assert conf.deprecated_in_use(both) == [
        "AWX_WS_STARTUP_REDIS_WAIT is deprecated and will be ignored in the next release: "
        "use AWX_WS_STARTUP_LAYER_WAIT"
    ]
    with pytest.raises(conf.SettingError, match=r"^AWX_WS_STARTUP_REDIS_WAIT='soon' cannot be read"):
        conf.from_environment({"AWX_WS_STARTUP_REDIS_WAIT": "soon"})
