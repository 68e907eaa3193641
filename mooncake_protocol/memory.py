"""Synthetic addresses and the region table of one rank.

Both worlds use the same address layout so that descriptors, WRITE targets and traces agree byte for
byte: a region's address is ``(owner + 1) << 40 | rid << 32``. From an address a driver can tell the
owning rank and region id; a WRITE whose target address is not inside a region that the segment's owner
registered fails with ``address-not-found`` (the engine's "Requested address ... not found").

Regions are below 4 GiB each.
"""

from __future__ import annotations

from dataclasses import dataclass

OWNER_SHIFT = 40
RID_SHIFT = 32
OFFSET_MASK = (1 << RID_SHIFT) - 1
RID_MASK = (1 << (OWNER_SHIFT - RID_SHIFT)) - 1


def region_addr(owner: int, rid: int) -> int:
    """The base address of region ``rid`` of rank ``owner``."""
    if not 0 <= rid <= RID_MASK:
        raise ValueError(f"region id {rid} out of range")
    return (owner + 1) << OWNER_SHIFT | rid << RID_SHIFT


@dataclass(frozen=True)
class AddrParts:
    owner: int
    rid: int
    offset: int


def split_addr(addr: int) -> AddrParts:
    """Decode an address into (owner rank, region id, offset). Owner is -1 for address 0 (null)."""
    return AddrParts((addr >> OWNER_SHIFT) - 1, (addr >> RID_SHIFT) & RID_MASK, addr & OFFSET_MASK)


#: Region kinds. ``device``: GPU memory (cudaMalloc / cuMemCreate); ``pinned``: page-locked host memory
#: mapped into the GPU's address space; ``host``: plain heap (malloc).
REGION_KINDS = ("device", "pinned", "host")


def is_host_kind(kind: str) -> bool:
    return kind in ("pinned", "host")


#: What memory that is not zeroed holds at allocation. Mooncake mallocs its sync flag arrays; what a real
#: allocator hands back is whatever an earlier user left there. We model the hazard deterministically as
#: stale sync flags: every int32 is 1 (as an earlier group's completed task leaves them).
GARBAGE_WORD = (1).to_bytes(4, "little")


def garbage(offset: int, length: int) -> bytes:
    """The bytes at ``[offset, offset+length)`` of a region allocated without zeroing."""
    start = offset % 4
    reps = (start + length) // 4 + 2
    return (GARBAGE_WORD * reps)[start:start + length]
