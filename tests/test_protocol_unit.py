"""Unit tests of the pure protocol, driven by a tiny scripted interpreter (no SimPy, no driver).

A test builds a protocol generator (engine init, one poller visit, ...) and answers each effect it yields
by hand through :func:`drive`, so every decision is checked in isolation: TENT/TE port draws and bind
retries, the poller's transition table and one visit per state, TENT's per-request transport selection
(mooncake-pg.md sections 5 and 6.3), TE's env rules, the 112-byte SegmentInfo and the diagnosis rules.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mooncake_protocol import effects as fx
from mooncake_protocol import transport as tp
from mooncake_protocol.backend import Backend, ProcessState, SegmentInfo
from mooncake_protocol.diagnosis import diagnose, wait_for_graph
from mooncake_protocol.engine import (
    TE_BIND_ATTEMPTS,
    TENT_BIND_ATTEMPTS,
    TENT_PORT_BASE,
    TENT_PORT_SPAN,
    BufferDesc,
    Engine,
    Request,
    SegmentDesc,
)
from mooncake_protocol.memory import region_addr
from mooncake_protocol.policy import PRESETS, Policy, make_policy
from mooncake_protocol.poller import (
    BACKOFF_CAP_S,
    BACKOFF_START_S,
    TRANSITIONS,
    IllegalTransition,
    PeerConnection,
    PeerEvent,
    PeerState,
    buffer_key,
    poll_peer,
    server_name_key,
    transition,
)
from mooncake_protocol.rankenv import RankEnv
from mooncake_protocol.trace import Blocked

# ---------------------------------------------------------------------------- the scripted interpreter

Answer = Callable[[fx.Effect], Any]


def drive(gen: fx.Activity, answer: Answer, limit: int = 10_000) -> tuple[Any, list[fx.Effect]]:
    """Run ``gen`` to its end, answering every effect with ``answer(effect)``; return (value, effects)."""
    seen: list[fx.Effect] = []
    result: Any = None
    for _ in range(limit):
        try:
            eff = gen.send(result)
        except StopIteration as stop:
            return stop.value, seen
        seen.append(eff)
        result = answer(eff)
    raise AssertionError(f"activity did not finish within {limit} effects")


def marks(effects: list[fx.Effect], name: str) -> list[dict[str, Any]]:
    return [dict(e.data) for e in effects if isinstance(e, fx.Mark) and e.name == name]


def make_env(rank: int = 0, size: int = 2, *, engine: str = "tent", policy: Policy | None = None,
             env: dict[str, str] | None = None, rpc_server_port: int = 0, seed: int = 0, host: str = "node0",
             machine_id: str = "m0", boot_id: str = "b0", faults: tuple[Any, ...] = (),
             tent_transports: dict[str, bool] | None = None, has_rdma_nic: bool = True, gpudirect: bool = True,
             all_fabric: bool = False, cuda_platform: bool = True) -> RankEnv:
    return RankEnv(
        rank=rank, size=size, host=host, address=host, gpu=rank if cuda_platform else None, numa=0,
        backend="cuda" if cuda_platform else "cpu", engine=engine, policy=policy or Policy(), env=env or {},
        tent_transports=tent_transports or {}, rpc_server_port=rpc_server_port, machine_id=machine_id,
        boot_id=boot_id, cuda_platform=cuda_platform, all_fabric=all_fabric, has_rdma_nic=has_rdma_nic,
        gpudirect=gpudirect, seed=seed, connect_timeout_s=5.0, collective_timeout_s=5.0, faults=faults,
    )


class World:
    """Answers effects like a tiny machine: a port table, a store, RPC to known descriptors, transfers."""

    def __init__(self, taken: set[int] | None = None):
        self.taken = set(taken or ())
        self.store: dict[str, bytes] = {}
        self.descs: dict[str, SegmentDesc] = {}
        self.batch_status: dict[int, tuple[str, ...]] = {}
        self.submitted: list[tuple[fx.WriteReq, ...]] = []
        self.memory: dict[tuple[int, int], bytes] = {}
        self.next_batch = 100
        self.now = 0.0

    def __call__(self, eff: fx.Effect) -> Any:
        if isinstance(eff, fx.RpcBind):
            if eff.port in self.taken:
                return fx.BindResult(False, "EADDRINUSE")
            self.taken.add(eff.port)
            return fx.BindResult(True)
        if isinstance(eff, fx.StoreCheck):
            return all(k in self.store for k in eff.keys)
        if isinstance(eff, fx.StoreGet):
            return self.store.get(eff.key)
        if isinstance(eff, fx.StoreSet):
            self.store[eff.key] = eff.value
            return None
        if isinstance(eff, fx.StoreDelete):
            return self.store.pop(eff.key, None) is not None
        if isinstance(eff, fx.RpcCall):
            desc = self.descs.get(eff.target)
            return fx.RpcReply(True, desc.to_bytes()) if desc else fx.RpcReply(False, b"", "refused")
        if isinstance(eff, fx.SubmitTransfer):
            self.next_batch += 1
            self.submitted.append(eff.writes)
            self.batch_status[self.next_batch] = ("pending",) * len(eff.writes)
            return self.next_batch
        if isinstance(eff, fx.PollTransfer):
            return self.batch_status[eff.batch]
        if isinstance(eff, fx.ReadMem):
            return self.memory.get((eff.rid, eff.offset), b"\0" * eff.length)
        if isinstance(eff, fx.Allocate):
            from mooncake_protocol.memory import split_addr

            return fx.Region(split_addr(eff.addr).rid, eff.name, eff.kind, eff.addr, eff.size, eff.device)
        if isinstance(eff, fx.Register):
            dev = eff.region.kind == "device"
            return fx.RegisterResult(eff.want_ipc and dev, eff.want_fabric and dev)
        if isinstance(eff, fx.Now):
            return self.now
        return None  # Mark, RpcServe, FreeBatch, WriteMem, Sleep, ...


# ---------------------------------------------------------------------------- RPC port choice


def test_tent_random_port_draw_in_range_and_seeded() -> None:
    ports = []
    for seed in (0, 1):
        eng = Engine(make_env(seed=seed))
        drive(eng._tent_start_rpc(), World())
        assert TENT_PORT_BASE <= eng.port < TENT_PORT_BASE + TENT_PORT_SPAN
        assert eng.server_running and eng.available and eng.server_name == f"node0:{eng.port}"
        ports.append(eng.port)
        again = Engine(make_env(seed=seed))
        drive(again._tent_start_rpc(), World())
        assert again.port == eng.port, "the same seed and rank must draw the same port"
    assert ports[0] != ports[1]


def test_tent_configured_port_conflict_unchecked_runs_without_server() -> None:
    """legacy-1755: the bind failure goes unnoticed; the server name is the other process's port."""
    eng = Engine(make_env(policy=PRESETS["legacy-1755"], rpc_server_port=15000))
    _, effs = drive(eng._tent_start_rpc(), World(taken={15000}))
    binds = [e for e in effs if isinstance(e, fx.RpcBind)]
    assert [b.port for b in binds] == [15000]
    assert not any(isinstance(e, fx.RpcServe) for e in effs)
    assert eng.server_name == "node0:15000" and not eng.server_running and eng.available
    (m,) = marks(effs, "rpc_bind")
    assert m["ok"] is False and m["checked"] is False and m["error"] == "EADDRINUSE"


