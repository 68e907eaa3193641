"""Point-to-point send/recv through the P2PProxy (mooncake-pg.md section 8).

Per ordered pair there is one lane per direction: my send ring for peer p is ``p2p_send + p * 16 MiB``,
its destination ``p.p2p_recv + me * 16 MiB``, 8 slots of 2 MiB (7 usable). Control slots (128 bytes per
peer: head at offset 0, tail at offset 64) carry the cursors: ``ctrl_send[p].head`` is mine,
``ctrl_send[p].tail`` is written by p (its consumer cursor); ``ctrl_recv[p].head`` is written by p,
``ctrl_recv[p].tail`` is mine. Cursors count chunks (int32, wrapping); a slot is ``cursor % 8``.

Sender: issue a chunk while fewer than 7 are unconsumed, WRITE it into p's slot, then publish the new head
with a 4-byte WRITE to p's ``ctrl_recv[me].head``. Receiver: while head != tail, copy the slot out, advance
the tail and WRITE it to p's ``ctrl_send[me].tail``. No size header, no tag: both sides post the same byte
count, matched by order per pair.

A failed WRITE marks the peer broken (the proxy thread's exception in Mooncake); the poller then tears the
peer down and :meth:`P2PProxy.reset_peer` zeroes the lane. Before any fix the pending operation is simply
forgotten and its ``wait()`` never returns; with ``p2p_reset_fails_pending`` it fails with an error.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import effects as fx
from .effects import Activity, mark
from .engine import Request
from .errors import ProtocolError
from .rankenv import P2P_BUFFER_SIZE

if TYPE_CHECKING:
    from .backend import Backend

NUM_SLOTS = 8
SLOT_SIZE = 2 << 20
CTRL_SLOT = 128
HEAD, TAIL = 0, 64


@dataclass
class Lane:
    send_head: int = 0
    recv_tail: int = 0
    pending: int = 0  # operations posted and not finished
    failed: bool = False


@dataclass
class P2PProxy:
    b: Backend
    regions: dict[str, fx.Region] = field(default_factory=dict)
    lanes: dict[int, Lane] = field(default_factory=dict)

    def lane(self, peer: int) -> Lane:
        return self.lanes.setdefault(peer, Lane())

    def allocate(self, data_kind: str, data_label: str, host_label: str, tag: str) -> Activity:
        engine = self.b.process.engine
        size = self.b.env.size
        gpu = self.b.env.gpu if data_kind == "device" else None
        for name in ("p2p_send", "p2p_recv"):
            r = yield from engine.alloc(tag + name, data_kind, P2P_BUFFER_SIZE * size, gpu)
            self.regions[name] = r
            yield from engine.register(r, data_label)
        for name in ("p2p_ctrl_send", "p2p_ctrl_recv"):
            r = yield from engine.alloc(tag + name, "host", CTRL_SLOT * 64, None)
            self.regions[name] = r
            yield from engine.register(r, host_label)

    def addresses(self) -> tuple[int, int, int, int]:
        r = self.regions
        return r["p2p_send"].addr, r["p2p_recv"].addr, r["p2p_ctrl_send"].addr, r["p2p_ctrl_recv"].addr

    def reset_peer(self, peer: int) -> Activity:
        """``ResetPeerState``: clear the lanes to ``peer`` and zero their head/tail."""
        lane = self.lane(peer)
        for name in ("p2p_ctrl_send", "p2p_ctrl_recv"):
            yield fx.WriteMem(self.regions[name].rid, peer * CTRL_SLOT, bytes(CTRL_SLOT))
        pending = lane.pending
        lane.send_head = lane.recv_tail = 0
        if self.b.env.policy.p2p_reset_fails_pending:
            lane.failed = True
        yield mark("p2p_lane_reset", peer=peer, pending=pending,
                   fails_pending=self.b.env.policy.p2p_reset_fails_pending)

    # ------------------------------------------------------------------ helpers

    def _ctrl(self, reader: fx.MemoryReader, name: str, peer: int, offset: int) -> int:
        raw = reader.read(self.regions[name].rid, peer * CTRL_SLOT + offset, 4)
        return int(struct.unpack("<i", raw)[0])

    def _write_remote(self, peer: int, src: fx.Region, src_off: int, dst_addr: int, length: int) -> Activity:
        """One WRITE to the peer; returns its final status."""
        engine = self.b.process.engine
        bid = yield from engine.submit([Request(self.b.segments[peer], peer, dst_addr, src, src_off, length)])
        lane = self.lane(peer)
        while True:
            (st,) = yield from engine.poll(bid)
            if st != "pending":
                break
            ok = yield fx.WaitUntil(lambda r: lane.failed or engine.batch_settled(r, bid), 1e-5,
                                    f"P2P WRITE to rank {peer}", None,
                                    lambda: (f"rank:{peer}",))
            del ok
            if lane.failed:
                st = "failed:lane-reset"
                break
        yield from engine.free(bid)
        return st

    def _fail(self, peer: int, st: str, what: str) -> Activity:
        b = self.b
        yield mark("log", level="error", text=f"P2P {what} to rank {peer} failed: {st}")
        if b.peer_connected[peer]:
            b.peer_connected[peer] = False
            b.active[peer] = False
            yield mark("peer_marked_broken", peer=peer, reason=f"p2p {st}", during="p2p")

    # ------------------------------------------------------------------ operations

    def send(self, peer: int, src: fx.Region, nbytes: int) -> Activity:
        b = self.b
        me = b.env.rank
        lane = self.lane(peer)
        lane.pending += 1
        info = b.segment_infos[peer]
        assert info is not None
        send_ring = self.regions["p2p_send"]
        ctrl_send = self.regions["p2p_ctrl_send"]
        for k, n in _chunks(nbytes):

            def has_room(r: fx.MemoryReader, lane: Lane = lane) -> bool:
                return lane.failed or (lane.send_head - self._ctrl(r, "p2p_ctrl_send", peer, TAIL)) % (1 << 32) < NUM_SLOTS - 1

            ok = yield fx.WaitUntil(has_room, 1e-5, f"P2P send to rank {peer}: a free slot (remote tail)", None,
                                    lambda: (f"rank:{peer}",))
            del ok
            if lane.failed:
                break
            slot = lane.send_head % NUM_SLOTS
            local_off = peer * P2P_BUFFER_SIZE + slot * SLOT_SIZE
            if n > 0:
                data = yield fx.ReadMem(src.rid, k * SLOT_SIZE, n)
                yield fx.WriteMem(send_ring.rid, local_off, data)
                st = yield from self._write_remote(peer, send_ring, local_off,
                                                   info.p2p_recv + me * P2P_BUFFER_SIZE + slot * SLOT_SIZE, n)
                if st != "completed":
                    yield from self._fail(peer, st, "chunk WRITE")
                    break
            lane.send_head += 1
            yield fx.WriteMem(ctrl_send.rid, peer * CTRL_SLOT + HEAD, struct.pack("<i", lane.send_head & 0x7FFFFFFF))
            st = yield from self._write_remote(peer, ctrl_send, peer * CTRL_SLOT + HEAD,
                                               info.p2p_ctrl_recv + me * CTRL_SLOT + HEAD, 4)
            if st != "completed":
                yield from self._fail(peer, st, "head WRITE")
                break
        yield from self._finish(peer, lane, "send")

    def recv(self, peer: int, dst: fx.Region, nbytes: int) -> Activity:
        b = self.b
        me = b.env.rank
        lane = self.lane(peer)
        lane.pending += 1
        recv_ring = self.regions["p2p_recv"]
        ctrl_recv = self.regions["p2p_ctrl_recv"]
        chunks = _chunks(nbytes)
        nchunks = len(chunks)
        for k, n in chunks:

            def arrived(r: fx.MemoryReader, lane: Lane = lane) -> bool:
                return lane.failed or self._ctrl(r, "p2p_ctrl_recv", peer, HEAD) != lane.recv_tail

            ok = yield fx.WaitUntil(arrived, 1e-5, f"P2P recv from rank {peer}: chunk {k} of {nchunks}", None,
                                    lambda: (f"rank:{peer}",))
            del ok
            if lane.failed:
                break
            slot = lane.recv_tail % NUM_SLOTS
            if n > 0:
                data = yield fx.ReadMem(recv_ring.rid, peer * P2P_BUFFER_SIZE + slot * SLOT_SIZE, n)
                yield fx.WriteMem(dst.rid, k * SLOT_SIZE, data)
            lane.recv_tail += 1
            yield fx.WriteMem(ctrl_recv.rid, peer * CTRL_SLOT + TAIL, struct.pack("<i", lane.recv_tail & 0x7FFFFFFF))
            info = b.segment_infos[peer]
            if info is None:
                break
            st = yield from self._write_remote(peer, ctrl_recv, peer * CTRL_SLOT + TAIL,
                                               info.p2p_ctrl_send + me * CTRL_SLOT + TAIL, 4)
            if st != "completed":
                yield from self._fail(peer, st, "tail WRITE")
                # the proxy thread's exception: this lane makes no further progress
                yield fx.WaitUntil(_lane_failed(lane), 1e-3,
                                        f"P2P recv from rank {peer}: the lane after a failed WRITE", None,
                                        lambda: (f"rank:{peer}",))
                break
        yield from self._finish(peer, lane, "recv")

    def _finish(self, peer: int, lane: Lane, what: str) -> Activity:
        lane.pending -= 1
        if lane.failed:
            raise ProtocolError(f"P2P {what} with rank {peer} failed: the lane was reset while it was pending",
                                cause="p2p-lane-reset")
        return
        yield


def _chunks(nbytes: int) -> list[tuple[int, int]]:
    """(index, length) of the slot-sized pieces a message travels in (one empty piece for 0 bytes)."""
    return [(k, min(SLOT_SIZE, nbytes - k * SLOT_SIZE)) for k in range(max(1, -(-nbytes // SLOT_SIZE)))]


def _lane_failed(lane: Lane) -> fx.Predicate:
    return lambda _r: lane.failed


def run_send_recv(b: Backend, spec: Any, index: int) -> Activity:
    """One ``send``/``recv`` pair of the workload: ``spec.src`` sends ``count`` elements to ``spec.dst``."""
    from .collectives import decode_output, encode_input
    from .reduce import ITEMSIZE

    env = b.env
    me = env.rank
    nbytes = spec.count * ITEMSIZE[spec.dtype]
    output: Any = None
    engine = b.process.engine
    kind = "host"  # P2P tensors are staged through host memory here (the CUDA path copies on the caller's stream)
    if me == spec.src:
        t = yield from engine.alloc(f"c{index}.send", kind, max(nbytes, 8), None)
        if env.data_values:
            data = encode_input(spec, me, spec.count)
            yield fx.HostCompute("fill", len(data))
            yield fx.WriteMem(t.rid, 0, data)
        yield mark("collective_start", index=index, op="send_recv", dtype=spec.dtype, count=spec.count)
        yield from b.p2p.send(spec.dst, t, nbytes)
    elif me == spec.dst:
        t = yield from engine.alloc(f"c{index}.recv", kind, max(nbytes, 8), None)
        yield mark("collective_start", index=index, op="send_recv", dtype=spec.dtype, count=spec.count)
        yield from b.p2p.recv(spec.src, t, nbytes)
        if env.data_values:
            raw = yield fx.ReadMem(t.rid, 0, nbytes)
            output = decode_output(spec.dtype, raw)
            yield fx.HostCompute("decode", len(raw))
    active = yield fx.ReadMem(b.regions["active_ranks"].rid, 0, env.size)
    yield mark("collective_done", index=index, op="send_recv", output=output, active=[int(x) for x in active])
