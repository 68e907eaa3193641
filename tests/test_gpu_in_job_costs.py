"""CUDA costs measured inside real jobs (``sim_cuda_by_ranks``): module loads follow a rank's speed, and an
IPC copy between two processes on one GPU takes the in-job NVLink WRITE time (docs/parity.md, "seventh
session")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import simpy

from mooncake_protocol.canonical import canonical
from mooncake_protocol.outcome import evaluate
from mooncake_protocol.scenario import load_scenario
from mooncake_real.calibrate import first_loads_of, in_situ_sim
from mooncake_sim.driver import Calibration, Simulation, simulate
from mooncake_sim.gpu import GpuModel, Op
from mooncake_sim.runner import load_calibration
from mooncake_sim.transfers import TransferModel


def _phase_spans(rec: object, ranks: int, start: str, end: str) -> list[float]:
    marks = {(m["rank"], m["data"]["phase"]): m["t"] for m in rec.marks if m["name"] == "phase"}  # type: ignore[attr-defined]
    return [marks[(r, end)] - marks[(r, start)] for r in range(ranks)]


def test_preloaded_module_loads_scale_with_the_rank_speed() -> None:
    # lazy-kernel-load-1gpu-fixed preloads every reduce kernel in the bootstrap: 36 module loads per rank,
    # driver work on the rank's CPU, so a slow rank loads them slowly too
    sc = load_scenario("lazy-kernel-load-1gpu-fixed")
    load = 2e-3
    alike = _phase_spans(simulate(sc, calibration=Calibration(module_load_s=load)), 4, "bootstrap", "warmup")
    assert max(alike) - min(alike) < 0.01 * max(alike)
    cal = Calibration(module_load_s=load, rank_spread=0.2)
    spans = _phase_spans(simulate(sc, calibration=cal), 4, "bootstrap", "warmup")
    sim = Simulation(sc, calibration=cal)
    speeds = [sim.rank_speed(r, "bootstrap") for r in range(4)]
    base = min(alike)  # every rank's bootstrap at speed 1: the loads are nearly all of it
    for span, speed in zip(spans, speeds, strict=True):
        assert span == pytest.approx(base * speed, rel=0.02)
    assert max(speeds) - min(speeds) > 0.05  # the draw does tell the ranks apart


def test_a_lazy_module_load_scales_with_the_rank_speed() -> None:
    env = simpy.Environment()
    m = GpuModel(env, lambda _rank: None, speed_of={0: 1.0, 1: 1.5}.__getitem__)
    m.module_load_s = 4e-3
    ends = []
    for rank in (0, 1):
        op = m.context(rank).enqueue(Op("kernel", "compute", 1e-6, "reduce", kernel="reduce_int32_sum"))
        env.run(until=op.done)
        ends.append(env.now)
    assert ends[0] == pytest.approx(4e-3, abs=5e-5)
    assert ends[1] - ends[0] == pytest.approx(6e-3, abs=5e-5)


def _nvlink_latencies(cal: Calibration, name: str) -> dict[tuple[int, int], float]:
    """(src rank, dst rank) -> planned latency of the scenario's NVLink WRITEs (a plan is made once per pair of
    ranks and regions, then kept: the spy sees every pair)."""
    got: dict[tuple[int, int], float] = {}
    orig = TransferModel._plan_static

    def spy(self: TransferModel, r, w):  # type: ignore[no-untyped-def]
        plan = orig(self, r, w)
        if w.transport == "nvlink" and not isinstance(plan, str):
            got[(r.env.rank, w.dst_owner)] = plan[0]
        return plan

    TransferModel._plan_static = spy  # type: ignore[method-assign]
    try:
        rec = simulate(load_scenario(name), calibration=cal)
    finally:
        TransferModel._plan_static = orig  # type: ignore[method-assign]
    assert rec.end_reason == "completed"
    return got


def test_an_ipc_copy_on_one_gpu_takes_the_in_job_nvlink_write_time() -> None:
    same = _nvlink_latencies(Calibration(nvlink_same_gpu_s=3e-3), "cuda-collectives-1gpu")
    assert same and all(v == pytest.approx(3e-3) for v in same.values())
    plain = _nvlink_latencies(Calibration(), "cuda-collectives-1gpu")
    assert set(plain) == set(same) and all(v < 1e-4 for v in plain.values())  # the topology's NVLink path


def test_copies_between_two_gpus_keep_the_topology_latency() -> None:
    # one rank per GPU on an HGX node: the in-job figure is about ranks sharing a GPU, not NVLink between GPUs
    got = _nvlink_latencies(Calibration(nvlink_same_gpu_s=3e-3), "mooncake-tests-hgx-2")
    cross = {k: v for k, v in got.items() if k[0] != k[1]}
    assert cross and all(v < 1e-4 for v in cross.values())


def test_calibrate_takes_the_cuda_jobs_nvlink_writes() -> None:
    alone = {"store_service_s": 0.0, "rpc_service_s": 0.0}
    out = in_situ_sim({"in_situ_effect_s": 1e-4, "in_situ_nvlink_write_s": 2.9e-3}, alone)  # type: ignore[arg-type]
    assert out["nvlink_same_gpu_s"] == pytest.approx(2.9e-3)
    assert "nvlink_same_gpu_s" not in in_situ_sim({"in_situ_effect_s": 1e-4}, alone)  # type: ignore[arg-type]


def test_in_job_ipc_copies_do_not_wait_for_a_time_slice_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file may set both the time slice and the in-job NVLink latency: an NVLink copy whose latency is the
    in-job figure (both ends on one GPU) holds its slice waits already and is not SM work for the model; the
    spin kernels, memsets, reduce kernels and send-buffer copies still wait."""
    from mooncake_sim import gpu as gpu_mod

    path = tmp_path / "cal.json"
    path.write_text(json.dumps({"sim": {"gpu_timeslice_s": 2.25e-3},
                                "sim_cuda_by_ranks": {"4": {"nvlink_same_gpu_s": 2.9e-3}}}))
    cal = load_calibration(str(path))
    assert cal.gpu_timeslice_s == pytest.approx(2.25e-3)
    seen: list[gpu_mod.Op] = []
    enqueue = gpu_mod.Context.enqueue

    def spy(self: gpu_mod.Context, op: gpu_mod.Op) -> gpu_mod.Op:
        seen.append(op)
        return enqueue(self, op)

    monkeypatch.setattr(gpu_mod.Context, "enqueue", spy)
    sim = Simulation(load_scenario("cuda-collectives-1gpu"), calibration=cal)
    rec = sim.run()
    assert rec.end_reason == "completed"
    copies = [op for op in seen if op.desc.startswith("nvlink copy")]
    assert copies and not any(op.sm for op in copies)
    assert any(op.sm for op in seen if op.kind in ("kernel", "spin")) and sim.gpu.slice_waits > 0
    from mooncake_real.calibrate import derive_sim

    assert derive_sim({"gpu_timeslice_s": 2.3e-3})["gpu_timeslice_s"] == 2.3e-3  # calibrate's measure_timeslice
    assert derive_sim({})["gpu_timeslice_s"] is None  # no GPU: the model stays off
    seen.clear()  # without the in-job figure the same copies are SM work
    path.write_text(json.dumps({"sim": {"gpu_timeslice_s": 2.25e-3}}))
    Simulation(load_scenario("cuda-collectives-1gpu"), calibration=load_calibration(str(path))).run()
    copies = [op for op in seen if op.desc.startswith("nvlink copy")]
    assert copies and all(op.sm for op in copies)