def test_tent_configured_port_conflict_checked_redraws() -> None:
    """#1755: the error is read, the configured port abandoned, a random one drawn."""
    eng = Engine(make_env(rpc_server_port=15000))
    _, effs = drive(eng._tent_start_rpc(), World(taken={15000}))
    binds = [e.port for e in effs if isinstance(e, fx.RpcBind)]
    assert binds[0] == 15000 and len(binds) == 2 and binds[1] != 15000
    assert eng.server_running and eng.port == binds[1]
    assert any(isinstance(e, fx.RpcServe) and e.port == binds[1] for e in effs)


def test_tent_gives_up_after_ten_attempts() -> None:
    everything = set(range(TENT_PORT_BASE, TENT_PORT_BASE + TENT_PORT_SPAN))
    eng = Engine(make_env())
    _, effs = drive(eng._tent_start_rpc(), World(taken=everything))
    assert sum(isinstance(e, fx.RpcBind) for e in effs) == TENT_BIND_ATTEMPTS
    assert not eng.available and eng.server_name == "" and eng.port == 0
    assert any(m["text"] == "Failed to bind any RPC port" for m in marks(effs, "log"))


def test_te_port_range_from_env_and_bind_and_keep() -> None:
    eng = Engine(make_env(engine="te", env={"MC_MIN_PRC_PORT": "20000", "MC_MAX_PRC_PORT": "20003"}))
    _, effs = drive(eng._te_start_rpc(), World(taken={20000, 20001, 20002}))
    binds = [e.port for e in effs if isinstance(e, fx.RpcBind)]
    assert all(20000 <= p <= 20003 for p in binds)
    assert eng.port == 20003 and eng.server_running
    eng2 = Engine(make_env(engine="te", env={"MC_MIN_PRC_PORT": "20000", "MC_MAX_PRC_PORT": "20000"}))
    _, effs2 = drive(eng2._te_start_rpc(), World(taken={20000}))
    assert sum(isinstance(e, fx.RpcBind) for e in effs2) == TE_BIND_ATTEMPTS
    assert not eng2.available


