"""``mooncake-real run``: a scenario, run for real on this machine, judged exactly as the simulator judges it.

Rules of this module:

* The run is turned into a :class:`mooncake_protocol.outcome.RunRecord` (``mode="real"``) and judged by
  :func:`mooncake_protocol.outcome.evaluate`; the report is :func:`~mooncake_protocol.outcome.format_summary`
  or :meth:`~mooncake_protocol.outcome.Outcome.to_json`, the very ones ``mooncake-sim run`` prints. Exit
  status 0 only when the outcome matches the scenario's ``expect``.
* Hang detection mirrors the simulator (see launcher.py): the run ends when every rank's caller finished
  (``completed``), when no progress mark appeared for ``deadlines.stall_s`` (``stall``), or at
  ``bootstrap_s + collective_s * max(1, len(workload))`` (``deadline``); the ranks then dump.
* Faults: ``kill_rank``, ``pause_rank``, ``delay_store`` and ``hold_port`` are the launcher's;
  ``slow_peer`` and ``close_port`` are the rank's RPC server's and ``block_direction`` its transfer
  engine's (taken from that rank's :class:`~mooncake_protocol.rankenv.RankEnv`, as the simulator takes
  them); ``skip_publish``, ``extra_backend``, ``advertise_host``, ``concurrent_groups`` are the protocol's own.
* Ranks re-load the scenario from its file, so it is passed to them as an absolute path.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from mooncake_protocol.errors import InputError
from mooncake_protocol.resources import check_output

from .launcher import Faults, JobResult, check_realisable, launch, record_t

#: ``mooncake-real run`` with no scenario runs this bundled CPU scenario (no GPU needed).
DEFAULT_SCENARIO = "real-cpu-allreduce"


#: The faults :func:`faults_of` hands to the launcher (the others are each rank's own or the protocol's): a job
#: that torchrun or SLURM starts has no launcher to carry them out.
LAUNCHER_FAULTS = ("kill_rank", "pause_rank", "hold_port", "delay_store")


def faults_of(scenario: Any) -> Faults:
    """The launcher's faults from a scenario's ``faults`` (the others are the protocol's own business)."""
    f = Faults()
    delay = 0.0
    for fault in scenario.faults:
        if fault.kind == "kill_rank" and fault.rank is not None:
            f.kill_at[int(fault.rank)] = str(fault.at or "bootstrap")
            if getattr(fault, "seconds", None):
                f.kill_after[int(fault.rank)] = float(fault.seconds)
        elif fault.kind == "pause_rank" and fault.rank is not None:
            f.pause_at[int(fault.rank)] = (str(fault.at or "bootstrap"), float(fault.seconds or 1.0))
        elif fault.kind == "hold_port" and fault.port is not None:
            f.hold_ports.append(int(fault.port))
        elif fault.kind == "delay_store":
            delay += float(fault.seconds or 0.0)  # the simulator adds them up too
    f.store_delay_s = delay
    return f


def rank_options(envs: list[Any]) -> dict[int, dict[str, Any]]:
    """Per-rank RankSpec fields for the RPC server faults, from each rank's own RankEnv."""
    out: dict[int, dict[str, Any]] = {}
    for env in envs:
        opts: dict[str, Any] = {}
        slow = env.fault("slow_peer")
        if slow is not None:
            opts["rpc_delay_s"] = float(slow.seconds or 0.0)
        if env.fault("close_port") is not None:
            opts["rpc_closed"] = True
        blocked = sorted({int(f.ranks[1]) for f in env.faults
                          if f.kind == "block_direction" and len(f.ranks) == 2 and int(f.ranks[0]) == env.rank})
        if blocked:
            opts["blocked_to"] = blocked
        if opts:
            out[env.rank] = opts
    return out


def deadline_of(scenario: Any) -> float:
    """The simulator's deadline: bootstrap_s + collective_s * max(1, len(workload))."""
    d = scenario.deadlines
    return float(d.bootstrap_s + d.collective_s * max(1, len(scenario.workload)))


def run_job(scenario: Any, *, deadline_s: float | None = None, keep_job_dir: bool = False,
            job_id: str | None = None, job_dir: str | None = None) -> JobResult:
    """Run a loaded scenario for real (refusing what this machine cannot realise); the launcher's result."""
    from mooncake_protocol.rankenv import make_rank_envs

    source = scenario.source
    check_realisable(scenario.realisable, source=source or scenario.name)
    gpus = [p.gpu if scenario.backend == "cuda" else None for p in sorted(scenario.placement, key=lambda p: p.rank)]
    envs = make_rank_envs(scenario, lambda _host: "127.0.0.1")
    return launch(scenario.ranks, scenario=str(Path(source).resolve()), gpus=gpus, faults=faults_of(scenario),
                  deadline_s=deadline_s if deadline_s is not None else deadline_of(scenario),
                  stall_s=float(scenario.deadlines.stall_s), rank_options=rank_options(envs),
                  keep_job_dir=keep_job_dir, job_id=job_id, job_dir=job_dir)


def run_scenario(ref: str, deadline_s: float | None = None, keep_job_dir: bool = False) -> JobResult:
    """Load ``ref`` (a bundled name or a path) and run it for real; the launcher's result."""
    from mooncake_protocol.scenario import load_scenario

    return run_job(load_scenario(ref), deadline_s=deadline_s, keep_job_dir=keep_job_dir)


# ---------------------------------------------------------------------------------- JobResult -> RunRecord


def _blocking_effect(name: str) -> bool:
    """Whether the simulator would report an activity in effect ``name`` as blocked (not Sleep, not instant)."""
    from mooncake_protocol import effects as fx

    cls = getattr(fx, name, None)
    if cls is None or not isinstance(cls, type):
        return True  # a driver-level record (e.g. DeviceWork): keep it
    return bool(getattr(cls, "blocking", False)) and cls is not fx.Sleep


def run_ended_at(result: JobResult) -> float | None:
    """When the launcher ended a run that stalled or ran past its deadline (run seconds, the ranks' clock), or
    None for a run that completed. The ranks run on while it asks for their dumps (``dump_grace_s``, longer
    when a rank stuck in a CuPy module load cannot answer), and what they do then is after the end: the
    simulator stops at that instant, so a rank's own wait that ran out meanwhile (an error) is not the run's
    story. Found by a generated H100 scenario: a stall at 3 s, then three ranks' 5 s collective waits ran
    out while the launcher waited for a frozen rank's dump, and the run was judged an error."""
    if result.end_reason not in ("stall", "deadline"):
        return None
    return next((float(e["t"]) for e in result.events if e.get("event") == result.end_reason), None)


def run_record(result: JobResult, scenario: Any, wall_s: float | None = None) -> Any:
    """The :class:`~mooncake_protocol.outcome.RunRecord` of a real run (the simulator's shape, mode "real")."""
    from mooncake_protocol.outcome import RunRecord
    from mooncake_protocol.rankenv import make_rank_envs
    from mooncake_protocol.trace import PHASES, Blocked

    envs = make_rank_envs(scenario, lambda _host: "127.0.0.1")
    ended = run_ended_at(result)
    trace = result.trace if ended is None else [rec for rec in result.trace if record_t(rec) <= ended]
    marks = [rec for rec in trace if rec.get("type") == "mark"]
    effects = [rec for rec in trace if rec.get("type") == "effect"]
    killed = sorted({int(m["rank"]) for m in marks if m.get("name") == "killed" and m.get("activity") == "driver"})

    phases: dict[int, str] = {e.rank: "bootstrap" for e in envs}
    phase_times: dict[int, dict[str, float]] = {e.rank: {} for e in envs}
    for m in marks:
        if m.get("name") != "phase":
            continue
        r, ph = int(m["rank"]), m.get("data", {}).get("phase")
        if ph not in PHASES or r not in phases:
            continue
        if PHASES.index(ph) >= PHASES.index(phases[r]):
            phases[r] = ph
            phase_times[r].setdefault(ph, float(m["t"]))

    errors: dict[int, tuple[str, str | None]] = {}
    for r, res in sorted(result.results.items()):
        if ended is not None and res.get("status") == "error" and float(res.get("t", 0.0)) > ended:
            continue  # a wait that ran out while the launcher was collecting dumps (a crash still counts)
        if res.get("status") == "error":
            errors[r] = (str(res.get("error", "")), res.get("cause"))
        elif res.get("status") == "crash":  # a driver or protocol bug: never a clean run
            errors[r] = (f"crash: {res.get('error', '')}", None)
    for m in marks:  # a ProtocolError in a spawned activity (the simulator counts those too)
        if m.get("name") == "error" and int(m["rank"]) not in errors:
            d = m.get("data", {})
            errors[int(m["rank"])] = (str(d.get("text", "")), d.get("cause"))
    for r, code in result.exit_codes.items():  # died without a word (not a kill fault)
        if r not in errors and r not in killed and r not in result.results and code not in (None, 0):
            errors[r] = (f"rank process exited with status {code} before its caller finished", None)

    if result.end_reason == "completed":
        end = result.callers_done_s
        done_t = [float(res["t"]) for res in result.results.values() if "t" in res]
        if done_t:
            end = max(done_t)
        sim_time = float(end if end is not None else result.last_progress_s)
        blocked: list[Blocked] = []
    else:
        sim_time = float(result.last_progress_s)
        blocked = [b for b in result.blocked() if b.rank not in killed and _blocking_effect(b.effect)]
    stats = {
        "store_ops": sum(v for k, v in result.store_stats.items() if isinstance(v, int)),
        "effects": len(effects),
        "marks": len(marks),
        "job_id": result.job_id,
        "launcher_wall_s": result.wall_s,
        "end_time_s": sim_time,
        # the job clock starts at the launch: process start, interpreter and imports come before bootstrap
        "bootstrap_at_s": min((t["bootstrap"] for t in phase_times.values() if "bootstrap" in t), default=None),
        "exit_codes": {str(r): c for r, c in sorted(result.exit_codes.items())},
        "launcher_events": [e["event"] for e in result.events],
    }
    return RunRecord(
        mode="real", end_reason=result.end_reason, sim_time_s=sim_time,
        wall_s=result.wall_s if wall_s is None else wall_s, envs=envs, marks=marks, effects=effects,
        blocked=blocked, errors=errors, phases=phases, phase_times=phase_times, killed=killed, stats=stats,
    )


def run_outcome(scenario: Any, *, trace: str | None = None, deadline_s: float | None = None,
                keep_job_dir: bool = False) -> tuple[Any, JobResult]:
    """Run a loaded scenario for real and judge it: (Outcome, JobResult)."""
    from mooncake_protocol.outcome import evaluate

    wall0 = time.perf_counter()
    result = run_job(scenario, deadline_s=deadline_s, keep_job_dir=keep_job_dir)
    rec = run_record(result, scenario, wall_s=time.perf_counter() - wall0)
    if trace is not None:
        write_run_trace(trace, rec)
    return evaluate(rec, scenario), result


def write_run_trace(path: str, rec: Any) -> None:
    """``--trace FILE``: the format of ``mooncake-sim run --trace`` (records by time, then the blocked ones)."""
    records = sorted(rec.effects + rec.marks, key=lambda r: (r.get("t0", r.get("t", 0.0)), r["rank"]))
    out = sys.stdout if path == "-" else open(path, "w", encoding="utf-8")
    try:
        for r in records:
            out.write(json.dumps(r, sort_keys=True, default=repr) + "\n")
        for b in rec.blocked:
            out.write(json.dumps({"type": "blocked", **b.to_json()}, sort_keys=True) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()


def cmd_run(args: Any) -> int:
    from mooncake_protocol.outcome import format_summary
    from mooncake_protocol.scenario import load_scenario

    scenario = load_scenario(args.scenario or DEFAULT_SCENARIO)
    if args.trace:
        check_output(args.trace, "--trace")
        if args.trace == "-" and args.json:
            raise InputError("--trace -", "", "--json also prints to stdout; write the trace to a file")
    outcome, result = run_outcome(scenario, trace=args.trace, deadline_s=args.deadline, keep_job_dir=args.keep)
    if args.json:
        print(json.dumps(outcome.to_json()))
    else:
        print(format_summary(outcome))
        crashed = {r: res for r, res in result.results.items() if res.get("status") == "crash"}
        for r, res in sorted(crashed.items()):
            print(f"  CRASH     rank {r}: {res.get('error', '')}", file=sys.stderr)
        if args.keep:
            print(f"  job dir   {result.job_dir}")
    return 0 if outcome.matches else 1
