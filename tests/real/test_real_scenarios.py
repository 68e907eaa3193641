"""``mooncake-real run``: real-mode scenarios judged like the simulator's, and the loopback-only rule.

Each scenario runs through the CLI (a subprocess, as a user runs it), is checked against its ``expect``
and against ``mooncake-sim run`` of the same file (verdict, cause, phase, collective outputs), and must
leave no process and no /dev/shm segment of its job behind.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("zmq")

from real_helpers import REPO, processes_matching, shm_segments, wait_for  # noqa: E402

from mooncake_protocol.outcome import evaluate  # noqa: E402
from mooncake_protocol.scenario import load_scenario  # noqa: E402

REAL_SCENARIOS = [
    "real-cpu-allreduce",
    "real-cpu-bootstrap-2",
    "real-cpu-bootstrap-4",
    "real-cpu-bootstrap-8",
    "real-cpu-port-conflict",
    "real-cpu-port-conflict-legacy",
    "real-cpu-kill-rank",
    "real-cpu-collectives",
]


def _cli(*args: str, timeout: float = 45.0) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=REPO + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""))
    return subprocess.run([sys.executable, "-m", "mooncake_real.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def _sim(name: str) -> dict:
    from mooncake_sim.driver import simulate

    sc = load_scenario(name)
    return evaluate(simulate(sc), sc).to_json()


def _assert_clean(job_id: str) -> None:
    assert wait_for(lambda: processes_matching(f"mooncake-real-{job_id}") == [], 5.0), \
        f"processes of job {job_id} left: {processes_matching(f'mooncake-real-{job_id}')}"
    assert shm_segments(job_id) == []


def _outputs(results: dict) -> dict:
    return {k: {r: v.get("output") for r, v in per.items()} for k, per in results.items()}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", REAL_SCENARIOS)
def test_real_scenario_matches_expect_and_the_simulator(name):
    t0 = time.monotonic()
    p = _cli("run", name, "--json")
    took = time.monotonic() - t0
    out = json.loads(p.stdout)
    _assert_clean(out["stats"]["job_id"])
    assert out["mode"] == "real" and out["scenario"] == name
    assert p.returncode == 0 and out["matches_expect"], (out["mismatches"], out["blocked"], p.stderr[-2000:])
    sim = _sim(name)
    assert sim["matches_expect"], sim["mismatches"]
    assert (out["verdict"], out["cause"], out["phase"]) == (sim["verdict"], sim["cause"], sim["phase"])
    assert _outputs(out["results"]) == _outputs(sim["results"])
    assert out["transports"] == sim["transports"]
    assert set(out) == set(sim)
    assert took < 20, f"{name} took {took:.1f} s"


@pytest.mark.timeout(60)
def test_collective_values_of_mooncakes_test_table():
    p = _cli("run", "real-cpu-collectives", "--json")
    out = json.loads(p.stdout)
    _assert_clean(out["stats"]["job_id"])
    res = _outputs(out["results"])
    assert res["0:allreduce"] == dict.fromkeys("0123", [10])
    assert res["1:allreduce"] == dict.fromkeys("0123", [16])
    assert res["2:allreduce"] == dict.fromkeys("0123", [10])
    assert res["3:allreduce"] == dict.fromkeys("0123", [13])
    assert res["4:allgather"] == dict.fromkeys("0123", [0, 1, 2, 3])
    assert res["5:barrier"] == dict.fromkeys("0123", "ok")
    assert res["6:gather"]["0"] == [0, 1, 2, 3] and all(res["6:gather"][r] is None for r in "123")
    assert res["7:scatter"] == {str(r): [r] for r in range(4)}
    assert res["8:reduce"]["0"] == [4] and all(res["8:reduce"][r] is None for r in "123")
    assert out["result_problems"] == []


@pytest.mark.timeout(60)
def test_killed_rank_is_dropped_from_active_ranks():
    p = _cli("run", "real-cpu-kill-rank", "--json")
    out = json.loads(p.stdout)
    _assert_clean(out["stats"]["job_id"])
    per = out["results"]["1:allreduce"]
    assert sorted(per) == ["0", "1", "2"]
    assert all(v == {"output": [6], "active": [1, 1, 1, 0]} for v in per.values())
    assert out["stats"]["exit_codes"]["3"] == -9


@pytest.mark.timeout(60)
def test_default_run_prints_the_simulators_summary(tmp_path):
    trace = tmp_path / "t.jsonl"
    p = _cli("run", "--trace", str(trace))
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == "real-cpu-allreduce [real, policy fixed, seed 0, 4 ranks]"
    assert "  verdict   COMPLETED   phase reached: done" in lines
    assert "  result    0:allreduce: [10] on 4 ranks" in lines
    assert "  result    1:allgather: [0, 1, 2, 3] on 4 ranks" in lines
    assert lines[-1] == "  expect    completed: matches"
    # the real job's clock starts at the launch, not at bootstrap as the simulator's: the line says when it began
    time_line = next(x for x in lines if x.startswith("  time      "))
    assert " measured from the launch (the first rank began its bootstrap at " in time_line
    recs = [json.loads(x) for x in trace.read_text().splitlines()]
    assert {r["type"] for r in recs} >= {"effect", "mark"}
    assert any(r["type"] == "mark" and r["name"] == "collective_done" for r in recs)


@pytest.mark.timeout(60)
def test_exit_status_follows_expect(tmp_path):
    src = load_scenario("real-cpu-bootstrap-2").source
    text = open(src).read().replace("expect: {verdict: completed, phase: done, cause: null}",
                                    "expect: {verdict: hang, phase: warmup, cause: null}")
    f = tmp_path / "wrong-expect.yaml"
    f.write_text(text)
    p = _cli("run", str(f))
    assert p.returncode == 1
    assert "DOES NOT MATCH: verdict completed, expected hang" in p.stdout


@pytest.mark.timeout(60)
def test_stall_ends_a_hang_long_before_the_deadline():
    sc = load_scenario("real-cpu-port-conflict-legacy")
    deadline = sc.deadlines.bootstrap_s + sc.deadlines.collective_s
    t0 = time.monotonic()
    p = _cli("run", "real-cpu-port-conflict-legacy", "--json")
    took = time.monotonic() - t0
    out = json.loads(p.stdout)
    _assert_clean(out["stats"]["job_id"])
    assert out["verdict"] == "hang" and "stall" in out["stats"]["launcher_events"]
    assert took < deadline, f"took {took:.1f} s; the stall window is {sc.deadlines.stall_s} s"
    # the hang report names the blocked activities, as the simulator's does
    assert out["blocked"] and all(b["effect"] != "Sleep" for b in out["blocked"])
    assert out["cause"] == "rpc-port-conflict" and "same server name" in out["diagnosis"]["explanation"]


# ---------------------------------------------------------------------------------- loopback only


def _no_network(monkeypatch):
    def boom(*a, **k):
        raise AssertionError(f"network call attempted: {a!r}")

    monkeypatch.setattr(socket, "create_connection", boom)
    monkeypatch.setattr(socket, "getaddrinfo", boom)
    monkeypatch.setattr(socket, "gethostbyname", boom)


@pytest.mark.parametrize("target", ["10.1.2.3:15000", "192.168.0.1:80", "8.8.8.8:53", "example.com:443",
                                    "[::1]:15000", "0.0.0.0:15000", "128.0.0.1:15000", "127.0.0.1.evil:1"])
def test_rpc_to_a_non_loopback_address_is_unreachable_at_once(target, monkeypatch):
    from mooncake_real.rpc import RpcClient

    monkeypatch.delenv("MOONCAKE_REAL_ALLOW_REMOTE", raising=False)
    _no_network(monkeypatch)
    c = RpcClient()
    t0 = time.monotonic()
    reply = c.call(target, "Notify", b"ping", 5.0)
    assert (reply.ok, reply.error) == (False, "unreachable")
    assert time.monotonic() - t0 < 0.1
    c.close()


def test_store_client_refuses_a_non_loopback_store(monkeypatch):
    from mooncake_real.store import StoreClient, StoreError

    monkeypatch.delenv("MOONCAKE_REAL_ALLOW_REMOTE", raising=False)
    c = StoreClient("10.9.9.9:29500", "tok", timeout_s=5.0)
    t0 = time.monotonic()
    with pytest.raises(StoreError, match="unreachable"):
        c.get("k")
    assert time.monotonic() - t0 < 0.1


def test_loopback_addresses_are_allowed():
    from mooncake_real.rpc import is_loopback

    assert all(is_loopback(h) for h in ("127.0.0.1", "127.3.4.5", "localhost", "LOCALHOST"))
    assert not any(is_loopback(h) for h in ("10.0.0.1", "::1", "0.0.0.0", "host", "", "127.0.0.1 "[:-1] + "x"))


def test_a_write_over_tcp_to_a_remote_server_fails_without_traffic(monkeypatch):
    """The data path goes through the same client: a WRITE to a non-loopback server is peer-dead at once."""
    from mooncake_real.rpc import RpcClient

    _no_network(monkeypatch)
    reply = RpcClient().call("172.16.0.5:16000", "__write__", b"\0" * 12, 5.0)
    assert reply.error == "unreachable"


# ---------------------------------------------------------------------------------- RPC server faults


def _server(**kw):
    from mooncake_real.rpc import RpcServer

    srv = RpcServer("127.0.0.1", builtins={"__echo__": lambda p: p}, **kw)
    for _ in range(20):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if srv.bind(port).ok:
            srv.serve(port, lambda m, p: b"pong:" + p)
            return srv, port
    raise RuntimeError("no free port")


@pytest.mark.timeout(20)
def test_slow_peer_delays_protocol_replies_only():
    from mooncake_real.rpc import RpcClient

    srv, port = _server(delay_s=0.3)
    c = RpcClient()
    try:
        t0 = time.monotonic()
        assert c.call(f"127.0.0.1:{port}", "__echo__", b"x", 2.0).payload == b"x"
        assert time.monotonic() - t0 < 0.25
        t0 = time.monotonic()
        r = c.call(f"127.0.0.1:{port}", "Notify", b"a", 2.0)
        took = time.monotonic() - t0
        assert r.ok and r.payload == b"pong:a" and 0.29 <= took < 1.0
        assert c.call(f"127.0.0.1:{port}", "Notify", b"b", 0.1).error == "timeout"
    finally:
        c.close()
        srv.close()


@pytest.mark.timeout(20)
def test_close_port_never_answers():
    from mooncake_real.rpc import RpcClient

    srv, port = _server(closed=True)
    c = RpcClient()
    try:
        t0 = time.monotonic()
        r = c.call(f"127.0.0.1:{port}", "GetSegmentDesc", b"", 0.3)
        assert r.error == "timeout" and time.monotonic() - t0 >= 0.29
        assert c.call(f"127.0.0.1:{port}", "__echo__", b"y", 1.0).payload == b"y"
    finally:
        c.close()
        srv.close()


@pytest.mark.timeout(20)
def test_a_dead_peer_is_refused_at_once_on_a_cached_connection():
    from mooncake_real.rpc import RpcClient

    srv, port = _server()
    c = RpcClient()
    try:
        assert c.call(f"127.0.0.1:{port}", "Notify", b"a", 2.0).ok
        srv.close()
        time.sleep(0.1)
        t0 = time.monotonic()
        r = c.call(f"127.0.0.1:{port}", "Notify", b"b", 3.0)
        assert r.error == "refused" and time.monotonic() - t0 < 1.0
    finally:
        c.close()


def _held_port_with_a_free_one_above() -> socket.socket:
    """A listening socket on a port below the ephemeral range (no client connection takes one there) whose next
    port is free too: torchrun's agent store, with room for the job's store above it."""
    import random

    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        held = socket.socket()
        try:
            held.bind(("127.0.0.1", port))
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", port + 1))
        except OSError:
            held.close()
            continue
        held.listen()
        return held
    raise RuntimeError("no two free consecutive ports below 32000")


@pytest.mark.timeout(90)
def test_a_job_of_mooncake_real_rank_processes_as_torchrun_starts_them(tmp_path):
    """`mooncake-real rank` under a launcher: two processes with torchrun's variables and one token run the
    scenario's bootstrap together; each ends with one line saying how it ended and where its files are.
    torchrun's agent holds MASTER_PORT with its own store (a listening socket here): the job's goes above it."""
    with _held_port_with_a_free_one_above() as agent_store:
        port = agent_store.getsockname()[1]
        base = dict(os.environ, PYTHONPATH=REPO + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""),
                    WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), MOONCAKE_REAL_TOKEN=f"t{port}",
                    TORCHELASTIC_RUN_ID="none")
        job = tmp_path / "job"
        procs = [subprocess.Popen([sys.executable, "-m", "mooncake_real.cli", "rank", "--scenario", "real-cpu-bootstrap-2",
                                   "--job-dir", str(job), "--deadline", "30"],
                                  env=dict(base, RANK=str(r), LOCAL_RANK=str(r)), cwd=REPO, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in (0, 1)]
        outs = [p.communicate(timeout=60) for p in procs]
    for r, (p, (_out, err)) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, err
        assert f"mooncake-real rank {r} of 2: completed at " in err and str(job) in err, err
        res = json.loads((job / f"rank{r}.result.json").read_text())
        assert res["status"] == "completed"
        marks = [json.loads(x) for x in (job / f"rank{r}.trace.jsonl").read_text().splitlines()]
        assert any(m.get("name") == "all_connected" for m in marks)


def test_mooncake_real_rank_refuses_a_scenario_of_another_size_before_starting(monkeypatch, capsys):
    from mooncake_real.cli import main

    for k, v in {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1",
                 "MOONCAKE_REAL_TOKEN": "t"}.items():
        monkeypatch.setenv(k, v)
    assert main(["rank", "--scenario", "real-cpu-allreduce"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("real-cpu-allreduce.yaml: ranks: the scenario has 4 ranks but the launcher started 2 "
                        "processes (WORLD_SIZE / SLURM_NTASKS); start one process per rank"), err
    assert main(["rank"]) == 2
    assert "--scenario: name the scenario every rank runs" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "4")  # a fault that mooncake-real run's launcher carries out: not here
    assert main(["rank", "--scenario", "real-cpu-kill-rank"]) == 2
    err = capsys.readouterr().err.strip()
    assert "real-cpu-kill-rank.yaml: faults[0]: kill_rank is carried out by mooncake-real run's launcher" in err, err
