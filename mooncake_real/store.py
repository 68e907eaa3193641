"""The job's key-value store: a TCPStore-like server on a pyzmq ROUTER socket, and its client.

Rules of this module:

* One server per job, run on its own thread (:meth:`StoreServer.start`) by the launcher, or by rank 0
  when launched by torchrun/SLURM. It binds 127.0.0.1 unless told otherwise.
* Wire format: the client (a DEALER) sends one frame, a JSON object
  ``{"tok": token, "id": n, "op": ..., ...}``; the server answers one frame
  ``{"id": n, "ok": true, ...}`` or ``{"id": n, "ok": false, "error": "..."}``. Values travel base64-encoded.
  A malformed request (wrong frame count, bad JSON, unknown op, wrong token) gets an error reply when it
  can be addressed, else it is dropped; the server keeps serving either way.
* ``wait`` never blocks the server loop: waiters are parked and answered when their keys appear or their
  deadline passes. The ``delay_store`` fault delays every request (or chosen ops) the same way: the request
  is parked until it is due, then applied.
* A client is used by one thread at a time (each activity thread gets its own, see driver.py). On a
  timeout it recreates its socket, so a late reply can never be taken for the answer to a later request.
"""

from __future__ import annotations

import base64
import heapq
import itertools
import json
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: Ops the server knows.
OPS = ("set", "get", "check", "delete", "add", "wait", "ping", "stats")

#: Store ports are drawn from this range when port 0 is asked for (the RPC servers use 15000-17000).
STORE_PORT_RANGE = (20000, 29999)


class StoreError(Exception):
    """The store answered with an error, or not at all."""


