"""Every bundled scenario, run in the simulator, gives the verdict, phase and cause its ``expect`` names."""

from __future__ import annotations

import pytest

from mooncake_protocol.outcome import format_summary
from mooncake_protocol.resources import bundled_names
from mooncake_protocol.scenario import load_scenario
from mooncake_sim.runner import run_one

SCENARIOS = [n for n in bundled_names("scenarios") if not n.startswith("bench-")]


@pytest.mark.parametrize("name", SCENARIOS)
def test_scenario_matches_expect(name: str) -> None:
    outcome = run_one(load_scenario(name))
    assert outcome.matches, "\n" + format_summary(outcome)
