"""``mooncake-real run``: a scenario, run for real on this machine.

The lead connects this to the protocol's verdict and diagnosis; until then it refuses what this machine
cannot realise, maps the scenario's faults onto the launcher, runs the ranks with the protocol's own
``rank_main`` and reports exit codes, results and (on a hang) the blocked activities.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from .launcher import Faults, JobResult, check_realisable, launch, write_trace


def faults_of(scenario: Any) -> Faults:
    """The launcher's faults from a scenario's ``faults`` (the others are the protocol's own business)."""
    f = Faults()
    for fault in scenario.faults:
        if fault.kind == "kill_rank" and fault.rank is not None:
            f.kill_at[int(fault.rank)] = str(fault.at or "bootstrap")
        elif fault.kind == "pause_rank" and fault.rank is not None:
            f.pause_at[int(fault.rank)] = (str(fault.at or "bootstrap"), float(fault.seconds or 1.0))
        elif fault.kind == "hold_port" and fault.port is not None:
            f.hold_ports.append(int(fault.port))
        elif fault.kind == "delay_store":
            f.store_delay_s = float(fault.seconds or 0.0)
    return f


def run_scenario(ref: str, deadline_s: float | None = None, keep_job_dir: bool = False) -> JobResult:
    from mooncake_protocol.scenario import load_scenario

    scenario = load_scenario(ref)
    check_realisable(scenario.realisable, source=scenario.source or ref)
    gpus = [p.gpu if scenario.backend == "cuda" else None for p in sorted(scenario.placement, key=lambda p: p.rank)]
    d = deadline_s if deadline_s is not None else scenario.deadlines.bootstrap_s + scenario.deadlines.collective_s
    return launch(scenario.ranks, scenario=str(ref), gpus=gpus, faults=faults_of(scenario), deadline_s=d,
                  keep_job_dir=keep_job_dir)


def summary(result: JobResult) -> dict[str, Any]:
    statuses = {r: res.get("status") for r, res in result.results.items()}
    if result.timed_out:
        outcome = "hang"
    elif any(s == "error" for s in statuses.values()):
        outcome = "error"
    elif len(statuses) == result.world_size and all(s == "completed" for s in statuses.values()):
        outcome = "completed"
    else:
        outcome = "error"
    return {
        "outcome": outcome, "job_id": result.job_id, "wall_s": result.wall_s, "exit_codes": result.exit_codes,
        "results": result.results, "blocked": [b.to_json() for b in result.blocked()], "events": result.events,
    }


def cmd_run(args: Any) -> int:
    if not args.scenario:
        print("mooncake-real run: name a scenario (a bundled name or a .yaml path)", file=sys.stderr)
        return 2
    result = run_scenario(args.scenario, deadline_s=args.deadline, keep_job_dir=args.keep)
    if args.trace:
        write_trace(result, args.trace)
    s = summary(result)
    if args.json:
        print(json.dumps(s, indent=1, default=repr))
    else:
        print(f"{args.scenario}: {s['outcome']} in {s['wall_s']:.2f} s (job {s['job_id']})")
        for r in sorted(result.exit_codes):
            res = result.results.get(r, {})
            print(f"  rank {r}: exit {result.exit_codes[r]} {res.get('status', 'no result')} {res.get('error', '')}".rstrip())
        for b in s["blocked"]:
            extra = f" [{b['resource']}]" if b.get("resource") else ""
            print(f"  blocked: rank {b['rank']} {b['activity']} in {b['effect']}: {b['what']}{extra}")
    return 0 if s["outcome"] == "completed" else 1
