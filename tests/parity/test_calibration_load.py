"""Calibration measured inside real jobs: what the constants are derived from, and how a run of N ranks per
host uses the rank counts that were measured (pure functions; the real measurement is in test_parity)."""

from __future__ import annotations

import itertools
import json
import statistics
from pathlib import Path

import pytest

from mooncake_protocol.errors import InputError
from mooncake_protocol.scenario import load_scenario
from mooncake_real.calibrate import (
    derive_by_ranks,
    derive_sim,
    in_situ_runs,
    in_situ_sim,
    pooled_rank_spread,
    rank_spread,
)
from mooncake_sim.driver import Calibration, Simulation, simulate
from mooncake_sim.runner import load_calibration


def _cal() -> Calibration:
    return Calibration.from_dict({"effect_cpu_s": 1e-5, "host_cpus": 2.0, "tcp_latency_s": 1e-4},
                                 {"2": {"effect_cpu_s": 1e-4, "tcp_latency_s": 1e-3, "host_cpus": None, "alloc_s": None},
                                  "8": {"effect_cpu_s": 4e-4, "tcp_latency_s": 4e-3, "host_cpus": None, "alloc_s": 2e-3}})


def test_for_ranks_interpolates_between_measured_rank_counts() -> None:
    cal = _cal()
    assert cal.for_ranks(2).tcp_latency_s == pytest.approx(1e-3)
    assert cal.for_ranks(8).effect_cpu_s == pytest.approx(4e-4)
    mid = cal.for_ranks(5)
    assert mid.tcp_latency_s == pytest.approx(2.5e-3) and mid.effect_cpu_s == pytest.approx(2.5e-4)
    assert mid.host_cpus is None and mid.by_ranks == {}
    assert mid.alloc_s == pytest.approx(2e-3)  # unset at 2 ranks: the other point's value
    assert cal.for_ranks(14).tcp_latency_s == pytest.approx(7e-3)  # beyond: the line through the last two
    assert cal.for_ranks(1).tcp_latency_s == pytest.approx(0.5e-3)
    steep = Calibration.from_dict({}, {"2": {"tcp_latency_s": 1e-3}, "3": {"tcp_latency_s": 3e-3}})
    assert steep.for_ranks(1).tcp_latency_s == 0.0  # never below zero
    plain = Calibration(effect_cpu_s=1e-5)
    assert plain.for_ranks(4) is plain


def test_cuda_runs_take_the_cuda_jobs_constants_on_top() -> None:
    cal = Calibration.from_dict({"module_load_s": 3e-4}, {"2": {"effect_cpu_s": 1e-4}, "8": {"effect_cpu_s": 4e-4}},
                                {"4": {"module_load_s": 1.3e-3, "effect_cpu_s": 2e-4}})
    cpu, cuda = cal.for_ranks(4), cal.for_ranks(4, "cuda")
    assert cpu.module_load_s == 3e-4 and cpu.effect_cpu_s == pytest.approx(2e-4)
    assert cuda.module_load_s == 1.3e-3 and cuda.effect_cpu_s == 2e-4  # one measured point: used at any count
    assert cuda.by_ranks == {} and cuda.cuda_by_ranks == {}
    assert Simulation(load_scenario("lazy-kernel-load-1gpu-fixed"), calibration=cal).cal.module_load_s == 1.3e-3
    assert Simulation(load_scenario("real-cpu-allreduce"), calibration=cal).cal.module_load_s == 3e-4


def test_a_simulation_uses_the_constants_of_its_ranks_per_host() -> None:
    two = Simulation(load_scenario("real-cpu-bootstrap-2"), calibration=_cal())
    eight = Simulation(load_scenario("real-cpu-bootstrap-8"), calibration=_cal())
    assert two.cal.tcp_latency_s == pytest.approx(1e-3) and eight.cal.tcp_latency_s == pytest.approx(4e-3)
    assert two.cal.host_cpus is None


