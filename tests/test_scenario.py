"""Scenario loading: defaults, placement, policy, env, faults, workload and realisability."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mooncake_protocol.errors import InputError
from mooncake_protocol.policy import PRESETS
from mooncake_protocol.resources import bundled_names
from mooncake_protocol.scenario import InputRule, OutputExpect, RankPlacement, Scenario, load_scenario


def write(tmp_path: Path, text: str, name: str = "s.yaml") -> str:
    f = tmp_path / name
    f.write_text(text)
    return str(f)


@pytest.mark.parametrize("name", bundled_names("scenarios"))
def test_bundled_scenario_validates(name: str) -> None:
    s = load_scenario(name)
    assert isinstance(s, Scenario)
    assert len(s.placement) == s.ranks
    assert [p.rank for p in s.placement] == list(range(s.ranks))


def test_example_scenario() -> None:
    s = load_scenario("example-hgx-allreduce")
    assert s.name == "example-hgx-allreduce"
    assert s.topology.name == "hgx-h100"
    assert (s.ranks, s.backend, s.engine, s.policy_name) == (8, "cuda", "tent", "fixed")
    assert s.policy == PRESETS["fixed"]
    assert s.placement[5] == RankPlacement(5, "node0", 5, 1, 5)
    (c,) = s.workload
    assert (c.op, c.dtype, c.count, c.reduce_op) == ("allreduce", "int32", 1, "sum")
    assert sum(c.input.values(r, 1)[0] for r in range(8)) == 36
    assert c.expect is not None and c.expect.for_rank(3) == (36,)
    assert s.expect is not None and s.expect.verdict == "completed"
    assert s.realisable.gpus == 8 and not s.realisable.cpu and not s.realisable.rdma


def test_defaults_cpu_topology(tmp_path: Path) -> None:
    s = load_scenario(write(tmp_path, "topology: cpu-host\nranks: 4\n"))
    assert s.name == "s"
    assert s.backend == "cpu" and s.engine == "tent"
    assert all(p.host == "cpu0" and p.gpu is None and p.device is None for p in s.placement)
    assert s.deadlines.bootstrap_s == 60 and s.deadlines.stall_s == 10
    assert s.workload == () and s.faults == () and s.expect is None
    assert s.data == "values" and s.seed == 0
    assert s.tent.transports.tcp and not s.tent.transports.shm and s.tent.rpc_server_port == 0
    assert s.realisable.cpu and s.realisable.gpus == 0 and s.realisable.hosts == 1


def test_cpu_backend_on_gpu_host_records_device(tmp_path: Path) -> None:
    s = load_scenario(write(tmp_path, "topology: hgx-h100-x2\nranks: 10\nbackend: cpu\n"))
    assert [p.host for p in s.placement] == ["node0"] * 8 + ["node1"] * 2
    assert s.placement[9].gpu is None and s.placement[9].device == 1
    with pytest.raises(InputError) as exc:
        load_scenario(write(tmp_path, "topology: hgx-h100\nranks: 9\nbackend: cpu\n"))
    assert exc.value.key == "ranks" and "ranks_per_host" in exc.value.message
    s2 = load_scenario(write(tmp_path, "topology: hgx-h100\nranks: 9\nbackend: cpu\nranks_per_host: 9\n"))
    assert len(s2.placement) == 9


def test_spread_and_packed(tmp_path: Path) -> None:
    s = load_scenario(write(tmp_path, "topology: hgx-h100-x2\nranks: 4\nplacement: spread\n"))
    assert [(p.host, p.gpu) for p in s.placement] == [("node0", 0), ("node1", 0), ("node0", 1), ("node1", 1)]
    assert s.realisable.rdma and s.realisable.hosts == 2
    p = load_scenario(write(tmp_path, "topology: hgx-h100-x2\nranks: 4\nranks_per_host: 2\n"))
    assert [(x.host, x.gpu) for x in p.placement] == [("node0", 0), ("node0", 1), ("node1", 0), ("node1", 1)]


def test_explicit_placement_shares_gpu(tmp_path: Path) -> None:
    s = load_scenario(write(tmp_path, """
topology: h100-1gpu
ranks: 3
placement: [{host: dev0, gpu: 0}, {host: dev0, gpu: 0}, {host: dev0, gpu: 0}]
"""))
    assert s.placement_mode == "explicit"
    assert {p.gpu for p in s.placement} == {0}
    assert s.realisable.gpus == 1


def test_mnnvl_realisable(tmp_path: Path) -> None:
    s = load_scenario(write(tmp_path, "topology: gb200-nvl72\nranks: 8\n"))
    assert s.realisable.mnnvl and s.realisable.rdma and s.realisable.gpus == 8
    one = load_scenario(write(tmp_path, "topology: gb200-nvl72\nranks: 4\n"))
    assert not one.realisable.mnnvl
    forced = load_scenario(write(tmp_path, "topology: gb200-nvl72\nranks: 4\nrealisable: {mnnvl: true}\n"))
    assert forced.realisable.mnnvl and forced.realisable.gpus == 4


def test_policy_env_tent_faults(tmp_path: Path) -> None:
    s = load_scenario(write(tmp_path, """