# ---------------------------------------------------------------- the first kernel of a process (eighth session)


def test_the_first_preloaded_kernel_pays_the_one_time_setup() -> None:
    # 36 preloads per rank: only the first carries CuPy's set-up, so each bootstrap is longer by it once
    sc = load_scenario("lazy-kernel-load-1gpu-fixed")
    base = _phase_spans(simulate(sc, calibration=Calibration(module_load_s=1e-3)), 4, "bootstrap", "warmup")
    setup = _phase_spans(simulate(sc, calibration=Calibration(module_load_s=1e-3, first_kernel_s=40e-3)), 4,
                         "bootstrap", "warmup")
    for b, s in zip(base, setup, strict=True):
        assert s - b == pytest.approx(40e-3, abs=1e-3)


def test_a_lazy_first_spin_launch_takes_the_setup_and_the_hang_stays() -> None:
    # no preload: the spin kernel is the process's first kernel, so its Launch call holds the host for the
    # set-up (38-79 ms in the H100 runs); the lazily loaded reduce kernel still hangs behind it
    sc = load_scenario("lazy-kernel-load-1gpu")
    rec = simulate(sc, record_effects=True, calibration=Calibration(first_kernel_s=30e-3))
    plain = simulate(sc, record_effects=True, calibration=Calibration())
    outcomes = [evaluate(r, sc).to_json() for r in (rec, plain)]
    assert outcomes[0]["cause"] == "lazy-kernel-load"
    assert canonical(rec.marks, outcomes[0]) == canonical(plain.marks, outcomes[1])  # the same story, later
    spins = [e for e in rec.effects if e["effect"] == "Launch" and e["args"]["kernel"] == "spin"]
    firsts = {}
    for e in sorted(spins, key=lambda e: e["t0"]):
        firsts.setdefault(e["rank"], e)
    assert sorted(firsts) == [0, 1, 2, 3]
    assert all(e["t1"] - e["t0"] >= 30e-3 for e in firsts.values())
    later = [e for e in rec.effects if e["effect"] == "Launch" and e not in firsts.values()]
    assert all(e["t1"] - e["t0"] < 1e-3 for e in later if e["args"]["kernel"] == "spin")
    plain_spins = [e for e in plain.effects if e["effect"] == "Launch" and e["args"]["kernel"] == "spin"]
    assert all(e["t1"] - e["t0"] < 1e-3 for e in plain_spins)  # uncalibrated: no set-up


