"""Shared test setup. Markers are declared in pyproject.toml; here only the ``gpu`` skip rule lives.

Tests marked ``gpu`` run only when CuPy imports and sees a CUDA device. CuPy is imported lazily, once,
and any failure (not installed, no driver, no device) means "skip", never an error.
"""

from __future__ import annotations

import functools

import pytest


@functools.lru_cache(maxsize=1)
def _gpu_unavailable_reason() -> str | None:
    try:
        import cupy

        count = int(cupy.cuda.runtime.getDeviceCount())
    except BaseException as exc:  # noqa: BLE001 - any failure means no usable GPU
        return f"no usable CUDA GPU ({type(exc).__name__}: {exc})"
    if count < 1:
        return "no CUDA device present"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    reason = _gpu_unavailable_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"gpu test skipped: {reason}")
    for item in gpu_items:
        item.add_marker(skip)