topology: hgx-h100
ranks: 4
engine: te
policy: {preset: legacy-1755, overrides: {preload_reduce_kernels: true}}
env: {MC_USE_NVLINK_IPC: 0, MC_FORCE_TCP: true, CUDA_MODULE_LOADING: EAGER, MC_MIN_PRC_PORT: 15000}
tent: {transports: {shm: true, mnnvl: true}, rpc_server_port: 16000, rpc_server_hostname: 10.0.0.1}
faults:
  - {kind: hold_port, host: node0, port: 15001}
  - {kind: extra_backend, rank: 1}
  - {kind: pause_rank, rank: 2, at: warmup, seconds: 0.5}
  - {kind: block_direction, ranks: [0, 3]}
  - {kind: concurrent_groups, count: 2}
data: sizes
deadlines: {bootstrap_s: 5}
seed: 7
expect: {verdict: hang, phase: bootstrap, cause: rpc-port-conflict, active_ranks: [0, 1]}
"""))
    assert s.engine == "te" and s.policy_name == "legacy-1755"
    assert s.policy.preload_reduce_kernels and not s.policy.check_rpc_bind
    assert s.policy_overrides == (("preload_reduce_kernels", True),)
    assert dict(s.env) == {"MC_USE_NVLINK_IPC": "0", "MC_FORCE_TCP": "1", "CUDA_MODULE_LOADING": "EAGER",
                           "MC_MIN_PRC_PORT": "15000"}
    assert s.tent.transports.shm and s.tent.transports.mnnvl and s.tent.rpc_server_port == 16000
    assert s.faults[1].count == 1
    assert s.faults_of("pause_rank")[0].seconds == 0.5
    assert s.faults_of("block_direction")[0].ranks == (0, 3)
    assert s.data == "sizes" and s.deadlines.bootstrap_s == 5 and s.deadlines.collective_s == 60 and s.seed == 7
    assert s.expect is not None and s.expect.cause == "rpc-port-conflict" and s.expect.active_ranks == (0, 1)


def test_workload_forms(tmp_path: Path) -> None:
    s = load_scenario(write(tmp_path, """
topology: hgx-h100
ranks: 4
workload:
  - {op: reduce, root: 2, reduce_op: avg, dtype: float32, input: rank, expect: {root: [1.5], others: null}}
  - {op: send_recv, src: 3, dst: 0, count: 2, input: "rank * 100 + index", expect: {per_rank: {0: [300, 301]}}}
  - {op: barrier}
  - {op: allgather, input: 2}
"""))
    red, sr, bar, ag = s.workload
    assert red.reduce_op == "avg" and red.root == 2
    assert isinstance(red.expect, OutputExpect)
    assert red.expect.for_rank(2, root=2) == (1.5,) and red.expect.for_rank(0, root=2) is None
    assert (sr.src, sr.dst) == (3, 0) and sr.expect is not None and sr.expect.for_rank(0) == (300, 301)
    assert sr.expect.for_rank(3) is None
    assert bar.op == "barrier" and bar.expect is None
    assert ag.input.values(3, 2) == [2, 2]


@pytest.mark.parametrize(
    ("text", "expected"),
    [("rank + 1", (1, 0, 1)), ("2", (0, 0, 2)), ("rank + 10", (1, 0, 10)), ("rank", (1, 0, 0)),
     ("index", (0, 1, 0)), ("rank * 100 + index", (100, 1, 0)), ("-rank + 3 * index - 4", (-1, 3, -4)),
     ("2*rank*3", (6, 0, 0))],
)
def test_input_rule_parse(text: str, expected: tuple[int, int, int]) -> None:
    r = InputRule.parse(text)
    assert (r.rank_coef, r.index_coef, r.const) == expected


@pytest.mark.parametrize("text", ["rank * index", "rank +", "__import__('os')", "", "1 2", "rank ** 2", "rank / 2"])
def test_input_rule_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        InputRule.parse(text)


@given(a=st.integers(-1000, 1000), b=st.integers(-1000, 1000), c=st.integers(-1000, 1000),
       rank=st.integers(0, 63), count=st.integers(1, 16))
def test_input_rule_roundtrip(a: int, b: int, c: int, rank: int, count: int) -> None:
    r = InputRule.parse(f"{a} * rank + {b} * index + {c}")
    assert r.values(rank, count) == [a * rank + b * i + c for i in range(count)]


def test_topology_relative_to_scenario(tmp_path: Path) -> None:
    sub = tmp_path / "sc"
    sub.mkdir()
    (tmp_path / "mini.yaml").write_text("hosts:\n  - name: m0\n")
    s = load_scenario(write(sub, "topology: ../mini.yaml\nranks: 2\n"))
    assert s.topology.name == "mini" and s.backend == "cpu"


def test_too_many_ranks_for_one_gpu_counts_it_as_one_gpu(tmp_path: Path) -> None:
    with pytest.raises(InputError) as exc:
        load_scenario(write(tmp_path, "topology: h100-1gpu\nranks: 2\n"))
    assert exc.value.key == "ranks" and "topology 'h100-1gpu' has 1 GPU; lower ranks" in exc.value.message
