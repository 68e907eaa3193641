"""Start a real job on this machine: the store, blocker sockets, one process per rank; faults; hygiene.

Rules of this module:

* :func:`launch` returns only when every process it started is gone and every shared-memory segment of
  the job (``/dev/shm/mc<job>_*``) is unlinked, and its temporary job directory removed (unless
  ``keep_job_dir``): after a normal run, a killed rank, a failed start, a deadline, an exception, or
  SIGINT/SIGTERM to the launcher (handlers turn them into KeyboardInterrupt while :func:`launch` runs on
  the main thread). Each rank runs in its own session and process group, and the whole group is SIGKILLed
  at the end; ranks also get SIGTERM if the launcher dies (PR_SET_PDEATHSIG, see driver.py), and then
  remove the temporary job directory themselves.
* Faults: ``hold_ports`` (plain listening sockets opened before any rank starts, so a rank's bind gets a
  real EADDRINUSE), ``kill_at`` (the rank SIGKILLs itself when it records ``phase`` mark = that phase),
  ``pause_at`` (the rank SIGSTOPs itself at that phase mark; the launcher, tailing its trace, SIGCONTs it
  ``seconds`` later), ``store_delay_s`` (every store request is held that long).
* Hang detection mirrors the simulator: the launcher tails every rank's trace for progress marks (names
  outside :data:`mooncake_protocol.trace.NOISE_MARKS`); when none appeared for ``stall_s`` (counted once
  every rank wrote its first record), or at ``deadline_s``, it asks every live rank for a dump (SIGUSR1),
  waits a little for the dump files, then ends the job. :class:`JobResult` carries the merged trace, dumps, results and exit codes.
* :func:`check_realisable` refuses, in one line, a scenario this machine cannot realise.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mooncake_protocol.errors import InputError

from .driver import RELEASE_KEY, RankSpec, rank_file, read_board
from .memory import sweep_shm
from .store import StoreClient, StoreServer

PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


def child_pythonpath(env: Mapping[str, str], extra: Sequence[str] = ()) -> str:
    """``PYTHONPATH`` for a child Python process: this package first (it may run from a source tree), then
    ``extra``, then what ``env`` already has."""
    return os.pathsep.join([PACKAGE_ROOT, *extra, *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])


class Unrealisable(InputError):
    """The scenario needs hardware this machine does not have. The CLI prints it and exits 2."""


@dataclass
class Faults:
    """Faults the launcher realises. Ranks are job ranks; phases are ``phase`` mark values."""

    kill_at: dict[int, str] = field(default_factory=dict)
    kill_after: dict[int, float] = field(default_factory=dict)  # seconds after the kill_at phase mark
    pause_at: dict[int, tuple[str, float]] = field(default_factory=dict)
    hold_ports: list[int] = field(default_factory=list)
    store_delay_s: float | dict[str, float] = 0.0


@dataclass
class JobResult:
    job_id: str
    job_dir: str
    world_size: int
    exit_codes: dict[int, int | None]  # None: was still running at the end (then killed)
    results: dict[int, dict[str, Any]]  # rank<r>.result.json of ranks that got that far
    dumps: dict[int, dict[str, Any]]  # rank<r>.dump.json of ranks that wrote one
    trace: list[dict[str, Any]]  # every rank's records, ordered by time
    timed_out: bool
    killed: list[int]  # ranks the launcher had to kill at the end
    events: list[dict[str, Any]]  # what the launcher did (faults applied, dumps asked)
    store_stats: dict[str, int]
    wall_s: float
    logs: dict[int, str]  # tail of each rank's stdout+stderr
    #: why the run ended: completed (every rank's caller finished or the rank is gone), stall (no progress
    #: mark for ``stall_s``), deadline
    end_reason: str = "completed"
    #: run seconds of the last progress mark (a mark whose name is not in trace.NOISE_MARKS)
    last_progress_s: float = 0.0
    #: run seconds when every rank's caller had finished (or its process was gone); None if that never happened
    callers_done_s: float | None = None

    def clean(self) -> bool:
        """Whether the job completed and every rank exited 0 (a run whose figures can be measured)."""
        return self.end_reason == "completed" and all(c == 0 for c in self.exit_codes.values())

    def blocked(self) -> list[Any]:
        from mooncake_protocol.trace import Blocked

        return [Blocked.from_json(b) for d in self.dumps.values() for b in d.get("blocked", [])]


# ---------------------------------------------------------------------------------- realisability


@dataclass(frozen=True)
class MachineFacts:
    gpus: int
    hostname: str

    @staticmethod
    def probe() -> MachineFacts:
        from .gpu import gpu_count

        return MachineFacts(gpus=gpu_count(), hostname=socket.gethostname())


def check_realisable(need: Any, source: str = "scenario", machine: MachineFacts | None = None) -> None:
    """Raise :class:`Unrealisable` if this machine cannot run ``need`` for real.

    ``need`` has the fields of :class:`mooncake_protocol.scenario.Realisable`: ``cpu``, ``gpus``,
    ``mnnvl``, ``rdma``, ``hosts``.
    """
    missing = []
    hosts = int(getattr(need, "hosts", 1) or 1)
    if hosts > 1:
        missing.append(f"{hosts} hosts (real mode runs on this one machine; use torchrun/SLURM with `mooncake-real rank`)")
    if getattr(need, "mnnvl", False):
        missing.append("an MNNVL fabric (GB200-class GPUs with IMEX); this host cannot realise fabric handles")
    if getattr(need, "rdma", False):
        missing.append("RDMA between hosts")
    gpus = int(getattr(need, "gpus", 0) or 0)
    # probe the GPUs only when the scenario needs some: importing CuPy and starting CUDA takes seconds
    m = machine or (MachineFacts.probe() if gpus > 0 else MachineFacts(gpus=0, hostname=socket.gethostname()))
    if gpus > m.gpus:
        missing.append(f"{gpus} GPU(s), this machine has {m.gpus}" + ("" if m.gpus else " (no CuPy or no CUDA device)"))
    if missing:
        raise Unrealisable(source, "", "cannot run for real on this machine: needs " + "; ".join(missing)
                           + "; run it in the simulator (mooncake-sim run) instead")


# ---------------------------------------------------------------------------------- hygiene helpers


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()


def _proc_state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"


@contextlib.contextmanager
def _interrupts_as_keyboardinterrupt() -> Iterator[None]:
    """While launching on the main thread, SIGINT and SIGTERM raise KeyboardInterrupt (cleanup runs)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class _TraceTail:
    """Follows one rank's trace file for phase marks (pause faults)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pos = 0
        self.buf = b""

    def new_records(self, marks_only: bool = False) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
        except OSError:
            return []
        self.pos += len(data)
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        out = []
        for line in lines:
            if marks_only and b'"mark"' not in line:
                continue
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def _read_trace(path: Path) -> list[dict[str, Any]]:
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
    except OSError:
        pass
    return out


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-limit:].decode("utf-8", "replace")


# ---------------------------------------------------------------------------------- launch


def launch(
    world_size: int,
    *,
    entry: str = "mooncake_real.entry:protocol_activity",
    scenario: str | None = None,
    gpus: Sequence[int | None] | None = None,
    faults: Faults | None = None,
    deadline_s: float = 60.0,
    host: str = "127.0.0.1",
    job_dir: str | Path | None = None,
    keep_job_dir: bool = False,
    args: Mapping[str, Any] | None = None,
    pythonpath: Sequence[str] = (),
    dump_grace_s: float = 3.0,
    env: Mapping[str, str] | None = None,
    job_id: str | None = None,
    stall_s: float | None = None,
    rank_options: Mapping[int, Mapping[str, Any]] | None = None,
) -> JobResult:
    """Run ``world_size`` rank processes of ``entry`` to their end or to ``deadline_s``.

    ``gpus[r]`` is rank r's CUDA device (None or absent: CPU backend). ``job_dir``: where specs, traces,
    dumps and results go (a temporary directory, removed afterwards unless ``keep_job_dir``). ``args`` is
    passed to every rank as ``RankSpec.args``. ``job_id`` (default: random hex) names the job's shared-memory
    segments ``mc<job_id>_*`` and its temporary directory. ``stall_s``: end the run (as a hang) when no
    progress mark appeared for that long (None: only the deadline). ``rank_options[r]``: extra
    :class:`RankSpec` fields of rank r (e.g. ``rpc_delay_s``, ``rpc_closed``).
    """
    faults = faults or Faults()
    pythonpath = [str(Path(p).resolve()) for p in pythonpath]
    job_id = job_id or secrets.token_hex(4)
    if not job_id.isalnum():
        raise ValueError(f"job id {job_id!r} must be alphanumeric (it names /dev/shm segments)")
    token = secrets.token_hex(16)
    own_dir = job_dir is None
    jdir = Path(tempfile.mkdtemp(prefix=f"mooncake-real-{job_id}-")) if job_dir is None else Path(job_dir)
    jdir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    procs: dict[int, subprocess.Popen[bytes]] = {}
    logs: dict[int, Any] = {}
    blockers: list[socket.socket] = []
    events: list[dict[str, Any]] = []
    store: StoreServer | None = None
    timed_out = False
    killed: list[int] = []
    exit_codes: dict[int, int | None] = {}
    store_stats: dict[str, int] = {}
    progress = _Progress()
    finished = False  # False while an interrupt (Ctrl-C, SIGTERM) can still leave the run half-done

    def event(kind: str, **data: Any) -> None:
        events.append({"t": round(time.monotonic() - t0, 6), "event": kind, **data})

    try:
        with _interrupts_as_keyboardinterrupt():
            if gpus is not None and any(g is not None for g in gpus):
                from .gpu import warm_disk_cache

                event("kernels_compiled", count=warm_disk_cache())  # ranks then only load them, lazily
            store = StoreServer(token, host=host, delay_s=faults.store_delay_s).start()
            for port in faults.hold_ports:
                b = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                b.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                b.bind((host, port))
                b.listen(1)
                blockers.append(b)
                event("hold_port", port=port)
            child_env = dict(os.environ if env is None else env)
            child_env["PYTHONPATH"] = child_pythonpath(child_env, pythonpath)
            child_env.setdefault("PYTHONUNBUFFERED", "1")
            for r in range(world_size):
                pause = faults.pause_at.get(r)
                spec = RankSpec(
                    job_id=job_id, job_dir=str(jdir), rank=r, world_size=world_size, store_addr=store.address,
                    token=token, t0=t0, deadline_s=deadline_s + dump_grace_s + 2.0, entry=entry, scenario=scenario,
                    host=host, gpu=(gpus[r] if gpus is not None and r < len(gpus) else None),
                    kill_at_phase=faults.kill_at.get(r), kill_after_s=float(faults.kill_after.get(r, 0.0)),
                    pause_at_phase=pause[0] if pause else None,
                    pause_s=pause[1] if pause else 0.0, release="launcher", pythonpath=list(pythonpath),
                    job_dir_owned=own_dir and not keep_job_dir,
                    args=dict(args or {}), **dict((rank_options or {}).get(r, {})),
                )
                spec_path = rank_file(jdir, r, "spec")
                spec_path.write_text(spec.to_json())
                logs[r] = open(jdir / f"rank{r}.log", "wb")
                procs[r] = subprocess.Popen(
                    [sys.executable, "-m", "mooncake_real.rank_main", str(spec_path)],
                    stdout=logs[r], stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True, env=child_env, cwd=str(jdir),
                )
            event("started", pids={r: p.pid for r, p in procs.items()})
            timed_out = _monitor(procs, jdir, faults, t0, deadline_s, dump_grace_s, store, token, event, stall_s,
                                 progress)
        finished = True
    finally:
        for r, p in procs.items():
            if p.poll() is None:
                killed.append(r)
            _kill_group(p)
        for r, p in procs.items():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass
            exit_codes[r] = p.returncode if r not in killed else None
        for f in logs.values():
            f.close()
        for b in blockers:
            b.close()
        if store is not None:
            store_stats = dict(store.stats)
            store.stop()
        sweep_shm(job_id)
        if not finished and own_dir and not keep_job_dir:  # interrupted: no result will read the directory
            shutil.rmtree(jdir, ignore_errors=True)

    result = _collect(job_id, jdir, world_size, exit_codes, timed_out, killed, events, store_stats, time.monotonic() - t0)
    result.end_reason = progress.end_reason
    result.last_progress_s = progress.last
    result.callers_done_s = progress.callers_done
    if own_dir and not keep_job_dir:
        shutil.rmtree(jdir, ignore_errors=True)
    return result


@dataclass
class _Progress:
    """What the monitor learnt about the run's progress (see JobResult)."""

    last: float = 0.0
    end_reason: str = "completed"
    callers_done: float | None = None


