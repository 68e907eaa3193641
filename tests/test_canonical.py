"""The canonical form of a trace (mooncake_protocol.canonical): what it keeps, abstracts and compares."""

from __future__ import annotations

from typing import Any

from mooncake_protocol.canonical import canonical, diff, format_diff


def mark(rank: int, mark_name: str, t: float = 0.0, activity: str = "caller", **data: Any) -> dict[str, Any]:
    return {"type": "mark", "rank": rank, "activity": activity, "t": t, "name": mark_name, "data": data}


def run(host: str, ports: tuple[int, int], peer_order: tuple[int, ...] = (1, 0), t_scale: float = 1.0) -> list[dict[str, Any]]:
    """Two ranks: bind, publish, connect (the poller's order given), one allreduce."""
    recs: list[dict[str, Any]] = []
    for r in (0, 1):
        recs += [
            mark(r, "phase", 0.0, phase="bootstrap"),
            mark(r, "rpc_bind", 0.1 * t_scale, port=ports[r], ok=True, error=None, attempt=0, checked=True),
            mark(r, "engine_ready", 0.2 * t_scale, engine="tent", transports=["tcp"],
                 server_name=f"{host}:{ports[r]}", server_running=True),
            mark(r, "key_published", 0.3 * t_scale, key=f"buffer_0_{r}"),
            mark(r, "key_published", 0.3 * t_scale, key=f"server_name_0_{r}", server_name=f"{host}:{ports[r]}"),
            mark(r, "phase", 0.4 * t_scale, phase="warmup", backend=0),
        ]
    for i, r in enumerate(peer_order):
        p = 1 - r
        recs += [
            mark(r, "segment_opened", (0.5 + i) * t_scale, "poller", name=f"{host}:{ports[p]}", ok=True, owner=p, error=None),
            mark(r, "transport", (0.5 + i) * t_scale, "poller", peer=p, transport="tcp", kind="dram_to_dram"),
            mark(r, "peer_connected", (0.6 + i) * t_scale, "poller", peer=p, count=2 + i),
            mark(r, "ping", (0.6 + i) * t_scale, "worker", peer=p, ok=True),
        ]
    for r in (0, 1):
        recs += [
            mark(r, "all_connected", 3.0 * t_scale, backend=0, size=2),
            mark(r, "phase", 3.0 * t_scale, phase="collective"),
            mark(r, "collective_start", 3.1 * t_scale, index=0, op="allreduce", dtype="int32", count=1),
            mark(r, "task_phase", 3.2 * t_scale, "worker", slot=0, op="ALLREDUCE", phase="data", seq=0, writes=2),
            mark(r, "task_phase", 3.3 * t_scale, "worker", slot=0, op="ALLREDUCE", phase="done", seq=0),
            mark(r, "collective_done", 3.4 * t_scale, index=0, op="allreduce", output=[3], active=[1, 1]),
            mark(r, "phase", 3.5 * t_scale, phase="done"),
        ]
    return sorted(recs, key=lambda m: m["t"])


OUTCOME = {"verdict": "completed", "cause": None, "phase": "done",
           "results": {"0:allreduce": {"0": {"output": [3], "active": [1, 1]}, "1": {"output": [3], "active": [1, 1]}}}}


def test_times_hosts_ports_and_connection_order_do_not_matter() -> None:
    sim = canonical(run("cpu0", (16955, 15769)), OUTCOME)
    real = canonical(run("127.0.0.1", (16955, 15769), peer_order=(0, 1), t_scale=37.0), OUTCOME)
    assert diff(sim, real) == []
    assert format_diff(diff(sim, real)) == "equal"
    assert sim["facts"]["server_names"] == {"host#0:port#0": [0], "host#0:port#1": [1]}
    # ports are named by first appearance in rank order, so other numbers bound the same way agree too
    assert canonical(run("cpu0", (20001, 20002)), OUTCOME) == sim


