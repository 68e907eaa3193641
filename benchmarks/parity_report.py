"""Parity and timing report: every bundled scenario this machine can realise, simulated and run for real.

    PYTHONPATH=. python benchmarks/parity_report.py [--calibration FILE] [--gpu] [--repeat K] [--sim-seeds N] [--keep DIR] [--budget S] [--json]

For each bundled scenario whose ``realisable`` says cpu (and, with ``--gpu``, the GPU ones), runs the
simulator (with the calibration file, if given) and ``mooncake-real run`` (a subprocess), and prints the
canonical equality, both verdicts/causes, and per phase simulated / measured time. A phase's time is the
longest rank's span from its ``phase`` mark to its next one; "bootstrap" starts at each rank's first
``phase`` mark, after process start-up and imports, in both worlds. Target: 0.8-1.25 per phase.

``--repeat K`` runs each scenario K times in both worlds (the simulator with spread seeds 0..K-1, which
draw other rank speeds where the calibration has a ``rank_spread``) and compares the median times per
phase; a real run's times vary by 20-40% from run to run on a small host, and warmup has a race in steps
of 50 ms (docs/parity.md), so one run against one run says little. The canonical column is "equal" only
when every pair of runs was; the last columns give the real runs' range per phase and, for the warmup
race, how many runs of each world had a key check that missed (a race lost: that rank retries 50 ms later).
``--sim-seeds N`` (N > K) adds simulator-only runs with spread seeds K..N-1 to the simulated medians and
the race count: a simulated run costs milliseconds, and the race's odds need more than a few draws. With
``--repeat`` above 1 it defaults to 20 (or K, if larger); a single run compares one draw with one run.
The last column ("at real odds") gives each phase's ratio again with the simulated runs weighed to the real
runs' odds of losing the race (:func:`at_real_odds`): where the race's two outcomes are 50 ms apart, the
plain median jumps between them with the odds, and this separates "are the times right" from "are the
odds right" (the race counts). The closing line counts the phases in range both ways; the race column's
``p=`` is Fisher's exact test of the two worlds' race counts (:func:`odds_p`), and the lines below the table
name the scenarios whose odds differ and explain each phase out of range plain but in at the real odds
(:func:`odds_lines`).

With ``--calibration`` the report measures the store round trip at its start and end, as ``calibrate``
does, and warns (stderr, and below the table) when either differs from the file's by more than 1.3 times:
the host then runs at another speed than when it was calibrated, and every simulated time is off with it.
It also holds the file against itself first (stderr, :func:`self_check`): the simulated bootstrap of the
job ``calibrate`` ran at each rank count, over the bootstrap that job measured then.

With ``--repeat K`` the real runs go in K rounds, each running every scenario once, so that a few slow
minutes of the host fall on every scenario a little rather than on one scenario's runs all. With a
calibration and K above 1, each round first runs the job ``calibrate`` measured again (its largest rank
count, a real run of about a second) and prints its bootstrap over the one the file recorded
(:func:`host_speed`): on a lent H100 host the same 8-rank bootstrap took a median 74 ms in one report and
34 ms in the next, ten minutes apart (docs/parity.md), so this says how far the host has moved from the
file while the report ran. Below the table: the rounds' factors and their median, with a warning when the
median is off by more than 1.3 times.

``--recalibrate [SHARE]`` measures the calibration's in-job figures again before each round
(:func:`recalibrated`, ``mooncake-real calibrate --refresh``: ``calibrate``'s own jobs, about 20 s on a
2-CPU host, the CUDA job too with ``--gpu``; SHARE 0.5 runs half of them) and simulates that round with
them, keeping the file's figures of operations measured alone; the simulator-only draws take the rounds'
calibrations in turn. The host's speed is then what those jobs measured (no second run). This compares the
model with the host as it is during the report rather than as it was when the file was written: on a small
or shared host the two differ by a quarter within minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

from mooncake_protocol.errors import InputError
from mooncake_protocol.resources import bundled_names, check_output
from mooncake_protocol.scenario import load_scenario
from mooncake_sim.parity import (
    UNCALIBRATED_NOTE,
    ParityResult,
    format_parity,
    missed_checks,
    parity,
    sim_outcome,
)
from mooncake_sim.runner import load_calibration

PHASES = ("bootstrap", "warmup", "collective")
#: A phase shorter than this in both worlds did no work (a bootstrap-only scenario's "collective" is the
#: step from its mark to "done"): shown as empty, with no ratio, and left out of the target.
EMPTY_S = 1e-3
#: Simulated draws per scenario by default with --repeat above 1 (see --sim-seeds).
SIM_SEEDS = 20
#: The target range of simulated / measured time per phase.
LOW, HIGH = 0.8, 1.25


def selected(gpu: bool) -> list[str]:
    out = []
    for name in bundled_names("scenarios"):
        r = load_scenario(name).realisable
        if r.hosts > 1 or r.mnnvl or r.rdma:
            continue
        if (r.cpu and r.gpus == 0) or (gpu and r.gpus >= 1):
            out.append(name)
    return out


def _median(xs: list[float | None]) -> float | None:
    got = [x for x in xs if x is not None]
    return statistics.median(got) if got else None


def sim_only(name: str, cal: Any, seed: int) -> tuple[dict[str, Any], int]:
    """A simulator-only run (spread seed ``seed``): its outcome JSON and its missed key checks."""
    rec, out = sim_outcome(load_scenario(name), cal, seed)
    return out, missed_checks(rec.effects)


def weighted_median(xs: list[tuple[float, Fraction]]) -> float | None:
    """The median of values with weights (exact fractions): the value where the cumulative weight passes
    half the total, or the mean of the two values around an exact half, as ``statistics.median`` does when
    all weights are equal."""
    xs = sorted((x, w) for x, w in xs if w > 0)
    if not xs:
        return None
    half, acc = sum(w for _, w in xs) / 2, Fraction(0)
    for k, (x, w) in enumerate(xs):
        acc += w
        if acc > half:
            return x
        if acc == half:
            return (x + xs[k + 1][0]) / 2
    return xs[-1][0]


def at_real_odds(sims: list[float | None], sim_lost: list[bool], reals: list[float | None],
                 real_lost: list[bool]) -> float | None:
    """The simulated median re-weighted to the real runs' odds of losing the warmup race: each simulated run
    weighs (share of real runs with its outcome) / (simulated runs with its outcome). A phase whose time is
    two modes 50 ms apart (race won, race lost) has a median that jumps between them with the odds, so
    comparing plain medians mixes two questions: are the times right, and are the odds right. This answers
    the first; the race counts answer the second. None when the real runs had an outcome no simulated run
    had (or nothing to weigh)."""
    real = [lost for t, lost in zip(reals, real_lost, strict=True) if t is not None]
    sim = [(t, lost) for t, lost in zip(sims, sim_lost, strict=True) if t is not None]
    if not real or not sim:
        return None
    n_sim = {o: sum(lost == o for _, lost in sim) for o in (False, True)}
    share = {o: Fraction(sum(lost == o for lost in real), len(real)) for o in (False, True)}
    if any(share[o] and not n_sim[o] for o in share):
        return None
    return weighted_median([(t, share[lost] / n_sim[lost]) for t, lost in sim])


def odds_p(sim_lost: int, sim_runs: int, real_lost: int, real_runs: int) -> float | None:
    """Fisher's exact test, two-sided: the chance, were both worlds' odds of losing the warmup race the same,
    of counts at least as unequal as these (the hypergeometric tables no likelier than this one, with the
    margins fixed). Small: the odds differ (the simulator's model of who publishes when is off); large: the
    counts are what one set of odds gives, and a median that jumped between the race's two modes did so by
    the draw. None without runs in both worlds."""
    if sim_runs < 1 or real_runs < 1:
        return None
    lost, n = sim_lost + real_lost, sim_runs + real_runs

    def chance(x: int) -> Fraction:
        return Fraction(math.comb(sim_runs, x) * math.comb(real_runs, lost - x), math.comb(n, lost))

    seen = chance(sim_lost)
    xs = range(max(0, lost - real_runs), min(sim_runs, lost) + 1)
    return float(sum(c for c in map(chance, xs) if c <= seen))


def row(runs: list[ParityResult], extra: list[tuple[dict[str, Any], int]] | None = None) -> dict[str, Any]:
    """One scenario's line from its runs (and ``extra`` simulator-only runs): the medians of each phase's
    times, simulated over measured, the same with the simulated runs weighed to the real race odds
    (:func:`at_real_odds`), and the warmup race's count of runs with a missed key check."""
    p = runs[0]
    extra = extra or []
    sim_lost = [q.missed_checks.get("sim", 0) > 0 for q in runs] + [n > 0 for _, n in extra]
    real_lost = [q.missed_checks.get("real", 0) > 0 for q in runs]
    raced = all(q.missed_checks for q in runs)
    phases = {}
    for ph in PHASES:
        sims = [(q.sim.get("phase_times_s") or {}).get(ph) for q in runs]
        sims += [(o.get("phase_times_s") or {}).get(ph) for o, _ in extra]
        reals = [(q.real.get("phase_times_s") or {}).get(ph) for q in runs]
        s, r = _median(sims), _median(reals)
        empty = s is not None and r is not None and max(s, r) < EMPTY_S
        got = [x for x in reals if x is not None]
        s_odds = at_real_odds(sims, sim_lost, reals, real_lost) if raced else None
        phases[ph] = {"sim_s": s, "real_s": r, "ratio": (s / r) if s is not None and r and not empty else None,
                      "empty": empty, "sim_runs_s": sims, "real_runs_s": reals,
                      "sim_at_real_odds_s": s_odds,
                      "ratio_at_real_odds": (s_odds / r) if s_odds is not None and r and not empty else None,
                      "real_range_s": (min(got), max(got)) if got else None}
    statuses = {q.status for q in runs}
    status = p.status if len(statuses) == 1 else "/".join(sorted(statuses))
    paired = [q for q in runs if q.missed_checks]
    missed = {"sim": sum(q.missed_checks["sim"] > 0 for q in paired) + sum(n > 0 for _, n in extra),
              "sim_runs": len(paired) + len(extra),
              "real": sum(q.missed_checks["real"] > 0 for q in paired), "real_runs": len(paired),
              "sim_lost": sim_lost if raced else None, "real_lost": real_lost if raced else None}
    missed["odds_p"] = odds_p(missed["sim"], missed["sim_runs"], missed["real"], missed["real_runs"]) if raced else None
    return {"scenario": p.scenario, "status": status, "runs": len(runs), "sim_runs": len(runs) + len(extra),
            "missed": missed,
            "sim": f"{p.sim.get('verdict')}/{p.sim.get('cause') or '-'}",
            "real": f"{p.real.get('verdict')}/{p.real.get('cause') or '-'}", "phases": phases,
            "message": "; ".join(sorted({q.message for q in runs if q.message})),
            "differences": [f"run {k + 1}: " + format_parity(q) for k, q in enumerate(runs) if q.status == "differ"]}


def odds_lines(rows: list[dict[str, Any]], alpha: float = 0.05) -> list[str]:
    """Below the table: the scenarios whose race odds differ between the worlds (:func:`odds_p` under
    ``alpha``), and each phase out of range as a plain median but in range at the real odds, with whether
    its scenario's odds are consistent (then the plain miss is the race's draw, not the times)."""
    out = []
    differ = [f"{r['scenario']} (p={r['missed']['odds_p']:.3f})" for r in rows
              if r["missed"].get("odds_p") is not None and r["missed"]["odds_p"] < alpha]
    if any(r["missed"].get("odds_p") is not None for r in rows):
        out.append(f"race odds differ (Fisher's exact test, p < {alpha}): " + (", ".join(differ) or "none"))
    for r in rows:
        p = r["missed"].get("odds_p")
        for ph in PHASES:
            c = r["phases"][ph]
            plain, odds = c.get("ratio"), c.get("ratio_at_real_odds")
            if plain is None or odds is None or LOW <= plain <= HIGH or not LOW <= odds <= HIGH:
                continue
            why = "consistent odds: the median fell on the other mode by the draw" if p is not None and p >= alpha \
                else "the odds differ"
            out.append(f"{r['scenario']} {ph}: {plain:.2f} plain, {odds:.2f} at the real odds ({why})")
    return out


def in_range(rows: list[dict[str, Any]], key: str) -> tuple[int, int]:
    """How many phase cells have ``key`` (a ratio) in the target range, of those with one."""
    got = [r["phases"][p][key] for r in rows for p in PHASES]
    got = [x for x in got if x is not None]
    return sum(LOW <= x <= HIGH for x in got), len(got)


def _measured(path: str) -> dict[str, Any]:
    """The calibration file's ``measured`` section ({} when it has none or cannot be read)."""
    try:
        m = json.loads(Path(path).read_text()).get("measured") or {}
    except (OSError, ValueError, AttributeError):
        return {}
    return m if isinstance(m, dict) else {}


def calibrated_ping(path: str) -> float | None:
    """The store round trip the calibration file measured (the mean of its start and end figures), if any."""
    m = _measured(path)
    got = [float(m[k]) for k in ("store_ping_rtt_s", "store_ping_rtt_end_s") if isinstance(m.get(k), (int, float))]
    return statistics.fmean(got) if got else None


def drift_warning(then_s: float | None, now_s: float, when: str) -> str | None:
    """A line when the host's store round trip now differs from the calibration's by more than
    ``UNSTEADY_FACTOR``: the in-job costs the simulator uses then describe another state of the host."""
    from mooncake_real.calibrate import speed_changed

    if not then_s or not speed_changed(then_s, now_s):
        return None
    return (f"parity_report: warning: the store round trip {when} is {now_s * 1e6:.0f} us against "
            f"{then_s * 1e6:.0f} us when the calibration was taken: this host runs at another speed now, and "
            "simulated times will be off by about that much; calibrate again right before the report")


def self_check(path: str, cal: Any, seeds: int = SIM_SEEDS) -> list[str]:
    """The file held against itself: for each rank count whose in-job run recorded its bootstrap phase
    (``in_situ_r<N>_bootstrap_s``), the simulated bootstrap of that same job with the file (median over
    ``seeds`` spread seeds) over the measured one. Off here, the model misses or overcharges something;
    near 1 while the report's bootstraps are off, the host changed between calibrating and the report."""
    import tempfile

    from mooncake_real.calibrate import IN_SITU_RANKS, in_situ_scenario

    m = _measured(path)
    lines = []
    with tempfile.TemporaryDirectory(prefix="mooncake-report-") as where:
        for n in IN_SITU_RANKS:
            real = m.get(f"in_situ_r{n}_bootstrap_s")
            if not isinstance(real, (int, float)) or real <= 0:
                continue
            sc = load_scenario(in_situ_scenario(n, where))
            sims = [(sim_outcome(sc, cal, seed)[1].get("phase_times_s") or {}).get("bootstrap") for seed in range(seeds)]
            s = _median(sims)
            if s is not None:
                lines.append(f"parity_report: the calibration's own {n}-rank job: bootstrap simulated {s * 1e3:.1f} ms, "
                             f"measured then {real * 1e3:.1f} ms = {s / real:.2f}")
    return lines


def reference_job(path: str) -> tuple[int, float] | None:
    """The calibration's own job to measure the host's speed by: its largest rank count whose bootstrap it
    recorded (``in_situ_r<N>_bootstrap_s``) and that bootstrap, or None."""
    m = _measured(path)
    got = []
    for key, value in m.items():
        head, _, tail = key.partition("_bootstrap_s")
        if head.startswith("in_situ_r") and not tail and head[len("in_situ_r"):].isdigit():
            if isinstance(value, (int, float)) and value > 0:
                got.append((int(head[len("in_situ_r"):]), float(value)))
    return max(got) if got else None


def host_speed(ranks: int) -> float | None:
    """One real run of ``calibrate``'s job at ``ranks`` ranks now: its bootstrap phase (the longest rank's
    span, as ``calibrate`` records it), or None when the run did not complete."""
    import tempfile

    from mooncake_real.calibrate import IN_SITU_SCENARIO, bootstrap_spans, in_situ_scenario
    from mooncake_real.runner import run_job, run_record

    with tempfile.TemporaryDirectory(prefix="mooncake-report-") as where:
        sc = load_scenario(in_situ_scenario(ranks, where, IN_SITU_SCENARIO))
        res = run_job(sc)
        if not res.clean():
            return None
        spans = bootstrap_spans(run_record(res, sc).phase_times)
    return max(spans) if spans else None


def recalibrated(path: str, gpu: bool, k: int, keep: str | None, share: float = 1.0) -> tuple[Any, dict[str, float]]:
    """Round ``k``'s calibration: the file at ``path`` with its in-job figures measured again now
    (``mooncake-real calibrate --refresh``; the CUDA job too with ``gpu``), written to
    ``keep/calibration-<k+1>.json`` when keeping; the loaded constants and the new measurements. ``share``:
    that share of ``calibrate``'s in-job runs (``calibrate.in_situ_runs``)."""
    import tempfile

    from mooncake_real.calibrate import refresh

    data = refresh(json.loads(Path(path).read_text()), cuda=gpu, share=share)
    with tempfile.TemporaryDirectory(prefix="mooncake-report-") as where:
        out = Path(keep or where) / f"calibration-{k + 1}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=1) + "\n")
        return load_calibration(str(out)), data["measured"]


def speed_summary(then_s: float, ranks: int, now_s: list[float | None],
                  recalibrated: bool = False) -> tuple[list[str], str | None]:
    """Lines for the reference job's rounds (its bootstrap now over the calibration's), and a warning when
    their median differs from 1 by more than ``UNSTEADY_FACTOR`` (none when every round was simulated with
    its own calibration: the drift is then measured, not an error)."""
    from mooncake_real.calibrate import speed_changed

    got = [x for x in now_s if x is not None]
    if not got:
        return [], None
    factors = " ".join("-" if x is None else f"{x / then_s:.2f}" for x in now_s)
    med = statistics.median(got)
    lines = [f"host speed: the calibration's own {ranks}-rank job, bootstrap now over then ({then_s * 1e3:.1f} ms), "
             f"per round: {factors}; median {med / then_s:.2f}"]
    warning = None
    if recalibrated:
        lines[0] += " (each round simulated with the in-job figures measured at its start)"
    elif speed_changed(then_s, med):
        warning = (f"parity_report: warning: the calibration's own {ranks}-rank job bootstrapped in {med * 1e3:.1f} ms "
                   f"(median of the rounds) against {then_s * 1e3:.1f} ms when the file was made: the host ran at "
                   "another speed during this report, and the bootstrap cells say as much about that as about "
                   "the model")
    return lines, warning


def run_order(names: list[str], repeat: int) -> list[tuple[str, int]]:
    """The real runs in rounds: (scenario, k) for k in 0..repeat-1, every scenario once per round."""
    return [(name, k) for k in range(repeat) for name in names]


def host_ping() -> float:
    """This host's store round trip now (as ``mooncake-real calibrate`` measures it)."""
    from mooncake_real.calibrate import measure_store

    return measure_store(100)["store_ping_rtt_s"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calibration", metavar="FILE")
    ap.add_argument("--gpu", action="store_true", help="also the GPU-realisable scenarios")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--only", nargs="*", help="these scenarios only")
    ap.add_argument("--repeat", type=int, default=1, metavar="K",
                    help="run each scenario K times in both worlds and compare medians (default 1)")
    ap.add_argument("--keep", metavar="DIR", help="keep each run's traces, outcomes and canonical forms in "
                    "DIR/<scenario>-<k>/ (as mooncake-sim parity --keep)")
    ap.add_argument("--recalibrate", nargs="?", type=float, const=1.0, metavar="SHARE",
                    help="before each round, measure the calibration's in-job figures again on this host "
                         "(mooncake-real calibrate --refresh, about 20 s on a 2-CPU host) and simulate that "
                         "round with the result; SHARE below 1 runs that share of calibrate's in-job runs "
                         "(0.5: half, at least 2 per rank count); needs --calibration")
    ap.add_argument("--sim-seeds", type=int, metavar="N",
                    help="simulated runs per scenario (spread seeds 0..N-1), at least K; the first K are paired "
                         f"with the real runs (default: {SIM_SEEDS} or K, whichever is larger, when K > 1; else 1)")
    ap.add_argument("--budget", type=float, metavar="SECONDS",
                    help="start no round that would likely end past this many seconds from the start (judged "
                         "by the longest round so far), and report on the rounds done; for a machine lent for a "
                         "limited time, where a report killed in its last round prints nothing")
    args = ap.parse_args(argv)
    if args.budget is not None and args.budget <= 0:
        ap.error("--budget must be above 0 seconds")
    if args.repeat < 1:
        ap.error("--repeat must be 1 or more")
    if args.sim_seeds is not None and args.sim_seeds < args.repeat:
        ap.error(f"--sim-seeds must be at least --repeat ({args.repeat})")
    if args.recalibrate is not None and not args.calibration:
        ap.error("--recalibrate needs --calibration FILE (the figures it keeps)")
    if args.recalibrate is not None and not 0 < args.recalibrate <= 1:
        ap.error("--recalibrate SHARE must be above 0 and at most 1")
    if args.keep:
        try:
            check_output(args.keep, "--keep", directory=True)
        except InputError as exc:
            ap.error(str(exc))
    sim_seeds = args.sim_seeds if args.sim_seeds is not None else (max(SIM_SEEDS, args.repeat) if args.repeat > 1 else 1)
    try:  # bad input is one line before any run: a scenario name or a calibration file
        for name in args.only or ():
            load_scenario(name)
        cal = load_calibration(args.calibration) if args.calibration else None
    except InputError as exc:
        print(f"parity_report: {exc}", file=sys.stderr)
        return 2
    then = calibrated_ping(args.calibration) if args.calibration else None
    warnings: list[str] = []

    def warn(w: str | None) -> None:
        """Keep a warning for below the table, and say it on stderr now."""
        if w:
            warnings.append(w)
            print(w, file=sys.stderr, flush=True)

    for line in self_check(args.calibration, cal) if args.calibration else []:
        print(line, file=sys.stderr, flush=True)
    if then:
        warn(drift_warning(then, host_ping(), "at the start"))
    names = list(args.only or selected(args.gpu))
    ref = reference_job(args.calibration) if args.calibration and (args.repeat > 1 or args.recalibrate is not None) else None
    speeds: list[float | None] = []
    if args.recalibrate is not None and ref is None:
        print(f"parity_report: {args.calibration}: measured: no in-job figures (in_situ_r<N>_bootstrap_s) to "
              "measure again; write a full calibration with `mooncake-real calibrate -o FILE`", file=sys.stderr)
        return 2
    cals = [] if args.recalibrate is not None else [cal]  # with --recalibrate: round k's calibration
    done: dict[str, list[ParityResult]] = {name: [] for name in names}
    started, round_at, longest, rounds_done = time.monotonic(), time.monotonic(), 0.0, 0
    for name, k in run_order(names, args.repeat):
        if k > rounds_done:  # round k starts: round k-1 is done
            now = time.monotonic()
            longest, round_at, rounds_done = max(longest, now - round_at), now, k
            if args.budget is not None and now - started + longest > args.budget:
                print(f"parity_report: --budget {args.budget:g} s: stopped after {k} of {args.repeat} rounds "
                      f"(the longest took {longest:.0f} s, {now - started:.0f} s gone); the report covers those",
                      file=sys.stderr, flush=True)
                break
        if ref is not None and len(speeds) == k:  # a round starts: the host's speed first
            if args.recalibrate is not None:
                got, fresh = recalibrated(args.calibration, args.gpu, k, args.keep, args.recalibrate)
                cals.append(got)
                speeds.append(fresh.get(f"in_situ_r{ref[0]}_bootstrap_s"))
            else:
                speeds.append(host_speed(ref[0]))
            print(f"... round {k + 1}/{args.repeat}: the calibration's own {ref[0]}-rank job bootstrapped in "
                  + ("-" if speeds[-1] is None else f"{speeds[-1] * 1e3:.1f} ms") + f" ({ref[1] * 1e3:.1f} ms then)",
                  file=sys.stderr, flush=True)
        if done[name] and done[name][-1].status in ("unrealisable", "real-failed"):
            continue
        print(f"... {name}" + (f" ({k + 1}/{args.repeat})" if args.repeat > 1 else ""), file=sys.stderr, flush=True)
        keep = f"{args.keep}/{name}-{k + 1}" if args.keep else None
        done[name].append(parity(name, calibration=cals[k % len(cals)], spread_seed=k, trace_dir=keep))
    rows = []
    for name in names:
        runs = done[name]
        extra = []
        if runs[-1].status in ("equal", "differ"):  # simulator-only draws take the rounds' calibrations in turn
            extra = [sim_only(name, cals[seed % len(cals)], seed) for seed in range(len(runs), sim_seeds)]
        rows.append(row(runs, extra))
    speed_lines: list[str] = []
    if ref is not None:
        speed_lines, w = speed_summary(ref[1], ref[0], speeds, recalibrated=args.recalibrate is not None)
        for line in speed_lines:
            print(f"parity_report: {line}", file=sys.stderr, flush=True)
        warn(w)
        for r in rows:  # the same for every row: the rows stay a list, as before
            r["host_speed"] = {"ranks": ref[0], "then_s": ref[1], "rounds_s": speeds}
    if then:
        warn(drift_warning(then, host_ping(), "at the end"))
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        def cell(ph: dict[str, Any]) -> str:
            if ph["real_s"] is None and ph["sim_s"] is None:
                return "-"
            if ph["empty"]:
                return "empty"
            r = f"{ph['ratio']:.2f}" if ph["ratio"] is not None else "n/a"
            return f"{_ms(ph['sim_s'])}/{_ms(ph['real_s'])}={r}"

        def spread(ph: dict[str, Any]) -> str:
            rr = ph["real_range_s"]
            return "-" if rr is None or ph["empty"] else f"{rr[0] * 1e3:.0f}-{rr[1] * 1e3:.0f}"

        def race(r: dict[str, Any]) -> str:
            m = r["missed"]
            if not m["real_runs"]:
                return "-"
            p = "" if m.get("odds_p") is None else f" p={m['odds_p']:.2f}"
            return f"sim {m['sim']}/{m['sim_runs']} real {m['real']}/{m['real_runs']}{p}"

        def odds(r: dict[str, Any]) -> str:
            got = [r["phases"][p]["ratio_at_real_odds"] for p in PHASES]
            if all(x is None for x in got):
                return "-"
            return "/".join("-" if x is None else f"{x:.2f}" for x in got)

        many = args.repeat > 1
        print(f"{'scenario':<30} {'canonical':<12} {'sim':<28} {'real':<28} " + " ".join(f"{p:<24}" for p in PHASES)
              + (f" {'real range ms (' + '/'.join(PHASES) + ')':<40}" if many else "") + " race lost (runs)"
              + ("  at real odds" if many else ""))
        for r in rows:
            print(f"{r['scenario']:<30} {r['status']:<12} {r['sim']:<28} {r['real']:<28} "
                  + " ".join(f"{cell(r['phases'][p]):<24}" for p in PHASES)
                  + (f" {' / '.join(spread(r['phases'][p]) for p in PHASES):<40}" if many else "") + " "
                  + f"{race(r):<24}" + (f"  {odds(r)}" if many else ""))
        plain, odd = in_range(rows, "ratio"), in_range(rows, "ratio_at_real_odds")
        print(f"\nphases in {LOW}-{HIGH}: {plain[0]} of {plain[1]} (medians)"
              + (f", {odd[0]} of {odd[1]} with the simulated runs weighed to the real race odds" if many else ""))
        for line in odds_lines(rows):
            print(line)
        if not args.calibration:
            print(UNCALIBRATED_NOTE)
        for r in rows:
            for text in r["differences"]:
                print(f"\n{r['scenario']} {text}")
        for line in speed_lines:
            print(f"\n{line}")
        for w in warnings:
            print(w)
    bad = [r for r in rows if r["status"] not in ("equal", "unrealisable")]
    return 1 if bad else 0


def _ms(t: float | None) -> str:
    return "-" if t is None else f"{t * 1e3:.1f}ms"


if __name__ == "__main__":
    sys.exit(main())
