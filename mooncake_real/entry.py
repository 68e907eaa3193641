"""The default rank entry: the protocol's own top-level activity for a scenario.

``protocol_activity(spec)`` loads ``spec.scenario``, builds every rank's :class:`~mooncake_protocol.rankenv.RankEnv`
with this machine's address (``spec.host``) for every topology host, and returns
``mooncake_protocol.rank.rank_main(env)`` for ``spec.rank``. Tests and tools may name any other
"module:callable" as ``RankSpec.entry``; it is called with the spec and returns an activity.
"""

from __future__ import annotations

from typing import Any


def protocol_activity(spec: Any) -> Any:
    from mooncake_protocol.rank import rank_main
    from mooncake_protocol.rankenv import make_rank_envs
    from mooncake_protocol.scenario import load_scenario

    if not spec.scenario:
        raise ValueError("RankSpec.scenario is empty; the protocol entry needs a scenario")
    scenario = load_scenario(spec.scenario)
    # Import what the protocol imports lazily (the worker pulls in numpy) now, before the first phase mark:
    # a Python import is process start-up, not bootstrap (the simulator's process has it loaded already).
    import mooncake_protocol.collectives  # noqa: F401
    import mooncake_protocol.p2p  # noqa: F401
    import mooncake_protocol.worker  # noqa: F401
    envs = make_rank_envs(scenario, lambda _host: spec.host)
    return rank_main(envs[spec.rank])
