"""First-collective benchmark: bootstrap plus one 64 MiB int32 allreduce for 8, 64 and 512 ranks.

Each run is ``data: sizes`` (WRITEs move lengths, no payload bytes) on HGX H100 nodes with TENT and the fixed
protocol: 8 ranks on one node (NVLink), 64 and 512 ranks on 8 and 64 nodes over one RDMA fabric (a topology
written to a temp dir; 512 raises ``max_group_size`` by a policy override). Prints, per size: wall time,
SimPy events processed (scheduled less still queued, read after the run), protocol effects, events/s, the number of chunks and WRITEs,
the simulated collective phase time and the allreduce bus bandwidth
``busbw = 2 (n - 1) / n * bytes / collective phase time`` next to the topology's link rates (GPU-to-GPU
path within a node and between nodes).

    PYTHONPATH=. python benchmarks/bench_collective.py               # 8, 64, 512
    PYTHONPATH=. python benchmarks/bench_collective.py 8 64          # chosen sizes
    PYTHONPATH=. python benchmarks/bench_collective.py --count 262144 512   # a smaller tensor
    PYTHONPATH=. python benchmarks/bench_collective.py --profile 64  # cProfile top 25 (stderr)
    PYTHONPATH=. python benchmarks/bench_collective.py --phases 512  # where the wall time goes, by phase

A shared machine's speed drifts (the 2-core development VM ran from 0.64 to 0.91 M bare SimPy events/s
within one day): the script prints the bare SimPy rate of ``bench_bootstrap.py`` before and after the
runs, so figures taken at different times can be compared.

Cost model: a chunk is ``((16 MiB - 1) / n) & ~7`` bytes per rank slice, so a 64 MiB tensor is
``64 MiB / chunk`` chunks (32 at 8 ranks, 257 at 64, 2049 at 512), and every chunk makes every rank WRITE to
every rank (data and sync flag): ``2 n^2`` WRITEs per chunk, about ``128 n^3`` in all. At 512 ranks that is
about 1.1e9 WRITEs; at the simulator's rate (~1e5 to 1e6 per second) that is hours, not minutes. So the
simulator runs chunks 0-3 and the last one in detail and fast-forwards the identical chunks between at
their measured period (``docs/architecture.md``): 512 ranks simulate 2.75 M WRITEs (the ``writes`` column).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from _simrun import positive_int, timed_run  # noqa: E402  (benchmarks/ is on sys.path when a script runs)
from bench_bootstrap import bare_simpy  # noqa: E402

from mooncake_protocol import topology as topo
from mooncake_protocol.collectives import chunk_bytes
from mooncake_protocol.scenario import load_scenario
from mooncake_sim.cli import freeze_at_exit
from mooncake_sim.driver import Simulation

COUNT = 16_777_216  # int32 elements: 64 MiB per rank

CLUSTER = """\
description: {hosts} HGX H100 nodes x 8 GPUs, one RDMA fabric (benchmark only).
host_templates:
  hgx:
    numa: 2
    gpus: {{count: 8, model: H100-SXM5, memory_gib: 80, numa: [0, 0, 0, 0, 1, 1, 1, 1]}}
    nvlink: {{switches: 4}}
    nics:
      - {{name: "mlx5_{{i}}", count: 8, type: rdma, rate_gbps: 400, numa: [0, 0, 0, 0, 1, 1, 1, 1],
         near_gpus: [0, 1, 2, 3, 4, 5, 6, 7], gpudirect: true}}
      - {{name: eth0, type: tcp, rate_gbps: 100, numa: 0}}
hosts:
  - {{name: "node{{i:02d}}", template: hgx, count: {hosts}}}
networks:
  - {{name: ib, type: rdma, hosts: all, hops: 2}}
  - {{name: mgmt, type: tcp, hosts: all}}
"""

SCENARIO = """\
name: bench-collective-{n}
description: Bootstrap and one {mib} MiB int32 allreduce, {n} ranks, TENT, fixed protocol (benchmark).
topology: {topology}
ranks: {n}
backend: cuda
engine: tent
policy: {policy}
data: sizes
workload:
  - {{op: allreduce, dtype: int32, count: {count}, reduce_op: sum}}
deadlines: {{bootstrap_s: 60, collective_s: 600, stall_s: 10}}
expect: {{verdict: completed, phase: done}}
"""


def scenario_file(n: int, count: int, tmp: Path) -> Path:
    if n <= 8:
        topology, policy = "hgx-h100", "fixed"
    else:
        hosts = -(-n // 8)
        (tmp / f"cluster-{hosts}.yaml").write_text(CLUSTER.format(hosts=hosts))
        topology = f"cluster-{hosts}.yaml"
        policy = "fixed" if n <= 64 else f"{{preset: fixed, overrides: {{max_group_size: {n}}}}}"
    path = tmp / f"bench-collective-{n}.yaml"
    path.write_text(SCENARIO.format(n=n, topology=topology, policy=policy, count=count, mib=count * 4 / 2**20))
    return path


def link_rates(t: topo.Topology) -> str:
    """GPU 0 to GPU 1 of the first host (NVLink) and GPU 0 to GPU 0 of the second host (RDMA), in GB/s."""
    hs = topo.hosts(t)
    out = []
    p = topo.path(t, topo.Endpoint(hs[0], "gpu", 0), topo.Endpoint(hs[0], "gpu", 1), "nvlink")
    if isinstance(p, topo.Path):
        out.append(f"nvlink {p.bandwidth_Bps / 1e9:.0f} GB/s")
    if len(hs) > 1:
        p = topo.path(t, topo.Endpoint(hs[0], "gpu", 0), topo.Endpoint(hs[1], "gpu", 0), "rdma")
        if isinstance(p, topo.Path):
            out.append(f"rdma {p.bandwidth_Bps / 1e9:.0f} GB/s")
    return ", ".join(out)


class PhasedSimulation(Simulation):
    """A :class:`Simulation` that notes the wall clock at rank 0's milestones (``--phases``): the start of the
    collective, the data phase of each chunk it simulates in detail, and the fast-forward. Wall time is the
    whole simulation's (every rank's work in between), read at the moment rank 0 gets there."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.wall_at: list[tuple[str, float]] = []

    def _mark(self, r: Any, act: Any, m: Any) -> None:
        super()._mark(r, act, m)
        if r.env.rank:
            return
        if m.name == "collective_start":
            self.wall_at.append(("collective", time.perf_counter()))
        elif m.name == "task_phase" and ("phase", "data") in m.data:
            self.wall_at.append((f"chunk {dict(m.data)['seq']}", time.perf_counter()))
        elif m.name == "fast_forward":
            self.wall_at.append((f"fast-forward over {dict(m.data)['chunks']} chunks", time.perf_counter()))


