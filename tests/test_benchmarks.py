"""The simulator benchmark's ``--phases`` split (benchmarks/bench_collective.py): where a run's wall time went,
read at rank 0's milestones. Timing itself is never asserted (benchmarks measure it; tests only check the
shape of what they print)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_collective  # noqa: E402


def test_phase_split_names_each_span_from_one_milestone_to_the_next() -> None:
    marks = [("collective", 10.0), ("chunk 0", 10.0), ("chunk 1", 14.0), ("fast-forward over 2 chunks", 15.0),
             ("chunk 4", 15.5)]
    assert bench_collective.phase_split(marks, 0.0, 17.0) == (
        "bootstrap + warmup 10.00 s; chunk 0 4.00 s; chunk 1 1.00 s; fast-forward over 2 chunks 0.50 s; "
        "chunk 4 1.50 s")


def test_bench_collective_phases_prints_every_chunk_simulated_in_detail(capsys) -> None:
    assert bench_collective.main(["--no-bare", "--phases", "8"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "wall by rank 0's milestones" in x)
    names = re.findall(r"(?:^|; |: )([a-z +\-0-9]+?) \d+\.\d\d s", line)
    # 64 MiB at 8 ranks is 33 chunks: 0-3 in detail, 28 skipped, the last one in detail
    assert names == ["bootstrap + warmup", "chunk 0", "chunk 1", "chunk 2", "chunk 3",
                     "fast-forward over 28 chunks", "chunk 32"]


def test_benchmark_sizes_and_counts_below_one_are_a_usage_error(capsys) -> None:
    """bench_collective 0, or --count 0, was a traceback from inside the scenario loader."""
    import pytest

    for argv in (["--no-bare", "0"], ["--no-bare", "--count", "0", "8"], ["--no-bare", "eight"]):
        with pytest.raises(SystemExit) as ei:
            bench_collective.main(argv)
        assert ei.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert ": error: argument " in err and ("at least 1" in err or "whole number" in err), err  # (prog: the runner's)
