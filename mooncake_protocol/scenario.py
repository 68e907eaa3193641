"""Scenario model: a YAML file (docs/scenario-format.md) -> a validated, frozen :class:`Scenario`.

Rules of this module:

* The only I/O is reading the scenario file and the topology file it names (resolved relative to the
  scenario's directory, or a bundled name). Every problem is an
  :class:`~mooncake_protocol.errors.InputError` naming the file and the key path (``workload[2].reduce_op``).
* Everything a driver needs is decided here, once, deterministically: rank placement, backend and
  engine defaults, the policy, input rules (parsed without ``eval``), what the hardware must offer to
  realise the scenario for real.
* Validation checks what the *file* says, not what the protocol will do with it: an ``avg`` reduce is
  valid input here; the protocol rejects it at run time (failure mode 14).
"""

from __future__ import annotations

import difflib
import pathlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .causes import CAUSE_CODES
from .policy import PRESETS, SWITCHES, Policy, make_policy
from .resources import resolve
from .topology import (
    GpuRef,
    InputReader,
    Topology,
    gpus,
    hosts,
    key_join,
    load_topology,
    nics,
    numa_of_gpu,
    read_yaml,
)

__all__ = [
    "BACKENDS",
    "DTYPES",
    "ENGINES",
    "ENV_KEYS",
    "FAULT_KINDS",
    "OPS",
    "PHASES",
    "REDUCE_OPS",
    "Collective",
    "Deadlines",
    "Expect",
    "Fault",
    "InputRule",
    "OutputExpect",
    "RankPlacement",
    "Realisable",
    "Scenario",
    "TentConfig",
    "TentTransports",
    "load_scenario",
    "parse_scenario",
]

BACKENDS: tuple[str, ...] = ("cuda", "cpu")
ENGINES: tuple[str, ...] = ("tent", "te")
PHASES: tuple[str, ...] = ("bootstrap", "warmup", "collective")
VERDICTS: tuple[str, ...] = ("completed", "error", "hang")
EXPECT_PHASES: tuple[str, ...] = ("bootstrap", "warmup", "collective", "done")
OPS: tuple[str, ...] = ("allreduce", "reduce", "broadcast", "allgather", "gather", "scatter", "alltoall",
                        "reduce_scatter", "barrier", "send_recv")
REDUCING_OPS: tuple[str, ...] = ("allreduce", "reduce", "reduce_scatter")
DTYPES: tuple[str, ...] = ("uint8", "int8", "int16", "int32", "int64", "float16", "bfloat16", "float32", "float64",
                           "bool")
REDUCE_OPS: tuple[str, ...] = ("sum", "min", "max", "product", "avg", "band", "bor")
ENV_KEYS: tuple[str, ...] = ("MC_USE_NVLINK_IPC", "MC_FORCE_TCP", "MC_FORCE_HCA", "MC_FORCE_MNNVL",
                             "MC_INTRANODE_NVLINK", "MC_ENABLE_MNNVL", "MC_USE_TENT", "MC_MIN_PRC_PORT",
                             "MC_MAX_PRC_PORT", "MC_PATH_ROUNDROBIN", "MC_USE_IPV6", "CUDA_MODULE_LOADING")
TRANSPORT_SWITCHES: tuple[str, ...] = ("tcp", "shm", "rdma", "nvlink", "mnnvl")

#: fault kind -> (required keys, optional keys)
FAULT_KINDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "hold_port": (("host", "port"), ()),
    "skip_publish": (("rank",), ()),
    "extra_backend": (("rank",), ("count",)),
    "advertise_host": (("rank", "address"), ()),
    "close_port": (("rank",), ()),
    "kill_rank": (("rank", "at"), ("seconds",)),
    "pause_rank": (("rank", "at", "seconds"), ()),
    "delay_store": (("seconds",), ()),
    "slow_peer": (("rank", "seconds"), ()),
    "concurrent_groups": (("count",), ()),
    "block_direction": (("ranks",), ()),
}

_TOP_KEYS = ("name", "description", "topology", "ranks", "placement", "ranks_per_host", "backend", "engine",
             "policy", "env", "tent", "faults", "workload", "data", "deadlines", "seed", "expect", "realisable")
