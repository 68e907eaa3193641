"""Every bundled scenario, run in the simulator, gives the verdict, phase and cause its ``expect`` names."""

from __future__ import annotations

import pytest

from mooncake_protocol.outcome import format_summary
from mooncake_protocol.resources import bundled_names
from mooncake_protocol.scenario import load_scenario
from mooncake_sim.runner import run_one

SCENARIOS = [n for n in bundled_names("scenarios") if not n.startswith("bench-")]


@pytest.mark.parametrize("name", SCENARIOS)
def test_scenario_matches_expect(name: str) -> None:
    outcome = run_one(load_scenario(name))
    assert outcome.matches, "\n" + format_summary(outcome)


def test_the_cli_freezes_the_collector_at_exit() -> None:
    """mooncake-sim's exit skips the collector's last walk over what a large run left alive: at exit the
    generations are frozen (once, however often main or freeze_at_exit ran)."""
    import subprocess
    import sys

    code = ("import atexit, gc\n"
            "atexit.register(lambda: print('frozen', gc.get_freeze_count() > 0))\n"
            "from mooncake_sim.cli import freeze_at_exit, main\n"
            "freeze_at_exit(); main(['topo', 'list'])\n"
            "import mooncake_sim.cli as c; print('registered', c._FREEZE_AT_EXIT)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    assert "registered True" in out and out.rstrip().endswith("frozen True"), out


def test_a_scenario_without_expect_is_expected_to_complete(tmp_path, capsys) -> None:
    """``expect`` is optional (docs/scenario-format.md): without it a run must complete cleanly, and the report
    says that this is the default. A float16 allreduce is rejected on the GPU backend: exit 1."""
    from mooncake_sim.cli import main

    base = "name: mine\ntopology: hgx-h100\nranks: 4\nworkload:\n  - {op: allreduce, dtype: %s, count: 8}\n"
    ok, bad = tmp_path / "ok.yaml", tmp_path / "bad.yaml"
    ok.write_text(base % "int32")
    bad.write_text(base % "float16")
    assert main(["run", str(ok)]) == 0
    out = capsys.readouterr().out
    assert "expect    completed (the default expectation: no expect in force): matches" in out, out
    assert main(["run", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "DOES NOT MATCH: verdict error, expected completed" in out, out
    outcome = run_one(load_scenario(str(ok)))
    assert outcome.expect["given"] is False and outcome.to_json()["matches_expect"] is True
    assert run_one(load_scenario("real-cpu-allreduce")).expect["given"] is True


def test_the_summary_of_a_sizes_run_says_why_it_shows_no_values(tmp_path) -> None:
    sc = tmp_path / "sizes.yaml"
    sc.write_text("name: s\ntopology: hgx-h100\nranks: 4\ndata: sizes\n"
                  "workload:\n  - {op: allreduce, dtype: int32, count: 1024}\n")
    text = format_summary(run_one(load_scenario(str(sc))))
    assert "result    0:allreduce: no values (data: sizes moves lengths only) on 4 ranks" in text, text
    assert "simulated, " in text and "from the launch" not in text  # the simulator's clock starts at bootstrap


def test_the_flagship_finds_the_four_1755_causes_one_fix_at_a_time(capsys) -> None:
    """README's first command: each step of the ladder hangs with the next #1755 cause and fixed completes;
    every step is held to that (the exit status), not only the last one."""
    import json

    from mooncake_sim.cli import main

    assert main(["run", "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)["runs"]
    assert [(r["verdict"], r["cause"]) for r in runs] == [
        ("hang", "rpc-port-conflict"), ("hang", "host-region-gpu-label"), ("hang", "lazy-kernel-load"),
        ("hang", "stale-task-id"), ("completed", None)]
    assert all(r["matches_expect"] for r in runs)
    assert runs[-1]["phase"] == "done" and not runs[-1]["result_problems"]


def test_every_bundled_scenario_loads_from_any_directory(tmp_path, monkeypatch) -> None:
    """A bundled scenario names its topology so that it is found wherever the command runs (an installed
    tool runs from the user's directory, not from this checkout's root)."""
    monkeypatch.chdir(tmp_path)
    for name in bundled_names("scenarios"):
        load_scenario(name)


def test_another_policy_sets_the_scenarios_expect_aside(capsys) -> None:
    """`run lazy-kernel-load --policy fixed`: the scenario expects the legacy hang; under the fixed protocol it
    is held to completing cleanly, with a note saying why. A policy that leaves the protocol as it was (the
    scenario's own) keeps the expect."""
    from mooncake_sim.cli import main

    assert main(["run", "lazy-kernel-load", "--policy", "fixed"]) == 0
    captured = capsys.readouterr()
    note = "note: --policy fixed replaces the scenario's policy legacy-1755; its expect (hang, lazy-kernel-load)"
    assert note in captured.err, captured.err
    assert "expect    completed (the default expectation: no expect in force): matches" in captured.out
    assert main(["run", "lazy-kernel-load", "--policy", "legacy-1755"]) == 0
    captured = capsys.readouterr()
    assert "note:" not in captured.err and "expect    hang (lazy-kernel-load): matches" in captured.out


def test_a_long_run_without_progress_says_it_may_be_a_busy_loop_and_when_it_ends(tmp_path) -> None:
    """A broken direction (rank 0 -> 1), TENT: the data WRITE fails and is resubmitted at once, forever (the
    snapshot's resubmit-on-poll). Uncalibrated, each pass costs only the failure latency, so the stall window
    takes millions of passes: the progress lines say so, and what ends it sooner."""
    from mooncake_sim.driver import Simulation

    sc = tmp_path / "spin.yaml"
    sc.write_text("name: spin\ntopology: hgx-h100\nranks: 4\npolicy: fixed\ndata: sizes\n"
                  "faults: [{kind: block_direction, ranks: [0, 1]}]\n"
                  "workload:\n  - {op: allreduce, dtype: float32, count: 16}\n"
                  "deadlines: {bootstrap_s: 5, collective_s: 5, stall_s: 1}\n")

    class Enough(Exception):
        pass

    lines: list[str] = []

    def progress(line: str) -> None:
        lines.append(line)
        if len(lines) >= 12:
            raise Enough

    sim = Simulation(load_scenario(str(sc)), progress=progress, progress_every_s=0.0)
    with pytest.raises(Enough):
        sim.run()
    assert "busy loop" not in lines[0]
    hint = lines[-1]
    assert "; no progress mark since " in hint and "a busy loop? The stall window (deadlines.stall_s) ends at " in hint, hint
    assert "uncalibrated, a pass costs no host time: --calibration FILE, or a smaller stall_s, ends it sooner" in hint


def test_a_tent_alltoall_on_a_pcie_box_completes_over_cuda_ipc(tmp_path) -> None:
    """Four PCIe GPUs without NVLink: TENT's "nvlink" transport (CUDA IPC) crosses PCIe, so the collective
    completes with the right values (it was a NoPath, and the WRITEs were resubmitted forever)."""
    sc = tmp_path / "pcie.yaml"
    sc.write_text("name: pcie\ntopology: pcie-4gpu\nranks: 4\nbackend: cuda\nengine: tent\npolicy: fixed\n"
                  "workload:\n  - {op: alltoall, dtype: int32, count: 2, input: \"rank * 100 + index\"}\n"
                  "  - {op: allreduce, dtype: float32, count: 3, reduce_op: sum, input: \"rank + 1\", expect: [10, 10, 10]}\n"
                  "deadlines: {bootstrap_s: 5, collective_s: 5, stall_s: 0.2}\n")  # (a spin ends as a hang in seconds)
    o = run_one(load_scenario(str(sc)))
    assert o.verdict == "completed" and o.matches and not o.result_problems, format_summary(o)
    assert o.transports["intra-host gpu_to_gpu"] == {"nvlink": 12}
    assert o.results["0:alltoall"]["1"]["output"] == [2, 3, 102, 103, 202, 203, 302, 303]


def test_tent_retries_to_a_dead_peer_each_wait_for_a_refused_connection(tmp_path) -> None:
    """Three ranks share a GPU over TENT, whose buffers offer two transports, so a WRITE that fails is
    resubmitted; rank 2 dies as the allreduce starts. A WRITE to it fails after a refused connection attempt,
    one round trip to its host (as the real client's port probe), not at once: the survivors resubmit about
    once per round trip until the liveness probe marks it broken (before, every 2 us: ten times as many
    WRITEs and events, 117 s of wall time for a four-rank run)."""
    from mooncake_sim.driver import Simulation

    sc = tmp_path / "kill.yaml"
    sc.write_text("name: kill\ntopology: h100-1gpu\nranks: 3\nplacement: [{host: dev0, gpu: 0}, {host: dev0, gpu: 0}, "
                  "{host: dev0, gpu: 0}]\nbackend: cuda\nengine: tent\npolicy: fixed\n"
                  "faults: [{kind: kill_rank, rank: 2, at: \"collective:1\"}]\nworkload:\n  - {op: barrier}\n"
                  "  - {op: allreduce, dtype: int32, count: 1, reduce_op: sum, input: \"rank + 1\", "
                  "expect: {per_rank: {0: [3], 1: [3]}}}\ndeadlines: {bootstrap_s: 10, collective_s: 8, stall_s: 4}\n")
    scenario = load_scenario(str(sc))
    sim = Simulation(scenario)
    rec = sim.run()
    died = sim.ranks[2].died_at
    broken = [m["t"] for m in rec.marks if m["name"] == "peer_marked_broken" and m["data"]["peer"] == 2]
    assert died is not None and len(broken) == 2, [m["name"] for m in rec.marks if m["rank"] < 2][-10:]
    rtt = sim.refused_s(sim.ranks[0], 2)
    assert rtt == 2 * sim.network.one_way("dev0", "dev0") > 1e-5
    retries = 2 * (max(broken) - died) / rtt  # two survivors, one resubmit each per round trip at most
    assert 0.5 * retries < sim.transfers.writes < retries + 200
    assert [m["data"]["output"] for m in rec.marks if m["name"] == "collective_done" and m["rank"] < 2][-2:] == [[3], [3]]


def test_ranks_that_disagree_on_an_allreduce_are_wrong_values_without_any_expect(tmp_path) -> None:
    """A user's scenario with no expect: under legacy-1755 the sync flags are not zeroed, a stale flag lets a
    rank read its receive buffer early, and ranks end the allreduce with different outputs. That was a clean
    'completed'; every rank of one active set must hold the same output, so it is wrong values and the
    diagnosis names the cause."""
    from mooncake_protocol.outcome import _disagreements

    sc = tmp_path / "stale.yaml"
    sc.write_text("name: stale\ntopology: cpu-host\nranks: 4\nbackend: cpu\nengine: tent\npolicy: legacy-1755\n"
                  "workload:\n  - {op: allreduce, dtype: int8, count: 5000, input: \"index\", reduce_op: max}\n")
    o = run_one(load_scenario(str(sc)))
    assert o.verdict == "completed" and o.cause == "uninitialized-sync-flag", format_summary(o)
    assert any("0:allreduce: the ranks disagree" in p for p in o.result_problems) and not o.matches
    # ranks whose active sets differ (one dropped a peer) may hold different outputs: not flagged
    dropped = {"0:allreduce": {"0": {"output": [6], "active": [1, 1, 1, 0]}, "1": {"output": [10], "active": [1, 1, 1, 1]}}}
    assert _disagreements(dropped, []) == []
    same_set = {"0:allreduce": {"0": {"output": [6], "active": [1, 1]}, "1": {"output": [10], "active": [1, 1]}},
                "1:alltoall": {"0": {"output": [1], "active": [1, 1]}, "1": {"output": [2], "active": [1, 1]}}}
    assert _disagreements(same_set, []) == [
        "collective 0:allreduce: the ranks disagree (rank 0: [6]; rank 1: [10]), though every rank must hold the same output"]
    assert _disagreements(same_set, ["collective 0:allreduce: rank 1 got [10], expected [6]"]) == []  # told already
