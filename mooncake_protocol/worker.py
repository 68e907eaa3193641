"""Placeholder until the worker lands (issue 4)."""

from __future__ import annotations

from . import effects as fx
from .effects import Activity


class Worker:
    def __init__(self, proc: object) -> None:
        self.proc = proc

    def preload_reduce_kernels(self) -> Activity:
        return
        yield

    def run(self) -> Activity:
        yield fx.WaitUntil(lambda _r: False, 1.0, "worker idle")
