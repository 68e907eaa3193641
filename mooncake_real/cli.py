"""``mooncake-real``: run scenarios for real, run one rank under torchrun/SLURM, discover this machine."""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Any

from mooncake_protocol.errors import InputError
from mooncake_protocol.resources import check_output

DEFAULT_ENTRY = "mooncake_real.entry:protocol_activity"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mooncake-real", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    run = sub.add_parser("run", help="run a scenario for real on this machine (one process per rank)")
    run.add_argument("scenario", nargs="?", help="bundled scenario name or path to a .yaml file")
    run.add_argument("--json", action="store_true", help="print the result as JSON")
    run.add_argument("--trace", metavar="FILE", help="write the merged trace as JSON lines")
    run.add_argument("--deadline", type=float, default=None, help="seconds before a hang is declared")
    run.add_argument("--keep", action="store_true", help="keep the job directory (specs, traces, dumps, logs)")

    rank = sub.add_parser(
        "rank", help="run one rank started by torchrun or srun (reads RANK/WORLD_SIZE/... )",
        description="One rank of a job that torchrun or SLURM starts, one process per rank, on one or more hosts. "
                    "Reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT (or SLURM_PROCID, SLURM_NTASKS, "
                    "SLURM_LOCALID and MASTER_ADDR/PORT or SLURM_JOB_NODELIST); rank 0 runs the job's store on "
                    "MASTER_ADDR at MOONCAKE_REAL_STORE_PORT, else MASTER_PORT + 1 under torchrun (whose agent "
                    "holds MASTER_PORT), else MASTER_PORT; each rank runs on the GPU the scenario's placement gives "
                    "it, as under `run`. Every rank needs the same MOONCAKE_REAL_TOKEN (or --token). Each rank ends with one "
                    "line on stderr: how it ended, its collective outputs, where its files are.",
        epilog="example: MOONCAKE_REAL_TOKEN=t1 torchrun --nnodes 1 --nproc-per-node 4 "
               "-m mooncake_real.cli rank --scenario real-cpu-allreduce   (docs/real-mode.md, torchrun / SLURM)")
    rank.add_argument("--scenario", help="scenario the protocol entry runs")
    rank.add_argument("--entry", default=DEFAULT_ENTRY, help="module:callable entry")
    rank.add_argument("--token", default=os.environ.get("MOONCAKE_REAL_TOKEN"),
                      help="the job's store token (default: $MOONCAKE_REAL_TOKEN); the same for every rank")
    rank.add_argument("--job-dir", help="directory for this rank's files (default: /tmp/mooncake-real-<job>)")
    rank.add_argument("--host", default=None, help="address this rank binds and advertises (default: this host's)")
    rank.add_argument("--deadline", type=float, default=600.0, help="seconds before the rank dumps and exits")

    cal = sub.add_parser("calibrate", help="measure this machine; write the simulator's timing constants (JSON)")
    cal.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    cal.add_argument("--no-gpu", action="store_true", help="skip the GPU measurements")
    cal.add_argument("--quick", action="store_true", help="fewer repetitions")
    cal.add_argument("--no-in-situ", action="store_true",
                     help="skip running a real job (real-cpu-allreduce) to measure costs inside it; the simulator "
                          "then uses the costs of operations measured alone, which a loaded job exceeds")
    cal.add_argument("--refresh", metavar="FILE",
                     help="measure only the in-job figures again (about 20 s on a small host, the CUDA job too "
                          "unless --no-gpu) and keep FILE's other figures: for a host whose speed has drifted "
                          "since FILE was written")

    disc = sub.add_parser("discover", help="write this machine's topology as a topology YAML file")
    disc.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    return p


