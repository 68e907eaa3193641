"""Discover this machine as a topology document (docs/topology-format.md): ``mooncake-real discover``.

Rules of this module:

* Read-only probing of sysfs (``/sys/devices/system/node``, ``/sys/class/net``, ``/sys/class/infiniband``)
  and, when CuPy sees a GPU, the CUDA runtime (device properties, PCI bus id -> NUMA node, peer access).
  Anything unreadable falls back to a safe default; discovery never fails because a file is missing.
* The output is a plain dict in the topology schema, loadable by
  :func:`mooncake_protocol.topology.load_topology` once written as YAML. Facts the schema has no key for
  (the CUDA peer-access matrix, PCI ids) go into the YAML as comments (:func:`to_yaml`).
* NVLink: the CUDA runtime says whether two GPUs can access each other's memory, not over what. Pairs with
  peer access are written as NVLink ``pairs`` only when NVML (pynvml, optional) reports active NVLink
  links; otherwise ``nvlink: none`` and the matrix stays a comment.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Any

SYS = Path("/sys")
_VIRTUAL_PREFIXES = ("lo", "ifb", "veth", "docker", "br-", "virbr", "tun", "tap", "dummy", "bond")


def _read(path: Path, default: str = "") -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return default


def _safe_name(name: str) -> str:
    out = re.sub(r"[^A-Za-z0-9_.\-]", "-", name)
    return out or "host"


def numa_nodes(sys_root: Path = SYS) -> int:
    base = sys_root / "devices/system/node"
    try:
        nodes = [p for p in base.iterdir() if re.fullmatch(r"node\d+", p.name)]
    except OSError:
        return 1
    return max(1, len(nodes))


def _numa_of(dev: Path, numa_count: int) -> int:
    try:
        n = int(_read(dev / "numa_node", "-1"))
    except ValueError:
        n = -1
    return n if 0 <= n < numa_count else 0


def _entries(base: Path) -> list[Path]:
    """The entries of a sysfs class folder, sorted; none when it is missing or unreadable."""
    try:
        return sorted(base.iterdir())
    except OSError:
        return []


def rdma_nics(sys_root: Path = SYS, numa_count: int = 1) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for d in _entries(sys_root / "class/infiniband"):
        rate = 100
        m = re.match(r"\s*(\d+)", _read(d / "ports/1/rate"))
        if m:
            rate = max(1, int(m.group(1)))
        out.append({"name": _safe_name(d.name), "type": "rdma", "rate_gbps": rate, "numa": _numa_of(d / "device", numa_count)})
    return out


def tcp_nics(sys_root: Path = SYS, numa_count: int = 1) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for d in _entries(sys_root / "class/net"):
        if d.name.startswith(_VIRTUAL_PREFIXES):
            continue
        physical = (d / "device").exists()
        if not physical and _read(d / "operstate") != "up":
            continue
        try:
            speed_mbps = int(_read(d / "speed", "-1"))
        except ValueError:
            speed_mbps = -1
        rate = max(1, speed_mbps // 1000) if speed_mbps > 0 else 10
        out.append({"name": _safe_name(d.name), "type": "tcp", "rate_gbps": rate,
                    "numa": _numa_of(d / "device", numa_count) if physical else 0})
    return out


def gpu_facts(numa_count: int = 1, sys_root: Path = SYS) -> dict[str, Any]:
    """GPUs through CuPy: {count, model, memory_gib, numa, fabric, peer, pci} ({} without a GPU)."""
    from .gpu import cupy_or_none

    cp = cupy_or_none()
    if cp is None:
        return {}
    rt = cp.cuda.runtime
    n = int(rt.getDeviceCount())
    models, mems, numas, pcis, fabric = [], [], [], [], []
    for i in range(n):
        props = rt.getDeviceProperties(i)
        name = props.get("name", b"GPU")
        models.append(name.decode() if isinstance(name, bytes) else str(name))
        mems.append(int(props.get("totalGlobalMem", 0)) / 2**30)
        try:
            pci = str(rt.deviceGetPCIBusId(i)).lower()
        except Exception:
            pci = ""
        pcis.append(pci)
        numas.append(_numa_of(sys_root / "bus/pci/devices" / pci, numa_count) if pci else 0)
        try:
            fabric.append(bool(rt.deviceGetAttribute(128, i)))  # HANDLE_TYPE_FABRIC_SUPPORTED
        except Exception:
            fabric.append(False)
    peer = [[i == j or bool(rt.deviceCanAccessPeer(i, j)) for j in range(n)] for i in range(n)]
    return {"count": n, "model": _safe_name(models[0]) if models else "GPU",
            "memory_gib": max(1, round(min(mems))) if mems else 1, "numa": numas, "fabric": all(fabric) and bool(fabric),
            "peer": peer, "pci": pcis}


def nvlink_pairs_from_smi(text: str) -> set[tuple[int, int]]:
    """GPU pairs joined by NVLink in ``nvidia-smi topo -m`` output (cells ``NV<k>``)."""
    pairs: set[tuple[int, int]] = set()
    for line in text.splitlines():
        m = re.match(r"\s*GPU(\d+)\s+(.*)", line)
        if not m:
            continue
        i = int(m.group(1))
        for j, cell in enumerate(m.group(2).split()):
            if re.fullmatch(r"NV\d+", cell) and i != j:
                pairs.add((min(i, j), max(i, j)))
    return pairs


def _nvlink_from_smi() -> set[tuple[int, int]] | None:
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return nvlink_pairs_from_smi(out.stdout) if out.returncode == 0 else None


def _nvlink_active(n: int) -> bool:
    smi = _nvlink_from_smi()
    if smi:
        return True
    try:
        import pynvml  # optional

        pynvml.nvmlInit()
        try:
            for i in range(n):
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                for link in range(18):
                    try:
                        if pynvml.nvmlDeviceGetNvLinkState(h, link):
                            return True
                    except pynvml.NVMLError:
                        break
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return False
    return False


def discover(sys_root: Path = SYS, hostname: str | None = None, with_gpus: bool = True) -> dict[str, Any]:
    """A topology document for this machine (a dict in the topology-file schema, plus ``_comments``)."""
    host = _safe_name(hostname or socket.gethostname())
    numa = numa_nodes(sys_root)
    nics = rdma_nics(sys_root, numa) + tcp_nics(sys_root, numa)
    seen: set[str] = set()
    nics = [n for n in nics if not (n["name"] in seen or seen.add(n["name"]))]  # type: ignore[func-returns-value]
    body: dict[str, Any] = {"name": host, "numa": numa}
    machine_id = _read(Path("/etc/machine-id"))
    if machine_id and _safe_name(machine_id) == machine_id:
        body["machine_id"] = machine_id
    comments = [f"discovered by mooncake-real discover on {host}"]
    g = gpu_facts(numa, sys_root) if with_gpus else {}
    if g:
        body["gpus"] = {"count": g["count"], "model": g["model"], "memory_gib": g["memory_gib"],
                        "numa": g["numa"], "fabric": g["fabric"]}
        pairs = [[i, j] for i in range(g["count"]) for j in range(i + 1, g["count"]) if g["peer"][i][j] and g["peer"][j][i]]
        smi = _nvlink_from_smi() if pairs else None
        if smi:
            nv = [p for p in pairs if (p[0], p[1]) in smi]  # peer access over NVLink, as nvidia-smi reports it
            if nv:
                body["nvlink"] = {"pairs": nv}
        elif pairs and _nvlink_active(g["count"]):
            body["nvlink"] = {"pairs": pairs}
        comments.append("CUDA peer access (row can access column): "
                        + "; ".join(f"gpu{i}: " + "".join("1" if x else "0" for x in row) for i, row in enumerate(g["peer"])))
        comments.append("GPU PCI bus ids: " + ", ".join(g["pci"]))
    if nics:
        body["nics"] = nics
    doc: dict[str, Any] = {
        "name": f"discovered-{host}",
        "description": f"This machine ({host}), as mooncake-real discover found it.",
        "hosts": [body],
    }
    nets = []
    if any(n["type"] == "tcp" for n in nics):
        nets.append({"name": "tcp", "type": "tcp", "hosts": "all"})
    if any(n["type"] == "rdma" for n in nics):
        nets.append({"name": "rdma", "type": "rdma", "hosts": "all"})
    if nets:
        doc["networks"] = nets
    doc["_comments"] = comments
    return doc


def to_yaml(doc: dict[str, Any]) -> str:
    import yaml

    body = {k: v for k, v in doc.items() if k != "_comments"}
    head = "".join(f"# {c}\n" for c in doc.get("_comments", []))
    return head + yaml.safe_dump(body, sort_keys=False, default_flow_style=None, width=110)


def write_topology(path: str | os.PathLike[str], doc: dict[str, Any] | None = None) -> Path:
    p = Path(path)
    p.write_text(to_yaml(doc if doc is not None else discover()))
    return p
