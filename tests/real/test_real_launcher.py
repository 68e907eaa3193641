"""Launcher hygiene: no process and no shared-memory segment of a job survives it, whatever happened."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("zmq")

from real_helpers import HERE, REPO, job_dirs, processes_matching, shm_segments, wait_for  # noqa: E402

from mooncake_real.launcher import Faults, MachineFacts, Unrealisable, check_realisable, launch  # noqa: E402


def _clean(job_id: str) -> None:
    assert processes_matching(f"mooncake-real-{job_id}") == []
    assert shm_segments(job_id) == []
    assert job_dirs(job_id) == []


@pytest.mark.timeout(60)
def test_after_a_normal_run():
    job = secrets.token_hex(4)
    r = launch(2, entry="real_activities:phases", pythonpath=[HERE], deadline_s=20, job_id=job)
    assert r.exit_codes == {0: 0, 1: 0}
    _clean(job)


@pytest.mark.timeout(60)
def test_after_killing_a_rank_and_a_deadline():
    job = secrets.token_hex(4)
    r = launch(3, entry="real_activities:hang", pythonpath=[HERE], deadline_s=1.5, job_id=job,
               faults=Faults(kill_at={0: "warmup"}))
    assert r.exit_codes[0] == -9 and r.timed_out
    _clean(job)


@pytest.mark.timeout(60)
def test_after_a_failed_start():
    job = secrets.token_hex(4)
    r = launch(2, entry="no_such_module:nothing", deadline_s=20, job_id=job)
    assert r.exit_codes == {0: 3, 1: 3}
    _clean(job)


def test_failed_blocker_does_not_leak():
    import socket

    job = secrets.token_hex(4)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    try:
        with pytest.raises(OSError):
            launch(2, entry="real_activities:phases", pythonpath=[HERE], deadline_s=20, job_id=job,
                   faults=Faults(hold_ports=[s.getsockname()[1]]))
    finally:
        s.close()
    _clean(job)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_after_a_signal_to_the_launcher(sig):
    job = secrets.token_hex(4)
    code = textwrap.dedent(f"""
        import sys
        from mooncake_real.launcher import launch
        try:
            launch(2, entry="real_activities:hang", pythonpath=[{HERE!r}], deadline_s=50, job_id={job!r})
        except KeyboardInterrupt:
            sys.exit(130)
        sys.exit(0)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, HERE]))
    p = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        # wait until both ranks run and hold their shared memory
        assert wait_for(lambda: len(shm_segments(job)) == 2, 20), "ranks did not start"
        assert len(processes_matching(f"mooncake-real-{job}")) == 2
        p.send_signal(sig)
        assert p.wait(20) == 130
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    _clean(job)


@pytest.mark.timeout(60)
def test_ranks_clean_up_when_the_launcher_is_killed():
    """SIGKILL of the launcher: the ranks get SIGTERM (parent-death signal) and remove their own segments."""
    job = secrets.token_hex(4)
    code = f"from mooncake_real.launcher import launch; launch(2, entry='real_activities:hang', pythonpath=[{HERE!r}], deadline_s=50, job_id={job!r})"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, HERE]))
    p = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        assert wait_for(lambda: len(shm_segments(job)) == 2, 20), "ranks did not start"
        p.kill()
        p.wait(10)
        assert wait_for(lambda: not processes_matching(f"mooncake-real-{job}") and not shm_segments(job)
                        and not job_dirs(job), 10)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


class _Need:
    def __init__(self, **kw):
        self.cpu, self.gpus, self.mnnvl, self.rdma, self.hosts = True, 0, False, False, 1
        self.__dict__.update(kw)


@pytest.mark.parametrize("need, text", [
    (_Need(gpus=2), "needs 2 GPU(s), this machine has 0"),
    (_Need(mnnvl=True), "MNNVL fabric"),
    (_Need(rdma=True), "RDMA between hosts"),
    (_Need(hosts=2), "2 hosts"),
])
def test_refuses_what_this_machine_cannot_realise(need, text):
    with pytest.raises(Unrealisable) as ei:
        check_realisable(need, "scenarios/x.yaml", MachineFacts(gpus=0, hostname="h"))
    msg = str(ei.value)
    assert text in msg and msg.startswith("scenarios/x.yaml: cannot run for real") and "\n" not in msg


def test_accepts_what_it_can():
    check_realisable(_Need(), "s.yaml", MachineFacts(gpus=0, hostname="h"))
    check_realisable(_Need(gpus=1), "s.yaml", MachineFacts(gpus=1, hostname="h"))


def test_a_stalled_run_is_judged_as_of_the_stall_not_of_what_came_while_dumps_were_collected():
    """A generated H100 run stalled at 3 s; the launcher then waited for a rank stuck in a CuPy module load to
    answer its dump request, and meanwhile three ranks' 5 s collective waits ran out. The run is judged as of
    the stall, as the simulator stops there: no error, no mark after it."""
    from mooncake_protocol.outcome import evaluate
    from mooncake_protocol.scenario import load_scenario
    from mooncake_real.launcher import JobResult
    from mooncake_real.runner import run_ended_at, run_record

    sc = load_scenario("real-cpu-bootstrap-2")

    def mark(rank, name, t, **data):
        return {"type": "mark", "rank": rank, "activity": "caller", "t": t, "name": name, "data": data}

    trace = [mark(r, "phase", 0.5, phase="bootstrap") for r in (0, 1)]
    trace += [mark(r, "phase", 0.6, phase="warmup", backend=0) for r in (0, 1)]
    late = [mark(1, "error", 7.5, text="collective 0 (allreduce) did not finish in 5 s", cause=None)]
    events = [{"t": 0.1, "event": "started"}, {"t": 3.6, "event": "stall", "alive": [0, 1], "last_progress": 0.6},
              {"t": 3.61, "event": "dump_request", "ranks": [0, 1]}]
    result = JobResult(job_id="x", job_dir="", world_size=2, exit_codes={0: None, 1: None},
                       results={1: {"status": "error", "error": "did not finish", "cause": None, "t": 7.5}},
                       dumps={}, trace=trace + late, timed_out=False, killed=[], events=events, store_stats={},
                       wall_s=8.0, logs={}, end_reason="stall", last_progress_s=0.6)
    assert run_ended_at(result) == 3.6
    rec = run_record(result, sc)
    assert rec.errors == {} and all(m["t"] <= 3.6 for m in rec.marks)
    assert evaluate(rec, sc).verdict == "hang"
    # a crash is a driver or protocol bug whenever it came: kept
    crashed = JobResult(**{**result.__dict__, "results": {1: {"status": "crash", "error": "KeyError", "t": 7.5}}})
    assert 1 in run_record(crashed, sc).errors
    # a run that completed keeps everything
    done = JobResult(**{**result.__dict__, "end_reason": "completed", "callers_done_s": 7.5})
    assert run_ended_at(done) is None and 1 in run_record(done, sc).errors
