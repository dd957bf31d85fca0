"""docs/channels.md's settings table says what the code does: every setting has its row, and the
default it shows is the one the code applies (conf.SETTINGS for AWX_WS, config/settings.py's
readers for Django's and the channel layers'). Defaults are written in code once; this holds the
table to them."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from awx_ws.main.conf import SETTINGS

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent


def documented() -> dict[str, str]:
    """{variable: its default cell, backticks removed} from the Settings table."""
    text = (ROOT / "docs" / "channels.md").read_text()
    table = text[text.index("\n## Settings") :]
    rows: dict[str, str] = {}
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].startswith("`"):
            for name in re.findall(r"`([A-Z0-9_]+)`", cells[0]):
                rows[name] = cells[1].replace("`", "")
    return rows


def shown_as(default: object, cell: str) -> bool:
    """Whether the docs' cell shows default."""
    if isinstance(default, bool):
        return cell in ({"true", "on"} if default else {"false", "off"})
    if isinstance(default, int | float):
        return float(cell) == default
    if isinstance(default, list | str) and not default:
        return cell.startswith("empty") or cell == "off"  # DEBUG: unset is off
    if isinstance(default, list):
        return cell == ",".join(default)
    if isinstance(default, dict):
        return bool(json.loads(cell) == default)
    return cell == default


def test_the_table_is_found():
    assert len(documented()) > 40


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_each_awx_ws_setting_is_documented_with_its_default(name):
    setting = SETTINGS[name]
    rows = documented()
    assert setting.env in rows, f"{setting.env} has no row in docs/channels.md's Settings table"
    if not callable(setting.default):  # computed from the environment: the row says from what
        assert shown_as(setting.default, rows[setting.env]), (setting.env, setting.default, rows[setting.env])


def environment_readers() -> dict[str, object]:
    """{variable: literal default} of each env_int, env_float, env_list, os.environ.get in settings.py."""
    tree = ast.parse((ROOT / "config" / "settings.py").read_text())
    found: dict[str, object] = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or len(node.args) != 2:
            continue
        name = ast.unparse(node.func)
        if name in {"env_int", "env_float", "env_list", "os.environ.get"}:
            variable, default = node.args
            if isinstance(variable, ast.Constant):
                try:
                    found[variable.value] = ast.literal_eval(default)
                except ValueError:
                    found[variable.value] = None  # computed: the row says from what
    return found


def test_the_django_and_layer_settings_are_documented_with_their_defaults():
    rows = documented()
    readers = environment_readers()
    assert {"REDIS_CONNECT_TIMEOUT", "CHANNEL_LAYER_CAPACITY", "ALLOWED_HOSTS"} <= set(readers)
    missing = sorted(set(readers) - set(rows))
    assert missing == []
    wrong = {
        variable: (default, rows[variable])
        for variable, default in readers.items()
        if default is not None and "see " not in rows[variable] and not shown_as(default, rows[variable])
    }
    assert wrong == {}
