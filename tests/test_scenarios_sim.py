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


def test_the_cli_freezes_the_collector_at_exit() -> None:
    """mooncake-sim's exit skips the collector's last walk over what a large run left alive: at exit the
    generations are frozen (once, however often main or freeze_at_exit ran)."""
    import subprocess
    import sys

    code = ("import atexit, gc\n"
            "atexit.register(lambda: print('frozen', gc.get_freeze_count() > 0))\n"
            "from mooncake_sim.cli import freeze_at_exit, main\n"
            "freeze_at_exit(); main(['topo', 'list'])\n"
            "import mooncake_sim.cli as c; print('registered', c._FREEZE_AT_EXIT)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    assert "registered True" in out and out.rstrip().endswith("frozen True"), out