def _monitor(
    procs: dict[int, subprocess.Popen[bytes]], jdir: Path, faults: Faults, t0: float, deadline_s: float,
    dump_grace_s: float, store: StoreServer, token: str, event: Any, stall_s: float | None = None,
    progress: _Progress | None = None,
) -> bool:
    """Watch the ranks until all exited, or a stall or the deadline (returns whether it was one of those)."""
    from mooncake_protocol.trace import NOISE_MARKS

    prog = progress if progress is not None else _Progress()
    tails = {r: _TraceTail(rank_file(jdir, r, "trace")) for r in procs}
    started: set[int] = set()  # ranks that wrote a first record (the stall clock runs once all did)
    resume_at: dict[int, float] = {}
    released = False
    client = StoreClient(store.address, token, timeout_s=5.0)
    try:
        while True:
            now = time.monotonic()
            alive = {r for r, p in procs.items() if p.poll() is None}
            for r, tail in tails.items():
                recs = tail.new_records(marks_only=True)
                if tail.pos:
                    started.add(r)
                for rec in recs:
                    name = rec.get("name")
                    if name not in NOISE_MARKS:
                        prog.last = max(prog.last, float(rec.get("t", 0.0)))
                    if (r in faults.pause_at and r not in resume_at and name == "phase"
                            and rec.get("data", {}).get("phase") == faults.pause_at[r][0]):
                        seconds = faults.pause_at[r][1]
                        resume_at[r] = now + seconds
                        event("pause", rank=r, phase=faults.pause_at[r][0], seconds=seconds)
            if not alive:
                if prog.callers_done is None:
                    prog.callers_done = round(now - t0, 6)
                return False
            for r, at in list(resume_at.items()):
                if at is not None and now >= at and r in alive:
                    if _proc_state(procs[r].pid) == "T" or now >= at + 1.0:
                        os.kill(procs[r].pid, signal.SIGCONT)
                        event("resume", rank=r)
                        resume_at[r] = float("inf")
            if not released and all(r not in alive or rank_file(jdir, r, "result").exists() for r in procs):
                prog.callers_done = round(now - t0, 6)
                client.set(RELEASE_KEY, b"1")
                released = True
                event("release")
            if not released:
                stalled = (stall_s is not None and len(started | (set(procs) - alive)) == len(procs)
                           and now - t0 - prog.last >= stall_s)
                if stalled or now - t0 >= deadline_s:
                    prog.end_reason = "stall" if stalled else "deadline"
                    event(prog.end_reason, alive=sorted(alive), last_progress=round(prog.last, 6))
                    _ask_dumps(procs, alive, jdir, dump_grace_s, event)
                    return True
            elif now - t0 >= deadline_s + dump_grace_s:  # released ranks that do not exit: end it anyway
                event("exit_overdue", alive=sorted(alive))
                return False
            time.sleep(0.005)
    finally:
        client.close()