def test_advertise_host_fault_changes_server_name() -> None:
    class F:
        kind = "advertise_host"
        rank = 0
        address = "127.0.0.1"

    eng = Engine(make_env(engine="te", faults=(F(),)))
    drive(eng._te_start_rpc(), World())
    assert eng.server_name.startswith("127.0.0.1:")


def test_engine_init_loads_transports() -> None:
    eng = Engine(make_env(env={"MC_ENABLE_MNNVL": "1"}, all_fabric=True, tent_transports={"tcp": False}))
    _, effs = drive(eng.init(), World())
    assert eng.transports == ("mnnvl", "rdma")
    (m,) = marks(effs, "engine_ready")
    assert m["transports"] == ["mnnvl", "rdma"]


# ---------------------------------------------------------------------------- poller transition table


def test_transition_table_legal_moves_and_illegal_raise() -> None:
    for state in PeerState:
        for event in PeerEvent:
            if event in TRANSITIONS[state]:
                assert transition(state, event) is TRANSITIONS[state][event]
            else:
                with pytest.raises(IllegalTransition):
                    transition(state, event)


def test_every_state_reachable_and_connected_reachable_from_each() -> None:
    def reach(start: PeerState) -> set[PeerState]:
        seen = {start}
        todo = [start]
        while todo:
            for nxt in TRANSITIONS[todo.pop()].values():
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    reachable = reach(PeerState.WAITING_STORE)
    # EXPIRING is declared in Mooncake's enum but no transition of the snapshot enters or leaves it.
    assert reachable == set(PeerState) - {PeerState.EXPIRING}
    assert TRANSITIONS[PeerState.EXPIRING] == {}
    assert all(PeerState.EXPIRING not in t.values() for t in TRANSITIONS.values())
    for s in reachable:
        assert PeerState.CONNECTED in reach(s), f"{s} can never connect"
    for event in PeerEvent:
        assert any(event in t for t in TRANSITIONS.values()), f"{event} is used by no state"


# ---------------------------------------------------------------------------- one poller visit


def _backend(rank: int, size: int, world: World, *, policy: Policy | None = None) -> Backend:
    env = make_env(rank=rank, size=size, policy=policy)
    proc = ProcessState(env=env, engine=Engine(env), global_connected=[False] * size)
    proc.engine.server_name = f"node0:{15000 + rank}"
    proc.engine.transports = ("nvlink", "tcp")  # no RDMA: no endpoint handshakes in these tests
    b = Backend(env=env, process=proc, index=0, location=env.location)
    ws = fx.Region(1, "warmup_send", "host", region_addr(rank, 1), 256)
    wr = fx.Region(2, "warmup_recv", "host", region_addr(rank, 2), 256)
    b.regions = {"warmup_send": ws, "warmup_recv": wr}
    b.peers = [PeerConnection() for _ in range(size)]
    b.peer_connected = [p == rank for p in range(size)]
    b.active = [True] * size
    b.segment_infos = [None] * size
    b.segments = [None] * size
    b.connected_count = 1
    b.peers[rank].state = PeerState.CONNECTED
    return b


def _publish_peer(world: World, peer: int, *, label: str = "*") -> SegmentInfo:
    a = [region_addr(peer, i) for i in range(1, 15)]
    info = SegmentInfo((a[0], a[1]), (a[2], a[3]), (a[4], a[5]), (a[6], a[7]), a[8], a[9], a[10], a[11], a[12], a[13])
    name = f"node0:{15000 + peer}"
    world.store[buffer_key(0, peer)] = info.pack()
    world.store[server_name_key(0, peer)] = name.encode()
    world.descs[name] = SegmentDesc(peer, name, "m0", "b0", (BufferDesc(info.warmup_recv, 256, label, ("tcp",)),))
    return info