def test_calibrate_splits_the_first_load_from_the_later_ones() -> None:
    alone = {"store_service_s": 0.0, "rpc_service_s": 0.0}
    out = in_situ_sim({"in_situ_effect_s": 1e-4, "in_situ_LoadKernel_s": 0.7e-3,  # type: ignore[arg-type]
                       "in_situ_LoadKernel_first_s": 50e-3}, alone)
    assert out["module_load_s"] == pytest.approx(0.6e-3)
    assert out["first_kernel_s"] == pytest.approx(49.3e-3)
    assert "first_kernel_s" not in in_situ_sim({"in_situ_effect_s": 1e-4, "in_situ_LoadKernel_s": 1e-3}, alone)  # type: ignore[arg-type]
    stepped = [((0, "caller"), {"effect": "LoadKernel", "t0": 0.2}, 1e-3),
               ((0, "caller"), {"effect": "LoadKernel", "t0": 0.1}, 50e-3),
               ((0, "worker"), {"effect": "Launch", "t0": 0.15}, 1e-3),
               ((1, "caller"), {"effect": "LoadKernel", "t0": 0.3}, 40e-3),
               ((2, "caller"), {"effect": "Launch", "t0": 0.1}, 40e-3),  # its first kernel was launched
               ((2, "caller"), {"effect": "LoadKernel", "t0": 0.2}, 1e-3)]
    firsts = first_loads_of(stepped)
    assert {r: rec["t0"] for r, rec in firsts.items()} == {0: 0.1, 1: 0.3}


def test_calibrate_keeps_each_threads_first_store_request_apart() -> None:
    """A thread's first store request opened its connection; the callers' were opened by the start barrier."""
    from mooncake_real.calibrate import first_store_requests

    stepped = [((0, "caller"), {"effect": "StoreSet", "t0": 0.1}, 1e-3),
               ((0, "poller"), {"effect": "StoreGet", "t0": 0.3}, 1e-3),
               ((0, "poller"), {"effect": "StoreCheck", "t0": 0.2}, 3e-3),
               ((0, "poller"), {"effect": "Sleep", "t0": 0.1}, 5e-2),
               ((1, "poller"), {"effect": "StoreCheck", "t0": 0.25}, 3e-3),
               ((1, "worker"), {"effect": "ReadMem", "t0": 0.2}, 1e-4)]
    got = first_store_requests(stepped, ranks=2)
    assert sorted((k, rec["t0"]) for k, rec, _ in stepped if id(rec) in got) == [((0, "poller"), 0.2), ((1, "poller"), 0.25)]
    alone = first_store_requests(stepped[:1], ranks=1)  # one rank: no start barrier, the caller connects itself
    assert alone == {id(stepped[0][1])}


def test_calibrate_interleaves_the_in_job_runs() -> None:
    """Every rank count's runs are spread over the whole in-job measurement, none bunched at one end."""
    from mooncake_real.calibrate import interleaved

    order = interleaved({2: 12, 4: 6, 8: 3})
    assert sorted(order) == [2] * 12 + [4] * 6 + [8] * 3
    for ranks, n in ((2, 12), (4, 6), (8, 3)):
        at = [i for i, r in enumerate(order) if r == ranks]
        assert at[0] <= 2 and at[-1] >= len(order) - 1 - len(order) // n, (ranks, at)


