"""Host regions in POSIX shared memory, the registry file, registration facts, garbage."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys

import pytest

from mooncake_protocol import effects as fx
from mooncake_protocol.memory import region_addr
from mooncake_real.memory import (
    PeerSegments,
    RegionTable,
    garbage,
    register_result,
    registry_path,
    shm_segments_of_job,
    sweep_shm,
)


@pytest.fixture
def job(tmp_path):
    job_id = secrets.token_hex(4)
    yield job_id, tmp_path
    sweep_shm(job_id)


def test_garbage_rule():
    g = garbage(3, 600)
    assert g[:3] == bytes([(3 * 131) % 251 + 1, (3 * 131 + 1) % 251 + 1, (3 * 131 + 2) % 251 + 1])
    assert all(b != 0 for b in g)
    assert g[251:254] == g[0:3]
    assert garbage(3, 10) == garbage(3, 10)


def test_allocate_zero_and_garbage_and_registry(job):
    job_id, d = job
    t = RegionTable(job_id, d, 2)
    a = t.allocate(fx.Allocate("a", "host", 4096, region_addr(2, 1), None, True))
    b = t.allocate(fx.Allocate("b", "pinned", 256, region_addr(2, 2), None, False))
    assert (a.rid, b.rid) == (1, 2)
    assert t.read(1, 0, 16) == b"\0" * 16
    assert t.read(2, 0, 256) == garbage(2, 256)
    assert shm_segments_of_job(job_id) == [f"mc{job_id}_2_1", f"mc{job_id}_2_2"]
    reg = json.loads(registry_path(d, 2).read_text())["regions"]
    assert reg["1"]["registered"] is False
    res = t.register(a, "*", want_ipc=True, want_fabric=True)
    assert (res.ipc_handle, res.fabric_handle) == (False, False)  # host memory: no IPC export, no fabric here
    reg = json.loads(registry_path(d, 2).read_text())["regions"]
    assert reg["1"] == {**reg["1"], "registered": True, "label": "*", "ipc": False, "kind": "host", "shm": f"mc{job_id}_2_1"}
    t.close()
    assert shm_segments_of_job(job_id) == []


def test_device_region_needs_gpu_on_cpu_backend(job):
    job_id, d = job
    t = RegionTable(job_id, d, 0)
    with pytest.raises(RuntimeError, match="GPU"):
        t.allocate(fx.Allocate("dev", "device", 64, region_addr(0, 1), 0, True))
    t.close()


def test_register_result_rule():
    assert register_result("device", True, True, True) == fx.RegisterResult(True, False, None)
    assert register_result("pinned", True, False, True).ipc_handle is False
    assert register_result("device", False, False, True).ipc_handle is False


def test_bounds_and_write_at_addr(job):
    job_id, d = job
    t = RegionTable(job_id, d, 1)
    r = t.allocate(fx.Allocate("a", "host", 64, region_addr(1, 3), None, True))
    with pytest.raises(IndexError):
        t.read(3, 60, 8)
    assert t.write_at_addr(region_addr(1, 3) + 8, b"x") == "address-not-found"  # not registered yet
    t.register(r, "*", False, False)
    assert t.write_at_addr(region_addr(1, 3) + 8, b"xy") is None
    assert t.read(3, 8, 2) == b"xy"
    assert t.write_at_addr(region_addr(0, 3), b"x") == "address-not-found"  # another owner's address
    assert t.write_at_addr(region_addr(1, 4), b"x") == "address-not-found"  # no such region
    assert t.write_at_addr(region_addr(1, 3) + 63, b"xy") == "address-not-found"  # past the end
    t.close()


def test_peer_process_writes_visible_to_owner(job):
    job_id, d = job
    t = RegionTable(job_id, d, 0)
    t.allocate(fx.Allocate("a", "host", 4096, region_addr(0, 1), None, True))
    name = f"mc{job_id}_0_1"
    code = (
        "from mooncake_real.memory import PeerSegments\n"
        f"p = PeerSegments(); p.get({name!r}).write(100, b'from-peer'); p.close()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
    assert t.read(1, 100, 9) == b"from-peer"
    t.close()
    assert shm_segments_of_job(job_id) == []  # the peer's open did not keep or recreate it


def test_peer_segments_cache(job):
    job_id, d = job
    t = RegionTable(job_id, d, 0)
    t.allocate(fx.Allocate("a", "host", 64, region_addr(0, 1), None, True))
    p = PeerSegments()
    s1 = p.get(f"mc{job_id}_0_1")
    assert p.get(f"mc{job_id}_0_1") is s1
    assert s1.size == 64
    p.close()
    t.close()


def test_sweep(job):
    job_id, d = job
    t = RegionTable(job_id, d, 0)
    t.allocate(fx.Allocate("a", "host", 64, region_addr(0, 1), None, True))
    assert sweep_shm(job_id) == [f"mc{job_id}_0_1"]
    assert shm_segments_of_job(job_id) == []
    t.close()  # unlinking again is harmless
