"""Simulated memory: each rank's regions, sparse, with real bytes where anything was written.

Regions hold bytes in 64 KiB pages created on first touch, so a 512-rank run with 16 MiB buffers per rank
stays small. In ``sizes`` mode (scenario ``data: sizes``) payloads are not materialised at all: a WRITE
moves only its length, and small control words (flags, counters) are still kept exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mooncake_protocol.effects import Region
from mooncake_protocol.memory import garbage

PAGE = 1 << 16


@dataclass
class SimRegion:
    region: Region
    zero: bool
    label: str | None = None
    ipc_handle: bool = False
    fabric_handle: bool = False
    pages: dict[int, bytearray] = field(default_factory=dict)
    #: the owning rank (anything with an ``epoch``): :meth:`write` and :meth:`fill` bump its epoch, which tells
    #: the driver that its waiters' predicates must be evaluated again (``Simulation.dirty_written``)
    owner: Any = None

    def _page(self, index: int) -> bytearray:
        page = self.pages.get(index)
        if page is None:
            size = min(PAGE, self.region.size - index * PAGE)
            page = bytearray(size) if self.zero else bytearray(garbage(index * PAGE, size))
            self.pages[index] = page
        return page

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or offset + length > self.region.size:
            raise IndexError(f"read [{offset}, {offset + length}) outside region {self.region.name} of {self.region.size} bytes")
        idx, off = divmod(offset, PAGE)
        if off + length <= PAGE:  # fast path: within one page (flags, counters)
            page = self.pages.get(idx)
            if page is not None:
                return bytes(page[off:off + length])
            if self.zero:
                return bytes(length)
        out = bytearray()
        pos = offset
        end = offset + length
        while pos < end:
            idx, off = divmod(pos, PAGE)
            n = min(end - pos, PAGE - off)
            if idx in self.pages or not self.zero:
                out += self._page(idx)[off:off + n]
            else:
                out += bytes(n)
            pos += n
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        if self.owner is not None:
            self.owner.epoch += 1
        self.land(offset, data)

    def land(self, offset: int, data: bytes) -> None:
        """:meth:`write` without bumping the owner's epoch: a WRITE landing, which the transfer model reports to
        the driver with the range it wrote (``Simulation.dirty_written``)."""
        if offset < 0 or offset + len(data) > self.region.size:
            raise IndexError(f"write [{offset}, {offset + len(data)}) outside region {self.region.name}")
        n = len(data)
        idx, off = divmod(offset, PAGE)
        if 0 < n <= PAGE - off:  # fast path: within one page (a sync flag landing)
            self._page(idx)[off:off + n] = data
            return
        pos = 0
        while pos < len(data):
            idx, off = divmod(offset + pos, PAGE)
            n = min(len(data) - pos, PAGE - off)
            self._page(idx)[off:off + n] = data[pos:pos + n]
            pos += n

    def fill(self, offset: int, length: int, value: int) -> None:
        if self.owner is not None:
            self.owner.epoch += 1
        pos = offset
        end = offset + length
        while pos < end:
            idx, off = divmod(pos, PAGE)
            n = min(end - pos, PAGE - off)
            page = self._page(idx)
            page[off:off + n] = bytes([value]) * n
            pos += n
