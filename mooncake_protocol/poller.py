"""The connection poller: one thread per process driving every backend's per-peer state machine.

The per-peer states and their transitions are data (:data:`TRANSITIONS`), in the style of h11's state
tables; :func:`transition` is the only way a peer's state changes, so an illegal move raises at once and
docs/state-machines.md is generated from the table (``python -m mooncake_protocol.docgen``).

Constants (mooncake-pg.md section 2): store poll back-off starts at 8 ms, doubles, caps at 1024 ms and is
reset after success; the poller sleeps 50 ms per pass while any peer is connecting, 200 ms when all are
connected.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import effects as fx
from .effects import Activity, mark
from .engine import Request

if TYPE_CHECKING:
    from .backend import Backend

BACKOFF_START_S = 0.008
BACKOFF_CAP_S = 1.024
IDLE_CONNECTING_S = 0.050
IDLE_CONNECTED_S = 0.200
SEGMENT_INFO_BYTES = 112


class PeerState(enum.Enum):
    WAITING_STORE = "WAITING_STORE"
    WAITING_WARMUP_TRANSFER = "WAITING_WARMUP_TRANSFER"
    WAITING_PEER_WARMUP = "WAITING_PEER_WARMUP"
    CONNECTED = "CONNECTED"
    EXPIRING = "EXPIRING"


class PeerEvent(enum.Enum):
    KEYS_MISSING = "keys missing or invalid"
    OPEN_FAILED = "openSegment failed (fixed: id validated)"
    SKIP_WARMUP = "segment opened, warmup skipped (MNNVL)"
    OPENED_LOWER = "segment opened, peer rank <= mine: warmup WRITE submitted"
    OPENED_HIGHER = "segment opened, peer rank > mine: wait for its warmup"
    WARMUP_PENDING = "warmup WRITE pending"
    WARMUP_DONE = "warmup WRITE completed"
    WARMUP_FAILED = "warmup WRITE failed"
    PEER_FLAG_UNSET = "peer's warmup flag not seen"
    PEER_FLAG_SEEN = "peer's warmup flag seen"
    HEALTHY = "peer still connected"
    BROKEN = "peer marked broken"


S, E = PeerState, PeerEvent

#: state -> event -> next state.
TRANSITIONS: dict[PeerState, dict[PeerEvent, PeerState]] = {
    S.WAITING_STORE: {
        E.KEYS_MISSING: S.WAITING_STORE,
        E.OPEN_FAILED: S.WAITING_STORE,
        E.SKIP_WARMUP: S.CONNECTED,
        E.OPENED_LOWER: S.WAITING_WARMUP_TRANSFER,
        E.OPENED_HIGHER: S.WAITING_PEER_WARMUP,
    },
    S.WAITING_WARMUP_TRANSFER: {
        E.WARMUP_PENDING: S.WAITING_WARMUP_TRANSFER,
        E.WARMUP_DONE: S.CONNECTED,
        E.WARMUP_FAILED: S.WAITING_STORE,
    },
    S.WAITING_PEER_WARMUP: {
        E.PEER_FLAG_UNSET: S.WAITING_PEER_WARMUP,
        E.PEER_FLAG_SEEN: S.CONNECTED,
    },
    S.CONNECTED: {
        E.HEALTHY: S.CONNECTED,
        E.BROKEN: S.WAITING_STORE,
    },
    S.EXPIRING: {},
}


class IllegalTransition(Exception):
    pass


def transition(state: PeerState, event: PeerEvent) -> PeerState:
    try:
        return TRANSITIONS[state][event]
    except KeyError:
        raise IllegalTransition(f"{event.name} is not allowed in {state.name}") from None


@dataclass
class PeerConnection:
    state: PeerState = PeerState.WAITING_STORE
    backoff_s: float = BACKOFF_START_S
    last_check_s: float = -1e9
    warmup_batch: int | None = None
    segment_name: str | None = None
    own_write_done: bool = False  # bidirectional warmup: my WRITE to the peer completed
    flag_seen: bool = False  # bidirectional warmup: the peer's WRITE to me landed


def buffer_key(bi: int, rank: int) -> str:
    return f"buffer_{bi}_{rank}"


def server_name_key(bi: int, rank: int) -> str:
    return f"server_name_{bi}_{rank}"


def extension_keys(bi: int, rank: int) -> tuple[str, str]:
    return f"extension_task_count_{bi}_{rank}", f"extension_active_ranks_{bi}_{rank}"


def _set(b: Backend, peer: int, event: PeerEvent) -> Activity:
    conn = b.peers[peer]
    new = transition(conn.state, event)
    if new is not conn.state:
        yield mark("peer_state", peer=peer, state=new.value, event=event.name)
    conn.state = new


def _connect(b: Backend, peer: int) -> Activity:
    b.peer_connected[peer] = True
    b.process.global_connected[peer] = True
    b.connected_count += 1
    yield mark("peer_connected", peer=peer, count=b.connected_count)


def poll_peer(b: Backend, peer: int, now: float) -> Activity:
    """One visit of the poller to one peer (``ConnectionContext::pollPeer``)."""
    conn = b.peers[peer]
    me = b.env.rank
    engine = b.process.engine
    policy = b.env.policy
    if conn.state is S.WAITING_STORE:
        if now - conn.last_check_s < conn.backoff_s:
            return
        conn.last_check_s = now
        keys = (buffer_key(b.index, peer), server_name_key(b.index, peer))
        present = yield fx.StoreCheck(keys)
        if not present:
            conn.backoff_s = min(conn.backoff_s * 2, BACKOFF_CAP_S)
            yield from _set(b, peer, E.KEYS_MISSING)
            return
        buf = yield fx.StoreGet(keys[0])
        name = yield fx.StoreGet(keys[1])
        if buf is None or len(buf) < SEGMENT_INFO_BYTES or name is None:
            yield mark("log", level="warning", text=f"Rank {me} got invalid buffer data from {peer}")
            conn.backoff_s = min(conn.backoff_s * 2, BACKOFF_CAP_S)
            yield from _set(b, peer, E.KEYS_MISSING)
            return
        sname = name.decode()
        seg = yield from engine.open_segment(sname)
        if seg is None and policy.validate_segment_id:
            engine.close_segment(sname)
            conn.backoff_s = min(conn.backoff_s * 2, BACKOFF_CAP_S)
            yield mark("log", level="warning", text=f"Rank {me} cannot open segment {sname} of rank {peer}")
            yield from _set(b, peer, E.OPEN_FAILED)
            return
        # legacy: the id is stored without checking for -1
        from .backend import SegmentInfo

        b.segment_infos[peer] = SegmentInfo.unpack(buf)
        b.segments[peer] = seg
        conn.segment_name = sname
        conn.backoff_s = BACKOFF_START_S
        if b.skip_warmup:
            yield from _set(b, peer, E.SKIP_WARMUP)
            yield from _connect(b, peer)
            return
        if peer <= me or policy.bidirectional_warmup:
            info = b.segment_infos[peer]
            assert info is not None
            req = Request(seg, peer, info.warmup_recv + me * 4, b.regions["warmup_send"], 0, 4)
            conn.warmup_batch = yield from engine.submit([req])
            conn.own_write_done = False
            conn.flag_seen = peer <= me and not policy.bidirectional_warmup
            yield mark("warmup_submitted", peer=peer)
            yield from _set(b, peer, E.OPENED_LOWER)
        else:
            yield from _set(b, peer, E.OPENED_HIGHER)
        return
    if conn.state is S.WAITING_WARMUP_TRANSFER:
        assert conn.warmup_batch is not None
        if not conn.own_write_done:
            (st,) = yield from engine.poll(conn.warmup_batch)
            if st.startswith("failed"):
                yield from engine.free(conn.warmup_batch)
                conn.warmup_batch = None
                if conn.segment_name:
                    engine.close_segment(conn.segment_name)
                yield from _set(b, peer, E.WARMUP_FAILED)
                return
            if st != "completed":
                yield from _set(b, peer, E.WARMUP_PENDING)
                return
            conn.own_write_done = True
            engine.warmed.add(peer)
            yield from engine.free(conn.warmup_batch)
        if not conn.flag_seen:
            flag = yield fx.ReadMem(b.regions["warmup_recv"].rid, peer * 4, 4)
            conn.flag_seen = flag != b"\0\0\0\0"
            if not conn.flag_seen:
                yield from _set(b, peer, E.WARMUP_PENDING)
                return
        conn.warmup_batch = None
        yield from _set(b, peer, E.WARMUP_DONE)
        yield from _connect(b, peer)
        return
    if conn.state is S.WAITING_PEER_WARMUP:
        flag = yield fx.ReadMem(b.regions["warmup_recv"].rid, peer * 4, 4)
        if flag == b"\0\0\0\0":
            yield from _set(b, peer, E.PEER_FLAG_UNSET)
            return
        yield from _set(b, peer, E.PEER_FLAG_SEEN)
        yield from _connect(b, peer)
        return
    if conn.state is S.CONNECTED and peer != me:
        if b.peer_connected[peer] and b.process.global_connected[peer]:
            return
        yield from teardown(b, peer)


def teardown(b: Backend, peer: int) -> Activity:
    """A connected peer was marked broken: forget it and wait for a new incarnation."""
    b.peer_connected[peer] = False
    b.process.global_connected[peer] = False
    b.active[peer] = False
    for key in (buffer_key(b.index, peer), server_name_key(b.index, peer), *extension_keys(b.index, peer)):
        yield fx.StoreDelete(key)
    yield fx.WriteMem(b.regions["warmup_recv"].rid, peer * 4, b"\0\0\0\0")
    if b.p2p is not None:
        yield from b.p2p.reset_peer(peer)
    conn = b.peers[peer]
    if conn.segment_name:
        b.process.engine.close_segment(conn.segment_name)
    b.connected_count -= 1
    yield mark("peer_torn_down", peer=peer, count=b.connected_count)
    yield from _set(b, peer, E.BROKEN)


def poller(process: object) -> Activity:
    """The poller thread: walk every registered backend and every peer; sleep between passes."""
    from .backend import ProcessState

    assert isinstance(process, ProcessState)
    while True:
        now = yield fx.Now()
        connecting = False
        for b in list(process.backends):
            for peer in range(b.env.size):
                if peer == b.env.rank:
                    continue
                conn = b.peers[peer]
                if conn.state is PeerState.WAITING_STORE and now - conn.last_check_s < conn.backoff_s:
                    connecting = True  # poll_peer would return at once (back-off not elapsed)
                    continue
                if conn.state is PeerState.CONNECTED and b.peer_connected[peer] and b.process.global_connected[peer]:
                    continue  # poll_peer would return at once (a healthy connection)
                yield from poll_peer(b, peer, now)
                if b.peers[peer].state is not PeerState.CONNECTED:
                    connecting = True
        if process.stopping:
            return
        yield fx.Sleep(IDLE_CONNECTING_S if connecting else IDLE_CONNECTED_S)