def test_poller_backoff_doubles_to_cap_while_keys_missing() -> None:
    world = World()
    b = _backend(1, 2, world)
    t = 0.0
    for _ in range(12):
        t += 2.0
        drive(poll_peer(b, 0, t), world)
    assert b.peers[0].state is PeerState.WAITING_STORE and b.peers[0].backoff_s == BACKOFF_CAP_S
    # within the back-off window the poller does not even ask the store
    _, effs = drive(poll_peer(b, 0, t + 0.001), world)
    assert effs == []


def test_poller_short_buffer_is_invalid() -> None:
    world = World()
    b = _backend(1, 2, world)
    world.store[buffer_key(0, 0)] = b"x" * 100
    world.store[server_name_key(0, 0)] = b"node0:15000"
    _, effs = drive(poll_peer(b, 0, 1.0), world)
    assert any("got invalid buffer data from 0" in m["text"] for m in marks(effs, "log"))
    assert b.peers[0].backoff_s == 2 * BACKOFF_START_S


def test_poller_lower_peer_warmup_write_then_connected() -> None:
    world = World()
    b = _backend(1, 2, world)
    info = _publish_peer(world, 0)
    drive(poll_peer(b, 0, 1.0), world)
    assert b.peers[0].state is PeerState.WAITING_WARMUP_TRANSFER
    (writes,) = world.submitted
    assert writes[0].dst_addr == info.warmup_recv + 1 * 4 and writes[0].length == 4
    assert writes[0].transport == "tcp"  # dram_to_dram: NVLink does not offer it
    batch = b.peers[0].warmup_batch
    assert batch is not None
    drive(poll_peer(b, 0, 1.05), world)
    assert b.peers[0].state is PeerState.WAITING_WARMUP_TRANSFER
    world.batch_status[world.next_batch] = ("completed",)
    _, effs = drive(poll_peer(b, 0, 1.1), world)
    assert b.peers[0].state is PeerState.CONNECTED and b.connected_count == 2
    assert marks(effs, "peer_connected") == [{"count": 2, "peer": 0}]


def test_poller_higher_peer_waits_for_flag() -> None:
    world = World()
    b = _backend(0, 2, world)
    _publish_peer(world, 1)
    drive(poll_peer(b, 1, 1.0), world)
    assert b.peers[1].state is PeerState.WAITING_PEER_WARMUP and world.submitted == []
    drive(poll_peer(b, 1, 1.05), world)
    assert b.peers[1].state is PeerState.WAITING_PEER_WARMUP
    world.memory[(2, 4)] = (1).to_bytes(4, "little")
    drive(poll_peer(b, 1, 1.1), world)
    assert b.peers[1].state is PeerState.CONNECTED


def test_poller_failed_warmup_goes_back_to_store() -> None:
    world = World()
    b = _backend(1, 2, world, policy=PRESETS["snapshot-1755"])
    _publish_peer(world, 0)
    drive(poll_peer(b, 0, 1.0), world)
    world.batch_status[world.next_batch] = ("failed:no-path",)  # TE/TENT with one transport: no resubmit
    drive(poll_peer(b, 0, 1.1), world)
    assert b.peers[0].state is PeerState.WAITING_STORE


def test_poller_unopenable_segment_fixed_vs_snapshot() -> None:
    for preset, want in (("fixed", PeerState.WAITING_STORE), ("snapshot-1755", PeerState.WAITING_WARMUP_TRANSFER)):
        world = World()
        b = _backend(1, 2, world, policy=PRESETS[preset])
        _publish_peer(world, 0)
        world.descs.clear()  # RPC refused
        _, effs = drive(poll_peer(b, 0, 1.0), world)
        assert b.peers[0].state is want, preset
        assert marks(effs, "segment_opened")[0]["ok"] is False


# ---------------------------------------------------------------------------- transport selection


def test_label_parsing() -> None:
    assert tp.label_type("*") == "*" and tp.label_type("cuda:3") == "cuda" and tp.label_type("cpu:0") == "cpu"
    assert tp.label_type("nolabel") == "*"
    assert tp.memory_type_of_label("*") == "dram" and tp.memory_type_of_label("cpu:1") == "dram"
    assert tp.memory_type_of_label("cuda:0") == "gpu" and tp.memory_type_of_label("npu:0") == "gpu"