_COLL_KEYS = ("op", "dtype", "count", "reduce_op", "root", "input", "expect", "src", "dst")

Number = int | float


@dataclass(frozen=True)
class RankPlacement:
    """Where a rank runs. ``gpu`` is its GPU (cuda backend) or None (cpu backend); ``numa`` its NUMA node;
    ``device`` the process's current CUDA device (cuda: = gpu; cpu backend on a GPU host: local rank modulo
    the host's GPUs, the device a pre-#1863 CPU backend would label buffers with; None on GPU-less hosts)."""

    rank: int
    host: str
    gpu: int | None
    numa: int
    device: int | None = None


@dataclass(frozen=True)
class TentTransports:
    tcp: bool = True
    shm: bool = False
    rdma: bool = True
    nvlink: bool = True
    mnnvl: bool = False


@dataclass(frozen=True)
class TentConfig:
    """The MC_TENT_CONF equivalent. ``rpc_server_port`` 0 means a random port in TENT's range."""

    transports: TentTransports = field(default_factory=TentTransports)
    rpc_server_port: int = 0
    rpc_server_hostname: str | None = None


@dataclass(frozen=True)
class Fault:
    """An injected fault. Fields used per kind (others stay None/empty):

    hold_port: host, port | skip_publish: rank | extra_backend: rank, count | advertise_host: rank, address |
    close_port: rank | kill_rank: rank, at | pause_rank: rank, at, seconds | delay_store: seconds |
    slow_peer: rank, seconds | concurrent_groups: count | block_direction: ranks (a pair: WRITEs a -> b fail)
    """

    kind: str
    rank: int | None = None
    host: str | None = None
    port: int | None = None
    count: int | None = None
    address: str | None = None
    at: str | None = None
    seconds: float | None = None
    ranks: tuple[int, ...] = ()


_TOKEN_RE = re.compile(r"\s*(?:(\d+)|(rank|index)|([+\-*]))")


@dataclass(frozen=True)
class InputRule:
    """Input element ``index`` of ``rank`` = ``rank_coef * rank + index_coef * index + const``.

    >>> InputRule.parse("rank * 100 + index").values(2, 3)
    [200, 201, 202]
    """

    rank_coef: int
    index_coef: int
    const: int
    text: str = ""

    def values(self, rank: int, count: int) -> list[int]:
        base = self.rank_coef * rank + self.const
        return [base + self.index_coef * i for i in range(count)]

    @classmethod
    def parse(cls, text: str) -> InputRule:
        """Parse a linear rule over ``rank``, ``index`` and integers (``+``, ``-``, ``*``); raises ValueError."""
        tokens: list[str] = []
        pos = 0
        src = text.strip()
        if not src:
            raise ValueError("is empty")
        while pos < len(src):
            m = _TOKEN_RE.match(src, pos)
            if m is None or m.end() == pos:
                raise ValueError(f"cannot read {src[pos:]!r}")
            tokens.append(m.group(1) or m.group(2) or m.group(3))
            pos = m.end()
            while pos < len(src) and src[pos].isspace():
                pos += 1
        coef = {"rank": 0, "index": 0, "": 0}
        i = 0
        sign = 1
        expect_term = True
        while i < len(tokens):
            if expect_term:
                while tokens[i] in ("+", "-"):
                    if tokens[i] == "-":
                        sign = -sign
                    i += 1
                    if i >= len(tokens):
                        raise ValueError("ends with an operator")
                value = 1
                var = ""
                while True:
                    t = tokens[i]
                    if t.isdigit():
                        value *= int(t)
                    elif t in ("rank", "index"):
                        if var:
                            raise ValueError(f"{var} * {t} is not linear")
                        var = t
                    else:
                        raise ValueError(f"unexpected {t!r}")
                    i += 1
                    if i < len(tokens) and tokens[i] == "*":
                        i += 1
                        if i >= len(tokens):
                            raise ValueError("ends with '*'")
                        continue
                    break
                coef[var] += sign * value
                sign = 1
                expect_term = False
            else:
                t = tokens[i]
                if t not in ("+", "-"):
                    raise ValueError(f"expected + or - before {t!r}")
                sign = -1 if t == "-" else 1
                i += 1
                if i >= len(tokens):
                    raise ValueError("ends with an operator")
                expect_term = True
        return cls(coef["rank"], coef["index"], coef[""], src)

    def __str__(self) -> str:
        return self.text or f"{self.rank_coef} * rank + {self.index_coef} * index + {self.const}"


