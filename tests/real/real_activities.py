"""Small hand-written protocol activities that the real-mode tests run in rank processes.

Each is a rank entry ("real_activities:<name>", called with the RankSpec) returning an activity: a
generator of effects, exactly like the protocol's own. Together they exercise every effect class.
"""

from __future__ import annotations

import struct
from typing import Any

from mooncake_protocol import effects as fx
from mooncake_protocol.memory import region_addr


def _barrier(spec: Any, name: str) -> fx.Activity:
    n = yield fx.StoreAdd(f"barrier/{name}", 1)
    if n == spec.world_size:
        yield fx.StoreSet(f"barrier/{name}/done", b"1")
    ok = yield fx.StoreWait((f"barrier/{name}/done",), 30.0, what=f"barrier {name}")
    return ok


def echo_handler(method: str, payload: bytes) -> bytes:
    if method == "echo":
        return b"echo:" + payload
    raise LookupError(method)


def store_and_rpc(spec: Any) -> fx.Activity:
    """Publish a server name, bind and serve, call every peer's echo."""
    r = spec.rank
    port = int(spec.args["ports"][r])
    res = yield fx.RpcBind(port)
    yield fx.mark("rpc_bind", port=port, ok=res.ok, error=res.error)
    yield fx.RpcServe(port, echo_handler)
    yield fx.StoreSet(f"server_name_{r}", f"127.0.0.1:{port}".encode())
    keys = tuple(f"server_name_{p}" for p in range(spec.world_size))
    ok = yield fx.StoreWait(keys, 20.0, what="all server names")
    assert ok
    replies = {}
    for p in range(spec.world_size):
        target = (yield fx.StoreGet(f"server_name_{p}")).decode()
        rep = yield fx.RpcCall(target, "echo", f"from {r}".encode(), 5.0)
        replies[p] = [rep.ok, rep.payload.decode(), rep.error]
    bad = yield fx.RpcCall(f"127.0.0.1:{port}", "nope", b"", 5.0)
    yield from _barrier(spec, "end")
    return {"replies": replies, "unknown_method": [bad.ok, bad.error]}


def bind_same_port(spec: Any) -> fx.Activity:
    """Rank 0 binds first, then rank 1 tries the same port (ordered through the store)."""
    port = int(spec.args["port"])
    if spec.rank == 1:
        yield fx.StoreWait(("bound0",), 20.0, what="rank 0 bound")
    res = yield fx.RpcBind(port)
    yield fx.mark("rpc_bind", port=port, ok=res.ok, error=res.error)
    if spec.rank == 0:
        yield fx.StoreSet("bound0", b"1")
    yield from _barrier(spec, "end")
    return {"ok": res.ok, "error": res.error}


def bind_port(spec: Any) -> fx.Activity:
    res = yield fx.RpcBind(int(spec.args["port"]))
    return {"ok": res.ok, "error": res.error}


def data_path(spec: Any) -> fx.Activity:
    """Two ranks: rank 1 WRITEs into rank 0's host region over shm and tcp; one WRITE to a bad address."""
    r = spec.rank
    port = int(spec.args["ports"][r])
    res = yield fx.RpcBind(port)
    assert res.ok, res
    yield fx.RpcServe(port, echo_handler)
    region = yield fx.Allocate("recv", "host", 4096, region_addr(r, 1), None, True)
    yield fx.Register(region, "*", False, False)
    src = yield fx.Allocate("send", "host", 4096, region_addr(r, 2), None, True)
    yield fx.Register(src, "*", False, False)
    yield fx.WriteMem(src.rid, 0, b"shm!tcp!")
    yield fx.StoreSet(f"server_{r}", f"127.0.0.1:{port}".encode())
    ok = yield fx.StoreWait(tuple(f"server_{p}" for p in range(2)), 20.0, what="servers")
    assert ok
    out: dict[str, Any] = {}
    if r == 1:
        server0 = (yield fx.StoreGet("server_0")).decode()
        dst = region_addr(0, 1)
        writes = (
            fx.WriteReq("shm", src.rid, 0, 4, 0, server0, dst + 0, 0),
            fx.WriteReq("tcp", src.rid, 4, 4, 0, server0, dst + 8, 0),
            fx.WriteReq("tcp", src.rid, 0, 4, 0, server0, region_addr(0, 7), 0),  # rid 7: not allocated
            fx.WriteReq("shm", src.rid, 0, 4, 0, server0, region_addr(1, 1), 0),  # owner 1 != dst_owner 0
            fx.WriteReq("nvlink", src.rid, 0, 4, 0, server0, dst + 16, 0),  # host target: no IPC handle
        )
        bid = yield fx.SubmitTransfer(writes)
        done = yield fx.WaitUntil(lambda m: all(s != "pending" for s in m.status(bid)), 0.01, "writes done",
                                  timeout_s=10.0)
        out["statuses"] = list((yield fx.PollTransfer(bid)))
        out["done"] = done
        yield fx.FreeBatch(bid)
        yield fx.StoreSet("written", b"1")
    else:
        yield fx.StoreWait(("written",), 20.0, what="rank 1 wrote")
        seen = yield fx.WaitUntil(lambda m: m.read(1, 0, 4) == b"shm!" and m.read(1, 8, 4) == b"tcp!", 0.01,
                                  "both writes landed", timeout_s=10.0)
        out["seen"] = seen
        out["bytes"] = (yield fx.ReadMem(1, 0, 12)).hex()
    yield from _barrier(spec, "end")
    return out