def cmd_rank(args: argparse.Namespace) -> int:
    from .driver import RankSpec, run_rank
    from .heap import keep_freed_memory
    from .launch_env import launch_env
    from .store import StoreError, StoreServer

    keep_freed_memory()  # as the launcher's ranks (mooncake_real/heap.py)

    le = launch_env(os.environ)
    if not args.token:
        raise InputError("MOONCAKE_REAL_TOKEN", "", "no store token; set MOONCAKE_REAL_TOKEN (the same random string for every rank)")
    sc = None
    if args.entry == DEFAULT_ENTRY:  # what every rank will run: refused here, not after the peers' 5 s wait
        from mooncake_protocol.scenario import load_scenario

        from .runner import LAUNCHER_FAULTS

        if not args.scenario:
            raise InputError("--scenario", "", "name the scenario every rank runs (a bundled name or a .yaml path), "
                                               "e.g. --scenario real-cpu-allreduce")
        sc = load_scenario(args.scenario)
        if sc.ranks != le.world_size:
            raise InputError(sc.source, "ranks", f"the scenario has {sc.ranks} ranks but the launcher started "
                                                 f"{le.world_size} processes (WORLD_SIZE / SLURM_NTASKS); start one "
                                                 "process per rank")
        for i, fault in enumerate(sc.faults):
            if fault.kind in LAUNCHER_FAULTS:
                raise InputError(sc.source, f"faults[{i}]", f"{fault.kind} is carried out by mooncake-real run's "
                                 "launcher, which a torchrun or SLURM job does not have; run the scenario with "
                                 "`mooncake-real run` on one host")
    job = hashlib.sha256(f"{args.token}:{le.master_addr}:{le.master_port}".encode()).hexdigest()[:8]
    job_dir = Path(args.job_dir or f"/tmp/mooncake-real-{job}")
    job_dir.mkdir(parents=True, exist_ok=True)
    server = None
    if le.rank == 0:
        bind = le.master_addr if le.master_addr in ("127.0.0.1", "localhost") else "0.0.0.0"
        try:
            server = StoreServer(args.token, host=bind, port=le.store_port).start()
        except StoreError as exc:
            raise InputError("MOONCAKE_REAL_STORE_PORT", "", f"the job's store cannot listen on port {le.store_port} "
                             f"({exc}); set MOONCAKE_REAL_STORE_PORT to a free TCP port on MASTER_ADDR, the same "
                             "for every rank") from None
    host = args.host or ("127.0.0.1" if le.master_addr in ("127.0.0.1", "localhost") else _my_address(le.master_addr))
    opts: dict[str, Any] = {}
    if sc is None:  # another entry: LOCAL_RANK's GPU, where there is one
        gpu = le.local_rank if _has_gpu() else None
    else:
        from mooncake_protocol.rankenv import make_rank_envs

        from .runner import rank_options

        # as mooncake-real run: the GPU of the scenario's placement (ranks may share one), and this rank's own
        # protocol faults (slow_peer, close_port, block_direction)
        gpu = next(p.gpu for p in sc.placement if p.rank == le.rank) if sc.backend == "cuda" else None
        if gpu is not None and not _has_gpu():
            raise InputError(sc.source, "backend", f"rank {le.rank} runs on GPU {gpu} (backend cuda) but CuPy sees no "
                                                   "CUDA device on this host; run it where the GPUs are")
        opts = rank_options(make_rank_envs(sc, lambda _host: host)).get(le.rank, {})
    spec = RankSpec(job_id=job, job_dir=str(job_dir), rank=le.rank, world_size=le.world_size,
                    store_addr=f"{le.master_addr}:{le.store_port}", token=args.token, t0=time.monotonic(),
                    deadline_s=args.deadline, entry=args.entry, scenario=args.scenario, host=host,
                    gpu=gpu, release="count", **opts)
    try:
        code = run_rank(spec)
    finally:
        if server is not None:
            server.stop()
    sys.stderr.flush()
    os.write(2, (_rank_report(spec, le.world_size) + "\n").encode())  # one write: ranks share the terminal
    return code


def _rank_report(spec: Any, world_size: int) -> str:
    """The rank's one line at its end: how it ended (its result file) and where its files are."""
    import json

    try:
        res = json.loads(spec.path("result").read_text())
    except (OSError, ValueError):
        res = {}
    status = str(res.get("status", "no result"))
    if res.get("error"):
        status += f" ({res['error']})"
    at = f" at {float(res['t']):.3f} s" if "t" in res else ""
    outputs = []
    try:
        with spec.path("trace").open() as f:
            for line in f:
                if '"collective_done"' in line:
                    d = json.loads(line).get("data", {})
                    text = json.dumps(d.get("output"))
                    outputs.append(f"{d.get('index')}:{d.get('op')} {text if len(text) <= 60 else text[:57] + '...'}")
    except (OSError, ValueError):
        pass
    got = f"; {', '.join(outputs)}" if outputs else ""
    return (f"mooncake-real rank {spec.rank} of {world_size}: {status}{at}{got}; trace, result and dump files in "
            f"{spec.job_dir}")


def _has_gpu() -> bool:
    from .gpu import gpu_count

    return gpu_count() > 0


def _my_address(master: str) -> str:
    """The local address used to reach the master (what peers can reach us at)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((master, 9))
            return str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def cmd_discover(args: argparse.Namespace) -> int:
    from .discover import discover, to_yaml

    if args.output:
        check_output(args.output, "--output")
    text = to_yaml(discover())
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    from .fdtable import grow_fd_table

    grow_fd_table()  # the launcher's store server, calibrate's clients: see mooncake_real/fdtable.py
    args = _parser().parse_args(argv)
    from .launch_env import LaunchEnvError

    try:
        deadline = getattr(args, "deadline", None)
        if deadline is not None and not deadline > 0:  # (also NaN)
            raise InputError("--deadline", "", f"must be a positive number of seconds, got {deadline:g}")
        if args.cmd == "run":
            from .runner import cmd_run

            return cmd_run(args)
        if args.cmd == "calibrate":
            from .calibrate import cmd_calibrate

            return cmd_calibrate(args)
        if args.cmd == "rank":
            return cmd_rank(args)
        return cmd_discover(args)
    except (InputError, LaunchEnvError) as exc:
        print(f"mooncake-real: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mooncake-real: interrupted; every rank process was stopped and its shared memory removed", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # and no second error at exit's flush
        return 141


if __name__ == "__main__":
    sys.exit(main())
