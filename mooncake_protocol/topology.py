"""Topology model: a YAML file (docs/topology-format.md) -> a validated networkx graph, plus queries.

Rules of this module:

* The only I/O is reading the YAML file the user named (bundled name or path, via
  :func:`mooncake_protocol.resources.resolve`). Every problem with that file is an
  :class:`~mooncake_protocol.errors.InputError` naming the file, the key path and what to do.
* The graph is the single source of truth and uses fixed node ids, which the simulator relies on:
  ``host:<h>``, ``numa:<h>:<n>``, ``gpu:<h>:<i>``, ``nvswitch:<name>``, ``nic:<h>:<name>``,
  ``netswitch:<name>``; node attribute ``kind`` is one of host, numa, gpu, nvswitch, nic, netswitch.
  Edges carry ``cls`` (a link class name), ``bandwidth_Bps`` (bytes/s per direction) and ``latency_s``.
* Queries are plain functions over a :class:`Topology` (networkx style), never methods on a god object.
  They are deterministic (declaration order, first-best choices) and cached per topology, so a 144-GPU
  topology answers quickly. Treat a loaded Topology, its graph included, as read-only: bundled files are
  cached and shared.
* The YAML checking helpers here (:class:`InputReader`, :func:`read_yaml`) are shared with
  :mod:`mooncake_protocol.scenario` so both files report errors the same way.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import hashlib
import math
import pathlib
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, NoReturn

import networkx as nx
import yaml

from .errors import InputError
from .resources import resolve

__all__ = [
    "DEFAULT_LINK_CLASSES",
    "Endpoint",
    "GpuRef",
    "InputReader",
    "LinkClass",
    "Nic",
    "NoPath",
    "NvlinkDomain",
    "Path",
    "Topology",
    "boot_id",
    "fabric_supported",
    "gpus",
    "hosts",
    "link_rate_summary",
    "load_topology",
    "location_labels",
    "machine_id",
    "nic_tiers",
    "nics",
    "numa_of_gpu",
    "nvlink_domain",
    "path",
    "read_yaml",
    "same_machine",
    "te_nic_preference",
    "to_dot",
]

# --------------------------------------------------------------------------------------------------------
# Shared YAML reading and checking helpers
# --------------------------------------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML silently keeps the last one)."""


def _construct_mapping_unique(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: set[Any] = set()
    for key_node, _value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, str) and key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (each key may appear once in a mapping)", key_node.start_mark
            )
        if isinstance(key, str):
            seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping_unique)


def read_yaml(path: pathlib.Path, display: str | None = None) -> dict[str, Any]:
    """Read a YAML file whose top level must be a mapping; syntax errors become InputError with the line."""
    file = display or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(file, "", f"cannot read the file ({exc.strerror}); check the path and permissions") from None
    except UnicodeDecodeError:
        raise InputError(file, "", "is not UTF-8 text; save it as UTF-8 YAML") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        if exc.problem_mark is not None and exc.context_mark is not None and exc.problem_mark.line >= text.count("\n"):
            mark = exc.context_mark  # error found at end of file: point at the construct left open
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "(YAML)"
        problem = exc.problem or exc.context or "syntax error"
        if isinstance(exc, yaml.constructor.ConstructorError):
            raise InputError(file, where, f"{problem}; fix the YAML at that spot") from None
        what = f"{problem} ({exc.context})" if exc.context and exc.problem else problem
        raise InputError(file, where, f"YAML syntax error: {what}; fix the YAML at that spot") from None
    except yaml.YAMLError as exc:
        raise InputError(file, "", f"YAML error: {exc}; fix the file's YAML") from None
    if data is None:
        raise InputError(file, "", "is empty; it must hold a YAML mapping (key: value lines)")
    if not isinstance(data, dict):
        raise InputError(file, "", f"top level must be a mapping (key: value lines), got {_type_name(data)}")
    return data


def _type_name(v: Any) -> str:
    if v is None:
        return "nothing (null)"
    if isinstance(v, bool):
        return f"a boolean ({str(v).lower()})"
    if isinstance(v, int):
        return f"an integer ({v})"
    if isinstance(v, float):
        return f"a number ({v})"
    if isinstance(v, str):
        short = v if len(v) <= 40 else v[:37] + "..."
        return f"a string ({short!r})"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "a mapping"
    return type(v).__name__


def key_join(base: str, name: str | int) -> str:
    """``key_join("hosts", 3) == "hosts[3]"``; ``key_join("hosts[3]", "gpus") == "hosts[3].gpus"``."""
    if isinstance(name, int):
        return f"{base}[{name}]"
    return f"{base}.{name}" if base else name


