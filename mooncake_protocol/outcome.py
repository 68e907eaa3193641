"""From a finished run to a verdict, a diagnosis and a report: the same for both drivers.

A driver returns a :class:`RunRecord` (marks, blocked records, errors, phase times). :func:`evaluate`
turns it into an :class:`Outcome`: verdict (``completed`` | ``error`` | ``hang``), cause code, the phase
reached, time per phase, the transports chosen per pair class, collective results checked against the
scenario, and whether all of that matches the scenario's ``expect``.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from .diagnosis import Diagnosis, diagnose
from .rankenv import RankEnv
from .scenario import Expect
from .trace import PHASES, Blocked


@dataclass
class RunRecord:
    """What a driver hands over when a run ends."""

    mode: str  # sim | real
    end_reason: str  # completed | stall | deadline
    sim_time_s: float  # simulated seconds (sim) or measured seconds (real) until the end
    wall_s: float
    envs: list[RankEnv]
    marks: list[dict[str, Any]]
    effects: list[dict[str, Any]]
    blocked: list[Blocked]
    errors: dict[int, tuple[str, str | None]]
    phases: dict[int, str]
    phase_times: dict[int, dict[str, float]]
    killed: list[int]
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class Outcome:
    scenario: str
    mode: str
    verdict: str
    cause: str | None
    phase: str
    sim_time_s: float
    wall_s: float
    ranks: int
    phase_times_s: dict[str, float]
    transports: dict[str, dict[str, int]]
    diagnosis: Diagnosis
    results: dict[str, Any]
    result_problems: list[str]
    expect: dict[str, Any]
    mismatches: list[str]
    blocked: list[Blocked]
    stats: dict[str, Any]
    policy: str
    seed: int

    @property
    def matches(self) -> bool:
        return not self.mismatches

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "mode": self.mode,
            "verdict": self.verdict,
            "cause": self.cause,
            "phase": self.phase,
            "sim_time_s": round(self.sim_time_s, 9),
            "wall_s": round(self.wall_s, 4),
            "ranks": self.ranks,
            "policy": self.policy,
            "seed": self.seed,
            "phase_times_s": {k: round(v, 9) for k, v in self.phase_times_s.items()},
            "transports": self.transports,
            "diagnosis": {"cause": self.diagnosis.cause, "explanation": self.diagnosis.explanation,
                          "wait_for": [list(e) for e in self.diagnosis.wait_for[:200]]},
            "blocked": [b.to_json() for b in self.blocked[:200]],
            "results": self.results,
            "result_problems": self.result_problems,
            "expect": self.expect,
            "matches_expect": self.matches,
            "mismatches": self.mismatches,
            "stats": self.stats,
        }


def pair_class(a: RankEnv, b: RankEnv) -> str:
    if a.rank == b.rank:
        return "self"
    if a.host != b.host:
        return "inter-host"
    if a.gpu is not None and a.gpu == b.gpu:
        return "same-gpu"
    return "intra-host"


def _phase_times(rec: RunRecord) -> dict[str, float]:
    out: dict[str, float] = {}
    for i, ph in enumerate(PHASES[:-1]):
        nxt = PHASES[i + 1]
        spans = []
        for times in rec.phase_times.values():
            if ph in times:
                end = times.get(nxt, rec.sim_time_s)
                spans.append(max(0.0, end - times[ph]))
        if spans:
            out[ph] = max(spans)
    return out


def _results(rec: RunRecord) -> tuple[dict[str, Any], list[str]]:
    """Collective outputs per collective and rank, and the problems found against the scenario."""
    results: dict[str, Any] = {}
    problems: list[str] = []
    by_rank = {e.rank: e for e in rec.envs}
    for m in rec.marks:
        if m["name"] != "collective_done":
            continue
        d = m["data"]
        key = f"{d.get('index')}:{d.get('op')}"
        results.setdefault(key, {})[str(m["rank"])] = {"output": d.get("output"), "active": d.get("active")}
        env = by_rank.get(m["rank"])
        if env is None:
            continue
        idx = int(d.get("index", 0))
        if idx >= len(env.workload):
            continue
        spec = env.workload[idx]
        want = expected_output(spec, m["rank"])
        if want is not _ANY and d.get("output") is not None and want != d.get("output"):
            problems.append(f"collective {key}: rank {m['rank']} got {_short(d.get('output'))}, expected {_short(want)}")
    problems += _disagreements(results, problems)
    return results, problems


#: Collectives after which every rank of one active set holds the same output.
SAME_OUTPUT_OPS = ("allreduce", "allgather", "broadcast")


def _disagreements(results: dict[str, Any], problems: list[str]) -> list[str]:
    """Wrong values that need no ``expect``: ranks that ended an allreduce, allgather or broadcast with the same
    active set but different outputs (one of them, at least, is wrong). A collective already found wrong
    against its ``expect`` is left to that."""
    out = []
    for key, per_rank in results.items():
        if key.split(":", 1)[1] not in SAME_OUTPUT_OPS or any(p.startswith(f"collective {key}:") for p in problems):
            continue
        held = {r: v for r, v in per_rank.items() if v.get("output") is not None}
        if len({json.dumps(v.get("active")) for v in held.values()}) != 1:
            continue  # a rank dropped a peer the others kept: their outputs may differ for that reason
        groups: dict[str, list[str]] = {}
        for r, v in sorted(held.items(), key=lambda kv: int(kv[0])):
            groups.setdefault(json.dumps(v["output"], sort_keys=True), []).append(r)
        if len(groups) > 1:
            parts = "; ".join(f"rank{'s' if len(rs) > 1 else ''} {', '.join(rs)}: {_short(json.loads(o))}"
                              for o, rs in groups.items())
            out.append(f"collective {key}: the ranks disagree ({parts}), though every rank must hold the same output")
    return out


_ANY = object()


def expected_output(spec: Any, rank: int) -> Any:
    """What the scenario says rank ``rank`` should hold after collective ``spec`` (or _ANY)."""
    exp = getattr(spec, "expect", None)
    if exp is None:
        return _ANY
    mode = getattr(exp, "mode", "all")
    if mode == "all":
        return list(exp.values)
    if mode == "root":
        return list(exp.values) if rank == spec.root else None
    if mode == "per_rank":
        for r, vals in exp.per_rank:
            if int(r) == rank:
                return list(vals)
        return _ANY
    return _ANY


def _short(v: Any) -> str:
    s = json.dumps(v)
    return s if len(s) <= 80 else s[:77] + "..."


def evaluate(rec: RunRecord, scenario: Any) -> Outcome:
    if rec.errors:
        verdict = "error"
    elif rec.end_reason == "completed":
        verdict = "completed"
    else:
        verdict = "hang"
    alive = [r for r in rec.phases if r not in rec.killed]
    if verdict == "completed":
        phase = "done"
    else:
        phase = min((rec.phases[r] for r in alive), key=PHASES.index, default="bootstrap")
    results, problems = _results(rec)
    diag = diagnose(rec.marks, rec.blocked, rec.errors, verdict, rec.killed, problems)
    cause = diag.cause
    transports: dict[str, Counter[str]] = defaultdict(Counter)
    by_rank = {e.rank: e for e in rec.envs}
    seen = set()
    for m in rec.marks:
        if m["name"] != "transport":
            continue
        d = m["data"]
        a, b = by_rank.get(m["rank"]), by_rank.get(int(d.get("peer", -1)))
        if a is None or b is None:
            continue
        key = (m["rank"], d.get("peer"), d.get("transport"), d.get("kind"))
        if key in seen:
            continue
        seen.add(key)
        transports[f"{pair_class(a, b)} {d.get('kind')}"][str(d.get("transport"))] += 1
    exp = scenario.expect
    if exp is None:  # a scenario without ``expect`` is expected to complete cleanly (docs/scenario-format.md)
        exp = Expect("completed")
    expect = {"verdict": exp.verdict, "phase": exp.phase, "cause": exp.cause, "active_ranks": exp.active_ranks,
              "given": scenario.expect is not None}
    mismatches = []
    if verdict != exp.verdict:
        mismatches.append(f"verdict {verdict}, expected {exp.verdict}")
    if exp.cause is not None and cause != exp.cause:
        mismatches.append(f"cause {cause}, expected {exp.cause}")
    if exp.verdict == "completed" and exp.cause is None and cause is not None and verdict == "completed":
        mismatches.append(f"cause {cause} found, expected a clean run")
    if exp.phase is not None and phase != exp.phase:
        mismatches.append(f"phase {phase}, expected {exp.phase}")
    if exp.verdict == "completed" and exp.cause is None:
        mismatches.extend(problems)
    if exp.active_ranks is not None:
        # activeRanks as each listed rank sees it after its last collective (a dropped rank's own view is not
        # the group's: it may not know it was dropped)
        last: dict[str, tuple[str, Any]] = {}
        for rkey, per_rank in results.items():
            for r, v in per_rank.items():
                last[r] = (rkey, v.get("active"))
        for r, (rkey, act) in sorted(last.items()):
            if int(r) in exp.active_ranks and act is not None \
                    and [i for i, x in enumerate(act) if x] != list(exp.active_ranks):
                mismatches.append(f"collective {rkey}: rank {r} active ranks {act}, expected {list(exp.active_ranks)}")
    return Outcome(
        scenario=scenario.name, mode=rec.mode, verdict=verdict, cause=cause, phase=phase,
        sim_time_s=rec.sim_time_s, wall_s=rec.wall_s, ranks=len(rec.envs), phase_times_s=_phase_times(rec),
        transports={k: dict(v) for k, v in sorted(transports.items())}, diagnosis=diag, results=results,
        result_problems=problems, expect=expect, mismatches=mismatches, blocked=rec.blocked, stats=rec.stats,
        policy=getattr(scenario, "policy_name", "fixed"), seed=scenario.seed,
    )


def _fmt_t(s: float) -> str:
    if s >= 1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3f} ms"
    return f"{s * 1e6:.1f} us"


def format_summary(o: Outcome, *, max_blocked: int = 12) -> str:
    """The readable report printed by ``mooncake-sim run`` and ``mooncake-real run``."""
    lines = []
    head = f"{o.scenario} [{o.mode}, policy {o.policy}, seed {o.seed}, {o.ranks} ranks]"
    lines.append(head)
    verdict = o.verdict.upper() + (f" ({o.cause})" if o.cause else "")
    lines.append(f"  verdict   {verdict}   phase reached: {o.phase}")
    clock = "simulated" if o.mode == "sim" else "measured"
    since = ""
    started = o.stats.get("bootstrap_at_s") if o.stats else None
    if o.mode == "real" and started:  # the simulator's clock starts at bootstrap, the real job's at the launch
        since = f" from the launch (the first rank began its bootstrap at {_fmt_t(started)}: process start, imports)"
    lines.append(f"  time      {_fmt_t(o.sim_time_s)} {clock}{since}, {o.wall_s:.2f} s wall")
    if o.phase_times_s:
        parts = ", ".join(f"{k} {_fmt_t(v)}" for k, v in o.phase_times_s.items())
        lines.append(f"  phases    {parts}")
    skipped = o.stats.get("chunks_fast_forwarded") if o.stats else None
    if skipped:
        lines.append(f"            ({skipped} identical chunks fast-forwarded at their measured steady period; "
                     "--no-fast-forward simulates each)")
    if o.transports:
        lines.append("  transports chosen (pair class, memory kinds: transport x pairs):")
        for k, v in o.transports.items():
            lines.append(f"            {k}: " + ", ".join(f"{t} x{n}" for t, n in sorted(v.items())))
    if o.results:
        for key, per_rank in o.results.items():
            outs = {json.dumps(v.get("output")) for v in per_rank.values() if v.get("output") is not None}
            if not outs:  # only ``data: sizes`` runs end a collective without any rank holding values
                shown = "no values (data: sizes moves lengths only)"
            else:
                shown = _short(json.loads(next(iter(outs)))) if len(outs) == 1 else f"{len(outs)} distinct outputs"
            lines.append(f"  result    {key}: {shown} on {len(per_rank)} ranks")
    for p in o.result_problems[:5]:
        lines.append(f"  WRONG     {p}")
    if o.verdict != "completed" or o.cause:
        lines.append(f"  diagnosis {o.diagnosis.cause or 'unknown'}: {o.diagnosis.explanation}")
    if o.blocked:
        lines.append(f"  blocked activities ({len(o.blocked)}):")
        for b in o.blocked[:max_blocked]:
            extra = f" [held by {b.resource}]" if b.resource else ""
            who = f" -> {', '.join(b.blockers[:4])}{' ...' if len(b.blockers) > 4 else ''}" if b.blockers else ""
            lines.append(f"    rank {b.rank} {b.activity}: {b.effect}: {b.what}{who}{extra}")
        if len(o.blocked) > max_blocked:
            lines.append(f"    ... {len(o.blocked) - max_blocked} more (see --json)")
    if o.diagnosis.wait_for and o.verdict == "hang":
        edges = o.diagnosis.wait_for
        lines.append(f"  wait-for  {len(edges)} edges, e.g. " + "; ".join(f"{a} -> {b}" for a, b in edges[:4]))
    exp = o.expect
    want = exp["verdict"] + (f" ({exp['cause']})" if exp.get("cause") else "")
    if not exp.get("given", True):
        want += " (the default expectation: no expect in force)"
    if o.matches:
        lines.append(f"  expect    {want}: matches")
    else:
        lines.append(f"  expect    {want}: DOES NOT MATCH: " + "; ".join(o.mismatches[:4]))
    return "\n".join(lines)