@dataclass(frozen=True)
class OutputExpect:
    """Expected output: ``mode`` ``all`` (same values on every rank), ``root`` (only the root checked;
    others may hold anything) or ``per_rank`` (listed ranks checked)."""

    mode: Literal["all", "root", "per_rank"]
    values: tuple[Number, ...] | None = None
    per_rank: tuple[tuple[int, tuple[Number, ...]], ...] = ()

    def for_rank(self, rank: int, root: int = 0) -> tuple[Number, ...] | None:
        """Expected values of ``rank``, or None when that rank's output is not checked."""
        if self.mode == "all":
            return self.values
        if self.mode == "root":
            return self.values if rank == root else None
        return dict(self.per_rank).get(rank)


@dataclass(frozen=True)
class Collective:
    op: str
    dtype: str = "int32"
    count: int = 1
    reduce_op: str = "sum"
    root: int = 0
    input: InputRule = field(default_factory=lambda: InputRule(1, 0, 1, "rank + 1"))
    expect: OutputExpect | None = None
    src: int | None = None
    dst: int | None = None


@dataclass(frozen=True)
class Deadlines:
    bootstrap_s: float = 60.0
    collective_s: float = 60.0
    stall_s: float = 10.0


@dataclass(frozen=True)
class Expect:
    verdict: Literal["completed", "error", "hang"]
    phase: str | None = None
    cause: str | None = None
    active_ranks: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Realisable:
    """What real hardware must offer to run the scenario for real: the CPU backend on one host (``cpu``),
    ``gpus`` distinct GPUs, an MNNVL fabric across hosts, RDMA between hosts, ``hosts`` hosts."""

    cpu: bool
    gpus: int
    mnnvl: bool
    rdma: bool
    hosts: int = 1


@dataclass(frozen=True, eq=False)
class Scenario:
    name: str
    description: str
    source: str
    topology_ref: str
    topology: Topology
    ranks: int
    placement: tuple[RankPlacement, ...]
    placement_mode: Literal["packed", "spread", "explicit"]
    backend: Literal["cuda", "cpu"]
    engine: Literal["tent", "te"]
    policy: Policy
    policy_name: str
    policy_overrides: tuple[tuple[str, Any], ...]
    env: Mapping[str, str]
    tent: TentConfig
    faults: tuple[Fault, ...]
    workload: tuple[Collective, ...]
    data: Literal["values", "sizes"]
    deadlines: Deadlines
    seed: int
    expect: Expect | None
    realisable: Realisable

    def faults_of(self, kind: str) -> tuple[Fault, ...]:
        """The faults of one kind, in file order."""
        return tuple(f for f in self.faults if f.kind == kind)


# --------------------------------------------------------------------------------------------------------


def load_scenario(ref: str) -> Scenario:
    """Load a scenario from a bundled name (``scenarios/<name>.yaml``) or a path.

    >>> load_scenario("example-hgx-allreduce").ranks
    8
    """
    p = resolve(ref, "scenarios")
    return parse_scenario(read_yaml(p, str(p)), str(p), p.stem, p.parent)


