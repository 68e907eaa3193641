"""docs/state-machines.md is what ``python -m mooncake_protocol.docgen`` generates from the tables."""

from __future__ import annotations

from mooncake_protocol import docgen, poller


def test_state_machines_doc_up_to_date() -> None:
    assert docgen.main(["--check"]) == 0, "docs/state-machines.md is stale: run python -m mooncake_protocol.docgen"


def test_every_transition_rendered() -> None:
    text = docgen.render()
    for state, moves in poller.TRANSITIONS.items():
        for event, nxt in moves.items():
            assert f"    {state.name} --> {nxt.name}: {event.name}" in text
            assert f"| `{state.name}` | `{event.name}` |" in text