@pytest.mark.parametrize(
    ("offered", "local", "label", "same", "gpudirect", "want"),
    [
        # GPU data across GPUs of one host: NVLink first
        (("nvlink", "rdma", "tcp"), "gpu", "cuda:1", True, True, "nvlink"),
        # another machine: NVLink skipped, RDMA with GPUDirect
        (("nvlink", "rdma", "tcp"), "gpu", "cuda:1", False, True, "rdma"),
        # no GPUDirect: TCP (all four on a CUDA platform)
        (("nvlink", "rdma", "tcp"), "gpu", "cuda:1", False, False, "tcp"),
        (("nvlink", "rdma"), "gpu", "cuda:1", False, False, None),
        # host to host: NVLink has no dram_to_dram, RDMA carries it
        (("nvlink", "rdma", "tcp"), "dram", "*", True, True, "rdma"),
        # SHM is skipped across machines (machine-id differs), TCP used
        (("shm", "tcp"), "dram", "*", False, True, "tcp"),
        (("shm", "tcp"), "dram", "*", True, True, "shm"),
        # a host region labelled cuda:N is a GPU target: dram_to_gpu; RDMA without GPUDirect cannot
        (("rdma",), "dram", "cuda:0", True, False, None),
        (("rdma",), "dram", "cuda:0", True, True, "rdma"),
        # MNNVL carries dram_to_gpu and gpu_to_gpu only
        (("mnnvl", "rdma"), "gpu", "cuda:0", False, False, "mnnvl"),
        (("mnnvl", "rdma"), "dram", "*", False, False, "rdma"),
        (("mnnvl",), "gpu", "*", False, False, None),
    ],
)
def test_tent_select(offered: tuple[str, ...], local: str, label: str, same: bool, gpudirect: bool,
                     want: str | None) -> None:
    got, idx = tp.tent_select(offered, local, label, same_machine=same, gpudirect=gpudirect, cuda_platform=True)
    assert got == want
    assert (idx == -1) == (want is None)
    if want is not None:
        assert offered[idx] == want


def test_tent_select_start_index_walks_on() -> None:
    got, idx = tp.tent_select(("nvlink", "rdma", "tcp"), "gpu", "cuda:0", same_machine=True, gpudirect=True,
                              cuda_platform=True, start=1)
    assert (got, idx) == ("rdma", 1)


def test_tcp_without_cuda_platform_is_host_only() -> None:
    assert tp.tent_select(("tcp",), "dram", "*", same_machine=False, gpudirect=False, cuda_platform=False)[0] == "tcp"
    assert tp.tent_select(("tcp",), "dram", "cuda:0", same_machine=False, gpudirect=False,
                          cuda_platform=False)[0] is None


def test_tent_offers() -> None:
    # MNNVL is never offered for host memory, whatever the label says about it
    assert not tp.tent_offers("mnnvl", "*", False, False)
    assert not tp.tent_offers("mnnvl", "cpu:0", False, False)
    assert not tp.tent_offers("mnnvl", "cuda:0", False, False)  # host region labelled cuda: no fabric handle
    assert tp.tent_offers("mnnvl", "cuda:0", False, True)
    # NVLink: cuda needs an IPC handle (fails on host pointers); host labels are offered
    assert not tp.tent_offers("nvlink", "cuda:0", False, False)
    assert tp.tent_offers("nvlink", "cuda:0", True, False)
    assert tp.tent_offers("nvlink", "*", False, False)
    for t in ("rdma", "shm", "tcp"):
        assert tp.tent_offers(t, "cuda:0", False, False) and tp.tent_offers(t, "*", False, False)


def test_tent_loaded_transports() -> None:
    kw: dict[str, bool] = {"has_rdma_nic": True, "cuda_platform": True, "all_fabric": True}
    assert tp.tent_loaded_transports({}, {}, **kw) == ("nvlink", "rdma", "tcp")
    assert tp.tent_loaded_transports({}, {"MC_ENABLE_MNNVL": "1"}, **kw) == ("mnnvl", "rdma", "tcp")
    assert tp.tent_loaded_transports({}, {"MC_ENABLE_MNNVL": "1"}, has_rdma_nic=True, cuda_platform=True,
                                     all_fabric=False) == ("nvlink", "rdma", "tcp")
    assert tp.tent_loaded_transports({"tcp": False, "shm": True}, {}, **kw) == ("nvlink", "rdma", "shm")
    assert tp.tent_loaded_transports({}, {}, has_rdma_nic=False, cuda_platform=False, all_fabric=False) == ("tcp",)


