"""Reduce semantics: dtypes, ops, and the element-wise combination both worlds must agree on.

``reduceKernel<T>`` (mooncake-pg.md 7.4): for each element, the first *active* rank initialises the
accumulator and the other active ranks are combined by SUM, MIN, MAX or PRODUCT; inactive ranks are skipped.
GPU dtypes: uint8 int8 int16 int32 int64 float32 float64 bool bfloat16 (no float16). CPU: the same without
bfloat16. Other ops (AVG, bitwise) are rejected with "Only support SUM/MIN/MAX/PRODUCT".

The numpy implementation here is the reference: the simulator uses it to compute results, the real CuPy
kernels are tested against it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

REDUCE_OPS = ("sum", "min", "max", "product")
GPU_REDUCE_DTYPES = ("uint8", "int8", "int16", "int32", "int64", "float32", "float64", "bool", "bfloat16")
CPU_REDUCE_DTYPES = ("uint8", "int8", "int16", "int32", "int64", "float32", "float64", "bool")
ALL_DTYPES = ("uint8", "int8", "int16", "int32", "int64", "float16", "bfloat16", "float32", "float64", "bool")

ITEMSIZE = {"uint8": 1, "int8": 1, "int16": 2, "int32": 4, "int64": 8, "float16": 2, "bfloat16": 2,
            "float32": 4, "float64": 8, "bool": 1}


def kernel_name(dtype: str, op: str) -> str:
    return f"reduce_{dtype}_{op}"


def all_reduce_kernels() -> tuple[str, ...]:
    """The instantiations ``preloadReduceKernels`` touches (one per dtype; ops share a module per dtype in
    Mooncake, but we name each (dtype, op) so a test can see exactly what was loaded)."""
    return tuple(kernel_name(d, o) for d in GPU_REDUCE_DTYPES for o in REDUCE_OPS)


def unsupported_reason(backend: str, dtype: str, op: str | None) -> str | None:
    """Why Mooncake rejects this reduction, or None when it is supported."""
    if op is not None and op not in REDUCE_OPS:
        return "Only support SUM/MIN/MAX/PRODUCT"
    allowed = GPU_REDUCE_DTYPES if backend == "cuda" else CPU_REDUCE_DTYPES
    if dtype not in allowed:
        return f"Unsupported dtype {dtype} for reduce on the {'GPU' if backend == 'cuda' else 'CPU'} backend"
    return None


def to_numpy(dtype: str, data: bytes) -> np.ndarray:
    if dtype == "bfloat16":
        u16 = np.frombuffer(data, dtype=np.uint16)
        return (u16.astype(np.uint32) << 16).view(np.float32)
    if dtype == "bool":
        return np.frombuffer(data, dtype=np.uint8).astype(bool)
    return np.frombuffer(data, dtype=np.dtype(dtype))


def from_numpy(dtype: str, arr: np.ndarray) -> bytes:
    if dtype == "bfloat16":
        f32 = np.asarray(arr, dtype=np.float32)
        u32 = f32.view(np.uint32)
        # round to nearest even, as __float2bfloat16 does
        rounded = (u32 + 0x7FFF + ((u32 >> 16) & 1)) >> 16
        return rounded.astype(np.uint16).tobytes()
    if dtype == "bool":
        return np.asarray(arr, dtype=bool).astype(np.uint8).tobytes()
    return np.asarray(arr, dtype=np.dtype(dtype)).tobytes()


def combine(dtype: str, op: str, slices: Sequence[bytes], active: Sequence[bool]) -> bytes:
    """Reduce ``slices`` (one per rank, equal length) over the active ranks; inactive ranks are skipped.

    With no active rank the result is zeros (the output was memset to 0 before the kernel).
    """
    acc: np.ndarray | None = None
    for data, on in zip(slices, active, strict=False):
        if not on:
            continue
        x = to_numpy(dtype, data)
        if acc is None:
            acc = x.copy()
            continue
        if dtype == "bool":
            acc = {"sum": acc | x, "product": acc & x, "min": acc & x, "max": acc | x}[op]
        elif op == "sum":
            acc = acc + x
        elif op == "product":
            acc = acc * x
        elif op == "min":
            acc = np.minimum(acc, x)
        elif op == "max":
            acc = np.maximum(acc, x)
        else:
            raise ValueError(f"unsupported reduce op {op}")
        if dtype not in ("bfloat16",):
            acc = acc.astype(to_numpy(dtype, data[:0]).dtype, copy=False)
    if acc is None:
        return bytes(len(slices[0]) if slices else 0)
    return from_numpy(dtype, acc)