def test_paused_and_dead_ranks_leave_the_others_the_costs_of_a_smaller_job() -> None:
    """real-cpu-port-conflict pauses ranks 1-3 for the first 0.2 s: rank 0 bootstraps alone, at the costs of
    one rank per host, and the four run at four ranks' costs after; a dead rank stops counting too."""
    cal = Calibration.from_dict({}, {"2": {"register_s": 1e-3}, "4": {"register_s": 3e-3}})

    def gaps(sim: Simulation, rank: int) -> list[float]:  # between the rank's registrations
        ts = [m["t"] for m in sim.marks if m["rank"] == rank and m["name"] == "registered"]
        return [b - a for a, b in itertools.pairwise(ts)]

    sim = Simulation(load_scenario("real-cpu-port-conflict"), calibration=cal)
    sim.run()
    assert [m["t"] for m in sim.marks if m["rank"] == 0 and m["name"] == "registered"][-1] < 0.2
    # register_s extrapolated to 1 rank is 0 ms (never below zero), 3 ms at 4: only the late ranks pay it
    assert max(gaps(sim, 0)) < 1e-3 and min(gaps(sim, 1)) >= 3e-3 - 1e-9
    one_point = Calibration.from_dict({}, {"4": {"register_s": 3e-3}})  # one measured count: used at any count
    flat = Simulation(load_scenario("real-cpu-port-conflict"), calibration=one_point)
    flat.run()
    assert min(gaps(flat, 0)) >= 3e-3 - 1e-9
    killed = Simulation(load_scenario("real-cpu-kill-rank"), calibration=cal)
    killed.run()
    assert killed.killed and killed.cal.register_s == pytest.approx(2e-3)  # three left: between 2 and 4


def test_in_situ_figures_replace_those_measured_alone() -> None:
    m = {"store_ping_rtt_s": 1e-4, "store_set_rtt_s": 1.2e-4, "store_get_rtt_s": 1.2e-4, "Now_s": 2e-5,
         "store_first_op_s": 5e-4, "rpc_rtt_s": 1e-4, "tcp_driver_write_small_s": 1.5e-4,
         "in_situ_r4_effect_s": 1e-4, "in_situ_r4_store_op_s": 9e-4, "in_situ_r4_store_first_s": 2.4e-3,
         "in_situ_r4_Allocate_s": 1.1e-3,
         "in_situ_r4_Register_s": 6e-4, "in_situ_r4_thread_start_s": 5e-4, "in_situ_r4_tcp_write_s": 2e-3,
         "in_situ_r4_rpc_first_s": 5e-3, "in_situ_r4_oversleep_s": 3e-4, "in_situ_r4_runs": 3.0,
         "in_situ_r4_rank_spread": 0.12}
    alone = derive_sim(m)
    assert alone["tcp_latency_s"] == 1.5e-4 and alone["host_cpus"]  # the file's "sim" keeps what was measured alone
    part = derive_by_ranks(m)["4"]
    assert part["effect_cpu_s"] == 1e-4 and part["host_cpus"] is None
    assert part["alloc_s"] == pytest.approx(1e-3) and part["register_s"] == pytest.approx(5e-4)
    assert part["thread_start_s"] == pytest.approx(4e-4)
    assert part["store_one_way_s"] == pytest.approx((9e-4 - 1e-4 - alone["store_service_s"]) / 2)  # type: ignore[operator]
    assert part["store_connect_s"] == pytest.approx(1.5e-3)  # a thread's first store request less a later one
    assert alone["store_connect_s"] == pytest.approx(5e-4 - 1.2e-4)  # a fresh client's first set less a warm one
    assert part["tcp_latency_s"] == 2e-3
    assert part["rpc_one_way_s"] == pytest.approx((2e-3 - alone["rpc_service_s"]) / 2)  # type: ignore[operator]
    assert part["rpc_connect_s"] == pytest.approx(5e-3 - 1e-4 - 2e-3)
    assert part["poll_overshoot_s"] == 3e-4
    assert part["rank_spread"] == 0.12 and alone["rank_spread"] is None
    cuda = derive_by_ranks({**m, "in_situ_cuda_r4_effect_s": 2e-4, "in_situ_cuda_r4_LoadKernel_s": 1.5e-3,
                            "in_situ_cuda_r4_Launch_s": 3e-3}, "in_situ_cuda_r")
    assert list(cuda) == ["4"] and cuda["4"]["module_load_s"] == pytest.approx(1.3e-3)
    assert "kernel_launch_s" not in cuda["4"] and cuda["4"]["effect_cpu_s"] == 2e-4  # see in_situ_sim
    assert in_situ_sim({"in_situ_effect_s": 1e-4}, alone) == {"effect_cpu_s": 1e-4, "host_cpus": None}