class StoreTimeout(StoreError):
    """No answer from the store within the call's timeout."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


@dataclass(order=True)
class _Parked:
    due: float
    seq: int
    ident: bytes = field(compare=False)
    req: dict[str, Any] = field(compare=False)
    kind: str = field(compare=False)  # "delayed" (not applied yet) | "wait" (applied, waiting for keys)


class StoreServer:
    """The key-value server. ``delay_s``: the ``delay_store`` fault, seconds added to every op, or a
    mapping op -> seconds."""

    def __init__(
        self,
        token: str,
        host: str = "127.0.0.1",
        port: int = 0,
        delay_s: float | Mapping[str, float] = 0.0,
        port_range: tuple[int, int] = STORE_PORT_RANGE,
    ) -> None:
        self.token = token
        self.host = host
        self._want_port = port
        self._port_range = port_range
        self.port = 0
        self.delay_s = delay_s
        self.data: dict[str, bytes] = {}
        self.stats: Counter[str] = Counter()
        self._parked: list[_Parked] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._lock = threading.Lock()  # guards data for in-process inspection (snapshot)

    # ------------------------------------------------------------------ lifecycle
    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> StoreServer:
        self._thread = threading.Thread(target=self._serve, name="store-server", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error
        if not self._ready.is_set():
            raise StoreError("store server did not start within 10 s")
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def snapshot(self) -> dict[str, bytes]:
        with self._lock:
            return dict(self.data)

    # ------------------------------------------------------------------ server loop
    def _serve(self) -> None:
        try:
            import zmq
        except ImportError as exc:  # reported by start() at once, not as a start-up timeout
            self._error = StoreError(f"real mode needs pyzmq: {exc}")
            self._ready.set()
            return

        ctx = zmq.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            if self._want_port:
                sock.bind(f"tcp://{self.host}:{self._want_port}")
                self.port = self._want_port
            else:
                lo, hi = self._port_range
                self.port = sock.bind_to_random_port(f"tcp://{self.host}", min_port=lo, max_port=hi, max_tries=200)
        except BaseException as exc:  # reported by start()
            self._error = StoreError(f"store server cannot bind {self.host}:{self._want_port}: {exc}")
            sock.close()
            ctx.term()
            self._ready.set()
            return
        self._ready.set()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                timeout_ms = 50.0
                if self._parked:
                    timeout_ms = max(0.0, min(timeout_ms, (self._parked[0].due - time.monotonic()) * 1000))
                events = dict(poller.poll(int(timeout_ms)))
                if sock in events:
                    for _ in range(1000):  # drain what is there, then look at parked requests
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._on_frames(sock, frames)
                self._run_due(sock)
        finally:
            sock.close()
            ctx.term()

    def _send(self, sock: Any, ident: bytes, reply: dict[str, Any]) -> None:
        import zmq

        try:
            sock.send_multipart([ident, json.dumps(reply).encode()], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the peer is gone; nothing to do

    def _on_frames(self, sock: Any, frames: list[bytes]) -> None:
        if len(frames) != 2:
            self.stats["malformed"] += 1
            if len(frames) >= 1:
                self._send(sock, frames[0], {"id": None, "ok": False, "error": "malformed: expected one frame"})
            return
        ident, body = frames
        try:
            req = json.loads(body)
            if not isinstance(req, dict):
                raise ValueError("not an object")
        except (ValueError, UnicodeDecodeError):
            self.stats["malformed"] += 1
            self._send(sock, ident, {"id": None, "ok": False, "error": "malformed: bad JSON"})
            return
        rid = req.get("id")
        if req.get("tok") != self.token:
            self.stats["bad-token"] += 1
            self._send(sock, ident, {"id": rid, "ok": False, "error": "refused: wrong token"})
            return
        op = req.get("op")
        if op not in OPS:
            self.stats["unknown-op"] += 1
            self._send(sock, ident, {"id": rid, "ok": False, "error": f"unknown op {op!r}"})
            return
        delay = self._delay_for(str(op))
        if delay > 0:
            heapq.heappush(self._parked, _Parked(time.monotonic() + delay, next(self._seq), ident, req, "delayed"))
            return
        self._apply(sock, ident, req)

    def _delay_for(self, op: str) -> float:
        if isinstance(self.delay_s, Mapping):
            return float(self.delay_s.get(op, 0.0))
        return float(self.delay_s)

    def _apply(self, sock: Any, ident: bytes, req: dict[str, Any]) -> None:
        op = req["op"]
        rid = req.get("id")
        self.stats[op] += 1
        try:
            if op == "wait":
                keys = [str(k) for k in req["keys"]]
                if all(k in self.data for k in keys):
                    self._send(sock, ident, {"id": rid, "ok": True, "value": True})
                else:
                    due = time.monotonic() + max(0.0, float(req.get("timeout", 0.0)))
                    heapq.heappush(self._parked, _Parked(due, next(self._seq), ident, req, "wait"))
                return
            reply: dict[str, Any] = {"id": rid, "ok": True}
            changed = False
            with self._lock:
                if op == "set":
                    self.data[str(req["key"])] = _unb64(req["value"])
                    changed = True
                elif op == "get":
                    v = self.data.get(str(req["key"]))
                    reply["value"] = None if v is None else _b64(v)
                elif op == "check":
                    reply["value"] = all(str(k) in self.data for k in req["keys"])
                elif op == "delete":
                    reply["value"] = self.data.pop(str(req["key"]), None) is not None
                elif op == "add":
                    key = str(req["key"])
                    cur = int(self.data.get(key, b"0").decode() or "0")
                    new = cur + int(req["delta"])
                    self.data[key] = str(new).encode()
                    reply["value"] = new
                    changed = True
                elif op == "ping":
                    reply["value"] = "pong"
                elif op == "stats":
                    reply["value"] = dict(self.stats)
        except (KeyError, TypeError, ValueError) as exc:
            self.stats["malformed"] += 1
            self._send(sock, ident, {"id": rid, "ok": False, "error": f"malformed {op} request: {exc!r}"})
            return
        self._send(sock, ident, reply)
        if changed:
            self._wake_waiters(sock)

    def _wake_waiters(self, sock: Any) -> None:
        keep = []
        for p in self._parked:
            if p.kind == "wait" and all(str(k) in self.data for k in p.req["keys"]):
                self._send(sock, p.ident, {"id": p.req.get("id"), "ok": True, "value": True})
            else:
                keep.append(p)
        if len(keep) != len(self._parked):
            heapq.heapify(keep)
            self._parked = keep

    def _run_due(self, sock: Any) -> None:
        now = time.monotonic()
        while self._parked and self._parked[0].due <= now:
            p = heapq.heappop(self._parked)
            if p.kind == "delayed":
                self._apply(sock, p.ident, p.req)
            else:  # a wait whose deadline passed
                ok = all(str(k) in self.data for k in p.req["keys"])
                self._send(sock, p.ident, {"id": p.req.get("id"), "ok": True, "value": ok})


class StoreClient:
    """One thread's connection to the store. Every call takes ``timeout_s`` (default: the client's)."""

    def __init__(self, address: str, token: str, timeout_s: float = 10.0) -> None:
        self.address = address
        self.token = token
        self.timeout_s = timeout_s
        self._ids = itertools.count(1)
        self._ctx: Any = None
        self._sock: Any = None
        self.stats: Counter[str] = Counter()

    def _socket(self) -> Any:
        import zmq

        if self._ctx is None:
            self._ctx = zmq.Context.instance()
        if self._sock is None:
            from .rpc import loopback_only

            host = self.address.rpartition(":")[0].strip("[]")
            if not loopback_only(host):  # safety: real mode talks to loopback only (see rpc.py)
                raise StoreError(f"store {self.address}: unreachable (real mode connects to loopback addresses only)")
            s = self._ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(f"tcp://{self.address}")
            self._sock = s
        return self._sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None

    def request(self, op: str, timeout_s: float | None = None, **fields: Any) -> Any:
        """Send one request and return the reply's ``value``; raises StoreError / StoreTimeout."""
        import zmq

        timeout = self.timeout_s if timeout_s is None else timeout_s
        rid = next(self._ids)
        sock = self._socket()
        self.stats[op] += 1
        sock.send(json.dumps({"tok": self.token, "id": rid, "op": op, **fields}).encode())
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sock.poll(max(1, int(left * 1000)), zmq.POLLIN):
                self.close()  # a late reply must not answer a later request
                raise StoreTimeout(f"store {self.address}: no answer to {op} within {timeout:g} s")
            try:
                reply = json.loads(sock.recv())
            except ValueError:
                raise StoreError(f"store {self.address}: bad reply to {op}") from None
            if reply.get("id") not in (rid, None):
                continue  # stale reply of an earlier request
            if not reply.get("ok"):
                raise StoreError(f"store {self.address}: {reply.get('error')}")
            return reply.get("value")

    # ------------------------------------------------------------------ one method per op
    def set(self, key: str, value: bytes, timeout_s: float | None = None) -> None:
        self.request("set", timeout_s, key=key, value=_b64(value))

    def get(self, key: str, timeout_s: float | None = None) -> bytes | None:
        v = self.request("get", timeout_s, key=key)
        return None if v is None else _unb64(v)

    def check(self, keys: Sequence[str], timeout_s: float | None = None) -> bool:
        return bool(self.request("check", timeout_s, keys=list(keys)))

    def delete(self, key: str, timeout_s: float | None = None) -> bool:
        return bool(self.request("delete", timeout_s, key=key))

    def add(self, key: str, delta: int, timeout_s: float | None = None) -> int:
        return int(self.request("add", timeout_s, key=key, delta=int(delta)))

    def wait(self, keys: Sequence[str], timeout_s: float) -> bool:
        """Whether all ``keys`` exist within ``timeout_s`` (the server parks the request)."""
        return bool(self.request("wait", timeout_s + max(2.0, self.timeout_s), keys=list(keys), timeout=timeout_s))

    def ping(self, timeout_s: float | None = None) -> bool:
        return self.request("ping", timeout_s) == "pong"

    def server_stats(self, timeout_s: float | None = None) -> dict[str, int]:
        return dict(self.request("stats", timeout_s))
