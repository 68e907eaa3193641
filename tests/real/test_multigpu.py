"""Several GPUs of one host, one rank per GPU (needs >= 2 GPUs; skipped otherwise)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_multigpu.py"


def _bench():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("bench_multigpu", BENCH)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_multigpu"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.timeout(900)
def test_one_rank_per_gpu_parity_and_allreduce(tmp_path: Path) -> None:
    bench = _bench()
    if bench.gpu_count() < 2:
        pytest.skip("needs two or more GPUs")
    # discovered topology accepted, parity of host-region-gpu-label / lazy-kernel-load, a 1 MiB allreduce
    assert bench.main(["--sizes", "1M", "--out", str(tmp_path)]) == 0