def phase_split(wall_at: list[tuple[str, float]], t0: float, t1: float) -> str:
    """``--phases``: the wall seconds from each of rank 0's milestones to the next (the first span is the
    bootstrap and warmup, the last one runs to the end of the simulation)."""
    names = ["bootstrap + warmup"] + [name for name, _ in wall_at]
    times = [t0] + [t for _, t in wall_at] + [t1]
    spans = []
    for i, name in enumerate(names):
        if name == "collective":
            continue  # no time passes between the collective's start and its chunk 0
        end = times[i + 1]
        if i + 2 < len(times) and names[i + 1] == "collective":
            end = times[i + 2]
        spans.append(f"{name} {end - times[i]:.2f} s")
    return "; ".join(spans)


def run_sim(n: int, count: int, tmp: Path, profile: bool = False, phases: bool = False) -> dict[str, Any]:
    sc = load_scenario(str(scenario_file(n, count, tmp)))
    sim = PhasedSimulation(sc) if phases else Simulation(sc)
    t0 = time.perf_counter()
    rec, wall, n_events = timed_run(sim, profile)
    t1 = time.perf_counter()
    times = [pt["done"] - pt["collective"] for pt in rec.phase_times.values() if "collective" in pt and "done" in pt]
    coll = max(times) if times else float("nan")
    nbytes = count * 4
    ok = rec.end_reason == "completed" and not rec.errors
    return {"ranks": n, "wall_s": wall, "events": n_events, "effects": rec.stats["effects"],
            "writes": rec.stats["writes"], "chunks": -(-nbytes // chunk_bytes(n)), "coll_s": coll,
            "busbw": 2 * (n - 1) / n * nbytes / coll if coll > 0 else float("nan"),
            "links": link_rates(sc.topology), "ok": ok, "end": rec.end_reason,
            "phases": phase_split(sim.wall_at, t0, t1) if isinstance(sim, PhasedSimulation) else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sizes", nargs="*", type=positive_int, default=[8, 64, 512])
    ap.add_argument("--count", type=positive_int, default=COUNT, help=f"int32 elements per rank (default {COUNT} = 64 MiB)")
    ap.add_argument("--profile", action="store_true", help="cProfile each run (top 25 by own time, to stderr)")
    ap.add_argument("--phases", action="store_true",
                    help="print where each run's wall time went: seconds between rank 0's milestones (the collective's "
                         "start, each chunk simulated in detail, the fast-forward)")
    ap.add_argument("--no-bare", action="store_true",
                    help="skip the bare SimPy rate printed before and after (this machine's speed at the time)")
    args = ap.parse_args(argv)
    freeze_at_exit()  # the process's exit skips the collector's walk over what the runs left (seconds at 512)

    def bare(when: str) -> None:
        if not args.no_bare:
            ev, wall = bare_simpy()
            print(f"bare simpy {when}: 1000 processes x 1000 timeouts: {ev / wall:,.0f} events/s", flush=True)

    bare("before")
    print(f"allreduce of {args.count:,} int32 ({args.count * 4 / 2**20:g} MiB) per rank, data: sizes")
    print(f"{'ranks':>6} {'wall s':>8} {'events':>11} {'effects':>11} {'events/s':>10} {'chunks':>7} {'writes':>11} "
          f"{'collective':>12} {'busbw GB/s':>11}  link rates / result")
    failed = False
    with tempfile.TemporaryDirectory() as d:
        for n in args.sizes:
            r = run_sim(n, args.count, Path(d), args.profile, args.phases)
            failed |= not r["ok"]
            print(f"{r['ranks']:>6} {r['wall_s']:>8.2f} {r['events']:>11,} {r['effects']:>11,} "
                  f"{r['events'] / r['wall_s']:>10,.0f} {r['chunks']:>7,} {r['writes']:>11,} "
                  f"{r['coll_s'] * 1e3:>9.3f} ms {r['busbw'] / 1e9:>11.1f}  {r['links']}; "
                  f"{'completed' if r['ok'] else 'FAILED: ' + r['end']}", flush=True)
            if r["phases"]:
                print(f"{'':>6} wall by rank 0's milestones: {r['phases']}", flush=True)
    bare("after")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
