"""Collectives, reduce semantics, the worker's slot table and P2P, run through the simulator."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mooncake_protocol.collectives import chunk_bytes, decode_output
from mooncake_protocol.reduce import (
    CPU_REDUCE_DTYPES,
    GPU_REDUCE_DTYPES,
    REDUCE_OPS,
    combine,
    from_numpy,
    to_numpy,
    unsupported_reason,
)
from mooncake_protocol.scenario import InputRule, load_scenario
from mooncake_protocol.worker import SLOT_TRANSITIONS, Op, SlotEvent, SlotState, Task, slot_transition
from mooncake_sim.runner import run_one


def _scenario(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "s.yaml"
    p.write_text(textwrap.dedent(body))
    return p


def test_chunk_size_matches_mooncake() -> None:
    # ((16 MiB - 1) / size) rounded down to a multiple of 8
    assert chunk_bytes(1) == (16 * 2**20 - 1) & ~7
    assert chunk_bytes(8) == 2097144
    assert chunk_bytes(64) % 8 == 0 and chunk_bytes(64) * 64 < 16 * 2**20


@pytest.mark.parametrize("dtype", GPU_REDUCE_DTYPES)
@pytest.mark.parametrize("op", REDUCE_OPS)
def test_combine_skips_inactive_ranks(dtype: str, op: str) -> None:
    rng = np.random.default_rng(3)
    raw = [rng.integers(1, 5, size=6) for _ in range(4)]
    slices = [from_numpy(dtype, r.astype(np.float32 if dtype == "bfloat16" else np.dtype("bool" if dtype == "bool" else dtype)))
              for r in raw]
    active = [True, False, True, True]
    got = to_numpy(dtype, combine(dtype, op, slices, active))
    xs = [to_numpy(dtype, s) for s, a in zip(slices, active, strict=True) if a]
    if dtype == "bool":
        want = np.logical_or.reduce(xs) if op in ("sum", "max") else np.logical_and.reduce(xs)
    else:
        f = {"sum": np.add, "product": np.multiply, "min": np.minimum, "max": np.maximum}[op]
        want = f.reduce(np.stack(xs), axis=0)
    assert np.array_equal(got.astype(np.float64), np.asarray(want, dtype=np.float64))


def test_unsupported_reductions_follow_mooncake() -> None:
    assert unsupported_reason("cuda", "float16", "sum") is not None  # no float16 on the GPU
    assert unsupported_reason("cpu", "bfloat16", "sum") is not None  # no bfloat16 on the CPU
    assert unsupported_reason("cuda", "int32", "avg") == "Only support SUM/MIN/MAX/PRODUCT"
    assert unsupported_reason("cpu", "int32", "max") is None
    assert "bfloat16" not in CPU_REDUCE_DTYPES


def test_slot_table_rejects_illegal_moves() -> None:
    assert slot_transition(SlotState.IDLE, SlotEvent.TASK_WITH_DATA) is SlotState.TRANSFERRED_1
    with pytest.raises(ValueError):
        slot_transition(SlotState.IDLE, SlotEvent.SYNC_DONE)
    reachable = {SlotState.IDLE}
    for _ in range(4):
        reachable |= {n for s in list(reachable) for n in SLOT_TRANSITIONS[s].values()}
    assert reachable == set(SlotState)


def test_task_round_trips() -> None:
    t = Task(Op.REDUCE_SCATTER, 3, 4096, 1, 2, 77, 1024)
    assert Task.unpack(t.pack()) == t


def test_large_outputs_are_summarised() -> None:
    out = decode_output("int32", np.arange(1000, dtype=np.int32).tobytes())
    assert out["n"] == 1000 and out["first"] == [0, 1, 2, 3]


@pytest.mark.parametrize("backend,topology", [("cpu", "cpu-host"), ("cuda", "hgx-h100")])
def test_every_collective_gives_the_reference_values(tmp_path: Path, backend: str, topology: str) -> None:
    # 4 ranks; alltoall/reduce_scatter inputs hold one slice of 2 elements per rank: value rank*100 + index
    p = _scenario(tmp_path, f"""
        topology: {topology}
        ranks: 4
        backend: {backend}
        workload:
          - {{op: broadcast, dtype: int64, count: 3, root: 2, input: "rank * 10 + index", expect: [20, 21, 22]}}
          - {{op: alltoall, dtype: int32, count: 2, input: "rank * 100 + index",
              expect: {{per_rank: {{0: [0, 1, 100, 101, 200, 201, 300, 301], 1: [2, 3, 102, 103, 202, 203, 302, 303],
                                   2: [4, 5, 104, 105, 204, 205, 304, 305], 3: [6, 7, 106, 107, 206, 207, 306, 307]}}}}}}
          - {{op: reduce_scatter, dtype: int32, count: 2, reduce_op: sum, input: "rank * 100 + index",
              expect: {{per_rank: {{0: [600, 604], 1: [608, 612], 2: [616, 620], 3: [624, 628]}}}}}}
          - {{op: allreduce, dtype: float32, count: 3, reduce_op: max, input: "rank + index", expect: [3, 4, 5]}}
          - {{op: gather, dtype: int32, root: 1, input: "rank", expect: {{root: [0, 1, 2, 3], others: null}}}}
        expect: {{verdict: completed}}
        """)
    o = run_one(load_scenario(str(p)))
    assert o.matches, o.mismatches


def test_multi_chunk_allreduce_and_p2p_values(tmp_path: Path) -> None:
    # 3 ranks: chunk = 5592400 bytes; 2M int32 = 8 MiB -> 2 chunks, parity alternates;
    # P2P of 20 MiB -> 10 slots of 2 MiB through an 8-slot ring (flow control)
    p = _scenario(tmp_path, """
        topology: cpu-host
        ranks: 3
        backend: cpu
        workload:
          - {op: allreduce, dtype: int32, count: 2000000, reduce_op: sum, input: "rank + index"}
          - {op: send_recv, src: 2, dst: 0, dtype: int32, count: 5242880, input: "index"}
          - {op: send_recv, src: 0, dst: 1, dtype: int64, count: 4, input: "rank * 100 + index",
             expect: {per_rank: {1: [0, 1, 2, 3]}}}
        expect: {verdict: completed}
        """)
    o = run_one(load_scenario(str(p)))
    assert o.matches, o.mismatches
    ar = o.results["0:allreduce"]["0"]["output"]
    assert ar["n"] == 2000000 and ar["first"] == [3, 6, 9, 12]  # sum over ranks of (rank + index)
    p2p = o.results["1:send_recv"]["0"]["output"]
    want = np.arange(5242880, dtype=np.int32).tobytes()
    import hashlib
    assert p2p["sha256"] == hashlib.sha256(want).hexdigest()[:16]


@settings(max_examples=200, deadline=None)
@given(rank_coef=st.integers(-2**40, 2**40), index_coef=st.integers(-2**40, 2**40), const=st.integers(-2**40, 2**40),
       rank=st.integers(0, 1000), n=st.integers(0, 50),
       dtype=st.sampled_from(["int8", "uint8", "int32", "int64", "float16", "bfloat16", "float32", "float64", "bool"]))
def test_input_values_built_by_numpy_equal_the_rules_list(rank_coef: int, index_coef: int, const: int, rank: int,
                                                           n: int, dtype: str) -> None:
    """encode_input builds a rule's values with numpy (a Python list of millions of ints cost a real run a third
    of a second): the same bytes as from the rule's own list, for every dtype."""
    from mooncake_protocol.collectives import input_array

    rule = InputRule(rank_coef, index_coef, const)
    floating = dtype in ("float16", "bfloat16", "float32", "float64")
    old = np.asarray(rule.values(rank, n), dtype=np.float64 if floating else np.int64)
    new = input_array(rule, rank, n, floating)
    assert new.dtype == old.dtype and new.tobytes() == old.tobytes()


def test_input_values_beyond_int64_take_the_rules_list() -> None:
    from mooncake_protocol.collectives import input_array

    rule = InputRule(0, 2**62, 0)
    assert input_array(rule, 0, 2, True).tolist() == [0.0, float(2**62)]