@pytest.mark.parametrize("by_ranks, key", [
    ({"two": {"effect_cpu_s": 1e-4}}, "sim_by_ranks.two"),
    ({"2": {"warp_s": 1e-4}}, "sim_by_ranks.2.warp_s"),
    ({"2": {"effect_cpu_s": -1}}, "sim_by_ranks.2.effect_cpu_s"),
    ([1, 2], "sim_by_ranks"),
    ({"4": {"module_load_s": "slow"}}, "sim_cuda_by_ranks.4.module_load_s"),
])
def test_a_bad_by_ranks_section_is_named(tmp_path: Path, by_ranks: object, key: str) -> None:
    path = tmp_path / "cal.json"
    section = "sim_cuda_by_ranks" if key.startswith("sim_cuda") else "sim_by_ranks"
    path.write_text(json.dumps({"sim": {"effect_cpu_s": 1e-5}, section: by_ranks}))
    with pytest.raises(InputError) as err:
        load_calibration(str(path))
    assert key in str(err.value) and "calibrate" in str(err.value)


def _times(marks: list[tuple[int, str, float]]) -> dict[int, dict[str, float]]:
    """A run record's ``phase_times`` (rank -> phase -> time) from phase marks in order."""
    out: dict[int, dict[str, float]] = {}
    for rank, phase, t in marks:
        out.setdefault(rank, {}).setdefault(phase, t)
    return out


def test_rank_spread_is_the_variation_of_the_ranks_bootstrap_times() -> None:
    trace = [(0, "bootstrap", 1.0), (1, "bootstrap", 1.5), (0, "warmup", 1.010),
             (1, "warmup", 1.520), (2, "bootstrap", 1.0)]  # rank 2 never left bootstrap
    assert rank_spread(_times(trace)) == pytest.approx(0.005 * 2 ** 0.5 / 0.015)  # spans 10 and 20 ms
    assert rank_spread(_times(trace[:3])) is None  # one rank with both marks


def test_the_rank_spread_pools_every_rank_of_every_run() -> None:
    assert pooled_rank_spread([[10.0, 20.0]]) == pytest.approx(rank_spread_of([10.0, 20.0]))
    # two steady runs and one odd one: pooled (1% and 1% and 40% deviations), not the median of per-run figures
    runs = [[99.0, 101.0], [101.0, 99.0], [60.0, 140.0]]
    assert pooled_rank_spread(runs) == pytest.approx(((4 * 0.01 ** 2 + 2 * 0.4 ** 2) / 3) ** 0.5)
    assert pooled_rank_spread([[5.0], []]) is None  # no run with two ranks
    assert in_situ_runs(2) == 12 and in_situ_runs(4) == 6 and in_situ_runs(8) == 3 and in_situ_runs(64) == 3
    assert [in_situ_runs(n, 0.5) for n in (2, 4, 8, 64)] == [6, 3, 2, 2]  # refresh's cheaper measurement


def rank_spread_of(spans: list[float]) -> float:
    return statistics.stdev(spans) / statistics.fmean(spans)


def _spans(rec: object) -> list[float]:
    marks = {(m["rank"], m["data"]["phase"]): m["t"] for m in rec.marks if m["name"] == "phase"}  # type: ignore[attr-defined]
    return [marks[(r, "warmup")] - marks[(r, "bootstrap")] for r in range(8)]


def test_rank_spread_gives_ranks_unequal_repeatable_speeds() -> None:
    sc = load_scenario("real-cpu-bootstrap-8")
    costs = {"effect_cpu_s": 2e-4, "store_one_way_s": 5e-4, "alloc_s": 1e-3, "thread_start_s": 5e-4}
    alike = _spans(simulate(sc, calibration=Calibration.from_dict(costs)))
    assert max(alike) - min(alike) < 0.02 * max(alike)  # without a spread only the store queue tells ranks apart
    spread = Calibration.from_dict({**costs, "rank_spread": 0.2})
    a, b = _spans(simulate(sc, calibration=spread)), _spans(simulate(sc, calibration=spread))
    assert a == b  # one seed, one story
    assert (max(a) - min(a)) > 0.15 * max(a)
    other = _spans(simulate(sc, calibration=spread, spread_seed=1))
    assert other != a
    sim = Simulation(sc, calibration=spread)
    speeds = [sim.rank_speed(r, "bootstrap") for r in range(200)]
    assert abs(sum(speeds) / 200 - 1.0) < 0.05 and min(speeds) >= 1 - 0.2 * 3 ** 0.5 - 1e-9