@pytest.mark.parametrize(
    ("env", "nic", "fabric", "want"),
    [
        ({}, True, False, "rdma"),
        ({}, True, True, "rdma"),
        ({"MC_FORCE_TCP": "1"}, True, False, "tcp"),
        ({"MC_FORCE_TCP": "1", "MC_FORCE_HCA": "1"}, True, False, "rdma"),
        ({}, False, True, "mnnvl"),  # issue 1639: no HCA on a fabric system
        ({}, False, False, "tcp"),
        ({"MC_FORCE_TCP": "1"}, False, True, "tcp"),
        ({"MC_FORCE_MNNVL": "1"}, True, True, "mnnvl"),
        ({"MC_INTRANODE_NVLINK": "1"}, True, False, "nvlink"),
    ],
)
def test_te_transport(env: dict[str, str], nic: bool, fabric: bool, want: str) -> None:
    assert tp.te_transport(env, has_rdma_nic=nic, cuda_backend=True, all_fabric=fabric) == want


def _request(label: str, src_kind: str, *, machine: str = "m0", boot: str = "b0") -> Request:
    seg = SegmentDesc(1, "node1:15001", machine, boot, (BufferDesc(region_addr(1, 5), 256, label, ("nvlink", "rdma", "tcp")),))
    src = fx.Region(1, "src", src_kind, region_addr(0, 1), 256)
    return Request(seg, 1, region_addr(1, 5), src, 0, 4)


def test_engine_choose_machine_id_vs_boot_id() -> None:
    """Cloned machine id: legacy comparison sees one machine and picks NVLink; boot id (#1863) does not."""
    for policy, want in ((make_policy("snapshot-1755"), "nvlink"), (make_policy("fixed"), "rdma")):
        eng = Engine(make_env(policy=policy, machine_id="clone", boot_id="boot-a"))
        eng.transports = ("nvlink", "rdma", "tcp")
        req = _request("cuda:0", "device", machine="clone", boot="boot-b")
        eng._choose(req)
        assert req.transport == want


def test_engine_poll_reresolves_unspec_forever_at_snapshot() -> None:
    eng = Engine(make_env(gpudirect=False))
    eng.transports = ("rdma",)
    seg = SegmentDesc(1, "n:1", "m0", "b0", (BufferDesc(region_addr(1, 5), 256, "cuda:0", ("rdma",)),))
    req = Request(seg, 1, region_addr(1, 5), fx.Region(1, "s", "host", region_addr(0, 1), 256), 0, 4)
    world = World()
    bid, _ = drive(eng.submit([req]), world)
    assert world.submitted == []  # nothing to dispatch: UNSPEC
    for _ in range(3):
        st, effs = drive(eng.poll(bid), world)
        assert st == ("pending",)
    assert len(marks(effs, "transport_unspec")) == 0  # reported once, on the first poll


# ---------------------------------------------------------------------------- SegmentInfo


def test_segment_info_pack_unpack_112_bytes() -> None:
    vals = list(range(1, 15))
    info = SegmentInfo((1, 2), (3, 4), (5, 6), (7, 8), 9, 10, 11, 12, 13, 14)
    raw = info.pack()
    assert len(raw) == 112
    assert struct.unpack("<14Q", raw) == tuple(vals)  # native little-endian, brief order
    assert SegmentInfo.unpack(raw) == info
    assert SegmentInfo.unpack(raw + b"extra") == info
    big = SegmentInfo((2**64 - 1, 0), (0, 0), (0, 0), (0, 0), 0, 0, 0, 0, 0, 0)
    assert SegmentInfo.unpack(big.pack()) == big


def test_segment_desc_roundtrip_and_find() -> None:
    d = SegmentDesc(3, "h:1", "m", "b", (BufferDesc(1000, 100, "*", ("rdma",)), BufferDesc(5000, 10, "cuda:0", ())))
    assert SegmentDesc.from_bytes(d.to_bytes()) == d
    assert d.find(1000, 100) is d.buffers[0] and d.find(1050, 60) is None and d.find(5005, 4) is d.buffers[1]


def _scan(d: SegmentDesc, addr: int, length: int) -> BufferDesc | None:
    """What ``find`` promises: the first registered buffer holding the range."""
    return next((b for b in d.buffers if b.addr <= addr and addr + length <= b.addr + b.size), None)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 60), st.integers(0, 12)), min_size=0, max_size=8),
       st.lists(st.tuples(st.integers(-2, 75), st.integers(0, 14)), min_size=1, max_size=20))
