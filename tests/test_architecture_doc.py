"""docs/architecture.md names every module of the service, and every file it names exists: a
newcomer can point at the file for each concept (issue 16)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
MAIN = ROOT / "awx_ws" / "main"
DOC = (ROOT / "docs" / "architecture.md").read_text()
# Packages the page describes as a whole: their modules need no row of their own.
DESCRIBED_WHOLE = ("api/", "management/", "migrations/")


def test_every_module_has_its_place_on_the_page():
    missing = []
    for path in sorted(MAIN.rglob("*.py")):
        relative = path.relative_to(MAIN).as_posix()
        if path.name == "__init__.py" or relative.startswith(DESCRIBED_WHOLE):
            continue
        if f"`{relative}`" not in DOC and not re.search(rf"`{re.escape(relative)}[`,]", DOC):
            missing.append(relative)
    assert missing == []


def test_every_file_the_page_names_exists():
    named = set(re.findall(r"`([\w/]+\.py)`", DOC))
    assert len(named) > 30
    places = [MAIN, ROOT / "awx_ws", ROOT, ROOT / "tests"]
    absent = sorted(name for name in named if not any((place / name).exists() for place in places))
    assert absent == []
