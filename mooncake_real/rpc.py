"""Each rank's RPC server on a real TCP port, and the client that calls peers by "host:port".

Rules of this module:

* :meth:`RpcServer.bind` does a real bind of a zmq ROUTER socket on ``tcp://<host>:<port>`` and keeps it
  (bind-and-keep, as the protocol asks). A port someone else listens on gives ``EADDRINUSE`` exactly as
  the OS says; zmq sets SO_REUSEADDR, which on Linux still fails against a LISTENING socket.
* :meth:`RpcServer.serve` starts one server thread (TENT has one) that dispatches ``(method, payload)`` to
  the protocol's handler. Methods starting with ``__`` are the driver's own (data path: ``__write__``,
  ``__ipc__``, ``__region__``); they are answered even before the protocol serves, exactly when a socket is
  bound and served, never otherwise.
* Wire format: request ``[req_id, method, payload]`` from a DEALER; reply ``[req_id, b"ok"|b"err", payload]``.
* Safety: real mode talks to loopback addresses only. :func:`loopback_only` accepts ``localhost`` and
  127.0.0.0/8 (no name lookup is ever made); any other target is answered ``unreachable`` at once, before
  a socket exists, so no packet leaves the machine. The store client applies the same rule.
  ``MOONCAKE_REAL_ALLOW_REMOTE=1`` lifts it, for several hosts under torchrun/SLURM only.
* Faults of the owning rank (scenario ``slow_peer`` / ``close_port``): ``delay_s`` answers protocol methods
  that much later (the server thread keeps serving others meanwhile, replies are queued by due time);
  ``closed`` takes protocol requests and never answers them (callers time out). The driver's own ``__``
  methods (the data path) are not affected, as in the simulator, where WRITEs do not travel over RPC.
* :class:`RpcClient` caches one DEALER per (thread, target). A new connection is preceded by a plain TCP
  connect probe, so a port with no listener answers ``refused`` at once (zmq alone would retry silently).
  On a timeout the connection is dropped, so a late reply never answers a later call.
"""

from __future__ import annotations

# socket.getaddrinfo (the port probe's create_connection) encodes a str host with the "idna" codec, whose first
# use imports encodings.idna, stringprep and unicodedata: 2 ms alone and 3-6 ms inside a loaded job, once per
# process, which landed on a rank's first RPC (the poller's first GetSegmentDesc took 5-6 ms where its later
# first calls to other servers took 2 ms). Imported here, with the driver, it is process start-up.
import encodings.idna  # noqa: F401
import errno
import heapq
import ipaddress
import itertools
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from mooncake_protocol.effects import BindResult, RpcReply

Handler = Callable[[str, bytes], bytes]


ALLOW_REMOTE_ENV = "MOONCAKE_REAL_ALLOW_REMOTE"