def test_calibrate_warns_when_the_host_changed_speed() -> None:
    from mooncake_real.calibrate import unsteady

    assert unsteady(130e-6, 140e-6) is None and unsteady(0.0, 1e-4) is None
    for first, last in ((252e-6, 130e-6), (130e-6, 252e-6)):
        note = unsteady(first, last)
        assert note is not None and f"{first * 1e6:.0f} us at the start" in note and "run calibrate again" in note


def test_calibrate_keeps_a_transports_first_write_to_a_peer_apart() -> None:
    """A first WRITE to a peer also opens what later ones reuse (NVLink: the peer's IPC handle), and a WRITE
    that opened the transfer thread's RPC connection (a TCP ``__write__``, or an NVLink WRITE's ``__ipc__``
    call) is kept apart: the WRITE latencies come from the later ones, the IPC opening from every first
    NVLink WRITE to a peer (connecting or not), the connection from the TCP WRITEs that opened one, pooled
    with the first RpcCalls; a first TCP WRITE on a connection an NVLink WRITE opened is an ordinary one."""
    from mooncake_real.calibrate import InSitu

    acc = InSitu(load_scenario("real-cpu-allreduce"))
    acc.done = 1  # what add() takes from the ranks' result files ("write_s", "write_first_s", "write_connect_s")
    acc.writes.update(tcp=[1e-3, 3e-3], nvlink=[2e-3], shm=[1e-4])
    acc.first_writes.update(tcp=[2.5e-3], nvlink=[12e-3], shm=[3e-4])  # a peer's first; the connection was open
    acc.connect_writes.update(tcp=[6e-3, 8e-3, 10e-3], nvlink=[16e-3])
    m = acc.figures()
    assert m["in_situ_tcp_write_s"] == pytest.approx(2e-3) and m["in_situ_tcp_write_connect_s"] == pytest.approx(8e-3)
    assert m["in_situ_tcp_write_connect_n"] == 3 and m["in_situ_nvlink_write_first_s"] == pytest.approx(12e-3)
    assert m["in_situ_nvlink_write_connect_s"] == pytest.approx(16e-3) and m["in_situ_tcp_write_first_n"] == 1
    alone = {"store_service_s": 0.0, "rpc_service_s": 0.0}
    m.update(in_situ_effect_s=1e-4, in_situ_rpc_first_s=5.1e-3, in_situ_rpc_first_n=1.0)
    out = in_situ_sim(m, alone)  # type: ignore[arg-type]
    assert out["tcp_latency_s"] == pytest.approx(2e-3) and out["nvlink_same_gpu_s"] == pytest.approx(2e-3)
    # pooled: one RpcCall 5.1 - 0.1 - 2 = 3 ms over the round trip, three connecting TCP WRITEs 6 ms over a
    # later one; the IPC opening: the first NVLink WRITEs (12 and 16 ms) over a later one (2 ms)
    assert out["rpc_connect_s"] == pytest.approx((3e-3 + 3 * 6e-3) / 4)
    assert out["ipc_open_s"] == pytest.approx(12e-3)
    # only first WRITEs of a transport: they are its latency, and nothing is split off
    only = InSitu(load_scenario("real-cpu-allreduce"))
    only.first_writes["tcp"] += [4e-3]
    only.done = 1
    f = only.figures()
    assert f["in_situ_tcp_write_s"] == pytest.approx(4e-3) and "in_situ_tcp_write_first_s" not in f
    # every NVLink first WRITE connected (no TCP WRITE before them): their extra is the IPC opening
    conn = InSitu(load_scenario("real-cpu-allreduce"))
    conn.writes.update(nvlink=[2e-3], tcp=[1e-3])
    conn.connect_writes["nvlink"] += [9e-3]
    conn.done = 1
    g = conn.figures()
    g.update(in_situ_effect_s=1e-4)
    out = in_situ_sim(g, alone)  # type: ignore[arg-type]
    assert out["ipc_open_s"] == pytest.approx(7e-3) and "rpc_connect_s" not in out