def _ask_dumps(procs: dict[int, subprocess.Popen[bytes]], alive: set[int], jdir: Path, grace_s: float, event: Any) -> None:
    before = {r: (_read_json(rank_file(jdir, r, "dump")) or {}).get("seq", 0) for r in alive}
    for r in sorted(alive):
        if _proc_state(procs[r].pid) == "T":  # a paused rank cannot answer
            os.kill(procs[r].pid, signal.SIGCONT)
        with contextlib.suppress(ProcessLookupError):
            os.kill(procs[r].pid, signal.SIGUSR1)
    event("dump_request", ranks=sorted(alive))
    end = time.monotonic() + grace_s
    pending = set(alive)
    while pending and time.monotonic() < end:
        for r in list(pending):
            d = _read_json(rank_file(jdir, r, "dump"))
            if procs[r].poll() is not None or (d is not None and d.get("seq", 0) > before[r]):
                pending.discard(r)
        time.sleep(0.02)
    for r in sorted(pending):  # stuck with the GIL held (or stopped): take its state board instead
        board = read_board(jdir / f"rank{r}.board")
        # CuPy loads a cold module holding the GIL: every other thread of that process is held by the load too
        loads = [b["resource"] for b in board if b.get("effect") in ("Launch", "LoadKernel")
                 and str(b.get("resource") or "").startswith("module-load:")]
        if loads:
            for b in board:
                b["resource"] = b.get("resource") or loads[0]
        doc = {
            "rank": r, "pid": procs[r].pid, "reason": "board", "seq": 0, "t": round(time.monotonic() - t0_of(jdir, r), 6),
            "note": "the rank did not answer the dump request (a thread holds the GIL in a CUDA call, or it is "
                    "stopped); blocked activities are taken from its state board, as of when each effect began",
            "blocked": sorted(board, key=lambda b: (b.get("activity", ""), b.get("since", 0.0))),
            "last_events": _read_trace(rank_file(jdir, r, "trace"))[-50:],
        }
        rank_file(jdir, r, "dump").write_text(json.dumps(doc, indent=1))
    if pending:
        event("dump_from_board", ranks=sorted(pending))


