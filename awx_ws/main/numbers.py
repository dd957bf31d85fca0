"""Numbers read from clients: ASCII digits only, and only as many as the value may have.

`str.isdigit()` is true for "²", "١" and "𝟠" too: "1²" passed such a check and then made `int()`
raise (a websocket closed with 1011, an SSE stream answered 500), and `int()` itself reads
Arabic-Indic or full-width digits, spaces and signs. Every number a client sends (ids, counters,
stream positions, ports) is read here: a regular expression of ASCII digits, matched in full,
with a bound on their count, so a 400-digit number costs nothing and reaches no database.
"""

from __future__ import annotations

import re

_DIGITS = re.compile(r"[0-9]+")


def parse_digits(text: object, max_digits: int) -> int | None:
    """The integer text spells in 1 to max_digits ASCII digits; None for anything else."""
    if not isinstance(text, str) or not 0 < len(text) <= max_digits or not _DIGITS.fullmatch(text):
        return None
    return int(text)


# The largest object id (a bigint primary key).
MAX_ID = 2**63 - 1


def parse_id(value: object) -> int | None:
    """An object id from a client's JSON: a positive integer (not a bool) or its ASCII decimal
    string, at most MAX_ID; None for anything else."""
    number = parse_bounded(value, MAX_ID) if isinstance(value, str) else value
    if isinstance(number, bool) or not isinstance(number, int) or not 0 < number <= MAX_ID:
        return None
    return number


def parse_bounded(text: object, maximum: int) -> int | None:
    """The integer text spells in ASCII digits if it is at most maximum; None for anything else."""
    value = parse_digits(text, len(str(maximum)))
    return value if value is not None and value <= maximum else None
