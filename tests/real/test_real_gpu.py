"""CUDA in real mode: spin kernel, reduce kernels, IPC, the lazy-loading and legacy-stream hazards.

The reduce rule is also checked on the CPU (``reduce_host``) against an independent reference, so it runs
everywhere; everything else is marked ``gpu`` (skipped without CuPy and a device) and bounded in time: the
spin kernel times out by itself, and every host wait has a limit.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
from real_helpers import HERE, REPO, free_ports  # noqa: E402

from mooncake_real.gpu import (
    REDUCE_DTYPES,
    REDUCE_OPS,
    all_kernel_names,
    parse_reduce,
    reduce_host,
    reduce_kernel_name,
    reduce_source,
)

NRANKS, COUNT = 3, 1000
ACTIVE = (True, False, True)


def _bf16_round(f32: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, round to nearest even (reference, element by element)."""
    out = np.empty(f32.shape, dtype=np.uint16)
    for i, x in enumerate(f32.astype(np.float32)):
        u = int(np.float32(x).view(np.uint32))
        out[i] = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF
    return out


def _inputs(dtype: str, seed: int = 0) -> tuple[bytes, int, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    if dtype == "bfloat16":
        vals = [_bf16_round(rng.uniform(-4, 4, COUNT).astype(np.float32)) for _ in range(NRANKS)]
    elif dtype == "bool":
        vals = [rng.integers(0, 2, COUNT).astype(np.bool_) for _ in range(NRANKS)]
    elif dtype.startswith("float"):
        vals = [rng.uniform(-4, 4, COUNT).astype(dtype) for _ in range(NRANKS)]
    else:
        info = np.iinfo(dtype)
        lo, hi = max(info.min, -1000), min(info.max, 1000)
        vals = [rng.integers(lo, hi, COUNT, endpoint=True).astype(dtype) for _ in range(NRANKS)]
    item = vals[0].itemsize
    stride = COUNT * item + 64  # slices need not be packed
    buf = bytearray(stride * NRANKS)
    for r, v in enumerate(vals):
        buf[r * stride:r * stride + COUNT * item] = v.tobytes()
    return bytes(buf), stride, vals


def _reference(dtype: str, op: str, vals: list[np.ndarray]) -> np.ndarray:
    act = [v for v, a in zip(vals, ACTIVE, strict=True) if a]
    acc = act[0].copy()
    for v in act[1:]:
        if dtype == "bfloat16":
            a = (acc.astype(np.uint32) << 16).view(np.float32)
            b = (v.astype(np.uint32) << 16).view(np.float32)
            r = {"sum": a + b, "product": a * b, "min": np.minimum(a, b), "max": np.maximum(a, b)}[op]
            acc = _bf16_round(r)
        elif dtype == "bool":
            acc = (acc | v) if op in ("sum", "max") else (acc & v)
        else:
            with np.errstate(over="ignore"):
                acc = {"sum": acc + v, "product": acc * v, "min": np.minimum(acc, v), "max": np.maximum(acc, v)}[op]
            acc = acc.astype(dtype)
    return acc


ALL = [(d, o) for d in REDUCE_DTYPES for o in REDUCE_OPS]


def test_kernel_names_and_sources():
    names = all_kernel_names()
    assert len(names) == 1 + 9 * 4 and names[0] == "spin"
    for d, o in ALL:
        name = reduce_kernel_name(d, o)
        assert parse_reduce(name) == (d, o)
        assert f'void {name}(' in reduce_source(d, o)
    for bad in ("reduce_float16_sum", "reduce_int32_avg", "spin2"):
        with pytest.raises(ValueError):
            parse_reduce(bad)


@pytest.mark.parametrize("dtype, op", ALL)
def test_reduce_rule_on_cpu(dtype, op):
    src, stride, vals = _inputs(dtype)
    out = reduce_host(dtype, op, src, COUNT, NRANKS, stride, ACTIVE)
    want = _reference(dtype, op, vals)
    got = np.frombuffer(out, dtype=want.dtype)
    np.testing.assert_array_equal(got, want)


def test_reduce_with_no_active_rank_writes_nothing():
    src, stride, _ = _inputs("int32")
    assert reduce_host("int32", "sum", src, COUNT, NRANKS, stride, (False, False, False)) is None


# ---------------------------------------------------------------------------------- GPU


@pytest.fixture
def gpu_table():
    pytest.importorskip("cupy")
    from mooncake_real.gpu import GpuContext
    from mooncake_real.memory import RegionTable, sweep_shm

    ctx = GpuContext.open(0)
    if not ctx.available:
        pytest.skip("no CUDA device")
    job = secrets.token_hex(4)
    table = RegionTable(job, tempfile.mkdtemp(), 0, ctx)
    ctx.table = table
    yield ctx, table
    table.close()
    sweep_shm(job)


def _alloc(table, rid, kind, size, zero=True):
    from mooncake_protocol import effects as fx
    from mooncake_protocol.memory import region_addr

    return table.allocate(fx.Allocate(f"r{rid}", kind, size, region_addr(0, rid), 0 if kind == "device" else None, zero))


def _flag(table, rid, slot=0):
    return int.from_bytes(table.read(rid, slot * 64, 4), "little", signed=True)


@pytest.mark.gpu
@pytest.mark.timeout(60)
def test_spin_kernel_released_by_host_flag(gpu_table):
    ctx, table = gpu_table
    tab = _alloc(table, 1, "pinned", 4 * 64)
    task = bytes(range(1, 41))
    ctx.launch_spin("enqueue", table.ptr(tab.rid) + 2 * 64, tab.rid, 2, task, 20.0)
    end = time.monotonic() + 10
    while _flag(table, 1, 2) != 1 and time.monotonic() < end:
        time.sleep(0.001)
    assert _flag(table, 1, 2) == 1
    assert table.read(1, 2 * 64 + 8, 40) == task  # the kernel published the task before setting active
    assert ctx.stream_sync("enqueue", 0.2) is False  # still spinning
    assert len(ctx.resident_spins()) == 1
    table.write(1, 2 * 64, b"\0\0\0\0")
    ctx.note_host_write(1, 2 * 64, b"\0\0\0\0")
    assert ctx.stream_sync("enqueue", 5.0) is True
    assert _flag(table, 1, 2) == 0
    assert ctx.resident_spins() == []


@pytest.mark.gpu
@pytest.mark.timeout(60)
def test_spin_kernel_times_out_by_itself(gpu_table):
    ctx, table = gpu_table
    tab = _alloc(table, 1, "pinned", 64)
    t = time.monotonic()
    ctx.launch_spin("enqueue", table.ptr(tab.rid), tab.rid, 0, b"x", 0.3)
    assert ctx.stream_sync("enqueue", 10.0) is True
    assert 0.25 <= time.monotonic() - t < 10.0
    assert _flag(table, 1) == 3
    assert int.from_bytes(table.read(1, 4, 4), "little") == 1  # gave_up: the caller's check after the stream
    assert ctx.resident_spins() == []


@pytest.mark.gpu
@pytest.mark.timeout(120)
def test_every_reduce_kernel_against_numpy(gpu_table):
    ctx, table = gpu_table
    src_region = _alloc(table, 1, "device", 64 * 1024)
    dst_region = _alloc(table, 2, "device", 64 * 1024)
    for dtype, op in ALL:
        src, stride, vals = _inputs(dtype, seed=7)
        want = _reference(dtype, op, vals)
        table.write(1, 0, src)
        table.write(2, 0, b"\0" * (COUNT * want.itemsize))
        name = reduce_kernel_name(dtype, op)
        ctx.load_kernel(name)
        ctx.launch_reduce(name, "enqueue", table.ptr(1), table.ptr(2), COUNT, NRANKS, stride, ACTIVE)
        assert ctx.stream_sync("enqueue", 10.0)
        got = np.frombuffer(table.read(2, 0, COUNT * want.itemsize), dtype=want.dtype)
        np.testing.assert_array_equal(got, want, err_msg=name)
    assert src_region.kind == dst_region.kind == "device"


@pytest.mark.gpu
@pytest.mark.timeout(120)
def test_a_zeroed_region_is_zero_for_a_later_copy_on_a_non_blocking_stream_though_the_legacy_one_is_busy(gpu_table):
    """The protocol copies into a fresh region on a non-blocking stream (the fixed policy's ``enqueue``),
    which does not wait for the legacy stream; the region's zero fill must come before that copy, however
    busy the legacy stream is (here a spin kernel that times out after 0.5 s; in a job, other ranks'
    contexts sharing the GPU). A ``cudaMemset`` on the legacy stream returned at once and zeroed the region
    after the copy. (Its sibling, a small ``cudaMemcpy`` from pageable memory returning
    before its bytes land, showed only with four ranks sharing the GPU:
    ``test_gpu_parity_of_tensors_of_kilobytes_to_megabytes``.)"""
    ctx, table = gpu_table
    _alloc(table, 1, "pinned", 64)
    rng = np.random.default_rng(3)
    for size in (8, 20_000, 1 << 20):
        _alloc(table, 10, "device", size, zero=False)
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        table.write(10, 0, data)
        ctx.launch_spin("legacy", table.ptr(1), 1, 0, b"x", 0.5)
        _alloc(table, 11, "device", size)
        ctx.memcpy(table.ptr(11), table.ptr(10), size, "enqueue", sync=True)
        assert ctx.stream_sync("legacy", 10.0)
        got = table.read(11, 0, size)
        bad = next((i for i in range(size) if got[i] != data[i]), None)
        assert bad is None, f"{size} bytes: wrong from byte {bad} on ({'zero' if not any(got[bad:]) else 'other'})"
        for rid in (10, 11):
            table.entries.pop(rid).storage.free()


@pytest.mark.gpu
def test_host_regions_cannot_export_ipc(gpu_table):
    ctx, table = gpu_table
    h = _alloc(table, 1, "pinned", 4096)
    d = _alloc(table, 2, "device", 4096)
    assert table.register(h, "cuda:0", True, True).ipc_handle is False  # cudaErrorInvalidValue
    res = table.register(d, "cuda:0", True, True)
    assert (res.ipc_handle, res.fabric_handle) == (True, False)


@pytest.mark.gpu
@pytest.mark.timeout(120)
def test_ipc_copy_between_two_processes_on_one_gpu():
    pytest.importorskip("cupy")
    from mooncake_real.launcher import launch

    r = launch(2, entry="real_activities:ipc_write", pythonpath=[HERE], gpus=[0, 0], args={"ports": free_ports(2)},
               deadline_s=60)
    assert r.exit_codes == {0: 0, 1: 0}, r.logs
    assert r.results[1]["value"]["status"] == ["completed"]
    assert r.results[1]["value"]["host_ipc"] is False
    assert r.results[0]["value"] == {"ipc": True, "seen": True}


def _probe(*args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, HERE]))
    p = subprocess.run([sys.executable, os.path.join(HERE, "gpu_hazard_probe.py"), *args], env=env,
                       capture_output=True, text=True, timeout=90)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.gpu