def test_segment_find_matches_registration_order_scan(bufs: list[tuple[int, int]],
                                                     probes: list[tuple[int, int]]) -> None:
    # buffers in any order, overlapping, sharing starts or empty: bisection where they are disjoint, a scan
    # otherwise, and the same answer as the scan either way
    d = SegmentDesc(0, "h:1", "m", "b", tuple(BufferDesc(a, n, "*", ()) for a, n in bufs))
    for addr, length in probes:
        assert d.find(addr, length) is _scan(d, addr, length)


def test_segment_find_first_registered_when_buffers_overlap() -> None:
    outer, inner = BufferDesc(100, 100, "*", ()), BufferDesc(120, 10, "cuda:0", ())
    assert SegmentDesc(0, "h:1", "m", "b", (outer, inner)).find(121, 4) is outer
    assert SegmentDesc(0, "h:1", "m", "b", (inner, outer)).find(121, 4) is inner


# ---------------------------------------------------------------------------- diagnosis rules


def _m(rank: int, mark_name: str, /, **data: Any) -> dict[str, Any]:
    return {"type": "mark", "rank": rank, "activity": "caller", "t": 0.0, "name": mark_name, "data": data}


def _wait(rank: int, *blockers: str) -> Blocked:
    return Blocked(rank, "caller", "WaitUntil", "all peers connected (waitUntilAllConnected)", blockers, 0.0)


def test_diagnose_error_cause_first() -> None:
    d = diagnose([_m(0, "rpc_bind", port=1, ok=False, checked=False)], [], {2: ("too big", "group-size-limit")}, "error")
    assert d.cause == "group-size-limit"


def test_diagnose_duplicate_server_name() -> None:
    ms = [_m(0, "key_published", key="server_name_0_0", server_name="n:15000"),
          _m(1, "key_published", key="server_name_0_1", server_name="n:15000")]
    assert diagnose(ms, [_wait(0, "rank:1:WAITING_PEER_WARMUP")], {}, "hang").cause == "rpc-port-conflict"
    unchecked = [_m(1, "rpc_bind", port=15000, ok=False, checked=False, error="EADDRINUSE")]
    assert diagnose(unchecked, [], {}, "hang").cause == "rpc-port-conflict"
    checked = [_m(1, "rpc_bind", port=15000, ok=False, checked=True, error="EADDRINUSE")]
    assert diagnose(checked, [], {}, "completed").cause is None


def test_diagnose_store_key_mismatch() -> None:
    ms = [_m(0, "key_published", key="buffer_0_0"), _m(1, "key_published", key="buffer_1_1"),
          _m(0, "phase", phase="warmup", backend=0), _m(1, "phase", phase="warmup", backend=1)]
    d = diagnose(ms, [_wait(0, "rank:1:WAITING_STORE")], {}, "hang")
    assert d.cause == "store-key-mismatch" and "buffer_1_1" in d.explanation
    never = diagnose(ms[:1] + ms[2:3], [_wait(0, "rank:1:WAITING_STORE")], {}, "hang")
    assert never.cause == "store-key-mismatch" and "never published" in never.explanation
    # a killed peer is not a key mismatch
    assert diagnose(ms[:1] + ms[2:3], [_wait(0, "rank:1:WAITING_STORE")], {}, "hang", killed=[1]).cause is None


def test_diagnose_transfer_rules() -> None:
    fabric = [_m(1, "transfer_failed", dst_rank=0, owner=0, transport="mnnvl", reason="address-not-found", label="*",
                 src_kind="host")]
    assert diagnose(fabric, [], {}, "hang").cause == "host-region-on-fabric"
    unspec = [_m(1, "transport_unspec", dst_rank=0, label="cuda:0", offered=["rdma"], src_kind="host")]
    assert diagnose(unspec, [], {}, "hang").cause == "host-region-gpu-label"
    # a GPU source to a cuda label is not the host-label failure
    assert diagnose([_m(1, "transport_unspec", dst_rank=0, label="cuda:0", offered=[], src_kind="device")],
                    [], {}, "hang").cause is None
    clone = [_m(2, "transfer_failed", dst_rank=1, transport="shm", reason="not-same-machine", label="*")]
    assert diagnose(clone, [], {}, "hang").cause == "duplicate-machine-id"
    seg = [_m(8, "segment_opened", name="127.0.0.1:15001", ok=False, owner=None, error="refused")]
    assert diagnose(seg, [], {}, "hang").cause == "unreachable-segment"


