"""Trace events: one schema for both drivers.

A run's trace is a list of JSON-able dicts, written as JSON lines by ``--trace FILE``:

* effect records: ``{"type": "effect", "rank": r, "activity": "poller", "t0": s, "t1": s,
  "effect": "StoreSet", "args": {...}, "result": ...}``
* mark records: ``{"type": "mark", "rank": r, "activity": "caller", "t": s, "name": "key_published",
  "data": {...}}``
* blocked records (hang dumps): see :class:`Blocked`.

Drivers build records only through :func:`effect_record` and :func:`mark_record`, so the two worlds
serialise arguments and results identically. Times are seconds from the run's start (simulated or
measured). The canonical form for parity (:mod:`mooncake_protocol.canonical`) drops what legitimately
differs.
"""

from __future__ import annotations

import base64
import dataclasses
from dataclasses import dataclass
from typing import Any

from . import effects as fx

#: Marks that are not progress (a hang detector ignores them when looking for a stall).
NOISE_MARKS = frozenset({"log", "retry", "ping", "poll"})

#: Phases of a run, in order. ``bootstrap``: engine init, registration, publishing; ``warmup``: until every
#: peer is connected; ``collective``: the workload; ``done``.
PHASES = ("bootstrap", "warmup", "collective", "done")


def _jsonable(value: Any, depth: int = 0) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, bytes):
        if len(value) <= 64:
            try:
                text = value.decode("ascii")
                if text.isprintable():
                    return text
            except UnicodeDecodeError:
                pass
            return {"b64": base64.b64encode(value).decode("ascii")}
        return {"bytes": len(value)}
    if isinstance(value, (list, tuple)):
        if depth > 2 and len(value) > 16:
            return {"items": len(value)}
        return [_jsonable(v, depth + 1) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v, depth + 1) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(value):
            if not f.compare:
                continue
            out[f.name] = _jsonable(getattr(value, f.name), depth + 1)
        return out
    return repr(value)


def effect_args(effect: fx.Effect) -> dict[str, Any]:
    """The effect's arguments as JSON (callables and activities left out)."""
    if isinstance(effect, fx.Mark):
        return dict(effect.data)
    out = _jsonable(effect)
    assert isinstance(out, dict)
    return out


def effect_record(rank: int, activity: str, t0: float, t1: float, effect: fx.Effect, result: Any) -> dict[str, Any]:
    return {
        "type": "effect",
        "rank": rank,
        "activity": activity,
        "t0": round(t0, 9),
        "t1": round(t1, 9),
        "effect": type(effect).__name__,
        "args": effect_args(effect),
        "result": _jsonable(result),
    }


_PRIMITIVE = (type(None), bool, int, float, str)


def mark_record(rank: int, activity: str, t: float, mark: fx.Mark) -> dict[str, Any]:
    # same result as _jsonable(dict(mark.data)), without recursing into primitive values (a hot path: a loop, not
    # a comprehension, which is a function call of its own before Python 3.12)
    data = {}
    for k, v in mark.data:
        data[str(k)] = v if type(v) in _PRIMITIVE else _jsonable(v, 1)
    return {
        "type": "mark",
        "rank": rank,
        "activity": activity,
        "t": round(t, 9),
        "name": mark.name,
        "data": data,
    }


@dataclass(frozen=True)
class Blocked:
    """What one activity of one rank is blocked in at the moment of a hang dump."""

    rank: int
    activity: str
    effect: str  # effect class name
    what: str  # what it awaits, in words
    blockers: tuple[str, ...]  # "rank:3", "store:buffer_0_3", "resource:module-load:reduce_int32_sum", ...
    since: float  # when it started waiting (run seconds)
    resource: str | None = None  # a driver-level resource holding it back (GPU model, loader, stream)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_json(d: dict[str, Any]) -> Blocked:
        return Blocked(
            rank=int(d["rank"]), activity=str(d["activity"]), effect=str(d["effect"]), what=str(d["what"]),
            blockers=tuple(d.get("blockers") or ()), since=float(d.get("since", 0.0)),
            resource=d.get("resource"),
        )


def describe_wait(effect: fx.Effect) -> tuple[str, tuple[str, ...]]:
    """(what, blockers) of a blocking effect, for hang dumps."""
    if isinstance(effect, fx.WaitUntil):
        blockers: tuple[str, ...] = ()
        if effect.blockers is not None:
            try:
                blockers = tuple(effect.blockers())
            except Exception as exc:  # a dump must never fail
                blockers = (f"error:{exc}",)
        return effect.what, blockers
    if isinstance(effect, fx.StoreWait):
        return effect.what or f"store keys {', '.join(effect.keys)}", tuple(f"store:{k}" for k in effect.keys)
    if isinstance(effect, fx.RpcCall):
        return f"RPC {effect.method} to {effect.target}", (f"rpc:{effect.target}",)
    if isinstance(effect, fx.Join):
        return effect.what or f"activity {effect.handle} to end", ()
    if isinstance(effect, fx.StreamSync):
        return effect.what or f"stream {effect.stream} to drain", (f"stream:{effect.stream}",)
    if isinstance(effect, fx.SteadyState):
        return (f"chunks before chunk {effect.chunk} of collective {effect.index} to finish (fast-forward check)",
                (f"stream:{effect.stream}",) if effect.stream else ())
    if isinstance(effect, fx.Memcpy):
        return f"memcpy of {effect.length} bytes on stream {effect.stream}", (f"stream:{effect.stream}",)
    if isinstance(effect, fx.Launch):
        return f"launch of {effect.kernel} on stream {effect.stream}", (f"kernel:{effect.kernel}",)
    if isinstance(effect, fx.LoadKernel):
        return f"module load of {effect.kernel}", (f"kernel:{effect.kernel}",)
    return type(effect).__name__, ()
