"""The data path: SHM and TCP WRITEs, failure reasons from the shared fabric rules, between processes."""

from __future__ import annotations

import secrets
import time

import pytest

pytest.importorskip("zmq")

from real_helpers import HERE, free_port, free_ports, shm_segments  # noqa: E402

from mooncake_protocol import effects as fx  # noqa: E402
from mooncake_protocol.memory import region_addr  # noqa: E402
from mooncake_real.launcher import launch  # noqa: E402
from mooncake_real.memory import RegionTable, sweep_shm  # noqa: E402
from mooncake_real.rpc import RpcClient, RpcServer  # noqa: E402
from mooncake_real.transports import TransferEngine, decode_write, encode_write, rpc_builtins  # noqa: E402


def _wait(engine, bid, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        st = engine.status(bid)
        if all(s != "pending" for s in st):
            return st
        time.sleep(0.005)
    return engine.status(bid)


@pytest.fixture
def two_ranks(tmp_path):
    """Rank 0 (owner, with an RPC server) and rank 1 (writer) in this process, sharing a job dir."""
    job_id = secrets.token_hex(4)
    owner = RegionTable(job_id, tmp_path, 0)
    writer = RegionTable(job_id, tmp_path, 1)
    dst = owner.allocate(fx.Allocate("recv", "host", 256, region_addr(0, 1), None, True))
    owner.register(dst, "*", False, False)
    unreg = owner.allocate(fx.Allocate("unregistered", "host", 256, region_addr(0, 2), None, True))
    src = writer.allocate(fx.Allocate("send", "host", 256, region_addr(1, 1), None, True))
    writer.register(src, "*", False, False)
    writer.write(1, 0, b"ABCDEFGH")
    port = free_port()
    server = RpcServer(builtins=rpc_builtins(owner))
    assert server.bind(port).ok
    server.serve(port, None)
    client = RpcClient()
    engine = TransferEngine(1, tmp_path, writer, client, None, rpc_timeout_s=1.0)
    yield owner, engine, f"127.0.0.1:{port}", unreg
    engine.close()
    client.close()
    server.close()
    owner.close()
    writer.close()
    sweep_shm(job_id)


def test_write_payload_roundtrip():
    assert decode_write(encode_write(region_addr(3, 2) + 5, b"xyz")) == (region_addr(3, 2) + 5, b"xyz")


def test_shm_and_tcp_writes_land(two_ranks):
    owner, engine, server, _ = two_ranks
    base = region_addr(0, 1)
    bid = engine.submit((
        fx.WriteReq("shm", 1, 0, 4, 0, server, base, 0),
        fx.WriteReq("tcp", 1, 4, 4, 0, server, base + 100, 0),
    ))
    assert _wait(engine, bid) == ("completed", "completed")
    assert owner.read(1, 0, 4) == b"ABCD"
    assert owner.read(1, 100, 4) == b"EFGH"
    engine.free(bid)
    assert engine.status(bid) == ()


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_failures(two_ranks, transport):
    _, engine, server, unreg = two_ranks
    base = region_addr(0, 1)
    writes = (
        fx.WriteReq(transport, 1, 0, 4, 0, server, region_addr(0, 9), 0),  # no region 9
        fx.WriteReq(transport, 1, 0, 4, 0, server, region_addr(1, 1), 1),  # address owned by 1, owner says 0
        fx.WriteReq(transport, 1, 0, 4, 0, server, unreg.addr, 0),  # allocated, never registered
        fx.WriteReq(transport, 1, 0, 8, 0, server, base + 252, 0),  # runs past the region's end
    )
    assert _wait(engine, engine.submit(writes)) == ("failed:address-not-found",) * 4


def test_registry_is_reread_when_the_owner_registers_again(two_ranks):
    """The engine keeps a peer's registry between WRITEs; a region the owner registers later is seen at once."""
    owner, engine, server, unreg = two_ranks
    first = engine.submit((fx.WriteReq("shm", 1, 0, 4, 0, server, unreg.addr, 0),))
    assert _wait(engine, first) == ("failed:address-not-found",)  # allocated, not registered: cached so
    owner.register(unreg, "*", False, False)
    again = engine.submit((fx.WriteReq("shm", 1, 0, 4, 0, server, unreg.addr, 0),))
    assert _wait(engine, again) == ("completed",)
    assert owner.read(unreg.rid, 0, 4) == b"ABCD"


def test_transports_this_machine_cannot_carry(two_ranks):
    _, engine, server, _ = two_ranks
    base = region_addr(0, 1)
    bid = engine.submit((
        fx.WriteReq("nvlink", 1, 0, 4, 0, server, base, 0),  # host target: IPC cannot open it
        fx.WriteReq("mnnvl", 1, 0, 4, 0, server, base, 0),  # host target on a fabric: not found
        fx.WriteReq("rdma", 1, 0, 4, 0, server, base, 0),  # cannot be realised here
    ))
    assert _wait(engine, bid) == ("failed:no-ipc-handle", "failed:address-not-found", "failed:no-path")


def test_tcp_to_owner_without_server_fails_as_peer_dead(two_ranks):
    _, engine, _, _ = two_ranks
    bid = engine.submit((fx.WriteReq("tcp", 1, 0, 4, 0, f"127.0.0.1:{free_port()}", region_addr(0, 1), 0),))
    assert _wait(engine, bid) == ("failed:peer-dead",)


def test_nvlink_to_an_owner_whose_server_is_gone_fails_as_peer_dead(two_ranks, monkeypatch):
    """A WRITE over CUDA IPC to a rank that died before its handle was fetched: the registry file it left
    still shows an exported device region, and its server does not answer. The reason is ``peer-dead``, as
    the simulator says; ``no-ipc-handle`` named host-region-gpu-label as the cause of a killed rank's run."""
    from mooncake_protocol.fabric import TargetInfo
    from mooncake_real import transports

    _, engine, _, _ = two_ranks

    class Gpu:
        available = True

    engine.gpu = Gpu()
    monkeypatch.setattr(transports, "target_facts",
                        lambda regions, owner, addr, length: (TargetInfo("device", True, False), {"shm": None}))
    bid = engine.submit((fx.WriteReq("nvlink", 1, 0, 4, 0, f"127.0.0.1:{free_port()}", region_addr(0, 1), 0),))
    assert _wait(engine, bid) == ("failed:peer-dead",)


@pytest.mark.timeout(60)
def test_between_two_processes():
    r = launch(2, entry="real_activities:data_path", pythonpath=[HERE], args={"ports": free_ports(2)}, deadline_s=30)
    assert r.exit_codes == {0: 0, 1: 0}, r.logs
    assert r.results[1]["value"]["statuses"] == [
        "completed", "completed", "failed:address-not-found", "failed:address-not-found", "failed:no-ipc-handle"]
    assert r.results[0]["value"]["seen"] is True
    assert bytes.fromhex(r.results[0]["value"]["bytes"]) == b"shm!\0\0\0\0tcp!"
    assert shm_segments(r.job_id) == []