def test_diagnose_a_p2p_lane_reset_only_where_an_op_was_pending() -> None:
    """A torn-down peer's P2P lanes are reset whether or not an op is on them (a generated H100 run: rank 0
    killed after its only send/recv had landed, a survivor's poller tore it down after the run's last
    collective): only a reset with a pending op names the cause."""
    idle = _m(1, "p2p_lane_reset", peer=0, pending=0, fails_pending=True)
    assert diagnose([idle], [], {}, "completed").cause is None
    hung = _m(1, "p2p_lane_reset", peer=0, pending=1, fails_pending=False)
    d = diagnose([idle, hung], [], {}, "hang")
    assert d.cause == "p2p-lane-reset" and "never returns" in d.explanation
    failed = _m(1, "p2p_lane_reset", peer=0, pending=1, fails_pending=True)
    assert "it fails" in diagnose([failed], [], {}, "error").explanation


def test_diagnose_clean_and_unknown() -> None:
    assert diagnose([], [], {}, "completed").cause is None
    d = diagnose([], [_wait(0, "rank:1:WAITING_PEER_WARMUP")], {}, "hang")
    assert d.cause is None and d.wait_for == (("rank0/caller", "rank1"),)


def test_diagnose_a_cold_kernel_behind_the_spin_in_a_collective_that_never_finished() -> None:
    """The collective's time limit ended the run before a dump named the module load: the marks name it."""
    start = _m(0, "collective_start", index=1, op="allreduce")
    cold = _m(0, "kernel_first_launch", kernel="reduce_uint8_min", preloaded=False)
    err = {0: ("collective 1 (allreduce) did not finish in 5 s", None)}
    d = diagnose([start, cold], [], err, "error")
    assert d.cause == "lazy-kernel-load" and "reduce_uint8_min" in d.explanation and "rank(s) 0" in d.explanation
    done = _m(0, "collective_done", index=1, op="allreduce")
    assert diagnose([start, cold, done], [], err, "error").cause is None  # that collective finished
    assert diagnose([start, cold], [], {}, "completed").cause is None
    # a cause the protocol named comes first
    assert diagnose([start, cold], [], {0: ("slot", "task-slot-exhaustion")}, "error").cause == "task-slot-exhaustion"


def test_a_spin_kernel_that_gave_up_is_found_in_either_cuda_slot() -> None:
    """The word our spin kernel sets when its safety limit ran out (offset 4 of task slots 2 and 3) is what
    the caller checks after the collective's stream finished."""
    from types import SimpleNamespace

    from mooncake_protocol.collectives import spin_gave_up
    from mooncake_protocol.worker import SLOT_BYTES, SPIN_GAVE_UP_OFFSET

    table = fx.Region(7, "task_table", "pinned", region_addr(0, 7), 4 * SLOT_BYTES)
    b = SimpleNamespace(process=SimpleNamespace(worker=SimpleNamespace(table=table)))
    for slot in (None, 2, 3):
        mem = bytearray(2 * SLOT_BYTES)
        for s in (2, 3):  # active words of both slots set: not what the check looks at
            mem[(s - 2) * SLOT_BYTES:(s - 2) * SLOT_BYTES + 4] = (3).to_bytes(4, "little")
        if slot is not None:
            at = (slot - 2) * SLOT_BYTES + SPIN_GAVE_UP_OFFSET
            mem[at:at + 4] = (1).to_bytes(4, "little")

        def answer(eff: fx.Effect, mem: bytes = bytes(mem)) -> Any:
            assert isinstance(eff, fx.ReadMem) and (eff.rid, eff.offset, eff.length) == (7, 2 * SLOT_BYTES, 2 * SLOT_BYTES)
            return mem

        gave_up, _ = drive(spin_gave_up(b), answer)  # type: ignore[arg-type]
        assert gave_up is (slot is not None), slot


def test_wait_for_graph_resources() -> None:
    b = [Blocked(0, "gpu", "DeviceWork", "x", (), 0.0, "module-load:reduce_int32_sum"),
         Blocked(1, "caller", "StoreWait", "keys", ("store:k",), 0.0)]
    assert wait_for_graph(b) == (("rank0/gpu", "module-load:reduce_int32_sum"), ("rank1/caller", "store:k"))