@pytest.mark.timeout(120)
def test_lazy_loading_hazard_without_preload():
    pytest.importorskip("cupy")
    out = _probe("lazy", "cold")
    assert out["done_before_release"] is False, out  # the copy on another stream waits for the spin kernel
    assert out["threads_alive"] == 0, out  # everything ended once the spin kernel ended
    # CuPy loads the cold module holding the GIL: even this probe's main thread stood still until the spin
    # kernel timed out by itself (flag 3), which is why hang dumps need the state board (driver.StateBoard)
    assert out["flag"] in (0, 3), out


@pytest.mark.gpu
@pytest.mark.timeout(120)
def test_lazy_loading_hang_dump_through_the_driver():
    """The hazard in rank processes; the launcher's dump names the module load holding both threads."""
    pytest.importorskip("cupy")
    from mooncake_real.launcher import launch

    r = launch(1, entry="real_activities:lazy_hazard", pythonpath=[HERE], gpus=[0], args={"preload": False},
               deadline_s=1.5, dump_grace_s=1.0)
    assert r.timed_out, r.logs
    blocked = {b.activity: b for b in r.blocked()}
    assert blocked["tail"].effect == "Launch" and blocked["tail"].resource == "module-load:reduce_int32_sum", r.dumps
    assert blocked["copy"].resource == "module-load:reduce_int32_sum", r.dumps
    r = launch(1, entry="real_activities:lazy_hazard", pythonpath=[HERE], gpus=[0], args={"preload": True},
               deadline_s=20)
    assert r.exit_codes == {0: 0}, r.logs
    assert r.results[0]["value"]["copy_done_before_release"] is True


