"""The real interpreter: every effect, the trace and dump files, exit codes, phase faults."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("zmq")

from real_helpers import HERE, free_port, free_ports, shm_segments  # noqa: E402

from mooncake_protocol import effects as fx  # noqa: E402
from mooncake_protocol.trace import Blocked  # noqa: E402
from mooncake_real.driver import HANDLERS, RankSpec  # noqa: E402
from mooncake_real.launcher import Faults, launch  # noqa: E402


def test_every_effect_has_a_handler():
    assert set(HANDLERS) == set(fx.ALL_EFFECTS)


def test_rank_spec_json_roundtrip(tmp_path):
    spec = RankSpec("ab12", str(tmp_path), 1, 2, "127.0.0.1:1", "t", 1.5, 10.0, gpu=0, args={"x": [1]})
    assert RankSpec.from_json(spec.to_json()) == spec
    assert spec.path("trace").name == "rank1.trace.jsonl"
    assert spec.path("dump").name == "rank1.dump.json"


@pytest.mark.timeout(60)
def test_all_effects_one_rank(tmp_path):
    r = launch(1, entry="real_activities:all_effects", pythonpath=[HERE], args={"port": free_port()},
               deadline_s=30, job_dir=tmp_path)
    assert r.exit_codes == {0: 0}, r.logs
    v = r.results[0]["value"]
    assert v == {
        "get": "v", "check": True, "add": 3, "deleted": True, "missing": None, "waited": True, "bind": True,
        "rpc": "echo:x", "reg": [False, False], "garbage": "0c0d0e0f", "reduced": [11, 22], "reduced_rid": [10, 20], "event": True,
        "synced": True, "landed": True, "status": ["completed"], "joined": 42, "now_positive": True,
    }
    # the trace: one JSON line per effect or mark, in the shared schema
    lines = [json.loads(x) for x in (tmp_path / "rank0.trace.jsonl").read_text().splitlines()]
    effects = {rec["effect"] for rec in lines if rec["type"] == "effect"}
    assert effects >= {c.__name__ for c in fx.ALL_EFFECTS} - {"Mark"}
    marks = [rec for rec in lines if rec["type"] == "mark"]
    assert [m["data"]["phase"] for m in marks if m["name"] == "phase"] == ["bootstrap", "done"]
    for rec in lines:
        assert rec["rank"] == 0
        if rec["type"] == "effect":
            assert set(rec) == {"type", "rank", "activity", "t0", "t1", "effect", "args", "result"}
            assert 0 <= rec["t0"] <= rec["t1"]
    assert {rec["activity"] for rec in lines} == {"caller", "child", "daemon-child"}
    set_rec = next(rec for rec in lines if rec.get("effect") == "StoreSet")
    assert set_rec["args"] == {"key": "k", "value": "v"}
    # the merged trace holds the same records
    assert len(r.trace) == len(lines)


@pytest.mark.timeout(60)
def test_hang_dump_names_the_blocked_effect():
    r = launch(2, entry="real_activities:hang", pythonpath=[HERE], deadline_s=1.5)
    assert r.timed_out and sorted(r.killed) == [0, 1]
    assert set(r.dumps) == {0, 1}
    for rank, d in r.dumps.items():
        assert d["reason"] == "request"
        b = Blocked.from_json(d["blocked"][0])
        assert (b.rank, b.activity, b.effect) == (rank, "caller", "StoreWait")
        assert b.what == "a key nobody publishes" and b.blockers == ("store:never",)
        assert 0 < b.since < 1.5
        assert d["last_events"][-1]["name"] == "phase"
        # every thread's innermost Python frames: the caller stands in the effect it is blocked on
        main = [f for name, f in d["driver"]["threads"].items() if name.startswith("MainThread/")]
        assert len(main) == 1 and any(x.startswith("driver.py:_store_wait:") for x in main[0])
    assert len(r.blocked()) == 2
    assert shm_segments(r.job_id) == []


@pytest.mark.timeout(60)
def test_protocol_error_and_crash_exit_codes():
    r = launch(1, entry="real_activities:fail", pythonpath=[HERE], deadline_s=20)
    assert r.exit_codes == {0: 1}
    assert r.results[0]["status"] == "error" and r.results[0]["cause"] == "store-key-mismatch"
    r = launch(1, entry="real_activities:no_such_entry", pythonpath=[HERE], deadline_s=20)
    assert r.exit_codes == {0: 3}
    assert r.results[0]["status"] == "crash" and "no_such_entry" in r.results[0]["error"]


@pytest.mark.timeout(60)
def test_kill_at_phase():
    r = launch(2, entry="real_activities:hang", pythonpath=[HERE], deadline_s=2.0, faults=Faults(kill_at={1: "warmup"}))
    assert r.exit_codes[1] == -9
    phases1 = [rec["data"]["phase"] for rec in r.trace if rec["rank"] == 1 and rec.get("name") == "phase"]
    assert phases1 == ["bootstrap", "warmup"]  # recorded, then killed
    assert 1 not in r.results
    assert shm_segments(r.job_id) == []


@pytest.mark.timeout(60)
def test_pause_at_phase():
    r = launch(2, entry="real_activities:phases", pythonpath=[HERE], deadline_s=20,
               faults=Faults(pause_at={1: ("warmup", 1.0)}))
    assert r.exit_codes == {0: 0, 1: 0}, r.logs
    assert r.results[0]["value"]["took"] < 0.9
    assert 1.0 <= r.results[1]["value"]["took"] < 5.0
    assert [e["event"] for e in r.events if e["event"] in ("pause", "resume")] == ["pause", "resume"]


@pytest.mark.timeout(60)
def test_store_and_rpc_three_ranks():
    r = launch(3, entry="real_activities:store_and_rpc", pythonpath=[HERE], args={"ports": free_ports(3)}, deadline_s=30)
    assert r.exit_codes == {0: 0, 1: 0, 2: 0}, r.logs
    for rank in range(3):
        v = r.results[rank]["value"]
        assert v["replies"] == {str(p): [True, f"echo:from {rank}", None] for p in range(3)}
        assert v["unknown_method"] == [False, "bad-reply"]


@pytest.mark.timeout(60)
def test_two_rank_processes_same_port():
    port = free_port()
    r = launch(2, entry="real_activities:bind_same_port", pythonpath=[HERE], args={"port": port}, deadline_s=30)
    assert r.results[0]["value"] == {"ok": True, "error": None}
    assert r.results[1]["value"] == {"ok": False, "error": "EADDRINUSE"}


@pytest.mark.timeout(60)
def test_hold_port_fault():
    port = free_port()
    r = launch(1, entry="real_activities:bind_port", pythonpath=[HERE], args={"port": port}, deadline_s=30,
               faults=Faults(hold_ports=[port]))
    assert r.results[0]["value"] == {"ok": False, "error": "EADDRINUSE"}
