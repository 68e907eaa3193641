"""Parity: a scenario this machine can realise tells the same story in the simulator and for real.

Every bundled scenario with ``realisable.cpu`` true, no GPUs and one host runs in both modes
(``mooncake_sim.parity.parity``: the simulator in-process, ``mooncake-real run`` as a subprocess) and
must give the same canonical trace, verdict and cause, failure scenarios included. GPU scenarios
(marked ``gpu``) need CuPy and a CUDA device. Timing is not checked here (benchmarks/parity_report.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from mooncake_protocol.resources import bundled_names
from mooncake_protocol.scenario import load_scenario
from mooncake_sim.parity import parity


def _cpu_realisable() -> list[object]:
    out: list[object] = []
    for name in bundled_names("scenarios"):
        r = load_scenario(name).realisable
        if r.cpu and r.gpus == 0 and r.hosts == 1 and not r.mnnvl and not r.rdma:
            out.append(name)
        else:
            why = ("realisable.cpu is false" if not r.cpu else f"needs {r.gpus} GPU(s)" if r.gpus
                   else f"needs {r.hosts} hosts")
            out.append(pytest.param(name, marks=pytest.mark.skip(reason=f"not realisable on a CPU-only machine: {why}")))
    return out


GPU_SCENARIOS = ("lazy-kernel-load-1gpu", "lazy-kernel-load-1gpu-fixed", "host-region-gpu-label-1gpu",
                 "host-region-gpu-label-1gpu-fixed", "cuda-collectives-1gpu")


def _check(name: str) -> None:
    p = parity(name, timeout_s=100)
    assert p.status != "unrealisable", p.message
    assert p.status != "real-failed", p.message
    assert p.sim["verdict"] == p.real["verdict"], (p.sim["verdict"], p.real["verdict"])
    assert p.sim["cause"] == p.real["cause"], (p.sim["cause"], p.real["cause"])
    assert p.equal, "canonical traces differ:\n" + "\n".join(p.diff)
    assert p.sim["matches_expect"] and p.real["matches_expect"], (p.sim.get("mismatches"), p.real.get("mismatches"))


@pytest.mark.timeout(110)
@pytest.mark.parametrize("name", _cpu_realisable())
def test_cpu_parity(name: str) -> None:
    _check(name)


@pytest.mark.gpu
@pytest.mark.timeout(200)
@pytest.mark.parametrize("name", GPU_SCENARIOS)
def test_gpu_parity(name: str) -> None:
    _check(name)


#: tensors of kilobytes to megabytes on the GPU, where a write still in flight would show (a 20 KB float32
#: allgather once came back wrong in real mode, differently on every run, while the one-element bundled
#: collectives were right); the simulator's values are the reference
LARGE_GPU_TENSORS = """name: large-gpu-tensors
topology: h100-1gpu
ranks: 4
placement: [{host: dev0, gpu: 0}, {host: dev0, gpu: 0}, {host: dev0, gpu: 0}, {host: dev0, gpu: 0}]
backend: cuda
engine: tent
policy: fixed
workload:
  - {op: allgather, dtype: float32, count: 5000, input: "rank * 100 + index"}
  - {op: allreduce, dtype: float32, reduce_op: sum, count: 300000, input: "rank + index"}
  - {op: broadcast, dtype: int64, root: 1, count: 1100000, input: "rank * 10000000 + index"}