def _child(n: int) -> fx.Activity:
    yield fx.Sleep(0.01)
    t = yield fx.Now()
    return n * 2 + (0 if t >= 0 else 1)


def all_effects(spec: Any) -> fx.Activity:
    """One rank, every effect class at least once (CPU stand-ins for the GPU effects)."""
    yield fx.mark("phase", phase="bootstrap")
    yield fx.StoreSet("k", b"v")
    v = yield fx.StoreGet("k")
    have = yield fx.StoreCheck(("k",))
    n = yield fx.StoreAdd("ctr", 5)
    n = yield fx.StoreAdd("ctr", -2)
    gone = yield fx.StoreDelete("k")
    missing = yield fx.StoreGet("k")
    waited = yield fx.StoreWait(("ctr",), 1.0)
    b = yield fx.RpcBind(int(spec.args["port"]))
    yield fx.RpcServe(int(spec.args["port"]), echo_handler)
    rep = yield fx.RpcCall(f"127.0.0.1:{spec.args['port']}", "echo", b"x", 5.0)
    src = yield fx.Allocate("src", "host", 64, region_addr(0, 1), None, True)
    dst = yield fx.Allocate("dst", "pinned", 64, region_addr(0, 2), None, False)
    reg = yield fx.Register(dst, "*", True, True)
    yield fx.Register(src, "*", False, False)
    garbage = yield fx.ReadMem(dst.rid, 0, 4)
    # two "ranks" of int32 in src: [1, 2] and [10, 20]
    yield fx.WriteMem(src.rid, 0, struct.pack("<4i", 1, 2, 10, 20))
    yield fx.LoadKernel("reduce_int32_sum")
    yield fx.Memset(dst.rid, 0, 64, 0, "enqueue")
    yield fx.Launch("reduce_int32_sum", "enqueue", fx.ReduceArgs(src.rid, 0, dst.rid, 0, 2, 2, 8, (True, True)))
    ev = yield fx.EventRecord("enqueue")
    evdone = yield fx.EventQuery(ev)
    synced = yield fx.StreamSync("enqueue", 1.0)
    skipped = yield fx.SteadyState(0, 4, 10, "enqueue")  # real hardware runs every chunk
    yield fx.HostCompute("reduce", 8)  # the protocol's own work: the real driver only records it
    assert skipped == 0
    yield fx.Memcpy(src.rid, 32, dst.rid, 0, 8, "legacy", True)
    reduced = struct.unpack("<2i", (yield fx.ReadMem(src.rid, 32, 8)))
    act = yield fx.Allocate("active", "host", 64, region_addr(0, 3), None, True)
    yield fx.WriteMem(act.rid, 0, b"\x00\x01")  # only rank 1 active, read when the "kernel" runs
    yield fx.Launch("reduce_int32_max", "enqueue",
                    fx.ReduceArgs(src.rid, 0, src.rid, 40, 2, 2, 8, (True, True), active_rid=act.rid))
    reduced_rid = struct.unpack("<2i", (yield fx.ReadMem(src.rid, 40, 8)))
    bid = yield fx.SubmitTransfer((fx.WriteReq("shm", src.rid, 0, 4, 0, "127.0.0.1:1", dst.addr + 16, 0),))
    landed = yield fx.WaitUntil(lambda m: m.status(bid) == ("completed",), 0.005, "self write", timeout_s=5.0)
    st = yield fx.PollTransfer(bid)
    yield fx.FreeBatch(bid)
    h = yield fx.Spawn("child", _child(21))
    h2 = yield fx.Spawn("daemon-child", _child(1), daemon=True)
    joined = yield fx.Join(h)
    yield fx.Join(h2)
    yield fx.Sleep(0.001)
    now = yield fx.Now()
    yield fx.mark("phase", phase="done")
    return {
        "get": v.decode(), "check": have, "add": n, "deleted": gone, "missing": missing, "waited": waited,
        "bind": b.ok, "rpc": rep.payload.decode(), "reg": [reg.ipc_handle, reg.fabric_handle],
        "garbage": garbage.hex(), "reduced": list(reduced), "reduced_rid": list(reduced_rid), "event": evdone, "synced": synced,
        "landed": landed, "status": list(st), "joined": joined, "now_positive": now > 0,
    }


def hang(spec: Any) -> fx.Activity:
    """Blocks in a StoreWait on a key nobody sets, after the phase marks the fault tests key on."""
    yield fx.mark("phase", phase="bootstrap")
    yield fx.Allocate("buf", "host", 1 << 16, region_addr(spec.rank, 1), None, True)
    yield fx.mark("phase", phase="warmup")
    yield fx.StoreWait(("never",), 600.0, what="a key nobody publishes")
    return None


