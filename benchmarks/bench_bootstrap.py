"""Bootstrap benchmark: simulate bootstrap only (``workload: []``) for 8, 64 and 512 ranks.

Prints, per size: wall time, SimPy events processed (scheduled less still queued, read after the run), protocol effects
interpreted, events/s, and the simulated bootstrap time; and, for scale, bare SimPy's event rate measured
in the same run (1000 processes x 1000 timeouts).

    PYTHONPATH=. python benchmarks/bench_bootstrap.py            # 8, 64, 512
    PYTHONPATH=. python benchmarks/bench_bootstrap.py 8 64       # chosen sizes
    PYTHONPATH=. python benchmarks/bench_bootstrap.py --profile 512   # cProfile top 25 of the 512 run

512 ranks exceed any bundled topology and Mooncake's 64-rank limit, so that run writes a 64-host x 8-GPU
RDMA cluster (template syntax) and a scenario to a temp dir and raises ``max_group_size`` by a policy
override. Targets on a 2-core machine: 64 ranks under 5 s, 512 under 60 s.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import simpy
from _simrun import positive_int, timed_run  # noqa: E402  (benchmarks/ is on sys.path when a script runs)

from mooncake_protocol.scenario import load_scenario
from mooncake_sim.cli import freeze_at_exit
from mooncake_sim.driver import Simulation

CLUSTER_512 = """\
description: 64 HGX H100 nodes x 8 GPUs, one RDMA fabric (benchmark only).
host_templates:
  hgx:
    numa: 2
    gpus: {count: 8, model: H100-SXM5, memory_gib: 80, numa: [0, 0, 0, 0, 1, 1, 1, 1]}
    nvlink: {switches: 4}
    nics:
      - {name: "mlx5_{i}", count: 8, type: rdma, rate_gbps: 400, numa: [0, 0, 0, 0, 1, 1, 1, 1],
         near_gpus: [0, 1, 2, 3, 4, 5, 6, 7], gpudirect: true}
      - {name: eth0, type: tcp, rate_gbps: 100, numa: 0}
hosts:
  - {name: "node{i:02d}", template: hgx, count: 64}
networks:
  - {name: ib, type: rdma, hosts: all, hops: 2}
  - {name: mgmt, type: tcp, hosts: all}
"""

SCENARIO = """\
name: bench-bootstrap-{n}
description: Bootstrap only, {n} ranks, TENT, fixed protocol (benchmark).
topology: {topology}
ranks: {n}
backend: cuda
engine: tent
policy: {policy}
workload: []
deadlines: {{bootstrap_s: 60, collective_s: 60, stall_s: 10}}
expect: {{verdict: completed, phase: done}}
"""


def scenario_file(n: int, tmp: Path) -> Path:
    if n <= 8:
        topology, policy = "hgx-h100", "fixed"
    elif n <= 64:
        topology, policy = "gb200-nvl72", "fixed"
    else:
        (tmp / "cluster-512.yaml").write_text(CLUSTER_512)
        topology, policy = "cluster-512.yaml", f"{{preset: fixed, overrides: {{max_group_size: {n}}}}}"
    path = tmp / f"bench-bootstrap-{n}.yaml"
    path.write_text(SCENARIO.format(n=n, topology=topology, policy=policy))
    return path


def run_sim(n: int, tmp: Path, profile: bool = False) -> dict[str, Any]:
    sc = load_scenario(str(scenario_file(n, tmp)))
    sim = Simulation(sc)
    rec, wall, n_events = timed_run(sim, profile)
    ok = rec.end_reason == "completed" and not rec.errors
    return {"ranks": n, "wall_s": wall, "events": n_events, "effects": rec.stats["effects"],
            "store_ops": rec.stats["store_ops"], "sim_s": rec.sim_time_s, "ok": ok, "end": rec.end_reason}


def bare_simpy(procs: int = 1000, timeouts: int = 1000) -> tuple[int, float]:
    env = simpy.Environment()

    def proc(env: simpy.Environment) -> Any:
        for _ in range(timeouts):
            yield env.timeout(1)

    for _ in range(procs):
        env.process(proc(env))

    class Bare:  # what timed_run needs of a simulation
        def __init__(self) -> None:
            self.env = env

        def run(self) -> None:
            env.run()

    _, wall, events = timed_run(Bare())
    return events, wall


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sizes", nargs="*", type=positive_int, default=[8, 64, 512])
    ap.add_argument("--profile", action="store_true", help="cProfile each run (top 25 by own time, to stderr)")
    ap.add_argument("--no-bare", action="store_true", help="skip the bare SimPy measurement")
    args = ap.parse_args(argv)
    freeze_at_exit()  # the process's exit skips the collector's walk over what the runs left (seconds at 512)
    if not args.no_bare:
        ev, wall = bare_simpy()
        print(f"bare simpy: 1000 processes x 1000 timeouts: {ev} events in {wall:.2f} s = {ev / wall:,.0f} events/s")
    print(f"{'ranks':>6} {'wall s':>8} {'events':>10} {'effects':>10} {'events/s':>10} {'effects/s':>10} "
          f"{'store ops':>10} {'sim bootstrap':>14}  result")
    failed = False
    with tempfile.TemporaryDirectory() as d:
        for n in args.sizes:
            r = run_sim(n, Path(d), args.profile)
            failed |= not r["ok"]
            print(f"{r['ranks']:>6} {r['wall_s']:>8.2f} {r['events']:>10,} {r['effects']:>10,} "
                  f"{r['events'] / r['wall_s']:>10,.0f} {r['effects'] / r['wall_s']:>10,.0f} {r['store_ops']:>10,} "
                  f"{r['sim_s'] * 1e3:>11.3f} ms  {'completed' if r['ok'] else 'FAILED: ' + r['end']}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
