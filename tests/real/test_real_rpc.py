"""RPC servers on real ports: EADDRINUSE, refused, timeouts, dispatch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("zmq")

from real_helpers import free_port  # noqa: E402

from mooncake_real.rpc import RpcClient, RpcServer  # noqa: E402


def echo(method: str, payload: bytes) -> bytes:
    if method == "echo":
        return b"echo:" + payload
    raise LookupError(method)


def test_second_bind_of_same_port_gets_eaddrinuse():
    port = free_port()
    a, b = RpcServer(), RpcServer()
    try:
        assert a.bind(port).ok
        res = b.bind(port)
        assert (res.ok, res.error) == (False, "EADDRINUSE")
    finally:
        a.close()
        b.close()


def test_blocker_socket_makes_bind_fail():
    port = free_port()
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind(("127.0.0.1", port))
    blocker.listen(1)
    s = RpcServer()
    try:
        res = s.bind(port)
        assert (res.ok, res.error) == (False, "EADDRINUSE")
    finally:
        s.close()
        blocker.close()


def test_call_and_builtins_and_errors():
    port = free_port()
    s = RpcServer(builtins={"__ping__": lambda p: b"pong" + p})
    assert s.bind(port).ok
    s.serve(port, echo)
    c = RpcClient()
    try:
        r = c.call(f"127.0.0.1:{port}", "echo", b"hi", 2.0)
        assert (r.ok, r.payload, r.error) == (True, b"echo:hi", None)
        assert c.call(f"127.0.0.1:{port}", "__ping__", b"!", 2.0).payload == b"pong!"
        bad = c.call(f"127.0.0.1:{port}", "nope", b"", 2.0)
        assert (bad.ok, bad.error) == (False, "bad-reply")
        assert b"LookupError" in bad.payload
        # the server survived the handler error
        assert c.call(f"127.0.0.1:{port}", "echo", b"again", 2.0).ok
    finally:
        c.close()
        s.close()


def test_call_to_port_without_server_is_refused_quickly():
    port = free_port()
    c = RpcClient()
    t = time.monotonic()
    r = c.call(f"127.0.0.1:{port}", "echo", b"", 5.0)
    assert (r.ok, r.error) == (False, "refused")
    assert time.monotonic() - t < 0.5


def test_peer_dying_between_probe_and_connect_is_refused_not_timed_out(monkeypatch):
    """The race of real-cpu-kill-rank under load: the connect probe still found the peer's port open, then the
    peer died before zmq's own connection came up. The send waits for the connection in slices and re-probes,
    so the call ends "refused" at once instead of after the whole timeout (which outlived the stall window)."""
    port = free_port()  # nobody listens: zmq's connection never comes up
    c = RpcClient()
    real_probe = c._probe
    probes = []

    def probe_alive_first(host: str, p: int, timeout_s: float) -> str | None:
        probes.append(p)
        return None if len(probes) == 1 else real_probe(host, p, timeout_s)

    monkeypatch.setattr(c, "_probe", probe_alive_first)
    try:
        r = c.call(f"127.0.0.1:{port}", "echo", b"", 30.0)
        assert (r.ok, r.error) == (False, "refused")
        assert len(probes) >= 2 and c.stats["refused"] == 1
    finally:
        c.close()


SLOW_SERVER = """
import sys, time
from mooncake_real.rpc import RpcServer
s = RpcServer()
assert s.bind(int(sys.argv[1])).ok
s.serve(int(sys.argv[1]), lambda method, payload: time.sleep(60) or b"late")
print("ready", flush=True)
time.sleep(60)
"""


def test_peer_killed_after_taking_the_request_is_refused():
    port = free_port()
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SERVER, str(port)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                                p for p in (repo, os.environ.get("PYTHONPATH", "")) if p)))
    c = RpcClient()
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        killer = threading.Timer(0.5, proc.kill)
        killer.start()
        r = c.call(f"127.0.0.1:{port}", "slow", b"", 30.0)
        killer.join()
        assert (r.ok, r.error) == (False, "refused")
    finally:
        c.close()
        proc.kill()
        proc.wait()


def test_bound_but_not_served_times_out():
    port = free_port()
    s = RpcServer()
    assert s.bind(port).ok
    c = RpcClient()
    try:
        t = time.monotonic()
        r = c.call(f"127.0.0.1:{port}", "echo", b"", 0.3)
        assert (r.ok, r.error) == (False, "timeout")
        assert time.monotonic() - t < 1.0
    finally:
        c.close()
        s.close()


def test_non_zmq_listener_times_out():
    port = free_port()
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", port))
    blocker.listen(1)
    c = RpcClient()
    try:
        r = c.call(f"127.0.0.1:{port}", "echo", b"", 0.3)
        assert (r.ok, r.error) == (False, "timeout")
    finally:
        c.close()
        blocker.close()


def test_serve_on_unbound_port_serves_nothing():
    s = RpcServer()
    assert s.serve(free_port(), echo) is False


def test_bad_target():
    r = RpcClient().call("no-port-here", "echo", b"", 0.5)
    assert (r.ok, r.error) == (False, "unreachable")


def test_the_driver_loads_the_host_name_codec_at_import_not_at_a_ranks_first_call() -> None:
    """socket.getaddrinfo (the port probe) encodes a str host with the idna codec; its first use imports
    encodings.idna (2 ms alone, 3-6 ms in a loaded job), which had landed on each rank's first RPC. Importing
    the real driver's RPC module must load it, so a fresh process's first call does not."""
    code = ("import sys; import mooncake_real.rpc; "
            "print('encodings.idna' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "True"


def test_a_quiesced_server_finishes_the_reply_in_hand_and_answers_no_other():
    """RpcServer.quiesce (before a rank kills itself): a request already being handled gets its reply; a later
    one gets none (the caller times out, as with a dead process whose port is still open)."""
    import threading

    port = free_port()
    entered, release = threading.Event(), threading.Event()

    def slow(method: str, payload: bytes) -> bytes:
        entered.set()
        release.wait(5)
        return b"done:" + payload

    s = RpcServer()
    assert s.bind(port).ok
    s.serve(port, slow)
    c1, c2 = RpcClient(), RpcClient()
    got: list[object] = []
    try:
        t = threading.Thread(target=lambda: got.append(c1.call(f"127.0.0.1:{port}", "w", b"a", 5.0)))
        t.start()
        assert entered.wait(5)
        q = threading.Thread(target=s.quiesce, args=(0.05,))
        q.start()  # waits for the reply in hand
        release.set()
        q.join(5)
        t.join(5)
        assert got and got[0].ok and got[0].payload == b"done:a"
        late = c2.call(f"127.0.0.1:{port}", "w", b"b", 0.5)
        assert not late.ok and late.error == "timeout"
    finally:
        c1.close()
        c2.close()
        if s._answering.locked():  # a test's server lives on: let it answer and stop
            s._answering.release()
        s.close()
