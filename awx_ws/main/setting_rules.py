"""The rules of AWX_WS settings (conf.py's table): readers of environment text, and checks of
values that say what is wrong (None when the value is valid). Pure functions, no Django."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

Check = Callable[[Any], str | None]


# --- readers of environment text -------------------------------------------------------------


def integer(text: str) -> int:
    return int(text.strip())


def number(text: str) -> float:
    value = float(text.strip())
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError("not a finite number")
    return value


def text(text: str) -> str:
    return text


def comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"expected one of {', '.join(sorted(_TRUE | _FALSE))}")


def json_value(text: str) -> Any:
    return json.loads(text)


# --- checks of values (None when valid, else what is wrong) ----------------------------------


def int_at_least(low: int) -> Check:
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int):
            return "must be an integer"
        return None if value >= low else f"must be at least {low}"

    return check


def seconds(*, zero: bool = False) -> Check:
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
            return "must be a number of seconds"
        if value < 0 or (value == 0 and not zero):
            return "must be at least 0" if zero else "must be greater than 0"
        return None

    return check


def string(*, empty: bool = True) -> Check:
    def check(value: Any) -> str | None:
        if not isinstance(value, str):
            return "must be a string"
        return None if empty or value.strip() else "must not be empty"

    return check


def flag(value: Any) -> str | None:
    return None if isinstance(value, bool) else "must be true or false"


# Patterns that validate are matched in full (fullmatch): `$` also matches before a final "\n",
# and `\d` matches any Unicode digit.
_RATE_RE = re.compile(r"[0-9]+/(s|m|h|d)[a-z]*")


def one_of(*choices: str) -> Check:
    def check(value: Any) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}"

    return check


def rate(value: Any) -> str | None:
    if isinstance(value, str) and _RATE_RE.fullmatch(value):
        return None
    return "must be a DRF rate such as 1200/min (a count, '/', then s, m, h or d)"


_PEER_RE = re.compile(r"wss?://[!-~]+|[A-Za-z0-9_.\-\[\]:]+:[0-9]{1,5}")


def peers(value: Any) -> str | None:
    if not isinstance(value, list) or not all(isinstance(peer, str) for peer in value):
        return "must be a list of host:port entries or ws:// / wss:// URLs"
    bad = [peer for peer in value if not _PEER_RE.fullmatch(peer)]
    return f"{bad[0]!r} is neither host:port nor a ws:// or wss:// URL" if bad else None


def history_kinds(value: Any) -> str | None:
    if not isinstance(value, dict):
        return 'must be a JSON object such as {"control": null, "jobs": {"length": 100, "age": 600}}'
    for kind, policy in value.items():
        if not isinstance(kind, str) or not kind:
            return f"{kind!r} is not a group kind"
        if policy is None:
            continue
        if not isinstance(policy, dict) or not set(policy) <= {"length", "age"}:
            return f'{kind!r}: expected null or {{"length": n, "age": seconds}}'
        if "length" in policy and (problem := int_at_least(1)(policy["length"])):
            return f"{kind!r}: length {problem}"
        if "age" in policy and (problem := seconds()(policy["age"])):
            return f"{kind!r}: age {problem}"
    return None