@dataclass(frozen=True)
class InputReader:
    """Typed checks of parsed YAML values; every failure is an InputError naming ``file`` and the key."""

    file: str

    def fail(self, key: str, message: str) -> NoReturn:
        raise InputError(self.file, key, message)

    def mapping(
        self,
        value: Any,
        key: str,
        allowed: Iterable[str],
        required: Iterable[str] = (),
        what: str = "",
    ) -> dict[str, Any]:
        """A mapping whose keys are all in ``allowed`` and include ``required``."""
        if not isinstance(value, dict):
            self.fail(key, f"must be a mapping{' (' + what + ')' if what else ''}, got {_type_name(value)}")
        allowed_list = list(allowed)
        for k in value:
            if not isinstance(k, str):
                self.fail(key, f"keys must be strings, got {_type_name(k)}")
            if k not in allowed_list:
                close = difflib.get_close_matches(k, allowed_list, n=1, cutoff=0.6)
                hint = f"did you mean {close[0]!r}? " if close else ""
                self.fail(
                    key_join(key, k),
                    f"unknown key {k!r}; {hint}known keys here: {', '.join(allowed_list)}",
                )
        for r in required:
            if r not in value:
                self.fail(key_join(key, r), f"is required but missing; add '{r}:'{' (' + what + ')' if what else ''}")
        return value

    def seq(self, value: Any, key: str, what: str = "") -> list[Any]:
        if not isinstance(value, list):
            self.fail(key, f"must be a list{' of ' + what if what else ''}, got {_type_name(value)}")
        return value

    def integer(self, value: Any, key: str, minimum: int | None = None, maximum: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(key, f"must be an integer, got {_type_name(value)}")
        if minimum is not None and value < minimum:
            rng = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            self.fail(key, f"must be {rng}, got {value}")
        if maximum is not None and value > maximum:
            rng = f"between {minimum} and {maximum}" if minimum is not None else f"<= {maximum}"
            self.fail(key, f"must be {rng}, got {value}")
        return value

    def positive(self, value: Any, key: str, unit: str = "") -> float:
        """A finite number > 0 (ints accepted)."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(key, f"must be a positive number{' in ' + unit if unit else ''}, got {_type_name(value)}")
        if not math.isfinite(float(value)) or value <= 0:
            self.fail(key, f"must be a positive number{' in ' + unit if unit else ''}, got {value}")
        return float(value)

    def boolean(self, value: Any, key: str) -> bool:
        if not isinstance(value, bool):
            self.fail(key, f"must be true or false, got {_type_name(value)}")
        return value

    def string(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not value:
            self.fail(key, f"must be a non-empty string, got {_type_name(value)}")
        return value

    def choice(self, value: Any, key: str, choices: Sequence[str]) -> str:
        if not isinstance(value, str) or value not in choices:
            got = _type_name(value)
            close = difflib.get_close_matches(value, list(choices), n=1, cutoff=0.6) if isinstance(value, str) else []
            hint = f"; did you mean {close[0]!r}?" if close else ""
            self.fail(key, f"must be one of {', '.join(choices)}, got {got}{hint}")
        return value


# --------------------------------------------------------------------------------------------------------
# Data model
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinkClass:
    """Figures of one link class: bandwidth in bytes/s per direction (``inf`` = no cap), one-way latency."""

    bandwidth_Bps: float
    latency_s: float


#: Default link classes (anchors.md section 4). ``network`` bandwidth is taken from each NIC's rate unless
#: a file caps it; ``rdma`` and ``tcp`` carry the per-transfer base latency of those transports.
DEFAULT_LINK_CLASSES: dict[str, LinkClass] = {
    "nvlink": LinkClass(450e9, 1.5e-6),  # H100: 18 x NVLink4 = 450 GB/s per direction per GPU
    "mnnvl": LinkClass(900e9, 2.0e-6),  # GB200: 1.8 TB/s bidirectional per GPU
    "pcie": LinkClass(64e9, 1.0e-6),  # Gen5 x16
    "c2c": LinkClass(450e9, 1.0e-6),  # Grace-Blackwell NVLink-C2C (900 GB/s bidirectional)
    "socket": LinkClass(64e9, 0.5e-6),  # between NUMA nodes of one host (UPI / xGMI / Grace-Grace)
    "network": LinkClass(math.inf, 1.0e-6),  # NIC <-> switch; bandwidth from NIC rate; 1 us per extra hop
    "rdma": LinkClass(math.inf, 2.0e-6),  # RDMA base one-way latency through one switch
    "tcp": LinkClass(math.inf, 15.0e-6),  # kernel TCP one-way latency
    "loopback": LinkClass(20e9, 10.0e-6),  # TCP over the loopback device
    "shm": LinkClass(20e9, 1.0e-6),  # host memory copy through shared memory
    "device": LinkClass(1500e9, 1.0e-6),  # copy within one GPU's memory (processes sharing a GPU, CUDA IPC)
}

LINK_CLASS_NAMES: tuple[str, ...] = tuple(DEFAULT_LINK_CLASSES)


@dataclass(frozen=True, order=True)
class GpuRef:
    """One GPU: ``GpuRef("node0", 3)``. Orders by host name, then index."""

    host: str
    index: int

    @property
    def node(self) -> str:
        return f"gpu:{self.host}:{self.index}"


@dataclass(frozen=True)
class NvlinkDomain:
    """GPUs that reach each other over NVLink: one host's (``kind="host"``) or an MNNVL clique."""

    id: str
    kind: Literal["host", "mnnvl"]
    gpus: tuple[GpuRef, ...]
    imex: bool


@dataclass(frozen=True)
class Nic:
    host: str
    name: str
    type: Literal["rdma", "tcp"]
    rate_gbps: float
    numa: int
    near_gpus: tuple[int, ...]
    gpudirect: bool

    @property
    def node(self) -> str:
        return f"nic:{self.host}:{self.name}"


class Endpoint(NamedTuple):
    """A memory location on a host: GPU memory of ``gpu`` or host memory on NUMA node ``numa``. (A named tuple:
    routing keys its caches by endpoints, and a tuple hashes and compares without a Python-level call.)"""

    host: str
    memory: Literal["gpu", "host"]
    gpu: int | None = None
    numa: int = 0


@dataclass(frozen=True)
class Path:
    """A usable route: edges crossed (node-id pairs), bottleneck bandwidth (B/s), one-way latency (s)."""

    transport: str
    hops: tuple[tuple[str, str], ...]
    bandwidth_Bps: float
    latency_s: float


@dataclass(frozen=True)
class NoPath:
    """The transport cannot connect the two endpoints; ``reason`` says why in words."""

    transport: str
    reason: str

    def __bool__(self) -> bool:
        return False


TRANSPORTS: tuple[str, ...] = ("nvlink", "mnnvl", "rdma", "tcp", "shm")


@dataclass
class _Index:
    hosts: list[str]
    host_attr: dict[str, dict[str, Any]]
    gpus_by_host: dict[str, list[GpuRef]]
    gpu_attr: dict[GpuRef, dict[str, Any]]
    nics_by_host: dict[str, list[Nic]]
    domain_of: dict[GpuRef, NvlinkDomain]
    cache: dict[Any, Any] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class Topology:
    """A loaded topology. ``graph`` follows the node/edge conventions in the module docstring."""

    name: str
    source: str
    graph: nx.Graph
    link_classes: dict[str, LinkClass]
    domains: tuple[NvlinkDomain, ...]
    description: str = ""
    _idx: _Index = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_idx", _build_index(self.graph, self.domains))


def _build_index(g: nx.Graph, domains: tuple[NvlinkDomain, ...]) -> _Index:
    hosts_: list[str] = []
    host_attr: dict[str, dict[str, Any]] = {}
    gpus_by_host: dict[str, list[GpuRef]] = {}
    gpu_attr: dict[GpuRef, dict[str, Any]] = {}
    nics_by_host: dict[str, list[Nic]] = {}
    for node, data in g.nodes(data=True):
        kind = data.get("kind")
        if kind == "host":
            h = node[len("host:"):]
            hosts_.append(h)
            host_attr[h] = data
            gpus_by_host.setdefault(h, [])
            nics_by_host.setdefault(h, [])
        elif kind == "gpu":
            ref = GpuRef(data["host"], data["index"])
            gpus_by_host.setdefault(ref.host, []).append(ref)
            gpu_attr[ref] = data
        elif kind == "nic":
            nics_by_host.setdefault(data["host"], []).append(
                Nic(data["host"], data["name"], data["type"], data["rate_gbps"], data["numa"],
                    tuple(data["near_gpus"]), data["gpudirect"])
            )
    for lst in gpus_by_host.values():
        lst.sort(key=lambda r: r.index)
    domain_of: dict[GpuRef, NvlinkDomain] = {}
    for d in domains:
        for ref in d.gpus:
            domain_of[ref] = d
    return _Index(hosts_, host_attr, gpus_by_host, gpu_attr, nics_by_host, domain_of)


# --------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------

_TOP_KEYS = ("name", "description", "link_classes", "host_templates", "hosts", "mnnvl_domains", "networks")
_BODY_KEYS = ("numa", "gpus", "nvlink", "nics")
_HOST_KEYS = ("name", "template", "count", "start", "machine_id", *_BODY_KEYS)
_GPU_KEYS = ("count", "model", "memory_gib", "numa", "fabric", "link")
_NIC_KEYS = ("name", "count", "type", "rate_gbps", "numa", "near_gpus", "gpudirect")
_NVLINK_KEYS = ("switches", "pairs")
_DOMAIN_KEYS = ("id", "hosts", "imex", "switches")
_NETWORK_KEYS = ("name", "type", "hosts", "hops")
_LINK_KEYS = ("bandwidth_GBps", "latency_us")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")
_I_RE = re.compile(r"\{i(?::([^{}]*))?\}")


def load_topology(ref: str, relative_to: pathlib.Path | None = None) -> Topology:
    """Load a topology from a bundled name (``"hgx-h100"``) or a path to a YAML file.

    >>> topo = load_topology("hgx-h100")
    >>> len(gpus(topo))
    8
    """
    p = resolve(ref, "topologies", relative_to)
    st = p.stat()
    return _load_cached(str(p.resolve()), st.st_mtime_ns, st.st_size, str(p))


@functools.lru_cache(maxsize=64)
def _load_cached(path: str, mtime_ns: int, size: int, display: str) -> Topology:
    """Parse once per (file, modification time, size); ``display`` is the path as the user gave it."""
    return parse_topology(read_yaml(pathlib.Path(path), display), display, pathlib.Path(path).stem)


def _expand(r: InputReader, pattern: str, i: int, key: str) -> str:
    def sub(m: re.Match[str]) -> str:
        spec = m.group(1) or ""
        try:
            return format(i, spec)
        except ValueError:
            r.fail(key, f"bad format {m.group(0)!r}; write {{i}} or e.g. {{i:02d}}")

    return _I_RE.sub(sub, pattern)


def _per_item(r: InputReader, value: Any, key: str, count: int, what: str) -> list[Any]:
    """``numa: 1`` (same for all) or ``numa: [0, 0, 1, 1]`` (one per item, ``count`` long)."""
    if isinstance(value, list):
        if len(value) != count:
            r.fail(key, f"has {len(value)} entries but count is {count}; give one {what} per item or a single value")
        return list(value)
    return [value] * count


@dataclass
class _Body:
    numa: int
    gpus: list[dict[str, Any]]  # per GPU: model, memory_gib, numa, fabric, link
    nvlink_switches: int
    nvlink_pairs: list[tuple[int, int]]
    nics: list[dict[str, Any]]  # per NIC: name, type, rate_gbps, numa, near_gpus, gpudirect
    nvlink_key: str


def _parse_body(r: InputReader, items: Mapping[str, tuple[Any, str]], owner: str) -> _Body:
    """Parse host body keys; ``items`` maps key -> (value, key path prefix where it was written)."""

    def k(name: str, *rest: str | int) -> str:
        base = key_join(items[name][1], name)
        for x in rest:
            base = key_join(base, x)
        return base

    numa = 1
    if "numa" in items:
        numa = r.integer(items["numa"][0], k("numa"), minimum=1, maximum=64)

    gpus_: list[dict[str, Any]] = []
    if "gpus" in items and items["gpus"][0] is not None:
        gk = k("gpus")
        g = r.mapping(items["gpus"][0], gk, _GPU_KEYS, required=("count",), what="GPU count, model, memory_gib, numa")
        count = r.integer(g["count"], key_join(gk, "count"), minimum=1, maximum=4096)
        model = r.string(g.get("model", "GPU"), key_join(gk, "model"))
        mem = r.positive(g.get("memory_gib", 80), key_join(gk, "memory_gib"), "GiB")
        fabric = r.boolean(g.get("fabric", False), key_join(gk, "fabric"))
        link = r.choice(g.get("link", "pcie"), key_join(gk, "link"), ("pcie", "c2c"))
        numas = _per_item(r, g.get("numa", 0), key_join(gk, "numa"), count, "NUMA node")
        for i, n in enumerate(numas):
            nk = key_join(gk, "numa") + (f"[{i}]" if isinstance(g.get("numa"), list) else "")
            r.integer(n, nk, minimum=0)
            if n >= numa:
                r.fail(nk, f"NUMA node {n} does not exist on {owner} (it has numa: {numa}, nodes 0..{numa - 1}); "
                           "raise 'numa' or fix the index")
            gpus_.append(dict(model=model, memory_gib=mem, numa=n, fabric=fabric, link=link))

    switches = 0
    pairs: list[tuple[int, int]] = []
    nvk = ""
    if "nvlink" in items and items["nvlink"][0] not in (None, "none"):
        nvk = k("nvlink")
        nv = r.mapping(items["nvlink"][0], nvk, _NVLINK_KEYS, what="'switches: N' or 'pairs: [[a, b], ...]', or none")
        if "switches" in nv and "pairs" in nv:
            r.fail(nvk, "give either 'switches' (NVSwitch) or 'pairs' (direct links), not both")
        if not nv:
            r.fail(nvk, "is empty; give 'switches: N' or 'pairs: [[a, b], ...]', or write 'nvlink: none'")
        if not gpus_:
            r.fail(nvk, f"{owner} has no GPUs to link; remove 'nvlink' or add 'gpus'")
        if "switches" in nv:
            switches = r.integer(nv["switches"], key_join(nvk, "switches"), minimum=1, maximum=64)
        if "pairs" in nv:
            pk = key_join(nvk, "pairs")
            for j, pr in enumerate(r.seq(nv["pairs"], pk, "[a, b] GPU index pairs")):
                pjk = key_join(pk, j)
                if not (isinstance(pr, list) and len(pr) == 2):
                    r.fail(pjk, f"must be a pair [a, b] of GPU indices, got {_type_name(pr)}")
                a = r.integer(pr[0], key_join(pjk, 0), minimum=0)
                b = r.integer(pr[1], key_join(pjk, 1), minimum=0)
                for x, xi in ((a, 0), (b, 1)):
                    if x >= len(gpus_):
                        r.fail(key_join(pjk, xi), f"GPU {x} does not exist on {owner} (GPUs 0..{len(gpus_) - 1})")
                if a == b:
                    r.fail(pjk, f"links GPU {a} to itself; give two different GPUs")
                pairs.append((min(a, b), max(a, b)))

    nics_: list[dict[str, Any]] = []
    if "nics" in items and items["nics"][0] is not None:
        lk = k("nics")
        seen: dict[str, str] = {}
        for j, raw in enumerate(r.seq(items["nics"][0], lk, "NIC entries")):
            nk = key_join(lk, j)
            n = r.mapping(raw, nk, _NIC_KEYS, required=("name", "type", "rate_gbps"), what="a NIC")
            count = r.integer(n.get("count", 1), key_join(nk, "count"), minimum=1, maximum=256)
            name_pat = r.string(n["name"], key_join(nk, "name"))
            if count > 1 and not _I_RE.search(name_pat):
                r.fail(key_join(nk, "name"), f"count is {count}, so the name must contain {{i}} (e.g. 'mlx5_{{i}}')")
            ntype = r.choice(n["type"], key_join(nk, "type"), ("rdma", "tcp"))
            rate = r.positive(n["rate_gbps"], key_join(nk, "rate_gbps"), "Gb/s")
            gpudirect = r.boolean(n.get("gpudirect", False), key_join(nk, "gpudirect"))
            if gpudirect and ntype != "rdma":
                r.fail(key_join(nk, "gpudirect"), "only rdma NICs can do GPUDirect RDMA; remove it or set type: rdma")
            numas = _per_item(r, n.get("numa", 0), key_join(nk, "numa"), count, "NUMA node")
            near_raw = n.get("near_gpus", [])
            nearks = key_join(nk, "near_gpus")
            near_list: list[list[int]]
            if count == 1:
                near_list = [list(r.seq(near_raw, nearks, "GPU indices"))]
                near_keys = [[key_join(nearks, q) for q in range(len(near_list[0]))]]
            else:
                per = _per_item(r, r.seq(near_raw, nearks, "GPU indices") if near_raw != [] else [[]] * count,
                                nearks, count, "near-GPU entry")
                near_list = []
                near_keys = []
                for q, item in enumerate(per):
                    if isinstance(item, list):
                        near_list.append(item)
                        near_keys.append([f"{nearks}[{q}][{z}]" for z in range(len(item))])
                    else:
                        near_list.append([item])
                        near_keys.append([f"{nearks}[{q}]"])
            for q in range(count):
                name = _expand(r, name_pat, q, key_join(nk, "name"))
                if not _NAME_RE.match(name):
                    r.fail(key_join(nk, "name"), f"NIC name {name!r} may use only letters, digits, '_', '.', '-'")
                if name in seen:
                    r.fail(key_join(nk, "name"), f"duplicate NIC name {name!r} on {owner} (also at {seen[name]}); "
                                                 "give each NIC its own name")
                seen[name] = nk
                numa_k = key_join(nk, "numa") + (f"[{q}]" if isinstance(n.get("numa"), list) else "")
                nn = r.integer(numas[q], numa_k, minimum=0)
                if nn >= numa:
                    r.fail(numa_k, f"NUMA node {nn} does not exist on {owner} (nodes 0..{numa - 1}); fix the index")
                near: list[int] = []
                for z, gi in enumerate(near_list[q]):
                    gk2 = near_keys[q][z]
                    r.integer(gi, gk2, minimum=0)
                    if gi >= len(gpus_):
                        have = f"GPUs 0..{len(gpus_) - 1}" if gpus_ else "no GPUs"
                        r.fail(gk2, f"NIC {name!r} names GPU {gi} but {owner} has {have}; fix the GPU index")
                    near.append(gi)
                nics_.append(dict(name=name, type=ntype, rate_gbps=rate, numa=nn, near_gpus=tuple(near),
                                  gpudirect=gpudirect))
    return _Body(numa, gpus_, switches, pairs, nics_, nvk)


def _match_hosts(r: InputReader, value: Any, key: str, all_hosts: list[str]) -> list[str]:
    """``hosts: all`` or a list of host names / glob patterns (``rack0-tray*``); each must match a host."""
    if value == "all":
        return list(all_hosts)
    items = r.seq(value, key, "host names or patterns, or 'all'")
    if not items:
        r.fail(key, "is empty; list host names or patterns, or write 'all'")
    chosen: list[str] = []
    for j, pat in enumerate(items):
        pk = key_join(key, j)
        r.string(pat, pk)
        found = [h for h in all_hosts if fnmatch.fnmatchcase(h, pat)]
        if not found:
            close = difflib.get_close_matches(pat, all_hosts, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else ""
            r.fail(pk, f"no host named {pat!r}; {hint}hosts are: {_short_list(all_hosts)}")
        for h in found:
            if h not in chosen:
                chosen.append(h)
    return chosen


def _short_list(names: Sequence[str], limit: int = 8) -> str:
    if len(names) <= limit:
        return ", ".join(names)
    return ", ".join(names[:limit]) + f", ... ({len(names)} in all)"


def parse_topology(data: dict[str, Any], file: str, default_name: str) -> Topology:
    """Validate a parsed topology mapping and build the graph. ``file`` is used in error messages."""
    r = InputReader(file)
    r.mapping(data, "", _TOP_KEYS, required=("hosts",), what="a topology")
    name = r.string(data.get("name", default_name), "name")
    description = data.get("description", "")
    if not isinstance(description, str):
        r.fail("description", f"must be a string, got {_type_name(description)}")

    # link classes
    classes = dict(DEFAULT_LINK_CLASSES)
    if "link_classes" in data:
        lc = r.mapping(data["link_classes"], "link_classes", LINK_CLASS_NAMES, what="link class overrides")
        for cname, spec in lc.items():
            ck = key_join("link_classes", cname)
            s = r.mapping(spec, ck, _LINK_KEYS, what="bandwidth_GBps and/or latency_us")
            bw = classes[cname].bandwidth_Bps
            lat = classes[cname].latency_s
            if "bandwidth_GBps" in s:
                v = s["bandwidth_GBps"]
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or not math.isfinite(v):
                    r.fail(key_join(ck, "bandwidth_GBps"),
                           f"must be a positive number, got {v!r}; give the per-direction bandwidth in GB/s")
                bw = float(v) * 1e9
            if "latency_us" in s:
                v = s["latency_us"]
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or not math.isfinite(v):
                    r.fail(key_join(ck, "latency_us"),
                           f"must be a positive number, got {v!r}; give the one-way latency in microseconds")
                lat = float(v) * 1e-6
            classes[cname] = LinkClass(bw, lat)

    # templates
    templates: dict[str, dict[str, Any]] = {}
    if "host_templates" in data:
        tmap = data["host_templates"]
        if not isinstance(tmap, dict):
            r.fail("host_templates", f"must be a mapping of template name -> host body, got {_type_name(tmap)}")
        for tname, body in tmap.items():
            tk = key_join("host_templates", str(tname))
            r.mapping(body, tk, _BODY_KEYS, what="numa, gpus, nvlink, nics")
            _parse_body(r, {kk: (vv, tk) for kk, vv in body.items()}, f"template {tname!r}")
            templates[str(tname)] = body

    # hosts
    hk = "hosts"
    host_list = r.seq(data["hosts"], hk, "host entries")
    if not host_list:
        r.fail(hk, "is empty; give at least one host")
    expanded: list[tuple[str, str, str | None, _Body]] = []  # (name, keypath, machine_id, body)
    seen_hosts: dict[str, str] = {}
    for j, raw in enumerate(host_list):
        ek = key_join(hk, j)
        e = r.mapping(raw, ek, _HOST_KEYS, required=("name",), what="a host")
        items: dict[str, tuple[Any, str]] = {}
        if "template" in e:
            t = r.string(e["template"], key_join(ek, "template"))
            if t not in templates:
                close = difflib.get_close_matches(t, list(templates), n=1, cutoff=0.6)
                hint = f"did you mean {close[0]!r}? " if close else ""
                known = ", ".join(templates) or "none defined"
                r.fail(key_join(ek, "template"), f"unknown template {t!r}; {hint}templates in host_templates: {known}")
            items.update({kk: (vv, key_join("host_templates", t)) for kk, vv in templates[t].items()})
        items.update({kk: (e[kk], ek) for kk in _BODY_KEYS if kk in e})
        count = r.integer(e.get("count", 1), key_join(ek, "count"), minimum=1, maximum=100000)
        start = r.integer(e.get("start", 0), key_join(ek, "start"), minimum=0)
        pat = r.string(e["name"], key_join(ek, "name"))
        if count > 1 and not _I_RE.search(pat):
            r.fail(key_join(ek, "name"), f"count is {count}, so the name must contain {{i}} (e.g. 'tray{{i:02d}}')")
        mid_pat = e.get("machine_id")
        if mid_pat is not None:
            mid_pat = r.string(str(mid_pat) if isinstance(mid_pat, int) and not isinstance(mid_pat, bool) else mid_pat,
                               key_join(ek, "machine_id"))
        for q in range(start, start + count):
            hname = _expand(r, pat, q, key_join(ek, "name"))
            if not _NAME_RE.match(hname):
                r.fail(key_join(ek, "name"), f"host name {hname!r} may use only letters, digits, '_', '.', '-'")
            if hname in seen_hosts:
                r.fail(key_join(ek, "name"), f"duplicate host name {hname!r} (also from {seen_hosts[hname]}); "
                                             "give each host its own name")
            seen_hosts[hname] = ek
            body = _parse_body(r, items, f"host {hname!r}")
            mid = _expand(r, mid_pat, q, key_join(ek, "machine_id")) if mid_pat is not None else None
            expanded.append((hname, ek, mid, body))
    all_hosts = [h for h, _, _, _ in expanded]
    body_of = {h: b for h, _, _, b in expanded}

    # MNNVL domains
    mnnvl: list[tuple[str, list[str], bool, int]] = []
    in_domain: dict[str, str] = {}
    if "mnnvl_domains" in data:
        dk = "mnnvl_domains"
        ids: set[str] = set()
        for j, raw in enumerate(r.seq(data["mnnvl_domains"], dk, "MNNVL domains")):
            ek = key_join(dk, j)
            d = r.mapping(raw, ek, _DOMAIN_KEYS, required=("id", "hosts"), what="an MNNVL domain")
            did = r.string(d["id"], key_join(ek, "id"))
            if did in ids:
                r.fail(key_join(ek, "id"), f"duplicate MNNVL domain id {did!r}; give each domain its own id")
            ids.add(did)
            members = _match_hosts(r, d["hosts"], key_join(ek, "hosts"), all_hosts)
            imex = r.boolean(d.get("imex", True), key_join(ek, "imex"))
            sw = r.integer(d.get("switches", 1), key_join(ek, "switches"), minimum=1, maximum=1024)
            for h in members:
                if h in in_domain:
                    r.fail(key_join(ek, "hosts"), f"host {h!r} is already in MNNVL domain {in_domain[h]!r}; "
                                                  "a host belongs to one domain")
                if not body_of[h].gpus:
                    r.fail(key_join(ek, "hosts"), f"host {h!r} has no GPUs; remove it from the domain")
                if body_of[h].nvlink_key:
                    r.fail(body_of[h].nvlink_key, f"host {h!r} is in MNNVL domain {did!r}, which provides its "
                                                  "NVLink; remove 'nvlink' from the host")
                in_domain[h] = did
            mnnvl.append((did, members, imex, sw))

    # networks
    networks: list[tuple[str, str, list[str], int]] = []
    if "networks" in data:
        nk = "networks"
        names: set[str] = set()
        for j, raw in enumerate(r.seq(data["networks"], nk, "networks")):
            ek = key_join(nk, j)
            n = r.mapping(raw, ek, _NETWORK_KEYS, required=("name", "type"), what="a network")
            nname = r.string(n["name"], key_join(ek, "name"))
            if nname in names:
                r.fail(key_join(ek, "name"), f"duplicate network name {nname!r}; give each network its own name")
            names.add(nname)
            ntype = r.choice(n["type"], key_join(ek, "type"), ("rdma", "tcp"))
            members = _match_hosts(r, n.get("hosts", "all"), key_join(ek, "hosts"), all_hosts)
            hops = r.integer(n.get("hops", 1), key_join(ek, "hops"), minimum=1, maximum=16)
            if not any(nic["type"] == ntype for h in members for nic in body_of[h].nics):
                r.fail(key_join(ek, "type"), f"no {ntype} NIC on any of its hosts; add {ntype} NICs or fix the type")
            networks.append((nname, ntype, members, hops))

    g = _build_graph(expanded, mnnvl, networks, classes)
    domains: list[NvlinkDomain] = []
    for h, _, _, b in expanded:
        if h in in_domain or not b.gpus:
            continue
        if b.nvlink_switches:
            domains.append(NvlinkDomain(f"{h}/nvlink", "host", tuple(GpuRef(h, i) for i in range(len(b.gpus))), False))
        elif b.nvlink_pairs:
            comp = nx.Graph()
            comp.add_edges_from(b.nvlink_pairs)
            parts = sorted((sorted(c) for c in nx.connected_components(comp)), key=lambda c: c[0])
            for q, part in enumerate(parts):
                did = f"{h}/nvlink" if len(parts) == 1 else f"{h}/nvlink{q}"
                domains.append(NvlinkDomain(did, "host", tuple(GpuRef(h, i) for i in part), False))
    for did, members, imex, _ in mnnvl:
        refs = tuple(GpuRef(h, i) for h in members for i in range(len(body_of[h].gpus)))
        domains.append(NvlinkDomain(did, "mnnvl", refs, imex))
    return Topology(name=name, source=file, graph=g, link_classes=classes, domains=tuple(domains),
                    description=description.strip())


def _default_machine_id(host: str) -> str:
    return hashlib.md5(f"machine-id:{host}".encode()).hexdigest()


def _boot_id(host: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_DNS, f"boot.{host}.mooncake-emu"))


def _build_graph(
    expanded: list[tuple[str, str, str | None, _Body]],
    mnnvl: list[tuple[str, list[str], bool, int]],
    networks: list[tuple[str, str, list[str], int]],
    classes: dict[str, LinkClass],
) -> nx.Graph:
    g = nx.Graph()

    def edge(a: str, b: str, cls: str, bw: float | None = None) -> None:
        c = classes[cls]
        g.add_edge(a, b, cls=cls, bandwidth_Bps=c.bandwidth_Bps if bw is None else bw, latency_s=c.latency_s)

    for h, _, mid, b in expanded:
        hn = f"host:{h}"
        g.add_node(hn, kind="host", name=h, machine_id=mid or _default_machine_id(h), boot_id=_boot_id(h),
                   numa_nodes=b.numa, machine_id_overridden=mid is not None)
        edge(hn, hn, "loopback")
        for n in range(b.numa):
            nn = f"numa:{h}:{n}"
            g.add_node(nn, kind="numa", host=h, index=n)
            edge(nn, nn, "shm")
            for m in range(n):
                edge(f"numa:{h}:{m}", nn, "socket")
        for i, gp in enumerate(b.gpus):
            gn = f"gpu:{h}:{i}"
            g.add_node(gn, kind="gpu", host=h, index=i, model=gp["model"], memory_gib=gp["memory_gib"],
                       numa=gp["numa"], fabric=gp["fabric"])
            edge(gn, f"numa:{h}:{gp['numa']}", gp["link"])
        if b.nvlink_switches:
            share = classes["nvlink"].bandwidth_Bps / b.nvlink_switches
            for s in range(b.nvlink_switches):
                sn = f"nvswitch:{h}-{s}"
                g.add_node(sn, kind="nvswitch", name=f"{h}-{s}", host=h, domain=f"{h}/nvlink")
                for i in range(len(b.gpus)):
                    edge(f"gpu:{h}:{i}", sn, "nvlink", share)
        if b.nvlink_pairs:
            peers: dict[int, int] = {}
            for a, c in b.nvlink_pairs:
                peers[a] = peers.get(a, 0) + 1
                peers[c] = peers.get(c, 0) + 1
            for a, c in b.nvlink_pairs:
                # a GPU's NVLink bandwidth is split over its direct peers
                bw = classes["nvlink"].bandwidth_Bps / max(peers[a], peers[c])
                edge(f"gpu:{h}:{a}", f"gpu:{h}:{c}", "nvlink", bw)
        for nic in b.nics:
            nn = f"nic:{h}:{nic['name']}"
            g.add_node(nn, kind="nic", host=h, **nic)
            edge(nn, f"numa:{h}:{nic['numa']}", "pcie")
            for gi in nic["near_gpus"]:
                edge(f"gpu:{h}:{gi}", nn, "pcie")
    body_of = {h: b for h, _, _, b in expanded}
    for did, members, _imex, sw in mnnvl:
        share = classes["mnnvl"].bandwidth_Bps / sw
        for s in range(sw):
            sn = f"nvswitch:{did}-{s}"
            g.add_node(sn, kind="nvswitch", name=f"{did}-{s}", host=None, domain=did)
            for h in members:
                for i in range(len(body_of[h].gpus)):
                    edge(f"gpu:{h}:{i}", sn, "mnnvl", share)
    cap = classes["network"].bandwidth_Bps
    for nname, ntype, members, hops in networks:
        sn = f"netswitch:{nname}"
        g.add_node(sn, kind="netswitch", name=nname, type=ntype, hops=hops)
        for h in members:
            for nic in body_of[h].nics:
                if nic["type"] == ntype:
                    edge(f"nic:{h}:{nic['name']}", sn, "network", min(cap, nic["rate_gbps"] * 1e9 / 8))
    return g


# --------------------------------------------------------------------------------------------------------
# Queries
# --------------------------------------------------------------------------------------------------------


def _host_check(topo: Topology, host: str) -> None:
    if host not in topo._idx.host_attr:
        raise ValueError(f"no host {host!r} in topology {topo.name!r} (hosts: {_short_list(topo._idx.hosts)})")


def hosts(topo: Topology) -> list[str]:
    """Host names in declaration order.

    >>> hosts(load_topology("hgx-h100-x2"))
    ['node0', 'node1']
    """
    return list(topo._idx.hosts)


def gpus(topo: Topology, host: str | None = None) -> list[GpuRef]:
    """GPUs of one host, or of all hosts (hosts in declaration order, then index).

    >>> gpus(load_topology("hgx-h100-x2"), "node1")[0]
    GpuRef(host='node1', index=0)
    """
    if host is not None:
        _host_check(topo, host)
        return list(topo._idx.gpus_by_host[host])
    return [ref for h in topo._idx.hosts for ref in topo._idx.gpus_by_host[h]]


def machine_id(topo: Topology, host: str) -> str:
    """The host's /etc/machine-id (default derived from the host name; files may clone it).

    >>> len(machine_id(load_topology("hgx-h100"), "node0"))
    32
    """
    _host_check(topo, host)
    return str(topo._idx.host_attr[host]["machine_id"])


def boot_id(topo: Topology, host: str) -> str:
    """The host's boot id (always unique per host).

    >>> t = load_topology("hgx-h100-x2-cloned")
    >>> boot_id(t, "node0") != boot_id(t, "node1")
    True
    """
    _host_check(topo, host)
    return str(topo._idx.host_attr[host]["boot_id"])


def same_machine(topo: Topology, a_host: str, b_host: str, use_boot_id: bool = False) -> bool:
    """Would Mooncake think the two hosts are one machine? Compares machine ids (or boot ids, #1863).

    >>> t = load_topology("hgx-h100-x2-cloned")
    >>> same_machine(t, "node0", "node1"), same_machine(t, "node0", "node1", use_boot_id=True)
    (True, False)
    """
    if use_boot_id:
        return boot_id(topo, a_host) == boot_id(topo, b_host)
    return machine_id(topo, a_host) == machine_id(topo, b_host)


def _gpu_attr(topo: Topology, gpu: GpuRef) -> dict[str, Any]:
    try:
        return topo._idx.gpu_attr[gpu]
    except KeyError:
        raise ValueError(f"no GPU {gpu.index} on host {gpu.host!r} in topology {topo.name!r}") from None


def numa_of_gpu(topo: Topology, gpu: GpuRef) -> int:
    """NUMA node a GPU is attached to.

    >>> numa_of_gpu(load_topology("hgx-h100"), GpuRef("node0", 5))
    1
    """
    return int(_gpu_attr(topo, gpu)["numa"])


def location_labels(topo: Topology, host: str, gpu: int | None, numa: int = 0) -> tuple[str, ...]:
    """Location labels a rank may use, most specific first: GPU rank ``("cuda:i", "cpu:<numa>", "*")``,
    CPU rank ``("cpu:<numa>", "*")``.

    >>> location_labels(load_topology("hgx-h100"), "node0", 6)
    ('cuda:6', 'cpu:1', '*')
    """
    _host_check(topo, host)
    if gpu is None:
        return (f"cpu:{numa}", "*")
    return (f"cuda:{gpu}", f"cpu:{numa_of_gpu(topo, GpuRef(host, gpu))}", "*")


def nvlink_domain(topo: Topology, gpu: GpuRef) -> NvlinkDomain | None:
    """The GPU's MNNVL clique if it is in one, else its host NVLink domain, else None (PCIe only).

    >>> nvlink_domain(load_topology("gb200-nvl72"), GpuRef("tray00", 0)).kind
    'mnnvl'
    """
    _gpu_attr(topo, gpu)
    return topo._idx.domain_of.get(gpu)


def fabric_supported(topo: Topology, gpu: GpuRef) -> bool:
    """CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_FABRIC_SUPPORTED for this GPU.

    >>> fabric_supported(load_topology("gb200-nvl72"), GpuRef("tray03", 2))
    True
    """
    return bool(_gpu_attr(topo, gpu)["fabric"])


def nics(topo: Topology, host: str, type: str | None = None) -> list[Nic]:
    """NICs of a host in declaration order, optionally only one type (``rdma`` or ``tcp``).

    >>> [n.name for n in nics(load_topology("hgx-h100"), "node0", "rdma")][:2]
    ['mlx5_0', 'mlx5_1']
    """
    _host_check(topo, host)
    return [n for n in topo._idx.nics_by_host[host] if type is None or n.type == type]


def _parse_label(label: str) -> tuple[str, int]:
    if label == "*" or ":" not in label:
        return "*", -1
    kind, _, idx = label.partition(":")
    try:
        return kind, int(idx)
    except ValueError:
        raise ValueError(f"bad location label {label!r}; use 'cuda:<i>', 'cpu:<numa>' or '*'") from None


def nic_tiers(topo: Topology, host: str, label: str) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """TENT's three RDMA NIC tiers for a location label (mooncake-pg.md section 10).

    ``cuda:i``: tier 0 = NICs at PCIe distance 0 (``near_gpus`` contains i; else the NICs at the minimum
    distance: same NUMA, else all), tier 1 = the rest on the GPU's NUMA node, tier 2 = others.
    ``cpu:N``: tier 0 = NICs on NUMA N, tier 2 = others. ``"*"`` (or an unknown type): all in tier 2.

    >>> nic_tiers(load_topology("hgx-h100"), "node0", "cuda:3")[0]
    ('mlx5_3',)
    """
    key = ("tiers", host, label)
    cache = topo._idx.cache
    if key in cache:
        return cache[key]  # type: ignore[no-any-return]
    rd = nics(topo, host, "rdma")
    kind, idx = _parse_label(label)
    t0: list[str] = []
    t1: list[str] = []
    t2: list[str] = []
    if kind == "cuda":
        numa = numa_of_gpu(topo, GpuRef(host, idx))
        dist = {n.name: (0 if idx in n.near_gpus else 1 if n.numa == numa else 2) for n in rd}
        best = min(dist.values(), default=2)
        for n in rd:
            d = dist[n.name]
            (t0 if d == best else t1 if d == 1 else t2).append(n.name)
    elif kind == "cpu":
        for n in rd:
            (t0 if n.numa == idx else t2).append(n.name)
    else:
        t2 = [n.name for n in rd]
    result = (tuple(t0), tuple(t1), tuple(t2))
    cache[key] = result
    return result


def te_nic_preference(topo: Topology, host: str, label: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """TE's (preferred, available) RDMA NICs for a location (mooncake-pg.md section 10).

    ``cpu:N``: preferred = NICs on NUMA N, available = the rest. ``cuda:i``: candidates = NICs on the GPU's
    NUMA node (else all); preferred = candidates at the smallest PCIe distance, available = the rest.
    ``"*"``: preferred = all NICs.

    >>> te_nic_preference(load_topology("hgx-h100"), "node0", "cuda:5")[0]
    ('mlx5_5',)
    """
    rd = nics(topo, host, "rdma")
    kind, idx = _parse_label(label)
    if kind == "cpu":
        pref = [n.name for n in rd if n.numa == idx]
    elif kind == "cuda":
        numa = numa_of_gpu(topo, GpuRef(host, idx))
        cands = [n for n in rd if n.numa == numa] or rd
        dist = {n.name: (0 if idx in n.near_gpus else 1) for n in cands}
        best = min(dist.values(), default=1)
        pref = [n.name for n in cands if dist[n.name] == best]
    else:
        pref = [n.name for n in rd]
    return tuple(pref), tuple(n.name for n in rd if n.name not in pref)


def _edge_bandwidths(topo: Topology) -> dict[tuple[str, str], float]:
    """Every edge's bandwidth by (node, node), both ways round: one dict lookup per hop where routing needs it
    (a 512-rank run routes 520,000 pairs; the graph's views cost two Python-level lookups per edge)."""
    key = ("edge-bandwidths",)
    cache = topo._idx.cache
    table: dict[tuple[str, str], float] | None = cache.get(key)
    if table is None:
        table = {}
        for a, b, bw in topo.graph.edges(data="bandwidth_Bps"):
            table[(a, b)] = table[(b, a)] = bw
        cache[key] = table
    return table


def _make_path(topo: Topology, transport: str, hops: list[tuple[str, str]], latency: float,
               cap: float = math.inf) -> Path:
    bandwidth = _edge_bandwidths(topo)
    bw = cap
    for hop in hops:
        bw = min(bw, bandwidth[hop])
    return Path(transport, tuple(hops), float(bw), latency)


def _mem_node(ep: Endpoint) -> str:
    return f"gpu:{ep.host}:{ep.gpu}" if ep.memory == "gpu" else f"numa:{ep.host}:{ep.numa}"


def _check_endpoint(topo: Topology, ep: Endpoint) -> None:
    """Raise ``ValueError`` for an endpoint the topology lacks (a valid one is remembered: routing asks often)."""
    key = ("endpoint-ok", ep)
    if key in topo._idx.cache:
        return
    _host_check(topo, ep.host)
    if ep.memory == "gpu":
        if ep.gpu is None:
            raise ValueError(f"endpoint on {ep.host!r} has memory='gpu' but no gpu index")
        _gpu_attr(topo, GpuRef(ep.host, ep.gpu))
    elif ep.memory == "host":
        n = int(topo._idx.host_attr[ep.host]["numa_nodes"])
        if not 0 <= ep.numa < n:
            raise ValueError(f"host {ep.host!r} has NUMA nodes 0..{n - 1}, not {ep.numa}")
    else:
        raise ValueError(f"endpoint memory must be 'gpu' or 'host', got {ep.memory!r}")
    topo._idx.cache[key] = True


def _desc(ep: Endpoint) -> str:
    return f"GPU memory (GPU {ep.gpu}) of {ep.host}" if ep.memory == "gpu" else f"host memory (NUMA {ep.numa}) of {ep.host}"


def _to_numa(topo: Topology, ep: Endpoint) -> tuple[list[tuple[str, str]], str]:
    """Edges from the endpoint's memory to its NUMA node (staging through host memory)."""
    if ep.memory == "gpu":
        numa = f"numa:{ep.host}:{numa_of_gpu(topo, GpuRef(ep.host, ep.gpu or 0))}"
        return [(_mem_node(ep), numa)], numa
    return [], _mem_node(ep)


def _to_nic(topo: Topology, ep: Endpoint, nic: Nic) -> list[tuple[str, str]]:
    """Edges from the endpoint's memory to a NIC: direct PCIe for a near GPU, else via the NUMA nodes."""
    mem = _mem_node(ep)
    if ep.memory == "gpu" and topo.graph.has_edge(mem, nic.node):
        return [(mem, nic.node)]
    legs, numa = _to_numa(topo, ep)
    nic_numa = f"numa:{nic.host}:{nic.numa}"
    if numa != nic_numa:
        legs.append((numa, nic_numa))
    legs.append((nic_numa, nic.node))
    return legs


def _reverse(hops: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(b, a) for a, b in reversed(hops)]


def _rdma_leg(topo: Topology, ep: Endpoint) -> tuple[Nic, list[tuple[str, str]]] | NoPath:
    """One side of an RDMA path (cached per endpoint; a path joins two of them): the first NIC of the best
    non-empty TENT tier for the memory's label and the edges from the memory to it."""
    key = ("rdma-leg", ep)
    cache = topo._idx.cache
    hit = cache.get(key)
    if hit is None:
        label = f"cuda:{ep.gpu}" if ep.memory == "gpu" else f"cpu:{ep.numa}"
        tiers = nic_tiers(topo, ep.host, label)
        name = next((t[0] for t in tiers if t), None)
        if name is None:
            hit = NoPath("rdma", f"host {ep.host} has no RDMA NIC")
        else:
            nic = next(n for n in nics(topo, ep.host, "rdma") if n.name == name)
            if ep.memory == "gpu" and not nic.gpudirect:
                hit = NoPath("rdma", f"NIC {nic.name} of {ep.host} has no GPUDirect RDMA, so GPU {ep.gpu}'s memory "
                                     "cannot be registered on it")
            else:
                hit = (nic, _to_nic(topo, ep, nic))
        cache[key] = hit
    return hit


def _common_switch(topo: Topology, a: str, b: str) -> tuple[str, int] | None:
    """The first network switch (in ``a``'s neighbour order) that NICs ``a`` and ``b`` both attach to, and its
    hop count."""
    key = ("netswitches", a)
    cache = topo._idx.cache
    switches = cache.get(key)
    g = topo.graph
    if switches is None:
        switches = cache[key] = [(sw, int(g.nodes[sw]["hops"])) for sw in g.neighbors(a)
                                 if g.nodes[sw].get("kind") == "netswitch"]
    edges = _edge_bandwidths(topo)
    for sw, hops in switches:
        if (sw, b) in edges:
            return sw, hops
    return None


def _gpu_to_gpu(topo: Topology, transport: str, a: GpuRef, b: GpuRef) -> Path | NoPath:
    """NVLink route between two GPUs: direct edge, or via the switches both attach to (striped)."""
    g = topo.graph
    if a == b:
        c = topo.link_classes["device"]
        return Path(transport, (), c.bandwidth_Bps, c.latency_s)
    an, bn = a.node, b.node
    if g.has_edge(an, bn) and g.edges[an, bn]["cls"] in ("nvlink", "mnnvl"):
        e = g.edges[an, bn]
        return Path(transport, ((an, bn),), float(e["bandwidth_Bps"]), float(e["latency_s"]))
    common = [s for s in g.neighbors(an) if g.nodes[s].get("kind") == "nvswitch" and g.has_edge(s, bn)]
    if not common:
        return NoPath(transport, f"GPU {a.index} of {a.host} and GPU {b.index} of {b.host} have no NVLink between "
                                 "them (no direct link, no common NVSwitch)")
    bw = sum(min(g.edges[an, s]["bandwidth_Bps"], g.edges[s, bn]["bandwidth_Bps"]) for s in common)
    s0 = common[0]
    return Path(transport, ((an, s0), (s0, bn)), float(bw), float(g.edges[an, s0]["latency_s"]))


def path(topo: Topology, src: Endpoint, dst: Endpoint, transport: str) -> Path | NoPath:
    """Route ``transport`` from ``src`` to ``dst``: a :class:`Path` or a :class:`NoPath` with a reason.

    Rules: ``nvlink`` (CUDA IPC) GPU memory on one host, over NVLink within one NVLink domain, else over PCIe
    through the GPUs' NUMA nodes; ``mnnvl`` GPU memory in one MNNVL
    domain with IMEX on and fabric support on both GPUs; ``rdma`` through each side's first NIC of the best
    non-empty TENT tier for the memory's label (GPU memory needs a GPUDirect NIC), then a shared rdma
    network (same NIC on one host: NIC loopback); ``tcp`` through tcp (then rdma) NICs sharing a network
    between hosts, or loopback on one host; ``shm`` host memory on one host. Latency: nvlink/mnnvl/shm/
    loopback use their class latency; rdma and tcp use the transport's base latency plus the network class
    latency for each switch hop beyond the first. Bandwidth is the bottleneck of the edges crossed (NVLink
    through NVSwitches is striped over every common switch).

    >>> t = load_topology("hgx-h100")
    >>> path(t, Endpoint("node0", "gpu", 0), Endpoint("node0", "gpu", 1), "nvlink").bandwidth_Bps
    450000000000.0
    """
    key = ("path", src, dst, transport)
    cache = topo._idx.cache
    if key in cache:
        return cache[key]  # type: ignore[no-any-return]
    result = _path(topo, src, dst, transport)
    cache[key] = result
    return result


def _path(topo: Topology, src: Endpoint, dst: Endpoint, transport: str) -> Path | NoPath:
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown transport {transport!r}; use one of {', '.join(TRANSPORTS)}")
    _check_endpoint(topo, src)
    _check_endpoint(topo, dst)
    cls = topo.link_classes
    same_host = src.host == dst.host

    if transport in ("nvlink", "mnnvl"):
        for side, ep in (("source", src), ("destination", dst)):
            if ep.memory != "gpu":
                return NoPath(transport, f"{transport} moves GPU memory only; the {side} is {_desc(ep)} "
                                         "(use rdma, tcp or shm)")
        a, b = GpuRef(src.host, src.gpu or 0), GpuRef(dst.host, dst.gpu or 0)
        da, db = topo._idx.domain_of.get(a), topo._idx.domain_of.get(b)
        if transport == "nvlink":
            if not same_host:
                return NoPath("nvlink", f"nvlink (CUDA IPC) connects GPUs of one host; {src.host} and {dst.host} "
                                        "are different hosts (use mnnvl or rdma)")
            if a == b:
                return _gpu_to_gpu(topo, "nvlink", a, b)
            if da is None or db is None or da is not db:
                # The transport is CUDA IPC plus cudaMemcpyAsync, which needs no NVLink: between GPUs of one host
                # without one (PCIe only, or separate NVLink islands) the copy crosses PCIe (peer to peer, or
                # staged by the driver), through each GPU's NUMA node
                legs_a, numa_a = _to_numa(topo, src)
                legs_b, numa_b = _to_numa(topo, dst)
                hops = legs_a + ([(numa_a, numa_b)] if numa_a != numa_b else []) + _reverse(legs_b)
                return _make_path(topo, "nvlink", hops, cls["pcie"].latency_s)
            return _gpu_to_gpu(topo, "nvlink", a, b)
        # mnnvl
        if da is None or da.kind != "mnnvl":
            return NoPath("mnnvl", f"GPU {a.index} of {a.host} is in no MNNVL domain")
        if db is None or db is not da:
            return NoPath("mnnvl", f"GPU {b.index} of {b.host} is not in MNNVL domain {da.id!r} of GPU {a.index} "
                                   f"of {a.host}")
        if not da.imex:
            return NoPath("mnnvl", f"MNNVL domain {da.id!r} has IMEX off, so fabric handles cannot be imported")
        for ref in (a, b):
            if not fabric_supported(topo, ref):
                return NoPath("mnnvl", f"GPU {ref.index} of {ref.host} does not support fabric handles "
                                       "(CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_FABRIC_SUPPORTED = 0)")
        return _gpu_to_gpu(topo, "mnnvl", a, b)

    if transport == "shm":
        if not same_host:
            return NoPath("shm", f"shm works within one host; {src.host} and {dst.host} are different hosts")
        for side, ep in (("source", src), ("destination", dst)):
            if ep.memory != "host":
                return NoPath("shm", f"shm moves host memory only; the {side} is {_desc(ep)} (use nvlink or tcp)")
        a_n, b_n = _mem_node(src), _mem_node(dst)
        hops = [(a_n, a_n)] if a_n == b_n else [(a_n, b_n)]
        return _make_path(topo, "shm", hops, cls["shm"].latency_s, cls["shm"].bandwidth_Bps)

    if transport == "rdma":
        legs = []
        for ep in (src, dst):
            leg = _rdma_leg(topo, ep)
            if isinstance(leg, NoPath):
                return leg
            legs.append(leg)
        (na, hops_a), (nb, hops_b) = legs
        hops = list(hops_a)
        latency = cls["rdma"].latency_s
        if na != nb:
            sw = _common_switch(topo, na.node, nb.node)
            if sw is None:
                return NoPath("rdma", f"no rdma network joins NIC {na.name} of {na.host} and NIC {nb.name} of "
                                      f"{nb.host}")
            hops += [(na.node, sw[0]), (sw[0], nb.node)]
            latency += (sw[1] - 1) * cls["network"].latency_s
        hops += _reverse(hops_b)
        return _make_path(topo, "rdma", hops, latency)

    # tcp
    if same_host:
        legs_a, _ = _to_numa(topo, src)
        legs_b, _ = _to_numa(topo, dst)
        hn = f"host:{src.host}"
        hops = legs_a + [(hn, hn)] + _reverse(legs_b)
        return _make_path(topo, "tcp", hops, cls["loopback"].latency_s)
    order = {"tcp": 0, "rdma": 1}
    cands_a = sorted(nics(topo, src.host), key=lambda n: order[n.type])
    cands_b = sorted(nics(topo, dst.host), key=lambda n: order[n.type])
    for na in cands_a:
        for nb in cands_b:
            sw = _common_switch(topo, na.node, nb.node)
            if sw is None:
                continue
            legs_a, numa_a = _to_numa(topo, src)
            legs_b, numa_b = _to_numa(topo, dst)
            hops = legs_a
            if numa_a != f"numa:{na.host}:{na.numa}":
                hops.append((numa_a, f"numa:{na.host}:{na.numa}"))
            hops += [(f"numa:{na.host}:{na.numa}", na.node), (na.node, sw[0]), (sw[0], nb.node),
                     (nb.node, f"numa:{nb.host}:{nb.numa}")]
            if numa_b != f"numa:{nb.host}:{nb.numa}":
                hops.append((f"numa:{nb.host}:{nb.numa}", numa_b))
            hops += _reverse(legs_b)
            return _make_path(topo, "tcp", hops, cls["tcp"].latency_s + (sw[1] - 1) * cls["network"].latency_s)
    return NoPath("tcp", f"no network joins a NIC of {src.host} and a NIC of {dst.host}")


def link_rate_summary(topo: Topology) -> list[tuple[str, int, float, float]]:
    """Edges grouped by (class, bandwidth, latency): ``[(cls, count, bandwidth_Bps, latency_s), ...]``.

    >>> [row[:2] for row in link_rate_summary(load_topology("hgx-h100")) if row[0] == "nvlink"]
    [('nvlink', 32)]
    """
    key = ("summary",)
    cache = topo._idx.cache
    if key not in cache:
        counts: dict[tuple[str, float, float], int] = {}
        for _a, _b, d in topo.graph.edges(data=True):
            k = (d["cls"], d["bandwidth_Bps"], d["latency_s"])
            counts[k] = counts.get(k, 0) + 1
        order = {c: i for i, c in enumerate(LINK_CLASS_NAMES)}
        cache[key] = sorted(((c, n, bw, lat) for (c, bw, lat), n in counts.items()),
                            key=lambda row: (order.get(row[0], 99), -row[2]))
    return list(cache[key])


def to_dot(topo: Topology) -> str:
    """Graphviz DOT text of the topology graph (nodes by kind, edges labelled with class and GB/s)."""
    shapes = {"host": "house", "numa": "box", "gpu": "box3d", "nvswitch": "diamond", "nic": "ellipse",
              "netswitch": "doubleoctagon"}
    out = [f'graph "{topo.name}" {{', "  graph [overlap=false];"]
    for node, d in topo.graph.nodes(data=True):
        label = node
        if d["kind"] == "gpu":
            label = f"{node}\\n{d['model']} NUMA {d['numa']}"
        elif d["kind"] == "nic":
            label = f"{node}\\n{d['type']} {d['rate_gbps']:g}G"
        out.append(f'  "{node}" [shape={shapes.get(d["kind"], "ellipse")}, label="{label}"];')
    for a, b, d in topo.graph.edges(data=True):
        bw = d["bandwidth_Bps"]
        bws = "" if math.isinf(bw) else f" {bw / 1e9:g}GB/s"
        out.append(f'  "{a}" -- "{b}" [label="{d["cls"]}{bws}"];')
    out.append("}")
    return "\n".join(out) + "\n"