deadlines: {bootstrap_s: 20, collective_s: 20, stall_s: 5}
"""


@pytest.mark.gpu
@pytest.mark.timeout(200)
def test_gpu_parity_of_tensors_of_kilobytes_to_megabytes(tmp_path: Any) -> None:
    sc = tmp_path / "large-gpu-tensors.yaml"
    sc.write_text(LARGE_GPU_TENSORS)
    p = parity(str(sc), timeout_s=150)
    assert p.status not in ("unrealisable", "real-failed"), p.message
    assert p.sim["verdict"] == p.real["verdict"] == "completed", (p.sim["verdict"], p.real["verdict"])
    assert p.equal, "canonical traces differ:\n" + "\n".join(p.diff)


@pytest.mark.timeout(60)
def test_parity_cli_exit_2_passes_real_modes_line_through() -> None:
    """A scenario this machine cannot realise (MNNVL): exit 2 with real mode's one line."""
    proc = subprocess.run([sys.executable, "-m", "mooncake_sim.cli", "parity", "host-region-on-fabric"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "cannot run for real" in lines[0] and "MNNVL" in lines[0], proc.stderr
    assert lines[0].startswith("mooncake-sim parity: ") and "mooncake-real:" not in lines[0]  # the command run


@pytest.mark.timeout(60)
def test_parity_cli_timing_dependent_scenario_is_unrealisable() -> None:
    proc = subprocess.run([sys.executable, "-m", "mooncake_sim.cli", "parity", "p2p-lane-reset", "--json"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert json.loads(proc.stdout)["status"] == "unrealisable"


@pytest.mark.timeout(60)
def test_parity_cli_equal(tmp_path: object) -> None:
    proc = subprocess.run([sys.executable, "-m", "mooncake_sim.cli", "parity", "real-cpu-bootstrap-2"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[0] == "real-cpu-bootstrap-2: equal"


@pytest.mark.timeout(90)
def test_parity_cli_of_a_scenario_without_expect(tmp_path: Any) -> None:
    """A user's scenario without ``expect`` runs in both worlds; uncalibrated, the report says why its time
    ratios are far from 1."""
    sc = tmp_path / "mine.yaml"
    sc.write_text("name: mine\ntopology: cpu-host\nranks: 2\nbackend: cpu\n"
                  "workload:\n  - {op: allreduce, dtype: int32, count: 4, reduce_op: sum}\n")
    proc = subprocess.run([sys.executable, "-m", "mooncake_sim.cli", "parity", str(sc)],
                          capture_output=True, text=True, timeout=90, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "mine: equal" and "uncalibrated" in proc.stdout, proc.stdout


def test_calibration_fields_match_the_simulator() -> None:
    import dataclasses

    from mooncake_real.calibrate import SIM_FIELDS
    from mooncake_sim.driver import TABLES, Calibration

    assert tuple(f.name for f in dataclasses.fields(Calibration) if f.name not in TABLES) == SIM_FIELDS


@pytest.mark.timeout(180)
def test_calibrate_writes_the_sim_section(tmp_path: object) -> None:
    from pathlib import Path

    from mooncake_sim.runner import load_calibration

    out = Path(str(tmp_path)) / "cal.json"
    proc = subprocess.run([sys.executable, "-m", "mooncake_real.cli", "calibrate", "--quick", "--no-gpu", "-o", str(out)],
                          capture_output=True, text=True, timeout=170, check=False)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert data["measured"]["store_ping_rtt_s"] > 0 and data["measured"]["Now_s"] > 0
    cal = load_calibration(str(out))
    assert cal.effect_cpu_s > 0 and cal.store_one_way_s is not None and cal.host_cpus
    # WRITEs are measured through the driver's own path, and that is what the simulator is given
    m = data["measured"]
    for t in ("shm", "tcp"):
        assert m[f"{t}_driver_write_small_s"] > 0 and m[f"{t}_driver_bandwidth_Bps"] > 0
        assert getattr(cal, f"{t}_latency_s") == pytest.approx(m[f"{t}_driver_write_small_s"], rel=1e-6)
    assert m["shm_driver_write_small_s"] > m["shm_write_small_s"]  # the registry lookup costs more than the copy
    # a fresh client's first call also probes the port and connects: the simulator charges the difference
    assert m["rpc_first_call_s"] > 0 and cal.rpc_connect_s == pytest.approx(max(m["rpc_first_call_s"] - m["rpc_rtt_s"], 0))
    # costs inside real jobs of 2, 4 and 8 ranks, which a run uses at its own ranks per host
    from mooncake_real.calibrate import IN_SITU_RANKS

    assert sorted(data["sim_by_ranks"]) == sorted(str(n) for n in IN_SITU_RANKS)
    for n in IN_SITU_RANKS:
        part = data["sim_by_ranks"][str(n)]
        assert m[f"in_situ_r{n}_runs"] == 1 and m[f"in_situ_r{n}_tcp_write_s"] > 0
        # each rank's first TCP WRITE to a server opens the transfer thread's connection: kept apart
        assert m[f"in_situ_r{n}_tcp_write_connect_n"] >= n
        assert 0 < m[f"in_situ_r{n}_bootstrap_s"] < 5  # the job's own bootstrap phase, to check a file against
        assert part["host_cpus"] is None and part["tcp_latency_s"] == pytest.approx(m[f"in_situ_r{n}_tcp_write_s"])
        assert part["effect_cpu_s"] > 0 and part["alloc_s"] is not None
        assert part["rank_spread"] is not None and part["rank_spread"] >= 0  # ranks of one run differ
        assert cal.for_ranks(n).tcp_latency_s == pytest.approx(part["tcp_latency_s"])
    assert cal.dead_peer_check_s == pytest.approx(0.1)  # the real RPC client's port probe period
    assert 0 < m["dead_notice_s"] < 1.0 and cal.dead_notice_s == pytest.approx(m["dead_notice_s"])  # a killed port's last moments
    assert "in situ" in proc.stderr.replace("inside it", "in situ") and "8 ranks" in proc.stderr


def test_report_counts_lost_races_and_adds_simulator_only_runs() -> None:
    """parity_report's row: simulated medians over the paired and the simulator-only runs; per world, the
    runs with a missed key check (a warmup race lost)."""
    from pathlib import Path

    from mooncake_sim.parity import ParityResult, missed_checks

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import parity_report

    def times(w: float) -> dict[str, object]:
        return {"verdict": "completed", "phase_times_s": {"bootstrap": 0.02, "warmup": w, "collective": 0.0}}

    runs = [ParityResult("x", "equal", times(0.06), times(0.11), missed_checks={"sim": 0, "real": 2}),
            ParityResult("x", "equal", times(0.11), times(0.06), missed_checks={"sim": 1, "real": 0})]
    extra = [(times(0.06), 0), (times(0.06), 0), (times(0.11), 3)]
    r = parity_report.row(runs, extra)
    assert r["missed"] == {"sim": 2, "sim_runs": 5, "real": 1, "real_runs": 2,
                           "sim_lost": [False, True, False, False, True], "real_lost": [True, False],
                           "odds_p": pytest.approx(1.0)}
    assert r["phases"]["warmup"]["sim_s"] == 0.06 and r["phases"]["warmup"]["real_s"] == pytest.approx(0.085)
    assert r["sim_runs"] == 5 and r["phases"]["collective"]["empty"]
    trace = [{"type": "effect", "effect": "StoreCheck", "result": False}, {"type": "effect", "effect": "StoreCheck", "result": True},
             {"type": "mark", "name": "StoreCheck", "result": False}, {"type": "effect", "effect": "StoreGet", "result": None}]
    assert missed_checks(trace) == 1


def test_report_weighs_simulated_runs_to_the_real_race_odds() -> None:
    """parity_report: a phase with two modes (race won 60 ms, lost 110 ms). The plain simulated median
    falls with the simulator's odds; weighed to the real runs' odds, it compares like with like."""
    from fractions import Fraction
    from pathlib import Path

    from mooncake_sim.parity import ParityResult

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import parity_report

    assert parity_report.weighted_median([(3.0, Fraction(1)), (1.0, Fraction(1)), (2.0, Fraction(1))]) == 2.0
    assert parity_report.weighted_median([(1.0, Fraction(1)), (2.0, Fraction(1))]) == 1.5
    assert parity_report.weighted_median([(1.0, Fraction(1)), (2.0, Fraction(3))]) == 2.0
    assert parity_report.weighted_median([]) is None

    def times(w: float) -> dict[str, object]:
        return {"verdict": "completed", "phase_times_s": {"bootstrap": 0.02, "warmup": w, "collective": 0.0}}

    # real: 3 of 4 runs lost the race (110 ms each), one won (62 ms); simulated: 6 of 8 draws won (58-63 ms)
    runs = [ParityResult("x", "equal", times(0.060), times(0.110), missed_checks={"sim": 0, "real": 1}),
            ParityResult("x", "equal", times(0.112), times(0.108), missed_checks={"sim": 1, "real": 1}),
            ParityResult("x", "equal", times(0.058), times(0.112), missed_checks={"sim": 0, "real": 2}),
            ParityResult("x", "equal", times(0.061), times(0.062), missed_checks={"sim": 0, "real": 0})]
    extra = [(times(0.063), 0), (times(0.059), 0), (times(0.062), 0), (times(0.114), 1)]
    w = parity_report.row(runs, extra)["phases"]["warmup"]
    assert w["ratio"] == pytest.approx(0.0615 / 0.109)  # the plain medians: won against lost
    # weighed: the two lost draws (112, 114 ms) carry 3/4 of the weight, the six won ones 1/4
    assert w["sim_at_real_odds_s"] == pytest.approx(0.112) and w["ratio_at_real_odds"] == pytest.approx(0.112 / 0.109)
    assert parity_report.in_range([{"phases": {"bootstrap": {"ratio": 1.0}, "warmup": w,
                                               "collective": {"ratio": None}}}], "ratio") == (1, 2)
    # a real outcome the simulator never drew: no weighed ratio
    runs[3] = ParityResult("x", "equal", times(0.061), times(0.062), missed_checks={"sim": 0, "real": 0})
    no_lost = parity_report.row(runs[:1] + runs[3:], extra[:3])["phases"]["warmup"]
    assert no_lost["ratio_at_real_odds"] is None and no_lost["ratio"] is not None


def test_report_tests_whether_the_race_odds_differ_and_says_why_a_plain_median_is_out() -> None:
    """parity_report: Fisher's exact test on the race counts (two-sided), and the line below the table for a
    phase out of range plain but in range at the real odds."""
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import parity_report

    assert parity_report.odds_p(5, 5, 0, 5) == pytest.approx(2 / 252)  # all against none: the two extreme tables
    assert parity_report.odds_p(10, 20, 5, 10) == pytest.approx(1.0)  # the same odds
    assert parity_report.odds_p(17, 20, 2, 5) == pytest.approx(0.0698, abs=1e-4)
    assert parity_report.odds_p(3, 20, 5, 5) < 0.01
    assert parity_report.odds_p(0, 0, 1, 5) is None

    def phases(plain: float | None, odds: float | None) -> dict[str, object]:
        return {"bootstrap": {"ratio": 1.0, "ratio_at_real_odds": 1.0}, "warmup": {"ratio": plain, "ratio_at_real_odds": odds},
                "collective": {"ratio": None, "ratio_at_real_odds": None}}

    rows = [{"scenario": "a", "missed": {"odds_p": 0.07}, "phases": phases(1.5, 0.93)},
            {"scenario": "b", "missed": {"odds_p": 0.001}, "phases": phases(0.5, 1.0)},
            {"scenario": "c", "missed": {"odds_p": 0.5}, "phases": phases(1.5, 1.4)},  # out both ways: no excuse line
            {"scenario": "d", "missed": {"odds_p": None}, "phases": phases(1.0, None)}]
    lines = parity_report.odds_lines(rows)
    assert lines[0] == "race odds differ (Fisher's exact test, p < 0.05): b (p=0.001)"
    assert lines[1].startswith("a warmup: 1.50 plain, 0.93 at the real odds (consistent odds")
    assert lines[2] == "b warmup: 0.50 plain, 1.00 at the real odds (the odds differ)"
    assert len(lines) == 3
    assert parity_report.odds_lines(rows[3:]) == []


def test_report_warns_when_the_host_runs_at_another_speed_than_calibrated(tmp_path: object) -> None:
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import parity_report

    path = Path(str(tmp_path)) / "cal.json"
    path.write_text(json.dumps({"sim": {}, "measured": {"store_ping_rtt_s": 1e-4, "store_ping_rtt_end_s": 1.2e-4}}))
    then = parity_report.calibrated_ping(str(path))
    assert then == pytest.approx(1.1e-4)
    assert parity_report.drift_warning(then, 1.3e-4, "at the start") is None  # within 1.3 times
    w = parity_report.drift_warning(then, 2.2e-4, "at the end")
    assert w is not None and "220 us against 110 us" in w and "calibrate again" in w
    assert parity_report.drift_warning(then, 0.5e-4, "at the start") is not None  # faster counts too
    path.write_text(json.dumps({"sim": {}}))  # an older file without the figure: no judgement
    assert parity_report.calibrated_ping(str(path)) is None
    assert parity_report.drift_warning(None, 2e-4, "at the start") is None
    assert 0 < parity_report.host_ping() < 0.1


@pytest.mark.timeout(60)
def test_report_runs_in_rounds_and_measures_the_host_by_the_calibrations_own_job(tmp_path: object) -> None:
    """parity_report: with --repeat K every scenario runs once per round (host drift spreads over all of them),
    and the job calibrate measured, run again now, says how fast the host runs against the file."""
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import parity_report

    assert parity_report.run_order(["a", "b"], 3) == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    assert parity_report.run_order(["a"], 1) == [("a", 0)]
    path = Path(str(tmp_path)) / "cal.json"
    path.write_text(json.dumps({"sim": {}, "measured": {
        "in_situ_r2_bootstrap_s": 0.02, "in_situ_r8_bootstrap_s": 0.05, "in_situ_r4_bootstrap_s": 0.03,
        "in_situ_r8_store_op_s": 1e-4, "in_situ_cuda_r8_bootstrap_s": 0.09}}))
    assert parity_report.reference_job(str(path)) == (8, 0.05)  # the largest CPU job, not the CUDA one
    path.write_text(json.dumps({"sim": {}, "measured": {"store_ping_rtt_s": 1e-4}}))
    assert parity_report.reference_job(str(path)) is None  # an older file: nothing to measure by
    lines, warning = parity_report.speed_summary(0.05, 8, [0.055, None, 0.06])
    assert "per round: 1.10 - 1.20; median 1.15" in lines[0] and warning is None
    lines, warning = parity_report.speed_summary(0.05, 8, [0.08, 0.07, 0.075])
    assert warning is not None and "75.0 ms" in warning and "50.0 ms" in warning
    assert parity_report.speed_summary(0.05, 8, [None]) == ([], None)
    now = parity_report.host_speed(2)  # one real 2-rank run of the calibration's job on this host
    assert now is not None and 0 < now < 5


def test_report_without_a_calibration_says_its_times_are_not_this_hosts(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import parity_report

    from mooncake_sim.parity import ParityResult

    def fake_parity(name: str, *, calibration: object, spread_seed: int, trace_dir: str | None) -> ParityResult:
        return ParityResult(name, "equal", sim={"phase_times_s": {"bootstrap": 1e-4}},
                            real={"phase_times_s": {"bootstrap": 0.01}})

    monkeypatch.setattr(parity_report, "parity", fake_parity)
    monkeypatch.setattr(parity_report, "load_scenario", lambda name: None)  # "a" is a name only the fake knows
    assert parity_report.main(["--only", "a"]) == 0
    out = capsys.readouterr().out
    assert "phases in 0.8-1.25: 0 of 1" in out and "\nuncalibrated: the simulator charges no CPU time" in out, out


def test_probe_mmap_maps_and_cleans_up_and_says_what_it_needs() -> None:
    """benchmarks/probe_mmap.py: one map of a fresh segment is timed and leaves nothing in /dev/shm; without
    CuPy and a GPU the script exits 2 with one line after its plain series."""
    from pathlib import Path

    bench = Path(__file__).resolve().parents[2] / "benchmarks"
    sys.path.insert(0, str(bench))
    import probe_mmap

    assert 0 < probe_mmap.map_once("test") < 1.0
    assert probe_mmap.describe([0.005, 0.001, 0.002]) == "3 rounds, the first 5.00 ms, the others median 1.50 max 2.00 ms"
    assert probe_mmap.describe([0.005]) == "1 rounds, the first 5.00 ms" and probe_mmap.describe([]) == "no round"
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"mooncake-probe-mmap-{os.getpid()}")]
    try:
        import cupy  # noqa: F401

        pytest.skip("CuPy is installed: the GPU series would run")
    except ImportError:
        pass
    proc = subprocess.run([sys.executable, str(bench / "probe_mmap.py"), "--reps", "2"], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "needs CuPy and a CUDA GPU" in proc.stderr


def test_report_holds_a_calibration_against_its_own_job(tmp_path: object) -> None:
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import parity_report

    from mooncake_sim.runner import load_calibration

    path = Path(str(tmp_path)) / "cal.json"
    path.write_text(json.dumps({"sim": {"effect_cpu_s": 1e-4}, "measured": {"in_situ_r4_bootstrap_s": 0.02}}))
    lines = parity_report.self_check(str(path), load_calibration(str(path)), seeds=2)
    assert len(lines) == 1 and "own 4-rank job" in lines[0] and "measured then 20.0 ms" in lines[0]
    ratio = float(lines[0].rsplit("= ", 1)[1])
    assert ratio > 0
    path.write_text(json.dumps({"sim": {}}))  # an older file: nothing to check
    assert parity_report.self_check(str(path), load_calibration(str(path)), seeds=2) == []


def test_refresh_measures_the_in_job_figures_again_and_keeps_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    """calibrate --refresh: the in-job figures of the jobs asked for are replaced (stale keys included), the
    figures of operations measured alone are kept, and the constants are derived again from the new ones."""
    from pathlib import Path

    from mooncake_real import calibrate, gpu

    data = json.loads((Path(__file__).resolve().parents[2] / "benchmarks" / "calibration-h100.json").read_text())
    old = data["measured"]
    calls = []

    def jobs(scenario: str, job: str, what: str, quick: bool, share: float) -> dict[str, float]:
        calls.append(job)
        keep = {k: v for k, v in old.items() if k.startswith(job) and k[len(job):][:1].isdigit()}
        fresh = {k: v * 2 for k, v in keep.items() if not k.endswith("_rank_spread")}
        return fresh

    monkeypatch.setattr(calibrate, "_in_situ_jobs", jobs)
    monkeypatch.setattr(gpu, "cupy_or_none", lambda: object())
    got = calibrate.refresh(data, cuda=False)
    assert calls == ["in_situ_r"]
    m = got["measured"]
    assert m["store_ping_rtt_s"] == old["store_ping_rtt_s"] and m["Now_s"] == old["Now_s"]
    assert m["in_situ_r8_effect_s"] == pytest.approx(2 * old["in_situ_r8_effect_s"])
    assert "in_situ_r8_rank_spread" in old and "in_situ_r8_rank_spread" not in m  # no stale figure survives
    assert got["sim_by_ranks"]["8"]["effect_cpu_s"] == pytest.approx(2 * old["in_situ_r8_effect_s"])
    def same(a: dict[str, Any], b: dict[str, Any]) -> bool:  # the file keeps its figures to 12 digits
        return a.keys() == b.keys() and all(
            same(a[k], b[k]) if isinstance(a[k], dict) else a[k] == b[k] if b[k] is None
            else a[k] == pytest.approx(b[k], rel=1e-9) for k in a)

    assert same(got["sim_cuda_by_ranks"], data["sim_cuda_by_ranks"])  # the CUDA job was not asked for
    from mooncake_real.calibrate import SIM_FIELDS

    # the file was written on a bigger host, and before the per-byte rates were measured (None here)
    here = dict({k: data["sim"].get(k) for k in SIM_FIELDS}, host_cpus=float(os.cpu_count() or 1))
    assert same(got["sim"], here)  # nothing the constants measured alone come from changed
    calls.clear()
    both = calibrate.refresh(data, cuda=True)
    assert calls == ["in_situ_r", "in_situ_cuda_r"]
    assert both["sim_cuda_by_ranks"]["4"]["effect_cpu_s"] == pytest.approx(2 * old["in_situ_cuda_r4_effect_s"])
    assert both["refreshed_from"] == data["machine"]  # where the kept figures were measured
    monkeypatch.setattr(gpu, "cupy_or_none", lambda: None)
    calls.clear()
    kept = calibrate.refresh(data, cuda=True)  # a host without a GPU keeps the CUDA job's figures
    assert calls == ["in_situ_r"] and same(kept["sim_cuda_by_ranks"], data["sim_cuda_by_ranks"])
    with pytest.raises(ValueError, match="no in-job figures"):
        calibrate.refresh({"measured": {"store_ping_rtt_s": 1e-4}, "sim": {}})


def test_calibrate_refresh_of_a_file_without_in_job_figures_says_so(tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "old.json"
    path.write_text(json.dumps({"measured": {"store_ping_rtt_s": 1e-4}, "sim": {}}))
    for target, says in ((path, "no in-job figures"), (path.with_name("none.json"), "not found")):
        proc = subprocess.run([sys.executable, "-m", "mooncake_real.cli", "calibrate", "--refresh", str(target)],
                              capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert str(target) in proc.stderr and says in proc.stderr and not proc.stdout
    proc = subprocess.run([sys.executable, "-m", "mooncake_real.cli", "calibrate", "--refresh", str(path), "--no-in-situ"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2 and "drop one of the two" in proc.stderr and proc.stderr.count("\n") == 1


def test_report_recalibrates_before_each_round(tmp_path: object, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """parity_report --recalibrate: round k's runs, and every K-th simulator-only draw after them, are
    simulated with the calibration measured at round k's start; the host's speed is that measurement's."""
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import parity_report

    from mooncake_sim.parity import ParityResult

    path = Path(str(tmp_path)) / "cal.json"
    path.write_text(json.dumps({"sim": {}, "measured": {"in_situ_r8_bootstrap_s": 0.05}}))
    rounds: list[int] = []
    used: list[tuple[str, object, int]] = []

    def recal(p: str, gpu: bool, k: int, keep: str | None, share: float) -> tuple[object, dict[str, float]]:
        assert p == str(path) and not gpu and share == 1.0
        rounds.append(k)
        return f"cal{k}", {"in_situ_r8_bootstrap_s": 0.05 * (k + 2)}

    def fake_parity(name: str, *, calibration: object, spread_seed: int, trace_dir: str | None) -> ParityResult:
        used.append((name, calibration, spread_seed))
        times = {"phase_times_s": {"bootstrap": 0.01}}
        return ParityResult(name, "equal", sim=dict(times), real=dict(times))

    def fake_sim_only(name: str, cal: object, seed: int) -> tuple[dict[str, object], int]:
        used.append((name + "+", cal, seed))
        return {"phase_times_s": {"bootstrap": 0.01}}, 0

    monkeypatch.setattr(parity_report, "recalibrated", recal)
    monkeypatch.setattr(parity_report, "parity", fake_parity)
    monkeypatch.setattr(parity_report, "sim_only", fake_sim_only)
    monkeypatch.setattr(parity_report, "load_calibration", lambda p: "file")
    monkeypatch.setattr(parity_report, "self_check", lambda p, c: [])
    monkeypatch.setattr(parity_report, "host_ping", lambda: 1e-4)
    monkeypatch.setattr(parity_report, "load_scenario", lambda name: None)
    assert parity_report.main(["--calibration", str(path), "--only", "a", "b", "--repeat", "2", "--sim-seeds", "4",
                               "--recalibrate", "--json"]) == 0
    assert rounds == [0, 1]
    assert used == [("a", "cal0", 0), ("b", "cal0", 0), ("a", "cal1", 1), ("b", "cal1", 1),
                    ("a+", "cal0", 2), ("a+", "cal1", 3), ("b+", "cal0", 2), ("b+", "cal1", 3)]
    err = capsys.readouterr().err
    assert "per round: 2.00 3.00" in err and "each round simulated with the in-job figures" in err
    assert "warning" not in err  # the drift was measured and used, not an error
    monkeypatch.setattr(parity_report, "recalibrated", lambda p, gpu, k, keep, share: (f"half{share}", {}))
    used.clear()
    assert parity_report.main(["--calibration", str(path), "--only", "a", "--recalibrate", "0.5", "--json"]) == 0
    assert used == [("a", "half0.5", 0)]  # a single run: one round, recalibrated all the same
    path.write_text(json.dumps({"sim": {}, "measured": {"store_ping_rtt_s": 1e-4}}))
    assert parity_report.main(["--calibration", str(path), "--only", "a", "--recalibrate"]) == 2
    assert "no in-job figures" in capsys.readouterr().err


def test_report_with_a_budget_stops_between_rounds_and_reports_the_rounds_done(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """--budget: a device call with a time limit killed a report in its last round, and it printed nothing.
    Rounds of 20 s (two scenarios of 10 s) under a 50 s budget: two rounds, then a line, then the report."""
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import parity_report

    from mooncake_sim.parity import ParityResult

    clock = [1000.0]
    used: list[tuple[str, int]] = []

    def fake_parity(name: str, *, calibration: object, spread_seed: int, trace_dir: str | None) -> ParityResult:
        used.append((name, spread_seed))
        clock[0] += 10.0
        times = {"phase_times_s": {"bootstrap": 0.01}}
        return ParityResult(name, "equal", sim=dict(times), real=dict(times))

    monkeypatch.setattr(parity_report.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(parity_report, "parity", fake_parity)
    monkeypatch.setattr(parity_report, "sim_only", lambda name, cal, seed: ({"phase_times_s": {"bootstrap": 0.01}}, 0))
    monkeypatch.setattr(parity_report, "load_scenario", lambda name: None)
    assert parity_report.main(["--only", "a", "b", "--repeat", "5", "--budget", "50", "--json"]) == 0
    assert used == [("a", 0), ("b", 0), ("a", 1), ("b", 1)]
    out = capsys.readouterr()
    assert "stopped after 2 of 5 rounds" in out.err
    assert [r["scenario"] for r in json.loads(out.out)] == ["a", "b"]
    with pytest.raises(SystemExit):
        parity_report.main(["--budget", "0"])


def test_report_refuses_an_unknown_scenario_or_a_broken_calibration_in_one_line(
        tmp_path: object, capsys: pytest.CaptureFixture[str]) -> None:
    """Before any run: a traceback was what `--only` with a typo, or a calibration file that is not JSON, gave."""
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import parity_report

    assert parity_report.main(["--only", "real-cpu-allreduce", "no-such-scenario"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("parity_report: no-such-scenario: no bundled scenario named 'no-such-scenario'") and "\n" not in err
    bad = Path(str(tmp_path)) / "cal.json"
    bad.write_text("{")
    assert parity_report.main(["--calibration", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"parity_report: {bad}: line 1: not valid JSON") and "\n" not in err, err


def test_a_difference_on_a_host_timing_failure_says_it_is_a_race_of_this_host() -> None:
    """A CPU scenario under snapshot-1755 on a loaded 2-CPU host: the real run's 100 us ping sometimes times out
    (5 ms) on a live peer and drops it (ping-false-positive) while the simulator completes. The parity report
    says why, and what makes it deterministic; other differences get no such note."""
    from mooncake_sim.parity import ParityResult, format_parity

    p = ParityResult("s", "differ", sim={"verdict": "completed", "cause": None},
                     real={"verdict": "hang", "cause": "ping-false-positive"}, diff=["fact verdict differs"])
    note = p.race_note()
    assert note is not None and note.startswith("only the real run met ping-false-positive: ")
    assert "pause_rank or slow_peer" in note and "note  only the real run met" in format_parity(p)
    assert p.to_json()["race_note"] == note
    other = ParityResult("s", "differ", sim={"cause": None}, real={"cause": "stale-task-id"}, diff=["x"])
    assert other.race_note() is None and "note  " not in format_parity(other)
    same = ParityResult("s", "differ", sim={"cause": "ping-false-positive"}, real={"cause": "ping-false-positive"})
    assert same.race_note() is None  # both worlds met it: the difference is elsewhere


def test_a_difference_in_dropped_peers_or_values_where_the_policy_leaves_a_race_open_is_noted() -> None:
    """Legacy policies at parity (generated CPU scenarios): both worlds hang with stale-task-id, but one dropped
    peers on a late ping reply, or read a buffer before its data landed. The note says which race the
    scenario's policy leaves open; under a policy that closes it, no note."""
    from mooncake_sim.parity import ParityResult

    same = {"verdict": "hang", "cause": "stale-task-id"}
    broken = ["fact broken differs:\n    only in sim: (nothing) | only in real: [\"0->1\"]"]
    p = ParityResult("s", "differ", sim=dict(same), real=dict(same), diff=broken,
                     races=("ping-false-positive", "uninitialized-sync-flag"))
    assert (p.race_note() or "").startswith("the runs differ in peers marked broken, where this policy leaves "
                                           "ping-false-positive open: ")
    values = ParityResult("s", "differ", sim=dict(same), real=dict(same), diff=["fact results differs:\n  x"],
                          races=("uninitialized-sync-flag",))
    assert "collective values, where this policy leaves uninitialized-sync-flag open" in (values.race_note() or "")
    closed = ParityResult("s", "differ", sim=dict(same), real=dict(same), diff=broken, races=())
    assert closed.race_note() is None


def test_a_hang_against_an_error_where_the_two_time_limits_lie_close_is_noted() -> None:
    """A generated GPU scenario (stall_s 5, collective_s 10): a cold reduce kernel held both worlds' collective;
    the simulated ranks' 5 s wait ran out 10 us before the stall window, the real launcher's stall window
    first. The note names the two limits and what to set; far-apart limits or different causes get none."""
    from mooncake_sim.parity import ParityResult

    sim = {"verdict": "error", "cause": "lazy-kernel-load"}
    real = {"verdict": "hang", "cause": "lazy-kernel-load"}
    p = ParityResult("s", "differ", sim=sim, real=real, diff=["fact verdict differs"],
                     limits={"collective": 5.0, "stall": 5.0})
    note = p.race_note() or ""
    assert note.startswith("the real run ended as a hang, the other as an error: ") and "stall_s" in note, note
    assert ParityResult("s", "differ", sim=sim, real=real, limits={"collective": 5.0, "stall": 1.0}).race_note() is None
    other = dict(real, cause="stale-task-id")
    assert ParityResult("s", "differ", sim=sim, real=other, limits={"collective": 5.0, "stall": 5.0}).race_note() is None


def test_the_races_each_policy_leaves_open() -> None:
    from mooncake_protocol.policy import make_policy
    from mooncake_sim.parity import open_races

    assert open_races(make_policy("fixed", {})) == ()
    assert open_races(make_policy("snapshot-1755", {})) == ("ping-false-positive",)
    assert open_races(make_policy("legacy-1755", {})) == ("uninitialized-sync-flag",)
    assert open_races(make_policy("legacy", {})) == ("ping-false-positive", "uninitialized-sync-flag")
    assert open_races(make_policy("legacy", {"zero_sync_flags": True})) == ("ping-false-positive",)
