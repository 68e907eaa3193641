"""Diagnosis codes: one per failure mode of Mooncake PG (brief mooncake-pg.md section 15).

These codes are stable: scenarios assert them in ``expect.cause``. Each entry says where its policy
switch lives (``mooncake_protocol.policy``) so the chain trigger -> switch -> scenario -> code is short.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Cause:
    code: str
    number: int
    summary: str
    switch: str | None


CAUSES: dict[str, Cause] = {
    c.code: c
    for c in (
        Cause("lazy-kernel-load", 1, "first launch of an unloaded kernel behind a resident spin kernel",
              "preload_reduce_kernels"),
        Cause("host-region-gpu-label", 2, "host region labelled cuda:N; transport selection fails or never lands",
              "host_region_wildcard_label"),
        Cause("host-region-on-fabric", 3, "write to a host region over a fabric-only NVLink (MNNVL, no HCA)", None),
        Cause("rpc-port-conflict", 4, "two servers on one port; duplicate server name published", "check_rpc_bind"),
        Cause("stale-task-id", 5, "worker polls task ids of ranks that have no task", "reset_task_ids"),
        Cause("uninitialized-sync-flag", 6, "garbage sync flag lets a rank read before data landed",
              "zero_sync_flags"),
        Cause("store-key-mismatch", 7, "ranks publish under different backend indices, or one never publishes",
              "bounded_connect_wait"),
        Cause("unreachable-segment", 8, "segment cannot be opened (wrong advertised host, closed port)",
              "validate_segment_id"),
        Cause("rdma-simultaneous-open", 9, "both sides of a pair open an endpoint at once", "rdma_connecting_state"),
        Cause("legacy-stream-serialization", 10, "spin kernel on the legacy default stream vs a synchronous copy",
              "nonblocking_spin_stream"),
        Cause("ping-false-positive", 11, "a slow but live peer marked broken and dropped", "liveness_probe"),
        Cause("p2p-lane-reset", 12, "lane reset while the peer still counts; wait never returns",
              "p2p_reset_fails_pending"),
        Cause("task-slot-exhaustion", 13, "more chunks in flight than task slots, or two groups sharing slots",
              "serialize_task_slots"),
        Cause("unsupported-reduce", 14, "unsupported dtype/op found after the exchange was enqueued",
              "validate_reduce_before_enqueue"),
        Cause("one-way-warmup", 15, "warmup proved only one direction; first collective hits the unproven one",
              "bidirectional_warmup"),
        Cause("duplicate-machine-id", 16, "cloned machine id makes NVLink/SHM chosen across hosts", "use_boot_id"),
        Cause("group-size-limit", 17, "group larger than the rank limit", "max_group_size"),
    )
}

CAUSE_CODES: tuple[str, ...] = tuple(CAUSES)
