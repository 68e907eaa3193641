"""``mooncake-sim run``: load a scenario, simulate it, print the report, exit by the expectation.

Exit status: 0 when the outcome matches the scenario's ``expect`` (with no ``expect``: when it
completes), 1 when it does not, 2 for bad input. With no scenario, the flagship runs: the seed's
situation on a GB200 NVL72 rack under ``legacy-1755`` with the #1755 fixes applied one at a time, then
under ``fixed``, side by side; it exits 0 when every step ends as :data:`FLAGSHIP_STEPS` expects (each
legacy step hangs with the next of the four causes, ``fixed`` completes with the right values).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from mooncake_protocol.errors import InputError
from mooncake_protocol.outcome import Outcome, evaluate, format_summary
from mooncake_protocol.policy import PRESETS, make_policy
from mooncake_protocol.resources import check_output
from mooncake_protocol.scenario import Expect, load_scenario

from .driver import CONSTANTS, Calibration, simulate

FLAGSHIP = "nvl72-first-collective"

#: The flagship's ladder: legacy-1755, then the #1755 fixes switched on one at a time, then fixed; each step
#: with the cause its hang must be diagnosed as (None: the step completes, as the scenario's ``expect`` says).
FLAGSHIP_STEPS: tuple[tuple[str, str, dict[str, Any], str | None], ...] = (
    ("legacy-1755", "legacy-1755", {}, "rpc-port-conflict"),
    ("+ RPC bind checked", "legacy-1755", {"check_rpc_bind": True}, "host-region-gpu-label"),
    ("+ host regions \"*\"", "legacy-1755", {"check_rpc_bind": True, "host_region_wildcard_label": True},
     "lazy-kernel-load"),
    ("+ reduce kernels preloaded", "legacy-1755",
     {"check_rpc_bind": True, "host_region_wildcard_label": True, "preload_reduce_kernels": True}, "stale-task-id"),
    ("fixed (+ task ids reset, sync flags zeroed)", "fixed", {}, None),
)


def load_calibration(path: str) -> Calibration:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(path, "", "calibration file not found; write one with `mooncake-real calibrate -o FILE`") from None
    except json.JSONDecodeError as exc:
        raise InputError(path, f"line {exc.lineno}", f"not valid JSON ({exc.msg}); regenerate it with `mooncake-real calibrate`") from None
    if not isinstance(data, dict) or not isinstance(data.get("sim"), dict):
        raise InputError(path, "sim", "missing the 'sim' section of constants; regenerate it with `mooncake-real calibrate`")
    known = CONSTANTS
    sections = [("sim", data["sim"])]
    tables = {}
    for name in ("sim_by_ranks", "sim_cuda_by_ranks"):
        table = tables[name] = data.get(name) or {}
        if not isinstance(table, dict):
            raise InputError(path, name, "must map a rank count to constants; regenerate it with `mooncake-real calibrate`")
        for n, part in table.items():
            if not str(n).isdigit() or int(n) < 1 or not isinstance(part, dict):
                raise InputError(path, f"{name}.{n}", "must map a rank count (a positive integer) to constants; "
                                 "regenerate it with `mooncake-real calibrate`")
            sections.append((f"{name}.{n}", part))
    for where, section in sections:
        for k, v in section.items():
            if k not in known:
                raise InputError(path, f"{where}.{k}", f"unknown constant (known: {', '.join(known)}); regenerate the file with `mooncake-real calibrate`")
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0):
                raise InputError(path, f"{where}.{k}", f"must be a non-negative number, got {v!r}; regenerate the file with `mooncake-real calibrate`")
    return Calibration.from_dict(data["sim"], tables["sim_by_ranks"], tables["sim_cuda_by_ranks"])


def with_policy(scenario: Any, preset: str, overrides: dict[str, Any] | None = None) -> Any:
    merged = dict(getattr(scenario, "policy_overrides", ()) or ())
    merged.update(overrides or {})
    policy = make_policy(preset, merged)
    name = preset + ("" if not overrides else " + " + ", ".join(sorted(k for k in overrides)))
    return dataclasses.replace(scenario, policy=policy, policy_name=name)


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_one(scenario: Any, *, trace: str | None = None, calibration: Calibration | None = None,
            progress: bool = False, fast_forward: bool = True) -> Outcome:
    rec = simulate(scenario, record_effects=trace is not None, calibration=calibration,
                   progress=_to_stderr if progress else None, fast_forward=fast_forward)
    if trace is not None:
        write_trace(trace, rec.effects, rec.marks, [b.to_json() for b in rec.blocked])
    return evaluate(rec, scenario)


def write_trace(path: str, effects: list[dict[str, Any]], marks: list[dict[str, Any]], blocked: list[dict[str, Any]]) -> None:
    records = sorted(effects + marks, key=lambda r: (r.get("t0", r.get("t", 0.0)), r["rank"]))
    out = sys.stdout if path == "-" else open(path, "w")
    try:
        for rec in records:
            out.write(json.dumps(rec, sort_keys=True) + "\n")
        for b in blocked:
            out.write(json.dumps({"type": "blocked", **b}, sort_keys=True) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()


def _flagship(args: argparse.Namespace, calibration: Calibration | None) -> int:
    base = load_scenario(FLAGSHIP)
    if args.seed is not None:
        base = dataclasses.replace(base, seed=args.seed)
    outcomes = []
    labels = []
    for label, preset, overrides, cause in FLAGSHIP_STEPS:
        sc = with_policy(base, preset, overrides)
        if cause is not None:  # this step's expectation: the hang of that cause, not the scenario's clean run
            sc = dataclasses.replace(sc, expect=Expect("hang", cause=cause))
        if not args.json:
            print(f"... simulating {base.name} ({base.ranks} ranks) under {label}", file=sys.stderr, flush=True)
        outcomes.append(run_one(sc, calibration=calibration, fast_forward=not args.no_fast_forward))
        labels.append(label)
    if args.json:
        print(json.dumps({"flagship": base.name,
                          "runs": [dict(o.to_json(), step=label) for label, o in zip(labels, outcomes, strict=True)]}))
    else:
        print(f"{base.name}: {base.description.strip()}\n")
        w = max(len(label) for label in labels)
        print(f"{'policy':<{w}}  {'verdict':<9} {'cause':<28} {'phase':<10} {'sim time':>10}  {'wall':>5}  as expected")
        for label, o in zip(labels, outcomes, strict=True):
            print(f"{label:<{w}}  {o.verdict:<9} {str(o.cause or '-'):<28} {o.phase:<10} {o.sim_time_s:>9.4f}s  "
                  f"{o.wall_s:>4.1f}s  {'yes' if o.matches else 'NO: ' + '; '.join(o.mismatches[:2])}")
        print()
        for o in (outcomes[0], outcomes[-1]):
            print(format_summary(o, max_blocked=6))
            print()
    return 0 if all(o.matches for o in outcomes) else 1


def cmd_run(args: argparse.Namespace) -> int:
    if args.seed is not None and args.seed < 0:
        raise InputError("--seed", "", f"must be an integer >= 0 (as the scenario's seed), got {args.seed}")
    calibration = load_calibration(args.calibration) if getattr(args, "calibration", None) else None
    if not args.scenario:
        if args.policy or args.trace:
            raise InputError("mooncake-sim run", "--policy/--trace", "name a scenario to use --policy or --trace")
        return _flagship(args, calibration)
    scenario = load_scenario(args.scenario)
    if args.trace:
        check_output(args.trace, "--trace")
        if args.trace == "-" and args.json:
            raise InputError("--trace -", "", "--json also prints to stdout; write the trace to a file")
    if args.seed is not None:
        scenario = dataclasses.replace(scenario, seed=args.seed)
    if args.policy:
        if args.policy not in PRESETS:
            raise InputError("--policy", "", f"unknown policy preset {args.policy!r}; use one of: {', '.join(PRESETS)}")
        changed = with_policy(scenario, args.policy)
        if changed.policy != scenario.policy and scenario.expect is not None:
            # the scenario's expect describes its own protocol (a legacy scenario expects its hang)
            e = scenario.expect
            print(f"note: --policy {args.policy} replaces the scenario's policy {scenario.policy_name}; its expect "
                  f"({e.verdict}{', ' + e.cause if e.cause else ''}) was written for that one, so this run is held "
                  "to completing cleanly", file=sys.stderr)
            changed = dataclasses.replace(changed, expect=None)
        scenario = changed
    outcome = run_one(scenario, trace=args.trace, calibration=calibration,
                      progress=not args.json and not getattr(args, "quiet", False),
                      fast_forward=not args.no_fast_forward)
    if args.json:
        print(json.dumps(outcome.to_json()))
    else:
        print(format_summary(outcome))
    return 0 if outcome.matches else 1