def is_loopback(host: str) -> bool:
    """``localhost`` or a literal IPv4 address in 127.0.0.0/8 (names are never resolved)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        addr = ipaddress.ip_address(host.strip())
    except ValueError:
        return False
    return isinstance(addr, ipaddress.IPv4Address) and addr in ipaddress.IPv4Network("127.0.0.0/8")


def loopback_only(host: str) -> bool:
    """May real mode connect to ``host``? Loopback only, unless $MOONCAKE_REAL_ALLOW_REMOTE is 1."""
    return is_loopback(host) or os.environ.get(ALLOW_REMOTE_ENV) == "1"


def split_target(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"RPC target {target!r} is not host:port")
    return host, int(port)


class RpcServer:
    """One rank's RPC server. ``builtins``: driver methods (name -> fn(payload) -> bytes)."""

    def __init__(self, host: str = "127.0.0.1", builtins: Mapping[str, Callable[[bytes], bytes]] | None = None,
                 delay_s: float = 0.0, closed: bool = False) -> None:
        self.host = host
        self.delay_s = max(0.0, float(delay_s))
        self.closed = closed
        self.builtins = dict(builtins or {})
        self._sockets: dict[int, Any] = {}
        self._threads: dict[int, threading.Thread] = {}
        self._stop = threading.Event()
        self.stats: Counter[str] = Counter()
        self._ctx: Any = None
        #: held while a request is handled and its reply sent: :meth:`quiesce` takes it for good
        self._answering = threading.Lock()

    def _context(self) -> Any:
        import zmq

        if self._ctx is None:
            self._ctx = zmq.Context.instance()
        return self._ctx

    @property
    def served_ports(self) -> tuple[int, ...]:
        return tuple(self._threads)

    def bind(self, port: int) -> BindResult:
        import zmq

        if port in self._sockets:
            return BindResult(True)
        sock = self._context().socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.bind(f"tcp://{self.host}:{port}")
        except zmq.ZMQError as exc:
            sock.close(0)
            name = errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno else str(exc)
            return BindResult(False, name)
        self._sockets[port] = sock
        return BindResult(True)

    def serve(self, port: int, handler: Handler | None) -> bool:
        """Start serving ``port`` (returns False, serving nothing, when that port is not bound)."""
        sock = self._sockets.get(port)
        if sock is None:
            return False
        if port in self._threads:
            return True
        t = threading.Thread(target=self._loop, args=(sock, handler), name=f"rpc-server-{port}", daemon=True)
        self._threads[port] = t
        t.start()
        return True

    def close(self) -> None:
        self._stop.set()
        for t in self._threads.values():
            t.join(2)
        for port, sock in list(self._sockets.items()):
            if port not in self._threads or not self._threads[port].is_alive():
                sock.close(0)
        self._sockets.clear()

    def _dispatch(self, handler: Handler | None, method: str, payload: bytes) -> bytes:
        fn = self.builtins.get(method)
        if fn is not None:
            return fn(payload)
        if handler is None or method.startswith("__"):
            raise LookupError(f"no RPC method {method!r}")
        return handler(method, payload)

    def _answer(self, sock: Any, handler: Handler | None, ident: bytes, req_id: bytes, method: str,
                payload: bytes) -> None:
        import zmq

        with self._answering:
            try:
                out, status = self._dispatch(handler, method, payload), b"ok"
            except Exception as exc:  # a handler error is the caller's bad reply, not our crash
                out, status = f"{type(exc).__name__}: {exc}".encode(), b"err"
            try:
                sock.send_multipart([ident, req_id, status, out], zmq.NOBLOCK)
            except zmq.ZMQError:
                pass

    def quiesce(self, flush_s: float = 0.01) -> None:
        """Before the process kills itself (fault ``kill_rank``): let a request being handled finish and send
        its reply, answer no other, and give pyzmq's I/O thread ``flush_s`` to put the replies on the wire.
        A WRITE whose data already landed here then gets its acknowledgement, as from a C++ server that
        replies as it writes; without this a rank killed right after a barrier could leave a peer's flag
        WRITE unacknowledged (the Python server thread preempted between the two), and that peer would mark
        it broken inside the barrier, which the simulator (acknowledging at landing) never does."""
        self._answering.acquire()
        time.sleep(flush_s)

    def _loop(self, sock: Any, handler: Handler | None) -> None:
        import zmq

        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        later: list[tuple[float, int, bytes, bytes, str, bytes]] = []  # slow_peer: (due, seq, request...)
        seq = itertools.count()
        try:
            while not self._stop.is_set():
                while later and later[0][0] <= time.monotonic():
                    _, _, ident, req_id, method, payload = heapq.heappop(later)
                    self._answer(sock, handler, ident, req_id, method, payload)
                wait_ms = 50 if not later else max(0, min(50, int((later[0][0] - time.monotonic()) * 1000) + 1))
                if not poller.poll(wait_ms):
                    continue
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    continue
                if len(frames) != 4:
                    self.stats["malformed"] += 1
                    continue
                ident, req_id, method_b, payload = frames
                try:
                    method = method_b.decode("ascii")
                except UnicodeDecodeError:
                    self.stats["malformed"] += 1
                    continue
                self.stats[method] += 1
                if not method.startswith("__"):
                    if self.closed:
                        self.stats["dropped"] += 1
                        continue
                    if self.delay_s > 0:
                        heapq.heappush(later, (time.monotonic() + self.delay_s, next(seq), ident, req_id, method, payload))
                        continue
                self._answer(sock, handler, ident, req_id, method, payload)
        finally:
            sock.close(0)


#: How often a call waiting for its reply checks that the peer's port is still open.
DEAD_PEER_CHECK_S = 0.1