@pytest.mark.gpu
@pytest.mark.timeout(120)
def test_lazy_loading_hazard_cured_by_preload():
    pytest.importorskip("cupy")
    out = _probe("lazy", "preload")
    assert out["done_before_release"] is True, out
    assert out["copy_done"] < 0.5, out
    assert out["resource_launch"] is None and out["resource_memcpy"] is None, out


@pytest.mark.gpu
@pytest.mark.timeout(120)
def test_legacy_stream_serialisation():
    pytest.importorskip("cupy")
    out = _probe("legacy")
    assert out["done_before_release"] is False, out  # a sync copy on the legacy stream waits for the spin
    assert out["resource_memcpy"] == "legacy-stream", out
    assert out["threads_alive"] == 0, out


@pytest.mark.gpu
@pytest.mark.timeout(120)
def test_calibrate_measures_the_time_slice_beside_another_busy_context():
    """calibrate's gpu_timeslice_s: a copy's mean wait beside one other process's resident kernel, this process's
    own kernel resident too (probe_timeslice measured 2.2-2.5 ms on the H100); both kernels end by themselves."""
    cp = pytest.importorskip("cupy")
    from mooncake_real.calibrate import derive_sim, measure_timeslice

    out = measure_timeslice(cp, reps=30, hold_s=1.5)
    assert out, "the other process did not start"
    assert out["timeslice_copy_alone_s"] < 1e-3
    assert 5e-4 < out["gpu_timeslice_s"] < 2e-2, out
    assert derive_sim({**out, "store_ping_rtt_s": 1e-4, "store_set_rtt_s": 1e-4, "rpc_rtt_s": 1e-4,
                       "Now_s": 1e-5})["gpu_timeslice_s"] == out["gpu_timeslice_s"]
