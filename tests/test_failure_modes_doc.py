"""docs/failure-modes.md has a section per diagnosis code and names only scenario files that exist."""

from __future__ import annotations

import re
from pathlib import Path

from mooncake_protocol.causes import CAUSES

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "failure-modes.md"


def test_one_section_per_code() -> None:
    text = DOC.read_text()
    for code, cause in CAUSES.items():
        assert f"## {cause.number}. `{code}`" in text, f"no section for {code}"


def test_named_scenarios_exist() -> None:
    for name in re.findall(r"scenarios/([\w.-]+\.yaml)", DOC.read_text()):
        assert (ROOT / "scenarios" / name).is_file(), f"docs/failure-modes.md names missing scenarios/{name}"


def test_named_switches_exist() -> None:
    from mooncake_protocol.policy import SWITCHES

    for cause in CAUSES.values():
        if cause.switch:
            assert cause.switch in SWITCHES