def _suggest(value: str, options: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(value, list(options), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}? " if close else ""


def parse_scenario(data: dict[str, Any], file: str, default_name: str, base_dir: pathlib.Path | None) -> Scenario:
    """Validate a parsed scenario mapping; ``file`` is used in messages, ``base_dir`` resolves the topology."""
    r = InputReader(file)
    r.mapping(data, "", _TOP_KEYS, required=("topology", "ranks"), what="a scenario")
    name = r.string(data.get("name", default_name), "name")
    description = data.get("description", "")
    if not isinstance(description, str):
        r.fail("description", f"must be a string, got {type(description).__name__}")

    topo_ref = r.string(data["topology"], "topology")
    tpath = resolve(topo_ref, "topologies", base_dir, file=file, key="topology")
    topo = load_topology(str(tpath))
    ranks = r.integer(data["ranks"], "ranks", minimum=1, maximum=1_000_000)
    all_gpus = gpus(topo)

    # backend, engine
    default_backend = "cuda" if all_gpus else "cpu"
    backend = r.choice(data.get("backend", default_backend), "backend", BACKENDS)
    if backend == "cuda" and not all_gpus:
        r.fail("backend", f"is cuda but topology {topo.name!r} has no GPUs; use backend: cpu or a GPU topology")
    engine = r.choice(data.get("engine", "tent"), "engine", ENGINES)

    placement, mode = _placement(r, data, topo, ranks, backend)

    # policy
    policy, policy_name, overrides = _policy(r, data.get("policy", "fixed"))

    env = _env(r, data.get("env", {}))
    tent = _tent(r, data.get("tent", {}))
    workload = _workload(r, data.get("workload", []), ranks)
    faults = _faults(r, data.get("faults", []), ranks, hosts(topo), len(workload))
    data_mode = r.choice(data.get("data", "values"), "data", ("values", "sizes"))

    dl = r.mapping(data.get("deadlines", {}), "deadlines", ("bootstrap_s", "collective_s", "stall_s"))
    deadlines = Deadlines(**{k: r.positive(v, key_join("deadlines", k), "seconds") for k, v in dl.items()})
    seed = r.integer(data.get("seed", 0), "seed", minimum=0)

    expect: Expect | None = None
    if data.get("expect") is not None:
        ek = "expect"
        e = r.mapping(data["expect"], ek, ("verdict", "phase", "cause", "active_ranks"), required=("verdict",))
        verdict = r.choice(e["verdict"], key_join(ek, "verdict"), VERDICTS)
        phase = None if e.get("phase") is None else r.choice(e["phase"], key_join(ek, "phase"), EXPECT_PHASES)
        cause = e.get("cause")
        if cause is not None and (not isinstance(cause, str) or cause not in CAUSE_CODES):
            hint = _suggest(cause, CAUSE_CODES) if isinstance(cause, str) else ""
            r.fail(key_join(ek, "cause"), f"unknown cause code {cause!r}; {hint}valid codes: {', '.join(CAUSE_CODES)}"
                                          " (or null)")
        active: tuple[int, ...] | None = None
        if e.get("active_ranks") is not None:
            ak = key_join(ek, "active_ranks")
            active = tuple(_rank(r, v, key_join(ak, j), ranks) for j, v in enumerate(r.seq(e["active_ranks"], ak)))
        expect = Expect(verdict, phase, cause, active)  # type: ignore[arg-type]

    realisable = _realisable(r, data.get("realisable"), topo, placement, backend)
    return Scenario(
        name=name, description=description.strip(), source=file, topology_ref=topo_ref, topology=topo,
        ranks=ranks, placement=placement, placement_mode=mode, backend=backend,  # type: ignore[arg-type]
        engine=engine, policy=policy, policy_name=policy_name,  # type: ignore[arg-type]
        policy_overrides=overrides, env=env, tent=tent, faults=faults, workload=workload,
        data=data_mode, deadlines=deadlines, seed=seed, expect=expect, realisable=realisable,  # type: ignore[arg-type]
    )


def _rank(r: InputReader, value: Any, key: str, ranks: int) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= ranks:
        r.fail(key, f"rank {value} does not exist: the scenario has {ranks} ranks (0..{ranks - 1})")
    return r.integer(value, key, minimum=0)


def _placement(
    r: InputReader, data: dict[str, Any], topo: Topology, ranks: int, backend: str
) -> tuple[tuple[RankPlacement, ...], Literal["packed", "spread", "explicit"]]:
    pk = "placement"
    raw = data.get("placement", "packed")
    host_list = hosts(topo)
    n_gpus = {h: len(gpus(topo, h)) for h in host_list}
    total = sum(n_gpus.values())
    rph: int | None = None
    if data.get("ranks_per_host") is not None:
        rph = r.integer(data["ranks_per_host"], "ranks_per_host", minimum=1)

    def cpu_rank(rank: int, h: str, local: int, numa: int | None = None) -> RankPlacement:
        dev = local % n_gpus[h] if n_gpus[h] else None
        if numa is None:
            numa = numa_of_gpu(topo, GpuRef(h, dev)) if dev is not None else 0
        return RankPlacement(rank, h, None, numa, dev)

    def gpu_rank(rank: int, h: str, g: int) -> RankPlacement:
        return RankPlacement(rank, h, g, numa_of_gpu(topo, GpuRef(h, g)), g)

    out: list[RankPlacement] = []
    if isinstance(raw, list):
        if len(raw) != ranks:
            r.fail(pk, f"lists {len(raw)} ranks but ranks is {ranks}; give exactly one entry per rank")
        if rph is not None:
            r.fail("ranks_per_host", "applies to packed/spread placement only; remove it or the placement list")
        local: dict[str, int] = {}
        for j, item in enumerate(raw):
            ek = key_join(pk, j)
            e = r.mapping(item, ek, ("host", "gpu", "numa"), required=("host",), what="host and gpu of one rank")
            h = r.string(e["host"], key_join(ek, "host"))
            if h not in n_gpus:
                r.fail(key_join(ek, "host"), f"no host {h!r} in topology {topo.name!r}; {_suggest(h, host_list)}"
                                             f"hosts: {', '.join(host_list[:8])}{' ...' if len(host_list) > 8 else ''}")
            numa_count = int(topo.graph.nodes[f"host:{h}"]["numa_nodes"])
            numa: int | None = None
            if e.get("numa") is not None:
                numa = r.integer(e["numa"], key_join(ek, "numa"), minimum=0)
                if numa >= numa_count:
                    r.fail(key_join(ek, "numa"), f"host {h!r} has NUMA nodes 0..{numa_count - 1}, not {numa}")
            g = e.get("gpu")
            if backend == "cpu":
                if g is not None:
                    r.fail(key_join(ek, "gpu"), "the cpu backend places ranks on hosts, not GPUs; remove 'gpu' "
                                                "(or use backend: cuda)")
                out.append(cpu_rank(j, h, local.get(h, 0), numa))
            else:
                if g is None:
                    r.fail(key_join(ek, "gpu"), "is required for the cuda backend; give the GPU index on the host")
                gi = r.integer(g, key_join(ek, "gpu"), minimum=0)
                if gi >= n_gpus[h]:
                    have = f"GPUs 0..{n_gpus[h] - 1}" if n_gpus[h] else "no GPUs"
                    r.fail(key_join(ek, "gpu"), f"host {h!r} has {have}, so GPU {gi} does not exist; fix the index")
                pl = gpu_rank(j, h, gi)
                if numa is not None:
                    pl = RankPlacement(j, h, gi, numa, gi)
                out.append(pl)
            local[h] = local.get(h, 0) + 1
        return tuple(out), "explicit"

    mode = r.choice(raw, pk, ("packed", "spread"))
    if backend == "cuda":
        usable = [h for h in host_list if n_gpus[h]]
        cap = {h: n_gpus[h] if rph is None else rph for h in usable}
        for h in usable:
            if cap[h] > n_gpus[h]:
                r.fail("ranks_per_host", f"is {rph} but host {h!r} has {_gpus(n_gpus[h])}; the cuda backend puts one "
                                         "rank per GPU (use an explicit placement list to share GPUs)")
        if ranks > sum(cap.values()):
            if rph is None:
                r.fail("ranks", f"{ranks} ranks but topology {topo.name!r} has {_gpus(total)}; lower ranks, pick a "
                                "bigger topology, or list an explicit placement to put several ranks on one GPU")
            r.fail("ranks", f"{ranks} ranks but only {sum(cap.values())} fit ({rph} per host on {len(usable)} hosts); "
                            "lower ranks or raise ranks_per_host")
        order = _order(mode, usable, cap, ranks)
        used: dict[str, int] = {}
        for rank, h in enumerate(order):
            out.append(gpu_rank(rank, h, used.get(h, 0)))
            used[h] = used.get(h, 0) + 1
        return tuple(out), mode  # type: ignore[return-value]
    cap = {h: (rph if rph is not None else (n_gpus[h] or ranks)) for h in host_list}
    if ranks > sum(cap.values()):
        r.fail("ranks", f"{ranks} ranks but only {sum(cap.values())} fit on {len(host_list)} host(s) of "
                        f"{topo.name!r} (ranks_per_host defaults to each host's GPU count); set ranks_per_host")
    order = _order(mode, host_list, cap, ranks)
    used = {}
    for rank, h in enumerate(order):
        out.append(cpu_rank(rank, h, used.get(h, 0)))
        used[h] = used.get(h, 0) + 1
    return tuple(out), mode  # type: ignore[return-value]


def _order(mode: str, host_list: list[str], cap: dict[str, int], ranks: int) -> list[str]:
    """Host of each rank: packed fills each host up to its cap in order; spread deals round-robin."""
    if mode == "packed":
        seq = [h for h in host_list for _ in range(cap[h])]
        return seq[:ranks]
    left = dict(cap)
    seq = []
    while len(seq) < ranks:
        for h in host_list:
            if left[h] > 0 and len(seq) < ranks:
                seq.append(h)
                left[h] -= 1
    return seq


def _policy(r: InputReader, raw: Any) -> tuple[Policy, str, tuple[tuple[str, Any], ...]]:
    presets = list(PRESETS)
    overrides: dict[str, Any] = {}
    if isinstance(raw, str):
        preset, pkey = raw, "policy"
    else:
        m = r.mapping(raw, "policy", ("preset", "overrides"), what="a preset name, or preset and overrides")
        preset = m.get("preset", "fixed")
        pkey = "policy.preset"
        if m.get("overrides") is not None:
            overrides = r.mapping(m["overrides"], "policy.overrides", SWITCHES, what="switch: value")
    if not isinstance(preset, str) or preset not in PRESETS:
        hint = _suggest(preset, presets) if isinstance(preset, str) else ""
        r.fail(pkey, f"unknown policy preset {preset!r}; {hint}presets: {', '.join(presets)}")
    for k, v in overrides.items():
        try:
            make_policy(preset, {k: v})
        except (KeyError, ValueError) as exc:
            r.fail(key_join("policy.overrides", k), f"{exc}")
    return make_policy(preset, overrides), preset, tuple(overrides.items())


def _env(r: InputReader, raw: Any) -> dict[str, str]:
    env = r.mapping(raw, "env", ENV_KEYS, what="Mooncake environment variables")
    out: dict[str, str] = {}
    for k, v in env.items():
        kk = key_join("env", k)
        if isinstance(v, bool):
            s = "1" if v else "0"
        elif isinstance(v, int):
            s = str(v)
        elif isinstance(v, str):
            s = v
        else:
            r.fail(kk, f"must be a string, integer or boolean, got {type(v).__name__}")
        if k == "CUDA_MODULE_LOADING" and s not in ("LAZY", "EAGER", "DEFAULT"):
            r.fail(kk, f"must be LAZY, EAGER or DEFAULT, got {s!r}")
        if k in ("MC_MIN_PRC_PORT", "MC_MAX_PRC_PORT") and (not s.isdigit() or not 1 <= int(s) <= 65535):
            r.fail(kk, f"must be a port number 1..65535, got {s!r}")
        out[k] = s
    if "MC_MIN_PRC_PORT" in out and "MC_MAX_PRC_PORT" in out and int(out["MC_MIN_PRC_PORT"]) > int(out["MC_MAX_PRC_PORT"]):
        r.fail("env.MC_MIN_PRC_PORT", f"{out['MC_MIN_PRC_PORT']} is above MC_MAX_PRC_PORT {out['MC_MAX_PRC_PORT']}; "
                                      "swap them")
    return out


def _tent(r: InputReader, raw: Any) -> TentConfig:
    t = r.mapping(raw, "tent", ("transports", "rpc_server_port", "rpc_server_hostname"), what="TENT config")
    tr = r.mapping(t.get("transports", {}), "tent.transports", TRANSPORT_SWITCHES, what="transport: true/false")
    transports = TentTransports(**{k: r.boolean(v, key_join("tent.transports", k)) for k, v in tr.items()})
    port = r.integer(t.get("rpc_server_port", 0), "tent.rpc_server_port", minimum=0, maximum=65535)
    hostname = t.get("rpc_server_hostname")
    if hostname is not None:
        hostname = r.string(hostname, "tent.rpc_server_hostname")
    return TentConfig(transports, port, hostname)


def _faults(r: InputReader, raw: Any, ranks: int, host_list: list[str], n_collectives: int = 0) -> tuple[Fault, ...]:
    out: list[Fault] = []
    for j, item in enumerate(r.seq(raw, "faults", "fault entries")):
        fk = key_join("faults", j)
        if not isinstance(item, dict):
            r.fail(fk, f"must be a mapping with a 'kind', got {type(item).__name__}")
        if "kind" not in item:
            r.fail(key_join(fk, "kind"), f"is required; one of: {', '.join(FAULT_KINDS)}")
        kind = item["kind"]
        if not isinstance(kind, str) or kind not in FAULT_KINDS:
            hint = _suggest(kind, tuple(FAULT_KINDS)) if isinstance(kind, str) else ""
            r.fail(key_join(fk, "kind"), f"unknown fault kind {kind!r}; {hint}kinds: {', '.join(FAULT_KINDS)}")
        req, opt = FAULT_KINDS[kind]
        f = r.mapping(item, fk, ("kind", *req, *opt), required=req, what=f"a {kind} fault")
        kw: dict[str, Any] = {}
        for k, v in f.items():
            kk = key_join(fk, k)
            if k == "kind":
                continue
            if k == "rank":
                kw[k] = _rank(r, v, kk, ranks)
            elif k == "host":
                h = r.string(v, kk)
                if h not in host_list:
                    r.fail(kk, f"no host {h!r} in the topology; {_suggest(h, host_list)}hosts: "
                               f"{', '.join(host_list[:8])}{' ...' if len(host_list) > 8 else ''}")
                kw[k] = h
            elif k == "port":
                kw[k] = r.integer(v, kk, minimum=1, maximum=65535)
            elif k == "count":
                kw[k] = r.integer(v, kk, minimum=2 if kind == "concurrent_groups" else 1)
            elif k == "address":
                kw[k] = r.string(v, kk)
            elif k == "at":
                # a phase, or "collective:N": as collective N (0-based) of the workload starts
                if isinstance(v, str) and v.startswith("collective:") and v[11:].isdigit():
                    if int(v[11:]) >= max(1, n_collectives):
                        r.fail(kk, f"names collective {v[11:]} but the workload has {n_collectives}; count from 0")
                    kw[k] = v
                else:
                    kw[k] = r.choice(v, kk, PHASES)
            elif k == "seconds":
                kw[k] = r.positive(v, kk, "seconds")
            elif k == "ranks":
                pair = r.seq(v, kk, "two ranks")
                if len(pair) != 2:
                    r.fail(kk, f"must list exactly two ranks [a, b], got {len(pair)}")
                a, b = (_rank(r, x, key_join(kk, q), ranks) for q, x in enumerate(pair))
                if a == b:
                    r.fail(kk, f"names rank {a} twice; give two different ranks")
                kw[k] = (a, b)
        if kind == "extra_backend":
            kw.setdefault("count", 1)
        out.append(Fault(kind, **kw))
    return tuple(out)


def _values(r: InputReader, v: Any, key: str) -> tuple[Number, ...]:
    items = r.seq(v, key, "expected values")
    for q, x in enumerate(items):
        if not isinstance(x, (int, float)):
            r.fail(key_join(key, q), f"must be a number or boolean, got {type(x).__name__}")
    return tuple(items)


def _workload(r: InputReader, raw: Any, ranks: int) -> tuple[Collective, ...]:
    out: list[Collective] = []
    for j, item in enumerate(r.seq(raw, "workload", "collectives")):
        wk = key_join("workload", j)
        c = r.mapping(item, wk, _COLL_KEYS, required=("op",), what="a collective")
        op = r.choice(c["op"], key_join(wk, "op"), OPS)
        dtype = r.choice(c.get("dtype", "int32"), key_join(wk, "dtype"), DTYPES)
        count = r.integer(c.get("count", 1), key_join(wk, "count"), minimum=1)
        reduce_op = "sum"
        if "reduce_op" in c:
            if op not in REDUCING_OPS:
                r.fail(key_join(wk, "reduce_op"), f"applies to {', '.join(REDUCING_OPS)} only, not {op}; remove it")
            reduce_op = r.choice(c["reduce_op"], key_join(wk, "reduce_op"), REDUCE_OPS)
        root = _rank(r, c.get("root", 0), key_join(wk, "root"), ranks)
        src = dst = None
        if op == "send_recv":
            if ranks < 2:
                r.fail(key_join(wk, "op"), "send_recv needs at least 2 ranks")
            src = _rank(r, c.get("src", 0), key_join(wk, "src"), ranks)
            dst = _rank(r, c.get("dst", 1), key_join(wk, "dst"), ranks)
            if src == dst:
                r.fail(key_join(wk, "dst"), f"equals src ({src}); send to another rank")
        else:
            for k in ("src", "dst"):
                if k in c:
                    r.fail(key_join(wk, k), f"applies to send_recv only, not {op}; remove it")
        rule_raw = c.get("input", "rank + 1")
        ik = key_join(wk, "input")
        if isinstance(rule_raw, int) and not isinstance(rule_raw, bool):
            rule_raw = str(rule_raw)
        if not isinstance(rule_raw, str):
            r.fail(ik, f"must be a rule string like 'rank + 1', got {type(rule_raw).__name__}")
        try:
            rule = InputRule.parse(rule_raw)
        except ValueError as exc:
            r.fail(ik, f"bad input rule {rule_raw!r}: {exc}; write a linear rule over rank, index and integers, "
                       "e.g. 'rank + 1' or 'rank * 100 + index'")
        expect: OutputExpect | None = None
        if c.get("expect") is not None:
            xk = key_join(wk, "expect")
            x = c["expect"]
            if isinstance(x, list):
                expect = OutputExpect("all", _values(r, x, xk))
            elif isinstance(x, dict) and "per_rank" in x:
                m = r.mapping(x, xk, ("per_rank",))
                pr = m["per_rank"]
                if not isinstance(pr, dict):
                    r.fail(key_join(xk, "per_rank"), "must map rank -> list of values")
                rows: list[tuple[int, tuple[Number, ...]]] = []
                for rk, vals in pr.items():
                    kk = key_join(key_join(xk, "per_rank"), str(rk))
                    rank_i = int(rk) if isinstance(rk, str) and rk.isdigit() else rk
                    rows.append((_rank(r, rank_i, kk, ranks), _values(r, vals, kk)))
                expect = OutputExpect("per_rank", per_rank=tuple(sorted(rows)))
            else:
                m = r.mapping(x, xk, ("root", "others"), required=("root",),
                              what="a list, {root: [...], others: null} or {per_rank: {r: [...]}}")
                if m.get("others") is not None:
                    r.fail(key_join(xk, "others"), "must be null (outputs of non-root ranks are not checked); "
                                                   "use per_rank to check them")
                expect = OutputExpect("root", _values(r, m["root"], key_join(xk, "root")))
        out.append(Collective(op, dtype, count, reduce_op, root, rule, expect, src, dst))
    return tuple(out)


def _realisable(
    r: InputReader, raw: Any, topo: Topology, placement: tuple[RankPlacement, ...], backend: str
) -> Realisable:
    used_hosts = sorted({p.host for p in placement})
    distinct = {(p.host, p.gpu) for p in placement if p.gpu is not None}
    mnnvl = False
    if backend == "cuda" and len(used_hosts) > 1:
        by_domain: dict[str, set[str]] = {}
        for d in topo.domains:
            if d.kind != "mnnvl":
                continue
            members = {g.host for g in d.gpus}
            by_domain[d.id] = {p.host for p in placement if p.host in members}
        mnnvl = any(len(s) > 1 for s in by_domain.values())
    rdma_nics = all(nics(topo, h, "rdma") for h in used_hosts)
    derived = Realisable(
        cpu=backend == "cpu" and len(used_hosts) == 1,
        gpus=len(distinct),
        mnnvl=mnnvl,
        rdma=len(used_hosts) > 1 and rdma_nics,
        hosts=len(used_hosts),
    )
    if raw is None:
        return derived
    m = r.mapping(raw, "realisable", ("cpu", "gpus", "mnnvl", "rdma", "hosts"))
    kw: dict[str, Any] = {}
    for k, v in m.items():
        kk = key_join("realisable", k)
        kw[k] = r.integer(v, kk, minimum=1 if k == "hosts" else 0) if k in ("gpus", "hosts") else r.boolean(v, kk)
    return Realisable(**{**derived.__dict__, **kw})


def _gpus(n: int) -> str:
    return f"{n} GPU" if n == 1 else f"{n} GPUs"
