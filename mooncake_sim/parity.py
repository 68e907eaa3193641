"""``mooncake-sim parity SCENARIO``: run one scenario in both worlds and compare their canonical traces.

The simulator runs in this process; real mode runs as a subprocess, ``python -m mooncake_real.cli run
SCENARIO --json --trace FILE`` (so ``mooncake_sim`` never imports ``mooncake_real``). Both traces and
outcome JSONs go through :func:`mooncake_protocol.canonical.canonical`; the command prints ``equal`` or the
first divergence per rank side by side (:func:`mooncake_protocol.canonical.diff`).

Exit status: 0 equal, 1 different (or real mode failed without a verdict), 2 bad input or a scenario
this machine cannot realise (real mode's one line is passed through).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mooncake_protocol
from mooncake_protocol.canonical import canonical, diff
from mooncake_protocol.errors import InputError
from mooncake_protocol.outcome import evaluate
from mooncake_protocol.rankenv import HOST_WAIT_SHARE
from mooncake_protocol.resources import check_output
from mooncake_protocol.scenario import load_scenario

from .driver import Calibration, simulate
from .runner import load_calibration, write_trace

#: Exit status of ``mooncake-real run`` when the machine cannot realise the scenario (or bad input).
UNREALISABLE = 2


@dataclass
class ParityResult:
    scenario: str
    status: str  # equal | differ | unrealisable | real-failed
    sim: dict[str, Any] = field(default_factory=dict)  # the sim outcome JSON
    real: dict[str, Any] = field(default_factory=dict)  # the real outcome JSON
    canonical_sim: dict[str, Any] = field(default_factory=dict)
    canonical_real: dict[str, Any] = field(default_factory=dict)
    diff: list[str] = field(default_factory=list)
    message: str = ""  # real mode's line (unrealisable) or its stderr tail (failed)
    #: store key checks that found a peer's keys missing, per world ("sim", "real"): a warmup race lost (the
    #: poller retries 50 ms later); abstracted from the canonical form, so it shows only in the times
    missed_checks: dict[str, int] = field(default_factory=dict)
    #: the host-timing failures (:data:`HOST_TIMING_CAUSES`) that the scenario's policy leaves open
    races: tuple[str, ...] = ()
    #: the scenario's two time limits that can end a stuck collective: the protocol's own wait for it (an
    #: error) and the stall window (a hang), in seconds
    limits: dict[str, float] = field(default_factory=dict)

    @property
    def equal(self) -> bool:
        return self.status == "equal"

    @property
    def exit_code(self) -> int:
        return {"equal": 0, "unrealisable": 2}.get(self.status, 1)

    def ratios(self) -> dict[str, float | None]:
        """Simulated over measured time per phase (None where a side has no such phase)."""
        ps, pr = self.sim.get("phase_times_s") or {}, self.real.get("phase_times_s") or {}
        return {ph: (ps[ph] / pr[ph] if ph in ps and pr.get(ph) else None) for ph in sorted(set(ps) | set(pr), key=_phase_key)}

    def race_note(self) -> str | None:
        """Why the worlds may differ, where it is timing rather than the model: a hang in one and an error in the
        other where the two time limits lie close (:meth:`_close_limits`); one of them met a failure that a slow
        moment of the host causes by itself (:data:`HOST_TIMING_CAUSES`) and the other did not; or the race such
        a failure comes from, left open by the policy, left its fact in one world only. Else None."""
        if self.status != "differ":
            return None
        close = self._close_limits()
        if close:
            return close
        causes = {self.sim.get("cause"), self.real.get("cause")}
        for cause, race in HOST_TIMING_CAUSES.items():
            if cause in causes and self.sim.get("cause") != self.real.get("cause"):
                side = "real" if self.real.get("cause") == cause else "simulated"
                return f"only the {side} run met {cause}: {race.why}"
        # the same cause in both (or none), but the race left its trace in one world only: peers dropped, or
        # values read before they landed
        for cause in self.races:
            race = HOST_TIMING_CAUSES[cause]
            if any(block.startswith(f"fact {race.fact} differs") for block in self.diff):
                return f"the runs differ in {race.what}, where this policy leaves {cause} open: {race.why}"
        return None

    def _close_limits(self) -> str | None:
        """One world ended as a hang and the other as an error with the same cause, and the collective's own
        wait and the stall window lie within a quarter of each other: which ran out first was timing."""
        if {self.sim.get("verdict"), self.real.get("verdict")} != {"hang", "error"}:
            return None
        if self.sim.get("cause") != self.real.get("cause"):
            return None
        wait, stall = self.limits.get("collective"), self.limits.get("stall")
        if not wait or not stall or abs(wait - stall) > 0.25 * max(wait, stall):
            return None
        hung = "real" if self.real.get("verdict") == "hang" else "simulated"
        return (f"the {hung} run ended as a hang, the other as an error: two time limits lie close together, a "
                f"collective's own wait (half of deadlines.collective_s, {wait:g} s) ends a stuck collective as an "
                f"error, the stall window (deadlines.stall_s, {stall:g} s) as a hang, and which runs out first is "
                "timing. Set stall_s well below half of collective_s (or well above it) for one story")

    def to_json(self) -> dict[str, Any]:
        def brief(o: dict[str, Any]) -> dict[str, Any]:
            keys = ("verdict", "cause", "phase", "phase_times_s", "sim_time_s", "wall_s", "matches_expect")
            return {k: o.get(k) for k in keys}

        return {"scenario": self.scenario, "status": self.status, "equal": self.equal, "message": self.message,
                "sim": brief(self.sim), "real": brief(self.real), "ratios": self.ratios(), "diff": self.diff,
                "missed_checks": self.missed_checks, "race_note": self.race_note(),
                "canonical": {"sim": self.canonical_sim, "real": self.canonical_real}}


@dataclass(frozen=True)
class HostRace:
    """A failure that a slow moment of a loaded host brings about in a real run with no fault injected."""

    switch: str  # the policy switch that closes it (the race is open while it is False)
    fact: str  # the canonical fact it leaves behind when both worlds agree on the cause
    what: str  # that fact, in words
    why: str  # why the worlds may differ on it, and what to do


#: A parity difference on one of these is a race of this host, not a model error: the simulator's costs are
#: calibrated means and never draw the slow moment.
HOST_TIMING_CAUSES: dict[str, HostRace] = {
    "ping-false-positive": HostRace("liveness_probe", "broken", "peers marked broken", (
        "at the snapshot a worker pings a peer whose task is older than 100 us and marks it broken when the reply "
        "takes more than 5 ms; a loaded host's RPC reply sometimes does, the simulator's RPCs take their "
        "calibrated mean. A pause_rank or slow_peer fault makes the stall happen in both worlds "
        "(scenarios/ping-false-positive.yaml); policy fixed (#1808's liveness probe) has no such race")),
    "uninitialized-sync-flag": HostRace("zero_sync_flags", "results", "collective values", (
        "sync flags that were never zeroed read as set, so a rank may read its receive buffer before a peer's "
        "data lands; whether the data has landed by then is a race between the peer's WRITE and the reader, "
        "which the two worlds can win differently. Policy fixed (zero_sync_flags) has no such race")),
}


def open_races(policy: Any) -> tuple[str, ...]:
    """The host-timing failures (:data:`HOST_TIMING_CAUSES`) that ``policy`` leaves open: the ping rule without
    #1808's liveness probe, sync flags that are not zeroed."""
    return tuple(cause for cause, race in HOST_TIMING_CAUSES.items() if not getattr(policy, race.switch))


