"""Hang and failure diagnosis: from a run's marks and blocked records to one cause code.

Both drivers hand over the same material: the trace marks (protocol milestones and observations, e.g.
``transport_unspec``, ``transfer_failed``, ``key_published``) and, for a hang, :class:`~.trace.Blocked`
records naming per rank and activity the effect it is blocked in, what it awaits, who it waits for, and any
driver-level resource holding it (``module-load:<kernel>``, ``legacy-stream``). :func:`diagnose` applies
the rules of :data:`RULES` in order; the first that matches names the cause. Each rule is one failure mode
of :mod:`mooncake_protocol.causes`; keep them small and keyed on facts both worlds record.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .trace import Blocked


@dataclass(frozen=True)
class Diagnosis:
    cause: str | None
    explanation: str
    wait_for: tuple[tuple[str, str], ...] = ()
    evidence: tuple[str, ...] = ()


@dataclass
class Facts:
    """The material the rules look at, indexed once."""

    marks: Sequence[dict[str, Any]]
    blocked: Sequence[Blocked]
    errors: dict[int, tuple[str, str | None]]
    verdict: str
    by_name: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    wrong_results: list[str] = field(default_factory=list)
    killed: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for m in self.marks:
            self.by_name[m["name"]].append(m)

    def named(self, name: str) -> list[dict[str, Any]]:
        return self.by_name.get(name, [])


Rule = Callable[[Facts], "tuple[str, str] | None"]


def _error_cause(f: Facts) -> tuple[str, str] | None:
    for rank in sorted(f.errors):
        msg, cause = f.errors[rank]
        if cause:
            return cause, f"rank {rank} raised: {msg}"
    return None


def _resource(prefix: str, code: str, text: str) -> Rule:
    def rule(f: Facts) -> tuple[str, str] | None:
        hits = [b for b in f.blocked if b.resource and b.resource.startswith(prefix)]
        if not hits:
            return None
        ranks = sorted({b.rank for b in hits})
        return code, f"{text} on rank(s) {_ranks(ranks)}: {hits[0].what}"

    return rule


def _duplicate_server_name(f: Facts) -> tuple[str, str] | None:
    owners: dict[str, list[int]] = defaultdict(list)
    for m in f.named("key_published"):
        name = m["data"].get("server_name")
        if name:
            owners[name].append(m["rank"])
    dups = {n: sorted(set(rs)) for n, rs in owners.items() if len(set(rs)) > 1}
    if dups:
        name, ranks = next(iter(sorted(dups.items())))
        return "rpc-port-conflict", (f"ranks {_ranks(ranks)} published the same server name {name}: a bind failure "
                                     "went unchecked, so peers reach the port's owner for both")
    unchecked = [m for m in f.named("rpc_bind") if not m["data"].get("ok") and not m["data"].get("checked")]
    if unchecked:
        m = unchecked[0]
        return "rpc-port-conflict", (f"rank {m['rank']}'s RPC bind on port {m['data'].get('port')} failed "
                                     f"({m['data'].get('error')}) and was not checked: it runs with no server")
    return None


def _key_mismatch(f: Facts) -> tuple[str, str] | None:
    published = {m["data"].get("key") for m in f.named("key_published")}
    missing = []
    for b in f.blocked:
        for blk in b.blockers:
            parts = blk.split(":")
            if len(parts) >= 3 and parts[0] == "rank" and parts[2] == "WAITING_STORE":
                missing.append((b.rank, int(parts[1])))
    if not missing:
        return None
    waiting_bi: dict[int, int] = {}
    for m in f.named("phase"):
        if m["data"].get("phase") == "warmup" and "backend" in m["data"]:
            waiting_bi[m["rank"]] = int(m["data"]["backend"])
    for rank, peer in missing:
        bi = waiting_bi.get(rank, 0)
        if f"buffer_{bi}_{peer}" not in published and peer not in f.killed:
            elsewhere = sorted(k for k in published if isinstance(k, str) and k.startswith("buffer_") and k.endswith(f"_{peer}"))
            how = (f"it published {', '.join(elsewhere)} instead (a different backend index)" if elsewhere
                   else "it never published")
            return "store-key-mismatch", f"rank {rank} waits for store key buffer_{bi}_{peer}; {how}"
    return None


def _failed_transfers(reason: str | None = None, transport: str | None = None,
                      label_type: str | None = None) -> Callable[[Facts], list[dict[str, Any]]]:
    def pick(f: Facts) -> list[dict[str, Any]]:
        out = []
        for m in f.named("transfer_failed"):
            d = m["data"]
            if reason and d.get("reason") != reason:
                continue
            if transport and d.get("transport") != transport:
                continue
            if label_type and not str(d.get("label") or "").startswith(label_type):
                continue
            out.append(m)
        return out

    return pick


def _host_region_on_fabric(f: Facts) -> tuple[str, str] | None:
    hits = [m for m in _failed_transfers("address-not-found", "mnnvl")(f)
            if str(m["data"].get("label")) in ("*",) or str(m["data"].get("label")).startswith("cpu")
            or m["data"].get("target_kind") in ("host", "pinned")]
    hits = hits or [m for m in _failed_transfers("address-not-found", "mnnvl")(f)]
    if not hits:
        return None
    m = hits[0]
    return "host-region-on-fabric", (f"rank {m['rank']}'s WRITE to rank {m['data'].get('dst_rank')} over MNNVL "
                                     "failed: Requested address not found (a host-memory region is no fabric target)")


def _host_region_gpu_label(f: Facts) -> tuple[str, str] | None:
    for m in f.named("transport_unspec"):
        d = m["data"]
        if str(d.get("label", "")).startswith("cuda") and d.get("src_kind") in ("host", "pinned"):
            return "host-region-gpu-label", (
                f"rank {m['rank']} cannot pick a transport for its WRITE to rank {d.get('dst_rank')}: the target "
                f"host region is labelled {d.get('label')}, so it is treated as GPU memory and no loaded transport "
                f"offers host-to-GPU for it (offered: {', '.join(d.get('offered') or []) or 'none'}); TENT resubmits forever")
    for m in _failed_transfers("no-ipc-handle", None, "cuda")(f):
        return "host-region-gpu-label", (f"rank {m['rank']}'s WRITE to rank {m['data'].get('dst_rank')} took "
                                         f"{m['data'].get('transport')} to a region labelled {m['data'].get('label')}, "
                                         "which is host memory without an IPC handle")
    return None


def _duplicate_machine_id(f: Facts) -> tuple[str, str] | None:
    hits = _failed_transfers("not-same-machine")(f)
    if not hits:
        return None
    m = hits[0]
    return "duplicate-machine-id", (f"rank {m['rank']} chose {m['data'].get('transport')} to rank "
                                    f"{m['data'].get('dst_rank')} on another host because both report the same "
                                    "machine id; the IPC open fails and TENT resubmits forever")


def _unreachable_segment(f: Facts) -> tuple[str, str] | None:
    fails = [m for m in f.named("segment_opened") if not m["data"].get("ok")]
    if not fails:
        return None
    m = fails[0]
    return "unreachable-segment", (f"rank {m['rank']} cannot open segment {m['data'].get('name')} "
                                   f"({m['data'].get('error')}): the advertised address or port is unreachable")


def _mark_rule(name: str, code: str, text: Callable[[dict[str, Any]], str],
               when: Callable[[dict[str, Any]], bool] | None = None) -> Rule:
    """The cause ``code`` as soon as a mark ``name`` (that passes ``when``, if given) was made."""
    def rule(f: Facts) -> tuple[str, str] | None:
        hits = [m for m in f.named(name) if when is None or when(m)]
        if not hits:
            return None
        return code, text(hits[0])

    return rule


def _ranks(ranks: Sequence[int]) -> str:
    ranks = list(ranks)
    if len(ranks) > 8:
        return f"{', '.join(map(str, ranks[:6]))}, ... ({len(ranks)} ranks)"
    return ", ".join(map(str, ranks))


def _one_way_caught_at_warmup(f: Facts) -> tuple[str, str] | None:
    for m in f.named("transfer_failed"):
        d = m["data"]
        if d.get("reason") == "blocked-direction" and d.get("phase") != "collective":
            return "one-way-warmup", (f"rank {m['rank']}'s warmup WRITE to rank {d.get('dst_rank')} fails: that "
                                      "direction of the pair is broken; warming up both directions caught it at "
                                      "bootstrap instead of in the first collective")
    return None


def _ping_false_positive(f: Facts) -> tuple[str, str] | None:
    for m in f.named("peer_marked_broken"):
        d = m["data"]
        if "ping" in str(d.get("reason")) and d.get("peer") not in f.killed:
            return "ping-false-positive", (f"rank {m['rank']} marked rank {d.get('peer')} broken during {d.get('during')} "
                                           f"({d.get('reason')}) although it was alive: it is silently dropped "
                                           "from the results")
    return None


def _uninitialized_sync_flag(f: Facts) -> tuple[str, str] | None:
    if not f.wrong_results:
        return None
    unzeroed = [m for m in f.named("sync_flags") if not m["data"].get("zeroed")]
    if not unzeroed:
        return None
    return "uninitialized-sync-flag", (f"{f.wrong_results[0]}: the sync flag arrays were not zeroed, so a stale "
                                       "flag let a rank read its receive buffer before every peer's data had landed")


def _one_way_warmup(f: Facts) -> tuple[str, str] | None:
    # a WRITE to a killed rank fails whichever direction the warmup proved: that is not this failure mode
    for m in f.named("unwarmed_direction"):
        if m["data"].get("peer") in f.killed:
            continue
        return "one-way-warmup", (f"rank {m['rank']}'s first WRITE to rank {m['data'].get('peer')} in the collective "
                                  f"uses the direction the warmup never proved, and it fails ({m['data'].get('reason')})")
    return None


def _cold_kernel_behind_spin(f: Facts) -> tuple[str, str] | None:
    """A run that failed in a collective in which a rank launched a reduce kernel for the first time, not
    preloaded, right behind its resident spin kernel, with nothing else named: the module load waits for the
    spin kernel, which waits for copies the load holds. Found from the protocol's marks when the collective's
    time limit ended the run before a hang dump could name ``module-load:<kernel>``."""
    if f.verdict == "completed":
        return None
    open_: dict[int, dict[str, Any]] = {}
    for m in f.marks:
        if m["name"] == "kernel_first_launch" and not m["data"].get("preloaded", True):
            open_[m["rank"]] = m
        elif m["name"] == "collective_done":
            open_.pop(m["rank"], None)
    if not open_:
        return None
    ranks = sorted(open_)
    kernel = open_[ranks[0]]["data"].get("kernel")
    return "lazy-kernel-load", (f"rank(s) {_ranks(ranks)} first launched {kernel}, not preloaded, behind the resident "
                                "spin kernel, and that collective never finished: the module load waits for the "
                                "spin kernel, which waits for copies the load holds")


#: The rules, most specific first. Worker- and collective-level marks come from the collective phase.
RULES: tuple[Rule, ...] = (
    # before _error_cause: whether the check ran before or after enqueueing is the point of failure mode 14
    _mark_rule("unsupported_reduce", "unsupported-reduce",
               lambda m: f"rank {m['rank']}: {m['data'].get('reason')}; found only after the exchange was enqueued, "
               "so the exchange still runs and the output is never written"
               if m["data"].get("after_enqueue") else
               f"rank {m['rank']}: {m['data'].get('reason')}; rejected before anything was enqueued (no exchange)"),
    _error_cause,
    _resource("module-load", "lazy-kernel-load",
              "device work held while a kernel module loads behind a resident spin kernel"),
    _resource("legacy-stream", "legacy-stream-serialization",
              "a synchronous copy on the legacy default stream waits behind the resident spin kernel"),
    _mark_rule("slot_exhausted", "task-slot-exhaustion",
               lambda m: f"rank {m['rank']}: {m['data'].get('text')}"),
    _mark_rule("stale_task_poll", "stale-task-id",
               lambda m: f"rank {m['rank']}'s worker polled task id {m['data'].get('task_id')} for rank "
               f"{m['data'].get('peer')}, which has no task in this batch ({m['data'].get('outcome')})"),
    _mark_rule("crossed_endpoints", "rdma-simultaneous-open",
               lambda m: f"ranks {m['rank']} and {m['data'].get('peer')} opened RDMA endpoints at once: "
               "crossed QPs"),
    _mark_rule("p2p_lane_reset", "p2p-lane-reset",
               lambda m: f"rank {m['rank']} reset its P2P lanes to rank {m['data'].get('peer')} while an op "
               "was pending: " + ("it fails" if m["data"].get("fails_pending") else "its wait() never returns"),
               # a torn-down peer's lanes are reset whether or not an op is on them; only a pending op is harmed
               when=lambda m: bool(m["data"].get("pending"))),
    _duplicate_server_name,
    _key_mismatch,
    _host_region_on_fabric,
    _host_region_gpu_label,
    _duplicate_machine_id,
    _one_way_warmup,
    _one_way_caught_at_warmup,
    _unreachable_segment,
    _ping_false_positive,
    _uninitialized_sync_flag,
    # last: a fallback for a run that stopped before a dump could name the resource holding it
    _cold_kernel_behind_spin,
)


def wait_for_graph(blocked: Sequence[Blocked]) -> tuple[tuple[str, str], ...]:
    edges = []
    for b in blocked:
        src = f"rank{b.rank}/{b.activity}"
        for blk in b.blockers:
            parts = blk.split(":")
            dst = f"rank{parts[1]}" if parts[0] == "rank" and len(parts) > 1 else blk
            edges.append((src, dst))
        if b.resource:
            edges.append((src, b.resource))
    return tuple(dict.fromkeys(edges))


def diagnose(marks: Sequence[dict[str, Any]], blocked: Sequence[Blocked], errors: dict[int, tuple[str, str | None]],
             verdict: str, killed: Sequence[int] = (), wrong_results: Sequence[str] = ()) -> Diagnosis:
    """Name the cause of a run's failure (or of an anomaly in a completed run), or None."""
    f = Facts(marks, blocked, errors, verdict, killed=tuple(killed), wrong_results=list(wrong_results))
    for rule in RULES:
        hit = rule(f)
        if hit is not None:
            code, text = hit
            return Diagnosis(code, text, wait_for_graph(blocked))
    if verdict == "completed":
        return Diagnosis(None, "no anomaly found")
    return Diagnosis(None, "no known failure mode matched; see the blocked activities", wait_for_graph(blocked))
