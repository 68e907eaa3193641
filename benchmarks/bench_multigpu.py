"""Real mode across several GPUs of one host (one rank per GPU), held against the simulator and NCCL.

    python benchmarks/bench_multigpu.py [--sizes 1M,4M,...,1G] [--out DIR]

1. ``mooncake-real discover`` writes this machine's topology; ``load_topology`` must accept it.
2. Parity on the discovered topology, one rank per GPU: ``host-region-gpu-label`` and ``lazy-kernel-load``
   under legacy-1755 and fixed: verdict and cause in the simulator and for real.
3. Allreduce (int32 sum) from 1 MiB to 1 GiB: bus bandwidth of the first collective for real (CUDA IPC
   between the rank processes), NCCL's through PyTorch in the same run (warm, one allreduce timed), and the
   simulator's on the discovered topology. busbw = 2 (n - 1) / n * bytes / time.

Needs two or more GPUs and CuPy; exits 2 with one line otherwise. NVLink multicast stays off
(NCCL_NVLS_ENABLE=0). Every spin kernel is bounded by the collective deadline.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("NCCL_MNNVL_ENABLE", "0")

SIZES = "1M,4M,16M,64M,256M,1G"


def _bytes(text: str) -> int:
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * mult[text[-1]] if text[-1] in mult else int(text)


def gpu_count() -> int:
    try:
        import cupy as cp

        return int(cp.cuda.runtime.getDeviceCount())
    except Exception:
        return 0


def scenario_doc(topology: str, host: str, n: int, policy: Any, workload: list[dict[str, Any]], *,
                 name: str, expect: dict[str, Any], tent: dict[str, Any] | None = None,
                 deadlines: dict[str, float] | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": name, "description": f"{name} on the discovered topology, one rank per GPU",
        "topology": topology, "ranks": n, "placement": [{"host": host, "gpu": i} for i in range(n)],
        "backend": "cuda", "engine": "tent", "policy": policy, "workload": workload,
        "deadlines": deadlines or {"bootstrap_s": 30, "collective_s": 60, "stall_s": 3}, "expect": expect,
    }
    if tent:
        doc["tent"] = tent
    return doc


def write(doc: dict[str, Any], d: Path) -> Path:
    p = d / f"{doc['name']}.yaml"
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


def sim_and_real(path: Path) -> tuple[Any, Any]:
    from mooncake_protocol.scenario import load_scenario
    from mooncake_real.runner import run_outcome
    from mooncake_sim.runner import run_one

    sc = load_scenario(str(path))
    sim = run_one(sc)
    real, _ = run_outcome(sc)
    return sim, real


def nccl_busbw(n: int, sizes: list[int]) -> dict[int, float]:
    """NCCL allreduce bus bandwidth through torch.distributed, one process per GPU (warm, median of 5)."""
    try:
        import torch
        import torch.multiprocessing as mp
    except Exception as exc:
        print(f"  (torch unavailable: {exc}; NCCL column skipped)")
        return {}
    with tempfile.TemporaryDirectory() as d:
        store = os.path.join(d, "store")
        q = mp.get_context("spawn").SimpleQueue()
        mp.spawn(_nccl_worker, args=(n, sizes, store, q), nprocs=n, join=True)
        out: dict[int, float] = {}
        while not q.empty():
            size, t = q.get()
            out[size] = 2 * (n - 1) / n * size / t
        del torch
        return out


def _nccl_worker(rank: int, n: int, sizes: list[int], store: str, q: Any) -> None:
    import torch
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=rank, world_size=n)
    for size in sizes:
        x = torch.ones(size // 4, dtype=torch.int32, device="cuda")
        dist.all_reduce(x)
        torch.cuda.synchronize()
        times = []
        for _ in range(5):
            dist.barrier()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            dist.all_reduce(x)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        if rank == 0:
            q.put((size, sorted(times)[2]))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default=SIZES, help=f"allreduce sizes (default {SIZES})")
    ap.add_argument("--out", default=None, help="directory for the discovered topology and scenarios")
    args = ap.parse_args(argv)
    n = gpu_count()
    if n < 2:
        print(f"bench_multigpu: needs two or more GPUs with CuPy; found {n}", file=sys.stderr)
        return 2
    from mooncake_protocol.topology import hosts, load_topology
    from mooncake_real.discover import discover, to_yaml

    d = Path(args.out or tempfile.mkdtemp(prefix="mooncake-multigpu-"))
    d.mkdir(parents=True, exist_ok=True)
    topo_path = d / "discovered.yaml"
    topo_path.write_text(to_yaml(discover()))
    topo = load_topology(str(topo_path))
    host = hosts(topo)[0]
    print(f"discovered {topo_path}: {len(topo.graph)} nodes, NVLink domains: "
          + ", ".join(f"{dom.id} ({len(dom.gpus)} GPUs)" for dom in topo.domains))
    print(topo_path.read_text())

    print("\nparity on the discovered topology (one rank per GPU):")
    print(f"{'scenario':<32} {'sim verdict/cause':<34} {'real verdict/cause':<34} same")
    one = [{"op": "allreduce", "dtype": "int32", "count": 1, "reduce_op": "sum", "input": "rank + 1",
            "expect": [n * (n + 1) // 2]}]
    cases = [
        ("host-region-gpu-label", "legacy-1755", {"transports": {"tcp": False, "shm": True}},
         {"verdict": "hang", "cause": "host-region-gpu-label"}),
        ("host-region-gpu-label-fixed", "fixed", {"transports": {"tcp": False, "shm": True}}, {"verdict": "completed"}),
        ("lazy-kernel-load", "legacy-1755", None, {"verdict": "hang", "cause": "lazy-kernel-load"}),
        ("lazy-kernel-load-fixed", "fixed", None, {"verdict": "completed"}),
    ]
    same_all = True
    for name, policy, tent, expect in cases:
        p = write(scenario_doc(str(topo_path), host, n, policy, one, name=name, expect=expect, tent=tent,
                               deadlines={"bootstrap_s": 20, "collective_s": 20, "stall_s": 3}), d)
        sim, real = sim_and_real(p)
        same = (sim.verdict, sim.cause) == (real.verdict, real.cause)
        same_all &= same
        print(f"{name:<32} {sim.verdict + ' ' + str(sim.cause or '-'):<34} {real.verdict + ' ' + str(real.cause or '-'):<34} "
              f"{'yes' if same else 'NO'}")

    sizes = [_bytes(s) for s in args.sizes.split(",")]
    print(f"\nallreduce int32 sum, {n} ranks, one per GPU: bus bandwidth (GB/s)")
    nccl = nccl_busbw(n, sizes)
    nvlink_rate = topo.link_classes["nvlink"].bandwidth_Bps / 1e9
    print(f"{'size':>8} {'mooncake-real (1st)':>20} {'NCCL (torch, warm)':>19} {'simulated':>10} {'NVLink/GPU':>11}")
    for size in sizes:
        wl = [{"op": "allreduce", "dtype": "int32", "count": size // 4, "reduce_op": "sum", "input": "1"}]
        p = write(scenario_doc(str(topo_path), host, n, "fixed", wl, name=f"allreduce-{size}",
                               expect={"verdict": "completed"}), d)
        from mooncake_protocol.scenario import load_scenario

        sc = dataclasses.replace(load_scenario(str(p)), data="sizes") if size > (64 << 20) else load_scenario(str(p))
        from mooncake_real.runner import run_outcome
        from mooncake_sim.runner import run_one

        sim = run_one(sc)
        real, _ = run_outcome(sc)

        def busbw(o: Any, size: int = size) -> float:
            t = o.phase_times_s.get("collective", 0.0)
            return 2 * (n - 1) / n * size / t / 1e9 if t > 0 and o.verdict == "completed" else float("nan")

        print(f"{size >> 20:>6}Mi {busbw(real):>20.1f} {nccl.get(size, float('nan')) / 1e9:>19.1f} {busbw(sim):>10.1f} "
              f"{nvlink_rate:>11.0f}")
    return 0 if same_all else 1


if __name__ == "__main__":
    sys.exit(main())