def _phase_key(ph: str) -> int:
    from mooncake_protocol.trace import PHASES

    return PHASES.index(ph) if ph in PHASES else len(PHASES)


def read_trace(path: str | Path) -> list[dict[str, Any]]:
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                out.append(json.loads(line))
    return out


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(mooncake_protocol.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_real(scenario_path: str, trace_path: str, *, deadline_s: float | None = None,
             timeout_s: float | None = None) -> tuple[int, dict[str, Any] | None, str]:
    """``mooncake-real run`` as a subprocess: (exit status, outcome JSON or None, stderr)."""
    cmd = [sys.executable, "-m", "mooncake_real.cli", "run", scenario_path, "--json", "--trace", trace_path]
    if deadline_s is not None:
        cmd += ["--deadline", str(deadline_s)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_subprocess_env(), timeout=timeout_s, check=False)
    outcome = None
    for line in reversed(proc.stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                outcome = json.loads(line)
            except json.JSONDecodeError:
                continue
            break
    return proc.returncode, outcome, proc.stderr


def missed_checks(records: list[dict[str, Any]]) -> int:
    """Effect records of a trace that are a ``StoreCheck`` answered false (a peer's keys not there yet)."""
    return sum(1 for r in records if r.get("type") == "effect" and r.get("effect") == "StoreCheck" and r.get("result") is False)


def sim_outcome(scenario: Any, calibration: Calibration | None = None, spread_seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """The simulator in this process, effects recorded: its run record and its outcome JSON."""
    rec = simulate(scenario, record_effects=True, calibration=calibration, spread_seed=spread_seed)
    out: dict[str, Any] = evaluate(rec, scenario).to_json()
    return rec, out


def run_sim(scenario: Any, trace_path: str, calibration: Calibration | None = None, spread_seed: int = 0) -> dict[str, Any]:
    """:func:`sim_outcome`, and the trace written as ``mooncake-sim run --trace`` does; the outcome JSON."""
    rec, out = sim_outcome(scenario, calibration, spread_seed)
    write_trace(trace_path, rec.effects, rec.marks, [b.to_json() for b in rec.blocked])
    return out


def parity(ref: str, *, calibration: Calibration | None = None, deadline_s: float | None = None,
           trace_dir: str | None = None, timeout_s: float | None = None, spread_seed: int = 0) -> ParityResult:
    """Run scenario ``ref`` (bundled name or path) in both worlds and compare the canonical forms
    (``spread_seed``: the simulator's draw of rank speeds, see :func:`~mooncake_sim.driver.simulate`)."""
    scenario = load_scenario(ref)
    path = str(Path(scenario.source).resolve())
    need = scenario.realisable
    if not need.cpu and not need.gpus and need.hosts <= 1 and not need.mnnvl and not need.rdma:
        return ParityResult(scenario.name, "unrealisable", message=(
            f"{scenario.source}: cannot run for real: the scenario says realisable.cpu is false (it depends on "
            "timing a real process cannot reproduce); run it in the simulator (mooncake-sim run) instead"))
    tmp = None
    if trace_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="mooncake-parity-")
        where = Path(tmp.name)
    else:
        where = Path(trace_dir)
        where.mkdir(parents=True, exist_ok=True)
    try:
        real_trace, sim_trace = str(where / "real.trace.jsonl"), str(where / "sim.trace.jsonl")
        rc, real_out, err = run_real(path, real_trace, deadline_s=deadline_s, timeout_s=timeout_s)
        if rc == UNREALISABLE:
            lines = [ln for ln in err.strip().splitlines() if ln.strip()]
            line = lines[-1] if lines else f"{scenario.source}: mooncake-real run exited 2"
            return ParityResult(scenario.name, "unrealisable", message=line.removeprefix("mooncake-real: "))
        if real_out is None or not Path(real_trace).exists():
            tail = "\n".join(err.strip().splitlines()[-8:])
            return ParityResult(scenario.name, "real-failed", message=f"mooncake-real run exited {rc} without a result: {tail}")
        sim_out = run_sim(scenario, sim_trace, calibration, spread_seed)
        sim_records, real_records = read_trace(sim_trace), read_trace(real_trace)
        cs = canonical(sim_records, sim_out)
        cr = canonical(real_records, real_out)
        d = diff(cs, cr, ("sim", "real"))
        missed = {"sim": missed_checks(sim_records), "real": missed_checks(real_records)}
        if trace_dir is not None:
            (where / "sim.outcome.json").write_text(json.dumps(sim_out, indent=1))
            (where / "real.outcome.json").write_text(json.dumps(real_out, indent=1))
            (where / "sim.canonical.json").write_text(json.dumps(cs, indent=1))
            (where / "real.canonical.json").write_text(json.dumps(cr, indent=1))
        return ParityResult(scenario.name, "equal" if not d else "differ", sim_out, real_out, cs, cr, d,
                            missed_checks=missed, races=open_races(scenario.policy),
                            limits={"collective": scenario.deadlines.collective_s * HOST_WAIT_SHARE,
                                    "stall": scenario.deadlines.stall_s})
    finally:
        if tmp is not None:
            tmp.cleanup()


#: Why an uncalibrated comparison's time ratios are far from 1, and what to do (parity and parity_report).
UNCALIBRATED_NOTE = ("uncalibrated: the simulator charges no CPU time for this host's work, so its times are not "
                     "this machine's; run `mooncake-real calibrate -o cal.json`, then pass --calibration cal.json")


def format_parity(p: ParityResult, calibrated: bool = True) -> str:
    """The readable result of ``mooncake-sim parity``; ``calibrated=False`` adds why the time ratios are far
    from 1 (an uncalibrated simulator charges no host CPU)."""
    if p.status == "unrealisable":
        return p.message
    if p.status == "real-failed":
        return f"{p.scenario}: {p.message}"
    lines = [f"{p.scenario}: {'equal' if p.equal else 'DIFFERENT'}"]
    w = ("verdict", "cause", "phase")
    for side, o in (("sim", p.sim), ("real", p.real)):
        lines.append(f"  {side:<5} " + "  ".join(f"{k} {o.get(k) or '-'}" for k in w))
    ratios = p.ratios()
    if ratios:
        ps, pr = p.sim.get("phase_times_s") or {}, p.real.get("phase_times_s") or {}
        parts = []
        for ph, r in ratios.items():
            s_t, r_t = ps.get(ph), pr.get(ph)
            parts.append(f"{ph} {_ms(s_t)}/{_ms(r_t)}" + (f" = {r:.2f}" if r is not None else ""))
        lines.append("  time  simulated/measured: " + ", ".join(parts))
        if not calibrated:
            lines.append(f"        ({UNCALIBRATED_NOTE})")
    if any(p.missed_checks.values()):
        lines.append("  key checks that missed (a warmup race lost, a 50 ms retry): "
                     + ", ".join(f"{side} {n}" for side, n in p.missed_checks.items()))
    if p.diff:
        lines.append("  first divergences (sim | real):")
        for block in p.diff:
            lines += ["  " + ln for ln in block.splitlines()]
    note = p.race_note()
    if note:
        lines.append(f"  note  {note}")
    return "\n".join(lines)


def _ms(t: float | None) -> str:
    return "-" if t is None else f"{t * 1e3:.1f}ms"


def cmd_parity(args: argparse.Namespace) -> int:
    calibration = load_calibration(args.calibration) if args.calibration else None
    if args.keep:
        check_output(args.keep, "--keep", directory=True)
    if args.deadline is not None and args.deadline <= 0:
        raise InputError("--deadline", "", "must be a positive number of seconds")
    p = parity(args.scenario, calibration=calibration, deadline_s=args.deadline, trace_dir=args.keep)
    if args.json:
        print(json.dumps(p.to_json()))
    elif p.status == "unrealisable":
        print(f"mooncake-sim parity: {p.message}", file=sys.stderr)
    else:
        print(format_parity(p, calibrated=calibration is not None))
    return p.exit_code
