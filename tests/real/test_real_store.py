"""The job's key-value store: ops, parked waits, refusals, delays, timeouts."""

from __future__ import annotations

import json
import threading
import time

import pytest

zmq = pytest.importorskip("zmq")

from mooncake_real.store import StoreClient, StoreError, StoreServer, StoreTimeout  # noqa: E402


@pytest.fixture
def server():
    s = StoreServer("tok").start()
    yield s
    s.stop()


def test_ops(server):
    c = StoreClient(server.address, "tok", timeout_s=5)
    assert c.get("a") is None
    c.set("a", b"\x00\xffbytes")
    assert c.get("a") == b"\x00\xffbytes"
    assert c.check(["a"]) is True
    assert c.check(["a", "b"]) is False
    assert c.add("n", 5) == 5
    assert c.add("n", -7) == -2
    assert c.get("n") == b"-2"
    assert c.delete("a") is True
    assert c.delete("a") is False
    assert c.check(["a"]) is False
    assert c.ping()
    stats = c.server_stats()
    assert stats["set"] == 1 and stats["add"] == 2 and stats["delete"] == 2
    c.close()


def test_wait_answers_at_deadline_without_blocking_the_server(server):
    waiter = StoreClient(server.address, "tok")
    other = StoreClient(server.address, "tok", timeout_s=2)
    t = time.monotonic()
    result = {}
    th = threading.Thread(target=lambda: result.setdefault("v", waiter.wait(["never"], 0.5)))
    th.start()
    time.sleep(0.1)
    # the server keeps serving other clients while the wait is parked
    t_op = time.monotonic()
    other.set("x", b"1")
    assert time.monotonic() - t_op < 0.3
    th.join(5)
    assert result["v"] is False
    assert 0.45 <= time.monotonic() - t < 2.0


def test_wait_answered_when_keys_appear(server):
    waiter = StoreClient(server.address, "tok")
    other = StoreClient(server.address, "tok")
    result = {}
    th = threading.Thread(target=lambda: result.setdefault("v", waiter.wait(["k1", "k2"], 10.0)))
    t = time.monotonic()
    th.start()
    time.sleep(0.1)
    other.set("k1", b"1")
    time.sleep(0.05)
    assert th.is_alive()  # one of two keys: still waiting
    other.add("k2", 1)
    th.join(5)
    assert result["v"] is True
    assert time.monotonic() - t < 2.0


def test_wrong_token_refused_and_server_still_alive(server):
    bad = StoreClient(server.address, "not-the-token", timeout_s=2)
    with pytest.raises(StoreError, match="wrong token"):
        bad.set("k", b"v")
    good = StoreClient(server.address, "tok", timeout_s=2)
    assert good.get("k") is None  # the bad set did not land
    good.set("k", b"v")
    assert good.get("k") == b"v"
    assert server.stats["bad-token"] == 1


def test_malformed_frames_refused_and_server_still_alive(server):
    ctx = zmq.Context.instance()
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.setsockopt(zmq.RCVTIMEO, 2000)
    raw.connect(f"tcp://{server.address}")
    cases = [
        [b"a", b"b"],  # two frames
        [b"{not json"],
        [b"[1, 2]"],  # JSON but not an object
        [json.dumps({"tok": "tok", "id": 1, "op": "frobnicate"}).encode()],
        [json.dumps({"tok": "tok", "id": 2, "op": "set"}).encode()],  # missing key/value
        [json.dumps({"tok": "tok", "id": 3, "op": "set", "key": "k", "value": "%%%"}).encode()],  # bad base64
        [json.dumps({"tok": "tok", "id": 4, "op": "add", "key": "k", "delta": "x"}).encode()],
        [b"\xff\xfe"],
    ]
    for frames in cases:
        raw.send_multipart(frames)
        reply = json.loads(raw.recv())
        assert reply["ok"] is False, frames
    raw.close()
    c = StoreClient(server.address, "tok", timeout_s=2)
    c.set("still", b"alive")
    assert c.get("still") == b"alive"
    assert server.stats["malformed"] + server.stats["unknown-op"] >= len(cases)


def test_delay_store_delays_every_op():
    s = StoreServer("tok", delay_s=0.2).start()
    try:
        c = StoreClient(s.address, "tok", timeout_s=5)
        t = time.monotonic()
        c.set("a", b"1")
        assert c.get("a") == b"1"
        assert time.monotonic() - t >= 0.4
    finally:
        s.stop()


def test_per_op_delay():
    s = StoreServer("tok", delay_s={"get": 0.3}).start()
    try:
        c = StoreClient(s.address, "tok", timeout_s=5)
        t = time.monotonic()
        c.set("a", b"1")
        assert time.monotonic() - t < 0.25
        c.get("a")
        assert time.monotonic() - t >= 0.3
    finally:
        s.stop()


def test_client_timeout_then_recovers():
    s = StoreServer("tok", delay_s={"get": 1.0}).start()
    try:
        c = StoreClient(s.address, "tok", timeout_s=0.2)
        t = time.monotonic()
        with pytest.raises(StoreTimeout):
            c.get("a")
        assert time.monotonic() - t < 0.6
        c.set("a", b"x")  # a fresh socket: the late get reply cannot answer this
        time.sleep(1.0)
        assert c.request("ping", 2.0) == "pong"
    finally:
        s.stop()


def test_no_server_times_out_quickly():
    c = StoreClient("127.0.0.1:1", "tok", timeout_s=0.2)
    t = time.monotonic()
    with pytest.raises(StoreTimeout):
        c.ping()
    assert time.monotonic() - t < 1.0
