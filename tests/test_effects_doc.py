"""docs/effects.md has one table row for every effect class of ``effects.ALL_EFFECTS`` (and no stale ones)."""

from __future__ import annotations

import re
from pathlib import Path

from mooncake_protocol import effects as fx

DOC = Path(__file__).resolve().parent.parent / "docs" / "effects.md"


def _rows() -> dict[str, str]:
    rows = {}
    for line in DOC.read_text().splitlines():
        m = re.match(r"^\| `(\w+)` \|(.*)\|\s*$", line)
        if m:
            rows[m.group(1)] = m.group(2)
    return rows


def test_every_effect_has_a_row() -> None:
    rows = _rows()
    missing = [c.__name__ for c in fx.ALL_EFFECTS if c.__name__ not in rows]
    assert not missing, f"docs/effects.md lacks rows for: {', '.join(missing)}"


def test_no_row_for_an_unknown_effect() -> None:
    known = {c.__name__ for c in fx.ALL_EFFECTS}
    stale = sorted(set(_rows()) - known)
    assert not stale, f"docs/effects.md documents effects that do not exist: {', '.join(stale)}"


def test_blocking_column_matches_the_class() -> None:
    rows = _rows()
    for c in fx.ALL_EFFECTS:
        cells = [x.strip() for x in rows[c.__name__].split(" | ")]
        assert "yes" in cells or "no" in cells, c.__name__
        documented = "yes" in cells
        assert documented == bool(c.blocking), f"{c.__name__}: blocking is {c.blocking} in effects.py"


def test_every_effect_is_listed_in_all_effects() -> None:
    classes = {v for v in vars(fx).values() if isinstance(v, type) and issubclass(v, fx.Effect) and v is not fx.Effect}
    assert classes == set(fx.ALL_EFFECTS)