class RpcClient:
    """Calls peers. Connections are cached per thread and target."""

    def __init__(self, probe_timeout_s: float = 1.0) -> None:
        self._local = threading.local()
        self._ids = itertools.count(1)
        self._ids_lock = threading.Lock()
        self.probe_timeout_s = probe_timeout_s
        self.stats: Counter[str] = Counter()
        self._all: list[Any] = []
        self._all_lock = threading.Lock()

    def _conns(self) -> dict[str, Any]:
        conns = getattr(self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = {}
        return conns

    def connected(self, target: str) -> bool:
        """Whether the calling thread holds an open connection to ``target`` (its next call makes none)."""
        return target in self._conns()

    def _drop(self, target: str) -> None:
        sock = self._conns().pop(target, None)
        if sock is not None:
            with self._all_lock:
                if sock in self._all:
                    self._all.remove(sock)
            sock.close(0)

    def close(self) -> None:
        """Close every connection of every thread (at rank exit)."""
        with self._all_lock:
            socks, self._all = self._all, []
        for s in socks:
            try:
                s.close(0)
            except Exception:
                pass

    def _probe(self, host: str, port: int, timeout_s: float) -> str | None:
        if not loopback_only(host):
            return "unreachable"
        try:
            with socket.create_connection((host, port), timeout=min(timeout_s, self.probe_timeout_s)):
                return None
        except ConnectionRefusedError:
            return "refused"
        except TimeoutError:
            return "timeout" if timeout_s <= self.probe_timeout_s else "unreachable"
        except OSError:
            return "unreachable"

    def _wait(self, sock: Any, event: int, deadline: float, host: str, port: int) -> str | None:
        """Wait until ``sock`` is ready for ``event``: None, or "timeout" at the deadline, or "refused" as soon
        as the peer's port is closed. It waits in slices of :data:`DEAD_PEER_CHECK_S` and probes the port
        after each: a peer that died after taking a request never answers, and one that died while zmq was
        connecting never lets a message out; its closed port says so at once (the simulator answers such a
        call "refused" too)."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return "timeout"
            if sock.poll(max(1, int(min(left, DEAD_PEER_CHECK_S) * 1000)), event):
                return None
            if self._probe(host, port, DEAD_PEER_CHECK_S) == "refused":
                return "refused"

    def call(self, target: str, method: str, payload: bytes, timeout_s: float) -> RpcReply:
        import zmq

        try:
            host, port = split_target(target)
        except ValueError:
            return RpcReply(False, b"", "unreachable")
        if not loopback_only(host):  # safety: nothing leaves this machine (see the module docstring)
            self.stats["unreachable"] += 1
            self.stats["refused-remote"] += 1
            return RpcReply(False, b"", "unreachable")
        conns = self._conns()
        sock = conns.get(target)
        fresh = sock is None
        deadline = time.monotonic() + timeout_s
        if sock is None:
            err = self._probe(host, port, timeout_s)
            if err is not None:
                self.stats[err] += 1
                return RpcReply(False, b"", err)
            sock = zmq.Context.instance().socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            # queue only on a live connection: a peer that died (its port closed) makes the send fail at once
            sock.setsockopt(zmq.IMMEDIATE, 1)
            sock.connect(f"tcp://{host}:{port}")
            conns[target] = sock
            with self._all_lock:
                self._all.append(sock)
        with self._ids_lock:
            req_id = str(next(self._ids)).encode()
        frames_out = [req_id, method.encode("ascii"), payload]
        try:
            sock.send_multipart(frames_out, zmq.NOBLOCK)
        except zmq.Again:
            if not fresh:  # the cached connection is gone (the peer closed it): start over, probe first
                self._drop(target)
                return self.call(target, method, payload, max(0.0, deadline - time.monotonic()))
            # the connection is not up yet; a peer that dies between the probe and the connect never brings it up
            err = self._wait(sock, zmq.POLLOUT, deadline, host, port)
            if err is not None:
                self._drop(target)
                self.stats[err] += 1
                return RpcReply(False, b"", err)
            sock.send_multipart(frames_out, zmq.NOBLOCK)
        while True:
            err = self._wait(sock, zmq.POLLIN, deadline, host, port)
            if err is not None:
                self._drop(target)
                self.stats[err] += 1
                return RpcReply(False, b"", err)
            frames = sock.recv_multipart()
            if len(frames) != 3:
                self._drop(target)
                return RpcReply(False, b"", "bad-reply")
            rid, status, out = frames
            if rid != req_id:
                continue  # a late reply to an earlier call of this thread
            if status != b"ok":
                self.stats["bad-reply"] += 1
                return RpcReply(False, out, "bad-reply")
            self.stats["ok"] += 1
            return RpcReply(True, out, None)