def test_the_first_ipc_copy_to_a_peer_pays_the_handle_open_once() -> None:
    sc = load_scenario("cuda-collectives-1gpu")
    base = simulate(sc, calibration=Calibration(nvlink_same_gpu_s=1e-3))
    opened = simulate(sc, calibration=Calibration(nvlink_same_gpu_s=1e-3, ipc_open_s=5e-3))
    sim = Simulation(sc, calibration=Calibration(nvlink_same_gpu_s=1e-3, ipc_open_s=5e-3))
    sim.run()
    ipc = {k for k in sim.connected if k[2].startswith("ipc:")}
    ranks = sc.ranks
    # one opening per (rank, other rank's server): never for a rank's own memory
    assert len(ipc) == ranks * (ranks - 1) and all(k[1] == "transfer" for k in ipc)
    assert opened.end_reason == base.end_reason == "completed"
    def canon(rec):  # type: ignore[no-untyped-def]
        return canonical(rec.marks + rec.effects, evaluate(rec, sc).to_json())

    assert canon(opened) == canon(base)  # the same story
    assert evaluate(opened, sc).sim_time_s > evaluate(base, sc).sim_time_s + 4e-3  # later by the openings


def test_a_first_ipc_copy_opens_the_transfer_threads_connection_to_the_peer() -> None:
    """The real NVLink WRITE fetches the peer's IPC handle by an ``__ipc__`` RPC on the transfer thread's
    connection to the peer's server, so it opens that connection where no TCP WRITE had (host regions over
    SHM): the simulator marks it open, once per (rank, peer), and a later TCP WRITE there pays no
    ``rpc_connect_s``. What the opening cost is part of ``ipc_open_s``, measured over such WRITEs."""
    cal = Calibration(nvlink_same_gpu_s=1e-3, ipc_open_s=2e-3, rpc_connect_s=5e-3)
    shm = load_scenario("host-region-gpu-label-1gpu-fixed")  # TCP off: sync flags and warmup over SHM
    sim = Simulation(shm, calibration=cal)
    sim.run()
    servers = {(k[0], k[2]) for k in sim.connected if k[1] == "transfer" and not k[2].startswith("ipc:")}
    ipc = {(k[0], k[2][len("ipc:"):]) for k in sim.connected if k[1] == "transfer" and k[2].startswith("ipc:")}
    assert servers == ipc and len(servers) == shm.ranks * (shm.ranks - 1)


def test_calibrate_takes_allocate_and_register_costs_from_the_bootstrap() -> None:
    """A rank allocates and registers its buffers in bootstrap; a collective's few Allocates, beside the
    running worker and poller, cost more and are left out of ``alloc_s`` (a time with no warmup mark yet
    counts as bootstrap)."""
    from mooncake_real.calibrate import _BOOTSTRAP_STEPS, in_bootstrap

    assert set(_BOOTSTRAP_STEPS) == {"Allocate", "Register"}
    times = {0: {"bootstrap": 0.10, "warmup": 0.12, "collective": 0.20}, 1: {"bootstrap": 0.10}}
    assert in_bootstrap(times, 0, 0.11) and not in_bootstrap(times, 0, 0.12) and not in_bootstrap(times, 0, 0.25)
    assert in_bootstrap(times, 1, 9.0) and in_bootstrap(times, 2, 0.3)


def test_a_cuda_ranks_first_tcp_write_to_a_server_opens_the_connection() -> None:
    """A CUDA rank's TCP WRITE is staged through the GPU in the simulator, and it is still the ``__write__``
    RPC of the real engine: its first one to a server (not opened by an IPC copy before) pays
    ``rpc_connect_s`` once, like a TCP WRITE on the transfer thread's own path."""
    sc = load_scenario("lazy-kernel-load-1gpu-fixed")  # TCP on: warmup and sync flags over TCP
    sim = Simulation(sc, calibration=Calibration(nvlink_same_gpu_s=1e-3, rpc_connect_s=5e-3))
    charged: list[tuple[int, str]] = []
    cost = sim.connect_cost

    def spy(rank, thread, target, c=None):  # type: ignore[no-untyped-def]
        got = cost(rank, thread, target, c)
        if thread == "transfer" and got:
            charged.append((rank, target))
        return got

    sim.connect_cost = spy  # type: ignore[method-assign]
    rec = sim.run()
    assert rec.end_reason == "completed" and charged
    assert len(charged) == len(set(charged))  # once per (rank, server)
    assert all(not target.startswith("ipc:") for _, target in charged)  # ipc_open_s is unset here
