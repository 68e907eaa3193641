"""NVLink pairs from ``nvidia-smi topo -m`` (the fallback when pynvml is absent)."""

from mooncake_real.discover import nvlink_pairs_from_smi

TOPO_M = """\
        GPU0    GPU1    GPU2    GPU3    NIC0    CPU Affinity    NUMA Affinity
GPU0     X      NV18    NV18    SYS     PXB     0-55    0
GPU1    NV18     X      NV18    SYS     SYS     0-55    0
GPU2    NV18    NV18     X      PIX     SYS     56-111  1
GPU3    SYS     SYS     PIX      X      SYS     56-111  1
NIC0    PXB     SYS     SYS     SYS      X
"""


def test_pairs_only_where_nvlink() -> None:
    assert nvlink_pairs_from_smi(TOPO_M) == {(0, 1), (0, 2), (1, 2)}


def test_no_gpu_rows() -> None:
    assert nvlink_pairs_from_smi("No devices were found\n") == set()