def record_t(rec: dict[str, Any]) -> float:
    """When a trace record happened (run seconds): an effect's start, a mark's time."""
    return float(rec.get("t0", rec.get("t", 0.0)))


def t0_of(jdir: Path, rank: int) -> float:
    """The run's start (monotonic) from a rank's spec."""
    try:
        return float(json.loads(rank_file(jdir, rank, "spec").read_text())["t0"])
    except (OSError, ValueError, KeyError):
        return time.monotonic()


def _collect(job_id: str, jdir: Path, world_size: int, exit_codes: dict[int, int | None], timed_out: bool,
             killed: list[int], events: list[dict[str, Any]], store_stats: dict[str, int], wall: float) -> JobResult:
    results, dumps, records, logs = {}, {}, [], {}
    for r in range(world_size):
        res = _read_json(rank_file(jdir, r, "result"))
        if res is not None:
            results[r] = res
        d = _read_json(rank_file(jdir, r, "dump"))
        if d is not None:
            dumps[r] = d
        records.extend(_read_trace(rank_file(jdir, r, "trace")))
        logs[r] = _tail(jdir / f"rank{r}.log")
    records.sort(key=lambda rec: (record_t(rec), rec.get("rank", 0)))
    return JobResult(job_id, str(jdir), world_size, exit_codes, results, dumps, records, timed_out, sorted(killed),
                     events, store_stats, round(wall, 6), logs)


def write_trace(result: JobResult, path: str | Path) -> None:
    """The merged trace as JSON lines (the ``--trace FILE`` format of both CLIs)."""
    with open(path, "w", encoding="utf-8") as f:
        for rec in result.trace:
            f.write(json.dumps(rec) + "\n")
