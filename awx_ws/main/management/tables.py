"""Plain-text tables for the management commands' terminal output."""

from __future__ import annotations

from collections.abc import Sequence


def ago(stamp: float, now: float) -> str:
    """`12s ago`, or `3m ago` past two minutes."""
    seconds = max(0, int(now - stamp))
    return f"{seconds}s ago" if seconds < 120 else f"{seconds // 60}m ago"


def format_table(lines: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart; the first line is the header."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )
