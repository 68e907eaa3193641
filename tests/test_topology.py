"""Topology loading, graph conventions and location queries."""

from __future__ import annotations

from pathlib import Path

import networkx as nx
import pytest

from mooncake_protocol.errors import InputError
from mooncake_protocol.resources import bundled_names
from mooncake_protocol.topology import (
    Endpoint,
    GpuRef,
    NoPath,
    boot_id,
    fabric_supported,
    gpus,
    hosts,
    link_rate_summary,
    load_topology,
    location_labels,
    machine_id,
    nic_tiers,
    nics,
    numa_of_gpu,
    nvlink_domain,
    path,
    same_machine,
    te_nic_preference,
    to_dot,
)
from mooncake_protocol.topology import (
    Path as RoutePath,
)

BUNDLED = bundled_names("topologies")
KINDS = {"host", "numa", "gpu", "nvswitch", "nic", "netswitch"}


def gpu_ep(host: str, i: int) -> Endpoint:
    return Endpoint(host, "gpu", i)


def host_ep(host: str, numa: int = 0) -> Endpoint:
    return Endpoint(host, "host", numa=numa)


def test_required_bundle_present() -> None:
    for name in ("h100-1gpu", "hgx-h100", "hgx-h200", "hgx-h100-x2", "gb200-nvl72", "gb200-nvl72-x2", "pcie-4gpu",
                 "cpu-host", "gb200-nvl72-nohca"):
        assert name in BUNDLED


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_topology_loads_with_graph_conventions(name: str) -> None:
    t = load_topology(name)
    assert t.name == name
    assert hosts(t)
    for node, d in t.graph.nodes(data=True):
        assert d["kind"] in KINDS
        prefix = node.split(":", 1)[0]
        assert prefix == d["kind"]
        if d["kind"] == "gpu":
            assert node == f"gpu:{d['host']}:{d['index']}"
            assert {"model", "memory_gib", "numa", "fabric"} <= set(d)
        if d["kind"] == "nic":
            assert node == f"nic:{d['host']}:{d['name']}"
            assert d["type"] in ("rdma", "tcp") and isinstance(d["near_gpus"], tuple)
        if d["kind"] == "host":
            assert {"machine_id", "boot_id"} <= set(d)
    for _a, _b, d in t.graph.edges(data=True):
        assert d["cls"] in t.link_classes
        assert d["bandwidth_Bps"] > 0 and d["latency_s"] > 0
    boots = [boot_id(t, h) for h in hosts(t)]
    assert len(set(boots)) == len(boots)


def test_bundled_topologies_are_cached() -> None:
    assert load_topology("gb200-nvl72") is load_topology("gb200-nvl72")


def test_gb200_nvl72_shape() -> None:
    t = load_topology("gb200-nvl72")
    assert len(hosts(t)) == 18
    assert len(gpus(t)) == 72
    assert [d.kind for d in t.domains] == ["mnnvl"]
    dom = t.domains[0]
    assert len(dom.gpus) == 72 and dom.imex
    assert all(fabric_supported(t, g) for g in gpus(t))
    for h in hosts(t):
        assert sum(1 for _n, d in t.graph.nodes(data=True) if d["kind"] == "numa" and d["host"] == h) == 2
        assert len(nics(t, h, "rdma")) == 4
        assert all(n.gpudirect for n in nics(t, h, "rdma"))
    assert sum(1 for _n, d in t.graph.nodes(data=True) if d["kind"] == "nvswitch") == 18
    assert nvlink_domain(t, GpuRef("tray17", 3)) is dom
    # gpu <-> grace over c2c
    assert t.graph.edges["gpu:tray00:0", "numa:tray00:0"]["cls"] == "c2c"


def test_gb200_x2_has_two_domains_and_nohca_has_no_rdma() -> None:
    t = load_topology("gb200-nvl72-x2")
    assert len(gpus(t)) == 144
    assert sorted(len(d.gpus) for d in t.domains if d.kind == "mnnvl") == [72, 72]
    n = load_topology("gb200-nvl72-nohca")
    assert all(not nics(n, h, "rdma") for h in hosts(n))
    assert len(n.domains) == 1 and n.domains[0].imex


def test_hgx_h100_one_host_domain() -> None:
    t = load_topology("hgx-h100")
    assert len(gpus(t)) == 8
    assert len(t.domains) == 1
    d = t.domains[0]
    assert d.kind == "host" and len(d.gpus) == 8
    assert sum(1 for _n, a in t.graph.nodes(data=True) if a["kind"] == "nvswitch") == 4
    assert numa_of_gpu(t, GpuRef("node0", 3)) == 0 and numa_of_gpu(t, GpuRef("node0", 4)) == 1
    assert load_topology("hgx-h200").graph.nodes["gpu:node0:0"]["memory_gib"] == 141


def test_nvlink_within_hgx() -> None:
    t = load_topology("hgx-h100")
    p = path(t, gpu_ep("node0", 0), gpu_ep("node0", 7), "nvlink")
    assert isinstance(p, RoutePath)
    assert p.bandwidth_Bps == pytest.approx(450e9)
    assert p.latency_s == pytest.approx(1.5e-6)
    assert p.hops[0][0] == "gpu:node0:0" and p.hops[-1][1] == "gpu:node0:7"
    assert p.hops[0][1].startswith("nvswitch:")


def test_rdma_between_hgx_nodes() -> None:
    t = load_topology("hgx-h100-x2")
    p = path(t, gpu_ep("node0", 2), gpu_ep("node1", 5), "rdma")
    assert isinstance(p, RoutePath)
    assert p.bandwidth_Bps == pytest.approx(50e9)
    # GPU 2 uses its nearest NIC, GPU 5 too
    assert ("gpu:node0:2", "nic:node0:mlx5_2") in p.hops
    assert ("nic:node1:mlx5_5", "gpu:node1:5") in p.hops
    assert p.latency_s == pytest.approx(2e-6)
    # host memory on NUMA 1 picks a NIC on NUMA 1
    q = path(t, host_ep("node0", 1), host_ep("node1", 0), "rdma")
    assert isinstance(q, RoutePath)
    assert q.hops[0] == ("numa:node0:1", "nic:node0:mlx5_4")


def test_rdma_multi_hop_latency() -> None:
    t = load_topology("gb200-nvl72-x2")
    p = path(t, gpu_ep("rack0-tray00", 0), gpu_ep("rack1-tray00", 0), "rdma")
    assert isinstance(p, RoutePath)
    assert p.latency_s == pytest.approx(3e-6)  # 2 us base + 1 us for the second switch hop


def test_mnnvl_between_trays() -> None:
    t = load_topology("gb200-nvl72")
    p = path(t, gpu_ep("tray00", 0), gpu_ep("tray11", 3), "mnnvl")
    assert isinstance(p, RoutePath)
    assert p.bandwidth_Bps == pytest.approx(900e9)
    assert p.latency_s == pytest.approx(2e-6)
    # nvlink (CUDA IPC) works within a tray, not across trays
    assert isinstance(path(t, gpu_ep("tray00", 0), gpu_ep("tray00", 3), "nvlink"), RoutePath)
    assert isinstance(path(t, gpu_ep("tray00", 0), gpu_ep("tray01", 0), "nvlink"), NoPath)
    x2 = load_topology("gb200-nvl72-x2")
    r = path(x2, gpu_ep("rack0-tray00", 0), gpu_ep("rack1-tray00", 0), "mnnvl")
    assert isinstance(r, NoPath) and "not in MNNVL domain" in r.reason


@pytest.mark.parametrize(
    ("topo", "src", "dst", "transport", "words"),
    [
        ("hgx-h100-x2", gpu_ep("node0", 0), gpu_ep("node1", 0), "nvlink", "different hosts"),
        ("gb200-nvl72", gpu_ep("tray00", 0), host_ep("tray01"), "mnnvl", "host memory"),
        ("hgx-h100-x2", host_ep("node0"), host_ep("node1"), "shm", "different hosts"),
        ("hgx-h100", gpu_ep("node0", 0), host_ep("node0"), "shm", "GPU memory"),
        ("pcie-4gpu", host_ep("pcie0"), host_ep("pcie0"), "rdma", "no RDMA NIC"),
        ("gb200-nvl72-nohca", gpu_ep("tray00", 0), gpu_ep("tray01", 0), "rdma", "no RDMA NIC"),
        ("h100-1gpu", gpu_ep("dev0", 0), gpu_ep("dev0", 0), "mnnvl", "no MNNVL domain"),
    ],
)
def test_no_path_reasons(topo: str, src: Endpoint, dst: Endpoint, transport: str, words: str) -> None:
    p = path(load_topology(topo), src, dst, transport)
    assert isinstance(p, NoPath)
    assert not p
    assert p.transport == transport
    assert words in p.reason


TOPO_NO_GPUDIRECT = """
hosts:
  - name: "n{i}"
    count: 2
    numa: 1
    gpus: {count: 1, model: A100, memory_gib: 40}
    nics:
      - {name: mlx5_0, type: rdma, rate_gbps: 200, near_gpus: [0], gpudirect: false}
networks:
  - {name: ib, type: rdma}
"""


def test_rdma_gpu_memory_without_gpudirect(tmp_path: Path) -> None:
    f = tmp_path / "nogdr.yaml"
    f.write_text(TOPO_NO_GPUDIRECT)
    t = load_topology(str(f))
    p = path(t, gpu_ep("n0", 0), gpu_ep("n1", 0), "rdma")
    assert isinstance(p, NoPath) and "GPUDirect" in p.reason
    # host memory is fine on the same NIC
    q = path(t, host_ep("n0"), host_ep("n1"), "rdma")
    assert isinstance(q, RoutePath) and q.bandwidth_Bps == pytest.approx(25e9)


def test_rdma_and_tcp_same_host() -> None:
    t = load_topology("hgx-h100")
    same_nic = path(t, gpu_ep("node0", 1), gpu_ep("node0", 1), "rdma")
    assert isinstance(same_nic, RoutePath)
    assert not any("netswitch" in a or "netswitch" in b for a, b in same_nic.hops)
    tcp = path(t, host_ep("node0"), gpu_ep("node0", 6), "tcp")
    assert isinstance(tcp, RoutePath) and ("host:node0", "host:node0") in tcp.hops
    assert tcp.latency_s == pytest.approx(t.link_classes["loopback"].latency_s)
    shm = path(t, host_ep("node0", 0), host_ep("node0", 1), "shm")
    assert isinstance(shm, RoutePath) and shm.bandwidth_Bps == pytest.approx(20e9)


def test_tcp_between_hosts_prefers_tcp_nic() -> None:
    t = load_topology("hgx-h100-x2")
    p = path(t, gpu_ep("node0", 0), gpu_ep("node1", 0), "tcp")
    assert isinstance(p, RoutePath)
    assert ("nic:node0:eth0", "netswitch:mgmt") in p.hops
    assert p.bandwidth_Bps == pytest.approx(12.5e9)
    assert p.latency_s == pytest.approx(15e-6)
    cpu = load_topology("cpu-host")
    assert isinstance(path(cpu, host_ep("cpu0"), host_ep("cpu0"), "tcp"), RoutePath)


def test_tcp_no_network(tmp_path: Path) -> None:
    f = tmp_path / "island.yaml"
    f.write_text("hosts:\n  - name: a\n  - name: b\n")
    p = path(load_topology(str(f)), host_ep("a"), host_ep("b"), "tcp")
    assert isinstance(p, NoPath) and "no network" in p.reason


def test_nic_tiers_and_te_preference() -> None:
    t = load_topology("hgx-h100")
    t0, t1, t2 = nic_tiers(t, "node0", "cuda:3")
    assert t0 == ("mlx5_3",)
    assert set(t1) == {"mlx5_0", "mlx5_1", "mlx5_2"}
    assert set(t2) == {"mlx5_4", "mlx5_5", "mlx5_6", "mlx5_7"}
    assert nic_tiers(t, "node0", "cpu:1") == (("mlx5_4", "mlx5_5", "mlx5_6", "mlx5_7"), (),
                                              ("mlx5_0", "mlx5_1", "mlx5_2", "mlx5_3"))
    assert nic_tiers(t, "node0", "*") == ((), (), tuple(f"mlx5_{i}" for i in range(8)))
    pref, avail = te_nic_preference(t, "node0", "cuda:3")
    assert pref == ("mlx5_3",) and len(avail) == 7
    pref, avail = te_nic_preference(t, "node0", "*")
    assert len(pref) == 8 and avail == ()
    # tcp NICs never appear in RDMA tiers
    assert all("eth0" not in tier for tier in nic_tiers(t, "node0", "*"))


def test_location_labels() -> None:
    t = load_topology("hgx-h100")
    assert location_labels(t, "node0", 5) == ("cuda:5", "cpu:1", "*")
    assert location_labels(t, "node0", None) == ("cpu:0", "*")


def test_cloned_machine_id(tmp_path: Path) -> None:
    t = load_topology("hgx-h100-x2-cloned")
    assert same_machine(t, "node0", "node1")
    assert not same_machine(t, "node0", "node1", use_boot_id=True)
    plain = load_topology("hgx-h100-x2")
    assert not same_machine(plain, "node0", "node1")
    assert machine_id(plain, "node0") != machine_id(plain, "node1")
    f = tmp_path / "cloned.yaml"
    f.write_text("hosts:\n  - {name: a, machine_id: img1}\n  - {name: b, machine_id: img1}\n  - {name: c}\n")
    c = load_topology(str(f))
    assert same_machine(c, "a", "b") and not same_machine(c, "a", "c")
    assert not same_machine(c, "a", "b", use_boot_id=True)


def test_gpus_order_and_refs() -> None:
    t = load_topology("gb200-nvl72")
    refs = gpus(t)
    assert refs == sorted(refs)
    assert refs[4] == GpuRef("tray01", 0)
    assert gpus(t, "tray05") == [GpuRef("tray05", i) for i in range(4)]
    with pytest.raises(ValueError):
        gpus(t, "nohost")


def test_templates_pairs_and_overrides(tmp_path: Path) -> None:
    f = tmp_path / "custom.yaml"
    f.write_text("""
name: custom
link_classes:
  nvlink: {bandwidth_GBps: 300, latency_us: 2}
host_templates:
  quad:
    numa: 2
    gpus: {count: 4, model: A100, memory_gib: 40, numa: [0, 0, 1, 1]}
    nvlink: {pairs: [[0, 1], [2, 3]]}
hosts:
  - {name: "q{i}", template: quad, count: 2, start: 1}
  - {name: solo, template: quad, nvlink: none}
""")
    t = load_topology(str(f))
    assert t.name == "custom"
    assert hosts(t) == ["q1", "q2", "solo"]
    ids = sorted(d.id for d in t.domains)
    assert ids == ["q1/nvlink0", "q1/nvlink1", "q2/nvlink0", "q2/nvlink1"]
    p = path(t, gpu_ep("q1", 0), gpu_ep("q1", 1), "nvlink")
    assert isinstance(p, RoutePath) and p.bandwidth_Bps == pytest.approx(300e9)
    assert p.latency_s == pytest.approx(2e-6) and p.hops == (("gpu:q1:0", "gpu:q1:1"),)
    # GPUs of separate NVLink islands: CUDA IPC copies cross PCIe, through both NUMA nodes
    p = path(t, gpu_ep("q1", 0), gpu_ep("q1", 2), "nvlink")
    assert isinstance(p, RoutePath) and p.hops == (("gpu:q1:0", "numa:q1:0"), ("numa:q1:0", "numa:q1:1"),
                                                   ("numa:q1:1", "gpu:q1:2"))
    assert nvlink_domain(t, GpuRef("solo", 0)) is None


def test_imex_off_and_fabric_off(tmp_path: Path) -> None:
    base = """
hosts:
  - {{name: "t{{i}}", count: 2, gpus: {{count: 2, fabric: {fabric}}}}}
mnnvl_domains:
  - {{id: d, hosts: all, imex: {imex}}}
"""
    f = tmp_path / "a.yaml"
    f.write_text(base.format(fabric="true", imex="false"))
    p = path(load_topology(str(f)), gpu_ep("t0", 0), gpu_ep("t1", 1), "mnnvl")
    assert isinstance(p, NoPath) and "IMEX" in p.reason
    g = tmp_path / "b.yaml"
    g.write_text(base.format(fabric="false", imex="true"))
    q = path(load_topology(str(g)), gpu_ep("t0", 0), gpu_ep("t1", 1), "mnnvl")
    assert isinstance(q, NoPath) and "fabric" in q.reason


def test_link_rate_summary_and_dot() -> None:
    t = load_topology("hgx-h100")
    rows = {(c, bw): n for c, n, bw, _lat in link_rate_summary(t)}
    assert rows[("nvlink", 112.5e9)] == 32
    assert rows[("network", 50e9)] == 8
    dot = to_dot(t)
    assert dot.startswith('graph "hgx-h100"') and '"gpu:node0:0" -- "nvswitch:node0-0"' in dot


def test_path_queries_fast_on_144_gpus() -> None:
    import time

    t = load_topology("gb200-nvl72-x2")
    refs = gpus(t)
    start = time.perf_counter()
    for a in refs[::12]:
        for b in refs:
            for tr in ("nvlink", "mnnvl", "rdma", "tcp"):
                path(t, gpu_ep(a.host, a.index), gpu_ep(b.host, b.index), tr)
    assert time.perf_counter() - start < 5.0


def test_graph_is_networkx_and_connected_per_host() -> None:
    t = load_topology("hgx-h100-x2")
    assert isinstance(t.graph, nx.Graph)
    # everything of a host except the host node is reachable from its NUMA node 0
    comp = nx.node_connected_component(t.graph, "numa:node0:0")
    assert "gpu:node0:7" in comp and "nic:node0:mlx5_7" in comp and "gpu:node1:0" in comp


def test_bad_endpoint_is_a_programming_error() -> None:
    t = load_topology("hgx-h100")
    with pytest.raises(ValueError):
        path(t, gpu_ep("node0", 9), gpu_ep("node0", 0), "nvlink")
    with pytest.raises(ValueError):
        path(t, gpu_ep("node0", 0), gpu_ep("node0", 1), "carrier-pigeon")


def test_input_error_fields(tmp_path: Path) -> None:
    f = tmp_path / "neg.yaml"
    f.write_text("link_classes:\n  nvlink: {bandwidth_GBps: -5}\nhosts:\n  - name: a\n")
    with pytest.raises(InputError) as exc:
        load_topology(str(f))
    e = exc.value
    assert e.file == str(f.resolve()) or e.file.endswith("neg.yaml")
    assert e.key == "link_classes.nvlink.bandwidth_GBps"
    assert "-5" in e.message and "GB/s" in e.message


def test_nvlink_transport_between_gpus_without_nvlink_crosses_pcie() -> None:
    """TENT's and TE's "nvlink" transport is CUDA IPC and cudaMemcpyAsync: it needs no NVLink. On a PCIe-only
    host the copy goes GPU -> NUMA node (-> the other NUMA node) -> GPU at PCIe rates (it was a NoPath, and a
    TENT collective on such a host resubmitted its failing WRITEs forever)."""
    t = load_topology("pcie-4gpu")
    near = path(t, gpu_ep("pcie0", 0), gpu_ep("pcie0", 1), "nvlink")
    assert isinstance(near, RoutePath)
    assert near.hops == (("gpu:pcie0:0", "numa:pcie0:0"), ("numa:pcie0:0", "gpu:pcie0:1"))
    assert near.bandwidth_Bps == pytest.approx(t.link_classes["pcie"].bandwidth_Bps)
    assert near.latency_s == pytest.approx(t.link_classes["pcie"].latency_s)
    far = path(t, gpu_ep("pcie0", 0), gpu_ep("pcie0", 3), "nvlink")
    assert isinstance(far, RoutePath) and ("numa:pcie0:0", "numa:pcie0:1") in far.hops
    assert far.bandwidth_Bps <= near.bandwidth_Bps