def test_kept_facts() -> None:
    c = canonical(run("cpu0", (1, 2)), OUTCOME)
    r0 = c["ranks"]["0"]
    assert r0["milestones"][0] == 'phase phase="bootstrap"'
    assert r0["milestones"][-1] == 'phase phase="done"'
    assert any(m.startswith("collective_start") for m in r0["milestones"])
    assert r0["slots"]["0"] == ['task_phase op="ALLREDUCE" phase="data" seq=0 writes=2',
                                'task_phase op="ALLREDUCE" phase="done" seq=0']
    assert "peer_connected peer=1" in r0["marks"]  # count (the connection order) dropped
    assert not any(k.startswith("ping") for k in r0["marks"])  # noise
    assert c["facts"]["transports"] == ["0->1 dram_to_dram tcp", "1->0 dram_to_dram tcp"]
    assert c["facts"]["published"]["buffer_0_1"] == [1]
    assert c["facts"]["results"]["0:allreduce"]["1"]["output"] == [3]
    assert c["facts"]["verdict"] == "completed"
    assert "store_read" not in c["facts"]  # no effect records given


def test_milestone_order_matters() -> None:
    a = run("h", (1, 2))
    b = [dict(m) for m in a]
    # rank 1 starts its collective before it is connected: a different story
    i = next(i for i, m in enumerate(b) if m["rank"] == 1 and m["name"] == "all_connected")
    j = next(i for i, m in enumerate(b) if m["rank"] == 1 and m["name"] == "collective_start")
    b[i], b[j] = b[j], b[i]
    d = diff(canonical(a, OUTCOME), canonical(b, OUTCOME))
    assert len(d) == 1 and d[0].startswith("rank 1: milestones diverge at #")
    assert "sim: all_connected" in d[0] and "real: collective_start" in d[0]


def test_wrong_value_verdict_and_missing_mark_are_reported() -> None:
    a = canonical(run("h", (1, 2)), OUTCOME)
    bad = dict(OUTCOME, verdict="hang", cause="store-key-mismatch",
               results={"0:allreduce": {"0": {"output": [4], "active": [1, 1]}, "1": {"output": [3], "active": [1, 1]}}})
    recs = [m for m in run("h", (1, 2)) if not (m["rank"] == 0 and m["name"] == "transport")]
    d = diff(a, canonical(recs, bad), ("sim", "real"))
    text = "\n".join(d)
    assert "fact verdict differs" in text and "fact cause differs" in text
    assert "fact results differs" in text and "[4]" in text
    assert "only in sim" in text and "0->1 dram_to_dram tcp" in text


def test_duplicated_server_name_is_a_fact() -> None:
    recs = run("h", (24511, 24511))
    c = canonical(recs, OUTCOME)
    assert c["facts"]["duplicated_server_names"] == ["host#0:port#0"]


def test_store_keys_from_effects() -> None:
    eff = [{"type": "effect", "rank": 0, "activity": "poller", "t0": 0, "t1": 0, "effect": "StoreGet",
            "args": {"key": "buffer_0_1"}, "result": {"bytes": 112}},
           {"type": "effect", "rank": 0, "activity": "poller", "t0": 0, "t1": 0, "effect": "StoreGet",
            "args": {"key": "buffer_0_9"}, "result": None},
           {"type": "effect", "rank": 0, "activity": "poller", "t0": 0, "t1": 0, "effect": "StoreCheck",
            "args": {"keys": ["buffer_0_1", "server_name_0_1"]}, "result": True}]
    c = canonical(run("h", (1, 2)) + eff * 3, OUTCOME)  # polled 3 times: still one set
    assert c["facts"]["store_read"] == {"0": ["buffer_0_1"]}
    assert c["facts"]["store_awaited"] == {"0": ["buffer_0_1", "server_name_0_1"]}


def test_killed_peer_discovery_route_and_after_done_marks_are_dropped() -> None:
    base = run("h", (1, 2))
    killed = [mark(1, "killed", 3.05, "driver")]
    a = base + killed + [mark(0, "transfer_failed", 3.2, "worker", dst_rank=1, reason="peer-dead", transport="tcp"),
                         mark(0, "peer_marked_broken", 3.2, "worker", peer=1, reason="failed (peer-dead)", during="transferring")]
    b = base + killed + [mark(0, "peer_marked_broken", 3.3, "worker", peer=1, reason="liveness probe failed", during="syncing"),
                         mark(0, "peer_state", 9.0, "poller", peer=1, state="WAITING_STORE", event="BROKEN"),
                         mark(0, "registered", 9.9, region="late", label="*", kind="host", offered=["tcp"])]
    ca, cb = canonical(sorted(a, key=lambda m: m["t"]), OUTCOME), canonical(sorted(b, key=lambda m: m["t"]), OUTCOME)
    assert diff(ca, cb) == []
    assert ca["facts"]["broken"] == [] and ca["facts"]["killed"] == [1]


