"""Parity and timing report: every bundled scenario this machine can realise, simulated and run for real.

    PYTHONPATH=. python benchmarks/parity_report.py [--calibration FILE] [--gpu] [--json]

For each bundled scenario whose ``realisable`` says cpu (and, with ``--gpu``, the GPU ones), runs the
simulator (with the calibration file, if given) and ``mooncake-real run`` (a subprocess), and prints the
canonical equality, both verdicts/causes, and per phase simulated / measured time. A phase's time is the
longest rank's span from its ``phase`` mark to its next one; "bootstrap" starts at each rank's first
``phase`` mark, after process start-up and imports, in both worlds. Target: 0.8-1.25 per phase.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from mooncake_protocol.resources import bundled_names
from mooncake_protocol.scenario import load_scenario
from mooncake_sim.parity import ParityResult, parity
from mooncake_sim.runner import load_calibration

PHASES = ("bootstrap", "warmup", "collective")
#: A phase shorter than this in both worlds did no work (a bootstrap-only scenario's "collective" is the
#: step from its mark to "done"): shown as empty, with no ratio, and left out of the target.
EMPTY_S = 1e-3


def selected(gpu: bool) -> list[str]:
    out = []
    for name in bundled_names("scenarios"):
        r = load_scenario(name).realisable
        if r.hosts > 1 or r.mnnvl or r.rdma:
            continue
        if (r.cpu and r.gpus == 0) or (gpu and r.gpus >= 1):
            out.append(name)
    return out


def row(p: ParityResult) -> dict[str, Any]:
    ps, pr = p.sim.get("phase_times_s") or {}, p.real.get("phase_times_s") or {}
    phases = {}
    for ph in PHASES:
        s, r = ps.get(ph), pr.get(ph)
        empty = s is not None and r is not None and max(s, r) < EMPTY_S
        phases[ph] = {"sim_s": s, "real_s": r, "ratio": (s / r) if s is not None and r and not empty else None,
                      "empty": empty}
    return {"scenario": p.scenario, "status": p.status, "sim": f"{p.sim.get('verdict')}/{p.sim.get('cause') or '-'}",
            "real": f"{p.real.get('verdict')}/{p.real.get('cause') or '-'}", "phases": phases, "message": p.message}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calibration", metavar="FILE")
    ap.add_argument("--gpu", action="store_true", help="also the GPU-realisable scenarios")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--only", nargs="*", help="these scenarios only")
    args = ap.parse_args(argv)
    cal = load_calibration(args.calibration) if args.calibration else None
    rows = []
    for name in args.only or selected(args.gpu):
        print(f"... {name}", file=sys.stderr, flush=True)
        rows.append(row(parity(name, calibration=cal)))
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

        print(f"{'scenario':<30} {'canonical':<12} {'sim':<28} {'real':<28} " + " ".join(f"{p:<24}" for p in PHASES))
        for r in rows:
            print(f"{r['scenario']:<30} {r['status']:<12} {r['sim']:<28} {r['real']:<28} "
                  + " ".join(f"{cell(r['phases'][p]):<24}" for p in PHASES))
    bad = [r for r in rows if r["status"] not in ("equal", "unrealisable")]
    return 1 if bad else 0


def _ms(t: float | None) -> str:
    return "-" if t is None else f"{t * 1e3:.1f}ms"


if __name__ == "__main__":
    sys.exit(main())
