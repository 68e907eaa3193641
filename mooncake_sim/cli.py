"""``mooncake-sim``: validate topology and scenario files, inspect topologies, run scenarios.

Rules: every user-facing problem is one line on stderr and exit status 2 (bad input) or 1 (unexpected
error; set MOONCAKE_DEBUG=1 for a traceback). Heavy modules (simpy, the runner) are imported only by the
subcommand that needs them.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import math
import os
import sys
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

from mooncake_protocol.errors import InputError
from mooncake_protocol.policy import PRESETS
from mooncake_protocol.resources import bundled_names, bundled_path, resolve

#: keys only a scenario has: their presence makes a file a scenario (so its errors read as a scenario's)
_SCENARIO_ONLY_KEYS = ("topology", "ranks", "placement", "workload", "faults", "expect", "policy", "backend")


def _classify(ref: str) -> tuple[str, Path]:
    """Is ``ref`` a scenario or a topology? Bundled names: scenarios first; files: by content."""
    from mooncake_protocol.topology import read_yaml

    looks_like_path = "/" in ref or ref.endswith((".yaml", ".yml")) or ref.startswith(".")
    if not looks_like_path:
        if ref in bundled_names("scenarios"):
            return "scenario", bundled_path("scenarios", ref)
        if ref in bundled_names("topologies"):
            return "topology", bundled_path("topologies", ref)
        names = ", ".join(bundled_names("topologies") + bundled_names("scenarios"))
        raise InputError(ref, "", f"no bundled topology or scenario named {ref!r}; use one of: {names}, or a path")
    p = resolve(ref, "topologies")
    data = read_yaml(p, ref)
    is_scenario = any(k in data for k in _SCENARIO_ONLY_KEYS)
    return ("scenario" if is_scenario else "topology"), p


def _validate_one(ref: str) -> str:
    from mooncake_protocol.scenario import load_scenario
    from mooncake_protocol.topology import gpus, hosts, load_topology

    kind, p = _classify(ref)
    if kind == "scenario":
        s = load_scenario(str(p))
        return f"ok {ref} (scenario: {s.ranks} ranks on {s.topology.name})"
    t = load_topology(str(p))
    return f"ok {ref} (topology: {len(hosts(t))} hosts, {len(gpus(t))} GPUs)"


def cmd_validate(args: argparse.Namespace) -> int:
    refs: list[str] = list(args.files)
    if args.all:
        refs += bundled_names("topologies") + bundled_names("scenarios")
    if not refs:
        print("mooncake-sim validate: give files or bundled names, or --all", file=sys.stderr)
        return 2
    failed = 0
    for ref in refs:
        try:
            print(_validate_one(ref))
        except InputError as exc:
            print(str(exc), file=sys.stderr)
            failed += 1
    return 2 if failed else 0


def _description_line(name: str) -> str:
    from mooncake_protocol.topology import load_topology

    try:
        d = load_topology(name).description
    except InputError as exc:
        return f"(invalid: {exc})"
    return d.splitlines()[0] if d else ""


def cmd_topo_list(args: argparse.Namespace) -> int:
    names = bundled_names("topologies")
    width = max(len(n) for n in names)
    for n in names:
        print(f"{n:<{width}}  {_description_line(n)}")
    return 0


def _fmt_bw(bw: float) -> str:
    return "uncapped" if math.isinf(bw) else f"{bw / 1e9:g} GB/s"


def topology_summary(ref: str) -> str:
    """The human summary printed by ``topo show``."""
    from mooncake_protocol.topology import gpus, hosts, link_rate_summary, load_topology, machine_id, nics

    t = load_topology(ref)
    hs = hosts(t)
    lines = [f"topology {t.name}  ({t.source})"]
    if t.description:
        lines.append(f"  {t.description}")
    lines.append(f"hosts: {len(hs)}")
    ids = Counter(machine_id(t, h) for h in hs)
    overridden = [h for h in hs if t.graph.nodes[f"host:{h}"].get("machine_id_overridden")]
    if overridden or any(c > 1 for c in ids.values()):
        for mid, c in ids.items():
            owners = [h for h in hs if machine_id(t, h) == mid]
            note = "  <- shared by several hosts (cloned image)" if c > 1 else ""
            lines.append(f"  machine_id {mid}: {', '.join(owners)}{note}")
    all_gpus = gpus(t)
    models = Counter(t.graph.nodes[g.node]["model"] for g in all_gpus)
    lines.append(f"GPUs: {len(all_gpus)}" + (f" ({', '.join(f'{c} x {m}' for m, c in models.items())})"
                                             if models else ""))
    host_doms = [d for d in t.domains if d.kind == "host"]
    mn = [d for d in t.domains if d.kind == "mnnvl"]
    if mn:
        parts = [f"{d.id} ({len(d.gpus)} GPUs, IMEX {'on' if d.imex else 'off'})" for d in mn]
        lines.append(f"{len(mn)} MNNVL domain{'s' if len(mn) > 1 else ''}: {'; '.join(parts)}")
    if host_doms:
        sizes = Counter(len(d.gpus) for d in host_doms)
        lines.append(f"{len(host_doms)} host NVLink domain{'s' if len(host_doms) > 1 else ''}: "
                     + ", ".join(f"{c} x {n} GPUs" for n, c in sizes.items()))
    if all_gpus and not t.domains:
        lines.append("NVLink: none (PCIe only)")
    nic_kinds: Counter[tuple[str, float, bool]] = Counter()
    for h in hs:
        for n in nics(t, h):
            nic_kinds[(n.type, n.rate_gbps, n.gpudirect)] += 1
    if nic_kinds:
        lines.append("NICs: " + ", ".join(
            f"{c} x {ty} {rate:g} Gb/s{' GPUDirect' if gd else ''}" for (ty, rate, gd), c in nic_kinds.items()))
    else:
        lines.append("NICs: none (TCP over loopback only)")
    nets = [(n, d) for n, d in t.graph.nodes(data=True) if d["kind"] == "netswitch"]
    for n, d in nets:
        lines.append(f"network {d['name']}: {d['type']}, {t.graph.degree(n)} NICs, {d['hops']} switch hop(s)")
    lines.append("links:")
    for cls, count, bw, lat in link_rate_summary(t):
        lines.append(f"  {cls:<9} {count:>5} x  {_fmt_bw(bw):>12}  {lat * 1e6:g} us")
    return "\n".join(lines)


def cmd_topo_show(args: argparse.Namespace) -> int:
    from mooncake_protocol.resources import check_output
    from mooncake_protocol.topology import load_topology, to_dot

    if args.dot:
        check_output(args.dot, "--dot")
    print(topology_summary(args.topology))
    if args.dot:
        text = to_dot(load_topology(args.topology))
        if args.dot == "-":
            sys.stdout.write(text)
        else:
            Path(args.dot).write_text(text, encoding="utf-8")
            print(f"wrote {args.dot}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from mooncake_sim.runner import cmd_run as run

    result: int = run(args)
    return result


def cmd_parity(args: argparse.Namespace) -> int:
    from mooncake_sim.parity import cmd_parity as parity

    result: int = parity(args)
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mooncake-sim",
        description="Simulate Mooncake-PG bootstrap and first collectives on modelled GPU topologies.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    v = sub.add_parser("validate", help="check topology and scenario files",
                       description="Check topology and scenario files (paths or bundled names).")
    v.add_argument("files", nargs="*", metavar="FILE", help="a path or a bundled name")
    v.add_argument("--all", action="store_true", help="validate every bundled topology and scenario")
    v.set_defaults(func=cmd_validate)

    t = sub.add_parser("topo", help="list and inspect topologies", description="List and inspect topologies.")
    tsub = t.add_subparsers(dest="topo_command", metavar="SUBCOMMAND")
    tsub.required = True
    tl = tsub.add_parser("list", help="bundled topologies with a one-line description",
                         description="List bundled topologies.")
    tl.set_defaults(func=cmd_topo_list)
    ts = tsub.add_parser("show", help="summarise one topology", description="Summarise one topology.")
    ts.add_argument("topology", metavar="NAME|FILE", help="bundled name or path")
    ts.add_argument("--dot", metavar="OUT.dot", help="also write the graph as Graphviz DOT ('-' for stdout)")
    ts.set_defaults(func=cmd_topo_show)

    r = sub.add_parser("run", help="simulate a scenario",
                       description="Simulate a scenario and report the verdict. Exit 0 when the outcome matches the "
                                   "scenario's expect (without one: when it completes cleanly), 1 when it does not, 2 "
                                   "for bad input. Without SCENARIO: the flagship ladder (legacy-1755, each #1755 fix "
                                   "in turn, fixed), each step held to its own cause.")
    r.add_argument("scenario", nargs="?", metavar="SCENARIO", help="bundled name or path")
    r.add_argument("--seed", type=int, help="override the scenario's seed (RPC port draws; with a calibration, rank speeds)")
    r.add_argument("--policy", metavar="P", help=f"run under another policy preset ({', '.join(PRESETS)}); one that "
                                                 "changes the protocol sets the scenario's expect aside")
    r.add_argument("--trace", metavar="FILE", help="write every effect and mark to FILE as JSON lines ('-': stdout)")
    r.add_argument("--json", action="store_true", help="print the result as JSON")
    r.add_argument("--quiet", action="store_true", help="no progress lines on stderr during a long run")
    r.add_argument("--calibration", metavar="FILE", help="timing constants measured in real mode")
    r.add_argument("--no-fast-forward", action="store_true",
                   help="simulate every chunk of a long collective in detail (default: skip a measured steady "
                        "stretch of identical chunks in data: sizes runs without faults)")
    r.set_defaults(func=cmd_run)

    pp = sub.add_parser("parity", help="run a scenario in the simulator and for real; compare canonical traces",
                        description="Run SCENARIO in the simulator and with `mooncake-real run` (a subprocess), "
                                    "compare their canonical traces and print 'equal' or the first divergence "
                                    "per rank. Exit 0 equal, 1 different, 2 not realisable here or bad input.")
    pp.add_argument("scenario", metavar="SCENARIO", help="bundled name or path")
    pp.add_argument("--json", action="store_true", help="print the result (both canonical forms included) as JSON")
    pp.add_argument("--calibration", metavar="FILE", help="timing constants from `mooncake-real calibrate`")
    pp.add_argument("--deadline", type=float, help="real mode's deadline in seconds (default: the scenario's)")
    pp.add_argument("--keep", metavar="DIR", help="keep both traces, outcomes and canonical forms in DIR")
    pp.set_defaults(func=cmd_parity)
    return p


_FREEZE_AT_EXIT = False


def freeze_at_exit() -> None:
    """For command-line entry points: at interpreter exit, freeze the collector's generations first, so that its
    last full collection does not walk what the runs left alive (a 256-rank run's marks, caches and models:
    5 s of the process's exit on the development VM, 0.1 s frozen). The memory goes back to the system with
    the process either way. Registered once, however often it is called."""
    global _FREEZE_AT_EXIT
    if not _FREEZE_AT_EXIT:
        _FREEZE_AT_EXIT = True
        atexit.register(gc.freeze)


def main(argv: list[str] | None = None) -> int:
    freeze_at_exit()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help or a usage error
        return int(exc.code) if isinstance(exc.code, int) else 2
    try:
        result: Any = args.func(args)
        return int(result or 0)
    except InputError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # and no second error at exit's flush
        return 141
    except Exception as exc:  # noqa: BLE001 - one line for users; the traceback on request
        if os.environ.get("MOONCAKE_DEBUG"):
            traceback.print_exc()
        else:
            print(f"mooncake-sim: {type(exc).__name__}: {exc} (run with MOONCAKE_DEBUG=1 for a traceback)",
                  file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