def test_a_refused_segment_open_of_a_dead_ranks_server_is_a_dead_peer_detail() -> None:
    """A rank that tries a killed peer's server after the kill gets "refused" with no owner to name; whether it
    tried before the run stopped is timing (generated parity scenarios: kill_rank at warmup, 2 of 4 runs
    differed on it alone). The server name says whose it was: dropped like the other dead-peer details."""
    base = run("h", (1, 2))
    killed = [mark(1, "killed", 3.05, "driver")]
    refused = [mark(0, "segment_opened", 3.2, "poller", name="h:2", ok=False, owner=None, error="refused")]
    a, b = base + killed + refused, base + killed
    assert diff(canonical(sorted(a, key=lambda m: m["t"]), OUTCOME), canonical(sorted(b, key=lambda m: m["t"]), OUTCOME)) == []
    # a live rank's server refusing is kept: that is not a death's detail
    alive = base + [mark(0, "segment_opened", 3.2, "poller", name="h:2", ok=False, owner=None, error="refused")]
    assert diff(canonical(sorted(alive, key=lambda m: m["t"]), OUTCOME), canonical(base, OUTCOME)) != []


def test_a_transport_toward_a_rank_killed_in_that_collective_is_timing_but_one_before_is_kept() -> None:
    """A generated H100 run (TENT alltoall, rank 2 killed as it entered the collective): the real rank 0,
    having entered first, got its data to rank 2 and wrote it a sync flag (a new dram_to_dram transport);
    the simulated one entered after the kill and never did. Whether a rank got to a WRITE to a rank killed
    in that collective is timing; transports toward it before that collective stay facts."""
    base = run("h", (1, 2))
    killed = [mark(1, "killed", 3.15, "driver")]
    flag = [mark(0, "transport", 3.2, "worker", peer=1, transport="tcp", kind="gpu_to_dram")]
    a, b = base + killed + flag, base + killed
    ca, cb = canonical(sorted(a, key=lambda m: m["t"]), OUTCOME), canonical(sorted(b, key=lambda m: m["t"]), OUTCOME)
    assert diff(ca, cb) == [] and "0->1 gpu_to_dram tcp" not in ca["facts"]["transports"]
    # the same transport in warmup, before the collective the rank died in: kept, and a difference
    early = [mark(0, "transport", 0.55, "worker", peer=1, transport="tcp", kind="gpu_to_dram")]
    ce = canonical(sorted(base + early + killed, key=lambda m: m["t"]), OUTCOME)
    assert "0->1 gpu_to_dram tcp" in ce["facts"]["transports"] and diff(ce, cb) != []
    # toward a live rank: kept
    live = canonical(sorted(base + flag, key=lambda m: m["t"]), OUTCOME)
    assert "0->1 gpu_to_dram tcp" in live["facts"]["transports"]


def test_warmup_writes_retried_to_a_peer_killed_in_warmup_are_a_dead_peer_detail() -> None:
    """Generated parity scenarios with kill_rank at warmup: the simulator's ranks retried the warmup WRITE to
    the dead rank a dozen times before the run ended, the real ranks not at all; how often is timing."""
    base = run("h", (1, 2))
    killed = [mark(1, "killed", 0.45, "driver")]
    retries = [mark(0, "warmup_submitted", 0.5 + 0.05 * k, "poller", peer=1) for k in range(12)]
    a, b = base + killed + retries, base + killed
    assert diff(canonical(sorted(a, key=lambda m: m["t"]), OUTCOME), canonical(sorted(b, key=lambda m: m["t"]), OUTCOME)) == []