def phases(spec: Any) -> fx.Activity:
    """Phase marks with short sleeps; returns how long the rank took (pause faults show up here)."""
    t0 = yield fx.Now()
    yield fx.Allocate("buf", "host", 4096, region_addr(spec.rank, 1), None, True)
    for p in ("bootstrap", "warmup", "collective", "done"):
        yield fx.mark("phase", phase=p)
        yield fx.Sleep(0.05)
    t1 = yield fx.Now()
    return {"took": t1 - t0}


def fail(spec: Any) -> fx.Activity:
    from mooncake_protocol.errors import ProtocolError

    yield fx.Sleep(0.0)
    raise ProtocolError("boom", cause="store-key-mismatch")


def ipc_write(spec: Any) -> fx.Activity:
    """Two ranks on one GPU: rank 1 WRITEs over CUDA IPC ("nvlink") into rank 0's device region."""
    r = spec.rank
    port = int(spec.args["ports"][r])
    res = yield fx.RpcBind(port)
    assert res.ok, res
    yield fx.RpcServe(port, echo_handler)
    dev = yield fx.Allocate("dev", "device", 1 << 20, region_addr(r, 1), 0, True)
    reg = yield fx.Register(dev, "cuda:0", True, False)
    host = yield fx.Allocate("host", "pinned", 4096, region_addr(r, 2), None, True)
    host_reg = yield fx.Register(host, "cuda:0", True, False)
    yield fx.WriteMem(host.rid, 0, b"ipc-data")
    yield fx.StoreSet(f"server_{r}", f"127.0.0.1:{port}".encode())
    yield fx.StoreWait(("server_0", "server_1"), 30.0, what="servers")
    if r == 1:
        server0 = (yield fx.StoreGet("server_0")).decode()
        bid = yield fx.SubmitTransfer((fx.WriteReq("nvlink", host.rid, 0, 8, 0, server0, region_addr(0, 1) + 64, 0),))
        yield fx.WaitUntil(lambda m: all(s != "pending" for s in m.status(bid)), 0.01, "ipc write", timeout_s=20.0)
        st = yield fx.PollTransfer(bid)
        yield fx.StoreSet("written", b"1")
        out = {"status": list(st), "host_ipc": host_reg.ipc_handle}
    else:
        yield fx.StoreWait(("written",), 30.0, what="rank 1 wrote")
        seen = yield fx.WaitUntil(lambda m: m.read(1, 64, 8) == b"ipc-data", 0.01, "ipc data", timeout_s=10.0)
        out = {"ipc": reg.ipc_handle, "seen": seen}
    yield from _barrier(spec, "end")
    return out


def lazy_hazard(spec: Any) -> fx.Activity:
    """A resident spin kernel, a cold (or preloaded) reduce kernel behind it, a copy on another stream."""
    r = spec.rank
    tab = yield fx.Allocate("tasks", "pinned", 256, region_addr(r, 1), None, True)
    src = yield fx.Allocate("src", "pinned", 4 << 20, region_addr(r, 2), None, True)
    dst = yield fx.Allocate("dst", "device", 4 << 20, region_addr(r, 3), 0, True)
    red = yield fx.Allocate("red", "device", 4096, region_addr(r, 4), 0, True)
    yield fx.LoadKernel("spin")
    if spec.args.get("preload"):
        yield fx.LoadKernel("reduce_int32_sum")
    yield fx.Launch("spin", "enqueue", fx.SpinArgs(tab.rid, 0, b"task", 8.0))
    yield fx.WaitUntil(lambda m: m.read(tab.rid, 0, 4) == b"\x01\0\0\0", 0.001, "spin kernel running", timeout_s=5.0)
    state: dict[str, float] = {}

    def tail() -> fx.Activity:
        yield fx.Launch("reduce_int32_sum", "enqueue", fx.ReduceArgs(src.rid, 0, red.rid, 0, 256, 2, 1024, (True, True)))

    def copy() -> fx.Activity:
        yield fx.Sleep(0.05)
        t0 = yield fx.Now()
        yield fx.Memcpy(dst.rid, 0, src.rid, 0, 4 << 20, "copy", False)
        ev = yield fx.EventRecord("copy")
        while not (yield fx.EventQuery(ev)):
            yield fx.Sleep(0.001)
        state["copy_done"] = (yield fx.Now()) - t0

    h1 = yield fx.Spawn("tail", tail())
    h2 = yield fx.Spawn("copy", copy())
    yield fx.Sleep(1.0)
    done_before = "copy_done" in state
    yield fx.WriteMem(tab.rid, 0, b"\0\0\0\0")  # release the spin kernel
    yield fx.Join(h1)
    yield fx.Join(h2)
    ok = yield fx.StreamSync("enqueue", 10.0)
    return {"copy_done_before_release": done_before, "copy_s": state.get("copy_done"), "synced": ok}
