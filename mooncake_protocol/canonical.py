"""The canonical form of a run: what must be the same in the simulator and in real mode.

A trace (:mod:`.trace`) records every effect and mark with times, absolute ports, host addresses and
values that legitimately differ between the two worlds. :func:`canonical` keeps what the protocol decided
and what the run established, and abstracts or drops the rest:

* **Per-rank milestone sequences** (order kept): the caller activity's ``phase``, ``engine_ready``,
  ``all_connected``, ``collective_start`` and ``collective_done`` marks. One activity emits them one after
  the other, so their order is the protocol's, never a scheduler's.
* **Per-slot task phases** (order kept): the worker's ``task_phase`` marks of each task-table slot.
* **Every other progress mark as a multiset** (order dropped): peer connection order within a rank
  depends on when each peer's keys appear and on the poller's timing, so ``peer_state``,
  ``segment_opened``, ``transport``, ``registered``, ... are compared as counts of canonical items.
  ``NOISE_MARKS`` (log, retry, ping, poll) are dropped; so are the counters that only say in which
  order things happened (``count`` of ``peer_connected``/``peer_torn_down``) and free text.
* **Dead peers and the end of the run**: how and whether a rank found out that a peer died (killed, or
  its protocol raised) before the run stopped (a WRITE that raced the kill, a liveness probe, the
  poller's teardown) is timing; those marks are dropped (the death's effect shows in the collectives'
  active ranks and outputs). Marks a rank makes after its own end (``phase done`` or its error) are
  dropped: its daemons run on until the run stops, and the two worlds stop differently.
* **Abstraction**: ports become ``port#k`` and hosts ``host#k``, numbered by first appearance when the
  ranks' own marks are read in rank order (caller marks first), so two worlds that bind the same way get
  the same names whatever the numbers are; ``cpu0:16955`` (simulated) and ``127.0.0.1:16955`` (real) are
  both ``host#0:port#0``. Times, pids, durations and synthetic buffer addresses never enter the form.
* **Cross-rank facts**: store keys published (key -> ranks) and, when the trace carries effect records,
  the keys each rank read (a ``StoreGet`` that found the key) and awaited (``StoreCheck``/``StoreWait``),
  as sets; which server names several ranks published (the fact, not the port); the transport each
  (rank, peer, memory kind) used (not toward a killed rank from the collective it died in on: whether a
  rank got to a WRITE to it, say its sync flag, before the kill or never, is timing); collective outputs
  and active ranks; killed ranks; per-rank error causes; which rank marked which live peer broken; and the
  run's verdict, cause and phase reached (from the outcome JSON).

:func:`diff` compares two canonical forms and names, per rank, the first divergence side by side.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .trace import NOISE_MARKS

CANONICAL_VERSION = 1

#: Marks of the caller activity whose order is the protocol's own (kept as a sequence per rank).
MILESTONES = frozenset({"phase", "engine_ready", "all_connected", "collective_start", "collective_done"})

#: Marks that become cross-rank facts (or are already in the outcome) rather than per-rank items.
FACT_MARKS = frozenset({"key_published", "transport", "error", "killed"})

#: Marks about a dead peer (killed, or its protocol raised) that only say *how* and *whether, before the run
#: stopped* a rank found out: a WRITE that raced the kill, a failed liveness probe, the poller's teardown, the
#: warmup WRITEs retried to it until the run ended. That is timing; what the death changed shows in the
#: collectives' active ranks and outputs. Broken marks about live peers are kept (``facts.broken``).
KILLED_PEER_DETAIL = frozenset({"peer_state", "peer_torn_down", "transfer_failed", "unwarmed_direction", "ping",
                                "segment_opened", "peer_marked_broken", "warmup_submitted"})

#: Data fields dropped from every mark (free text, order counters, values kept elsewhere).
DROP_FIELDS: Mapping[str, frozenset[str]] = {
    "*": frozenset({"text"}),
    "peer_connected": frozenset({"count"}),
    "peer_torn_down": frozenset({"count"}),
    "collective_done": frozenset({"output", "active"}),  # compared in facts.results
}

_HOSTPORT = re.compile(r"^(?P<host>[A-Za-z0-9_.\-\[\]]+):(?P<port>\d{1,5})$")
_STORE_READ = ("StoreGet",)
_STORE_AWAIT = ("StoreCheck", "StoreWait")


class _Names:
    """Abstract names (``port#k``, ``host#k``) numbered by first appearance."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.ids: dict[str, int] = {}

    def see(self, value: Any) -> None:
        key = str(value)
        if key not in self.ids:
            self.ids[key] = len(self.ids)

    def name(self, value: Any) -> str:
        self.see(value)
        return f"{self.prefix}#{self.ids[str(value)]}"


class _Abstractor:
    def __init__(self) -> None:
        self.ports = _Names("port")
        self.hosts = _Names("host")

    def learn(self, name: str, data: Mapping[str, Any]) -> None:
        if name == "rpc_bind" and isinstance(data.get("port"), int):
            self.ports.see(data["port"])
        for v in data.values():
            if isinstance(v, str):
                m = _HOSTPORT.match(v)
                if m:
                    self.hosts.see(m["host"])
                    self.ports.see(int(m["port"]))

    def value(self, key: str, v: Any) -> Any:
        if key == "port" and isinstance(v, int) and not isinstance(v, bool):
            return self.ports.name(v)
        if isinstance(v, str):
            m = _HOSTPORT.match(v)
            if m:
                return f"{self.hosts.name(m['host'])}:{self.ports.name(int(m['port']))}"
            return v
        if isinstance(v, list):
            return [self.value("", x) for x in v]
        if isinstance(v, dict):
            return {str(k): self.value(str(k), x) for k, x in sorted(v.items())}
        return v


def _item(name: str, data: Mapping[str, Any], ab: _Abstractor) -> str:
    drop = DROP_FIELDS["*"] | DROP_FIELDS.get(name, frozenset())
    kept = {k: ab.value(k, v) for k, v in sorted(data.items()) if k not in drop}
    if not kept:
        return name
    return name + " " + " ".join(f"{k}={json.dumps(v, sort_keys=True, separators=(',', ':'))}" for k, v in kept.items())


def _rank_order(records: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Records in a world-independent order for numbering: the caller activities' marks first (what each
    rank bound and published itself, rank by rank), then every other mark by rank, then trace order. A
    poller's view of its peers comes last: which peer it sees first is timing."""
    indexed = list(enumerate(records))
    indexed.sort(key=lambda ir: (0 if ir[1].get("activity") == "caller" else 1, int(ir[1].get("rank", -1)), ir[0]))
    return [r for _, r in indexed]


def canonical(record_marks: Sequence[Mapping[str, Any]], outcome_json: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The canonical form of one run.

    ``record_marks``: the run's trace records (marks; effect records too, if present, add the store keys
    read and awaited; ``blocked`` records are ignored). ``outcome_json``: :meth:`Outcome.to_json` of the
    run (verdict, cause, phase, results), or None.
    """
    marks = [m for m in record_marks if m.get("type", "mark") == "mark" and "name" in m]
    effects = [e for e in record_marks if e.get("type") == "effect"]
    ab = _Abstractor()
    for m in _rank_order(marks):
        if m["name"] not in NOISE_MARKS:
            ab.learn(str(m["name"]), m.get("data") or {})

    killed = {int(m.get("rank", -1)) for m in marks if m["name"] == "killed"}
    # the collective each rank is in at each mark (-1 before the first), and the one each killed rank died in
    in_coll: list[int] = []
    current: dict[int, int] = {}
    died_in: dict[int, int] = {}
    for m in marks:
        r = int(m.get("rank", -1))
        if m["name"] == "collective_start" and m.get("activity", "caller") == "caller":
            current[r] = int((m.get("data") or {}).get("index", current.get(r, -1) + 1))
        elif m["name"] == "killed":
            died_in.setdefault(r, current.get(r, -1))
        in_coll.append(current.get(r, -1))
    # A rank whose protocol raised is gone as well (Mooncake's process aborts): when its peers notice is timing.
    dead = killed | {int(m.get("rank", -1)) for m in marks if m["name"] == "error"}
    # A rank's daemons keep running after its caller finished until the run stops, and the two worlds stop
    # differently (the simulator at the last caller's end, real ranks when released): cut each rank's
    # marks at its own end ("phase done" or its error).
    done_at: dict[int, int] = {}
    for i, m in enumerate(marks):
        if m["name"] == "error" or (m["name"] == "phase" and (m.get("data") or {}).get("phase") == "done"):
            done_at.setdefault(int(m.get("rank", -1)), i)
    ranks: dict[int, dict[str, Any]] = {}

    def rank_entry(r: int) -> dict[str, Any]:
        if r not in ranks:
            ranks[r] = {"milestones": [], "slots": defaultdict(list), "marks": Counter()}
        return ranks[r]

    # whose server a name is (what each rank published), for a failed segment open that names no owner
    publishers: dict[str, set[int]] = defaultdict(set)
    for m in marks:
        if m["name"] == "key_published" and (m.get("data") or {}).get("server_name"):
            publishers[str(m["data"]["server_name"])].add(int(m.get("rank", -1)))
    published: dict[str, set[int]] = defaultdict(set)
    server_names: dict[str, set[int]] = defaultdict(set)
    transports: set[str] = set()
    errors: dict[str, str | None] = {}
    broken: set[str] = set()
    for i, m in enumerate(marks):
        name = str(m["name"])
        if name in NOISE_MARKS:
            continue
        r = int(m.get("rank", -1))
        if r in done_at and i > done_at[r]:
            continue
        data: Mapping[str, Any] = m.get("data") or {}
        entry = rank_entry(r)
        peer = data.get("peer", data.get("dst_rank", data.get("owner")))
        if peer is None and name == "segment_opened" and len(publishers.get(str(data.get("name")), ())) == 1:
            peer = next(iter(publishers[str(data.get("name"))]))  # refused: the server's rank died
        about_dead = isinstance(peer, int) and peer in dead and peer != r
        if about_dead and name in KILLED_PEER_DETAIL:
            continue
        if name == "peer_marked_broken":
            broken.add(f"{r}->{peer}")
            continue
        if name in MILESTONES and m.get("activity", "caller") == "caller":
            entry["milestones"].append(_item(name, data, ab))
        elif name == "task_phase":
            entry["slots"][str(data.get("slot"))].append(_item(name, {k: v for k, v in data.items() if k != "slot"}, ab))
        elif name == "key_published":
            published[str(data.get("key"))].add(r)
            if data.get("server_name"):
                server_names[str(ab.value("", data["server_name"]))].add(r)
        elif name == "transport":
            if isinstance(peer, int) and peer in died_in and peer != r and in_coll[i] >= died_in[peer]:
                continue  # a WRITE to a rank killed in this collective (or before): whether one was made is timing
            transports.add(f"{r}->{data.get('peer')} {data.get('kind')} {data.get('transport')}")
        elif name == "error":
            errors.setdefault(str(r), data.get("cause"))
        elif name == "killed":
            pass
        else:
            entry["marks"][_item(name, data, ab)] += 1

    store_read: dict[int, set[str]] = defaultdict(set)
    store_awaited: dict[int, set[str]] = defaultdict(set)
    for e in effects:
        kind = e.get("effect")
        args = e.get("args") or {}
        r = int(e.get("rank", -1))
        if kind in _STORE_READ and e.get("result") is not None:
            store_read[r].add(str(args.get("key")))
        elif kind in _STORE_AWAIT:
            store_awaited[r].update(str(k) for k in args.get("keys") or ())

    out_ranks = {
        str(r): {
            "milestones": list(v["milestones"]),
            "slots": {s: list(seq) for s, seq in sorted(v["slots"].items())},
            "marks": dict(sorted(v["marks"].items())),
        }
        for r, v in sorted(ranks.items())
    }
    o = outcome_json or {}
    results = {
        key: {str(rk): {"output": rv.get("output"), "active": rv.get("active")} for rk, rv in sorted(per.items())}
        for key, per in sorted((o.get("results") or {}).items())
    }
    facts: dict[str, Any] = {
        "published": {k: sorted(v) for k, v in sorted(published.items())},
        "server_names": {k: sorted(v) for k, v in sorted(server_names.items())},
        "duplicated_server_names": sorted(k for k, v in server_names.items() if len(v) > 1),
        "transports": sorted(transports, key=_natural),
        "killed": sorted(killed),
        "broken": sorted(broken, key=_natural),
        "errors": dict(sorted(errors.items())),
        "results": results,
        "verdict": o.get("verdict"),
        "cause": o.get("cause"),
        "phase": o.get("phase"),
    }
    if effects:
        facts["store_read"] = {str(r): sorted(v) for r, v in sorted(store_read.items())}
        facts["store_awaited"] = {str(r): sorted(v) for r, v in sorted(store_awaited.items())}
    return {"version": CANONICAL_VERSION, "ranks": out_ranks, "facts": facts}


def _natural(s: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _show(v: Any) -> str:
    if v is None:
        return "(nothing)"
    return v if isinstance(v, str) else json.dumps(v, sort_keys=True, separators=(",", ":"))


def _side(label_a: str, a: Any, label_b: str, b: Any, width: int = 60) -> list[str]:
    left, right = _show(a), _show(b)
    if len(left) <= width and len(right) <= width:
        return [f"    {label_a}: {left:<{width}} | {label_b}: {right}"]
    return [f"    {label_a}: {left}", f"    {label_b}: {right}"]


def _first_seq_divergence(a: Sequence[str], b: Sequence[str]) -> int | None:
    for i in range(max(len(a), len(b))):
        if i >= len(a) or i >= len(b) or a[i] != b[i]:
            return i
    return None


def diff(a: Mapping[str, Any], b: Mapping[str, Any], labels: tuple[str, str] = ("sim", "real")) -> list[str]:
    """Differences of two canonical forms: the first divergence per rank, then each differing fact.

    Empty when they are equal. Each entry is one or more lines (joined with newlines)."""
    la, lb = labels
    out: list[str] = []
    ra, rb = a.get("ranks", {}), b.get("ranks", {})
    for r in sorted(set(ra) | set(rb), key=_natural):
        xa, xb = ra.get(r), rb.get(r)
        if xa is None or xb is None:
            out.append(f"rank {r}: present only in {la if xb is None else lb}")
            continue
        lines = _rank_divergence(r, xa, xb, la, lb)
        if lines:
            out.append("\n".join(lines))
    fa, fb = a.get("facts", {}), b.get("facts", {})
    for k in sorted(set(fa) | set(fb)):
        va, vb = fa.get(k), fb.get(k)
        if va == vb:
            continue
        lines = [f"fact {k} differs:"]
        if isinstance(va, dict) and isinstance(vb, dict):
            for sub in sorted(set(va) | set(vb), key=_natural):
                if va.get(sub) != vb.get(sub):
                    lines.append(f"  {k}[{sub}]:")
                    lines += _side(la, va.get(sub), lb, vb.get(sub))
                    break
        elif isinstance(va, list) and isinstance(vb, list):
            only_a = [x for x in va if x not in vb]
            only_b = [x for x in vb if x not in va]
            lines += _side(f"only in {la}", only_a or None, f"only in {lb}", only_b or None)
        else:
            lines += _side(la, va, lb, vb)
        out.append("\n".join(lines))
    return out


def _rank_divergence(r: str, xa: Mapping[str, Any], xb: Mapping[str, Any], la: str, lb: str) -> list[str]:
    ma, mb = xa.get("milestones", []), xb.get("milestones", [])
    i = _first_seq_divergence(ma, mb)
    if i is not None:
        lines = [f"rank {r}: milestones diverge at #{i}" + (f" (after {ma[i - 1]})" if i > 0 else "") + ":"]
        lines += _side(la, ma[i] if i < len(ma) else None, lb, mb[i] if i < len(mb) else None)
        return lines
    sa, sb = xa.get("slots", {}), xb.get("slots", {})
    for s in sorted(set(sa) | set(sb), key=_natural):
        qa, qb = sa.get(s, []), sb.get(s, [])
        j = _first_seq_divergence(qa, qb)
        if j is not None:
            lines = [f"rank {r}: task slot {s} diverges at #{j}" + (f" (after {qa[j - 1]})" if j > 0 else "") + ":"]
            lines += _side(la, qa[j] if j < len(qa) else None, lb, qb[j] if j < len(qb) else None)
            return lines
    ca, cb = Counter(xa.get("marks", {})), Counter(xb.get("marks", {}))
    if ca != cb:
        only_a = sorted((ca - cb).items())
        only_b = sorted((cb - ca).items())
        lines = [f"rank {r}: marks differ (compared as a multiset):"]
        left = only_a[0] if only_a else None
        right = only_b[0] if only_b else None
        lines += _side(la, f"{left[0]} x{left[1]}" if left else None, lb, f"{right[0]} x{right[1]}" if right else None)
        more = len(only_a) + len(only_b) - (left is not None) - (right is not None)
        if more > 0:
            lines.append(f"    ... and {more} more differing item(s)")
        return lines
    return []


def format_diff(lines: Sequence[str]) -> str:
    """``equal`` or the divergences, one block each."""
    return "equal" if not lines else "\n".join(lines)