@pytest.mark.parametrize("died, noticed", [(0.0, 0.1), (0.03, 0.1), (0.15, 0.2), (0.2, 0.2)])
def test_a_call_in_flight_to_a_dying_server_fails_at_the_next_port_probe(died: float, noticed: float) -> None:
    sim = Simulation(load_scenario("real-cpu-kill-rank"), calibration=Calibration(dead_peer_check_s=0.1))
    owner = sim.ranks[3]
    owner.died_at = died

    def caller():  # type: ignore[no-untyped-def]
        yield from sim.notice_dead(owner, 0.0)

    sim.env.process(caller())
    sim.env.run()
    assert sim.env.now == pytest.approx(noticed)


def _failures_after_the_kill(cal: Calibration) -> list[float]:
    """Seconds from rank 3's death to each survivor's failed WRITE to it, in real-cpu-kill-rank."""
    from mooncake_protocol.outcome import evaluate

    sc = load_scenario("real-cpu-kill-rank")
    rec = simulate(sc, calibration=cal)
    assert evaluate(rec, sc).to_json()["verdict"] == "completed"
    killed = next(m["t"] for m in rec.marks if m["name"] == "killed")
    return [m["t"] - killed for m in rec.marks if m["name"] == "transfer_failed" and m["data"]["dst_rank"] == 3]


def test_a_write_sent_while_the_killed_rank_is_torn_down_fails_at_the_next_probe() -> None:
    """dead_notice_s: a killed rank's port takes requests for a while (its process is torn down), so a TCP
    WRITE sent to it then goes out and fails only at the real client's next port probe (0.1 s later), as
    real kill-rank runs showed; without the field, or once the window is over, it fails at once."""
    base = dict(dead_peer_check_s=0.1, transfer_threads=1.0, tcp_latency_s=1e-3)
    at_once = _failures_after_the_kill(Calibration(**base))  # type: ignore[arg-type]
    assert len(at_once) == 3 and max(at_once) < 0.05
    torn_down = _failures_after_the_kill(Calibration(**base, dead_notice_s=1.0))  # type: ignore[arg-type]
    assert len(torn_down) == 3 and min(torn_down) >= 0.1  # each waits for its probe, a slice after sending
    over = _failures_after_the_kill(Calibration(**base, dead_notice_s=1e-9))  # type: ignore[arg-type]
    assert over == at_once  # sent after the window: refused at once, as before
    no_probe = _failures_after_the_kill(Calibration(tcp_latency_s=1e-3, transfer_threads=1.0, dead_notice_s=1.0))
    assert max(no_probe) < 0.05  # without dead_peer_check_s nothing waits for a probe


def test_host_work_over_a_large_tensor_costs_its_bytes(tmp_path: Path) -> None:
    """A CPU allreduce of 4 MB per rank: with per-byte rates calibrated, the collective phase grows by at least
    its fill, reduce and decode bytes at those rates (ReadMem and WriteMem copies come on top); the protocol
    reports that work as HostCompute effects of those sizes."""
    path = tmp_path / "big.yaml"
    path.write_text("name: big\ntopology: cpu-host\nranks: 2\nbackend: cpu\n"
                    "workload:\n  - {op: allreduce, dtype: int32, count: 1000000}\n")
    sc = load_scenario(str(path))
    base = {"effect_cpu_s": 1e-6, "host_cpus": 2.0}
    rates = {"host_copy_Bps": 1e9, "host_reduce_Bps": 1e9, "host_fill_Bps": 1e9, "host_decode_Bps": 1e9}
    plain = simulate(sc, calibration=Calibration.from_dict(base), record_effects=True)
    priced = simulate(sc, calibration=Calibration.from_dict({**base, **rates}), record_effects=True)
    work = [(e["args"]["what"], e["args"]["nbytes"]) for e in priced.effects
            if e["effect"] == "HostCompute" and e["rank"] == 0]
    assert work == [("fill", 4_000_000), ("reduce", 8_000_000), ("decode", 4_000_000)]
    extra = priced.phase_times[0]["done"] - priced.phase_times[0]["collective"] \
        - (plain.phase_times[0]["done"] - plain.phase_times[0]["collective"])
    assert extra >= 16_000_000 / 1e9
