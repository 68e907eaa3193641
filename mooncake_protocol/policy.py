"""Policies: every behaviour a Mooncake fix changed is a switch; default = fixed.

A scenario picks a preset (``fixed``, ``legacy-1755``, ...) and may override single switches::

    policy:
      preset: legacy-1755
      overrides: {preload_reduce_kernels: true}

Each switch documents the failure mode (diagnosis code) it guards against, so a failure mode's trigger,
its switch, its scenario and its diagnosis code can be found from each other.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any


@dataclass(frozen=True)
class Policy:
    """The switches. Field defaults are the fixed protocol (Mooncake after #1755, plus sane bounds)."""

    #: lazy-kernel-load: call cudaFuncGetAttributes on every reduce kernel at backend init (#1755).
    preload_reduce_kernels: bool = True
    #: host-region-gpu-label: label CPU sync, warmup and P2P control regions "*" (#1755) instead of "cuda:N".
    host_region_wildcard_label: bool = True
    #: rpc-port-conflict: check the RPC server's bind result and redraw (#1755).
    check_rpc_bind: bool = True
    #: stale-task-id: reset per-rank task ids to kInvalidTaskId before each batch and skip them (#1755).
    reset_task_ids: bool = True
    #: uninitialized-sync-flag: zero the sync flag arrays at registration (#1755).
    zero_sync_flags: bool = True
    #: legacy-stream-serialization: spin kernel on a non-blocking enqueue stream (#1863) vs legacy default.
    nonblocking_spin_stream: bool = True
    #: unsupported-reduce: validate dtype and op before enqueueing any work.
    validate_reduce_before_enqueue: bool = True
    #: ping-false-positive: a dedicated liveness probe (#1808) instead of pinging every pass after 100 us.
    liveness_probe: bool = True
    #: rdma-simultaneous-open: CONNECTING state and endpoint reuse on simultaneous open (#1733).
    rdma_connecting_state: bool = True
    #: duplicate-machine-id: identify machines by boot_id (#1863) instead of /etc/machine-id.
    use_boot_id: bool = True
    #: one-way-warmup: warm up both directions of every pair (not in Mooncake; our mitigation).
    bidirectional_warmup: bool = False
    #: p2p-lane-reset: complete pending P2P futures with an error when the poller resets a lane.
    p2p_reset_fails_pending: bool = True
    #: task-slot-exhaustion: serialise chunk submission per device when slots are busy.
    serialize_task_slots: bool = True
    #: CPU backend on a GPU host labels its data buffers "*" (#1863) instead of "cuda:N".
    cpu_backend_wildcard_label: bool = True
    #: store-key-mismatch / unreachable-segment: bound waits (init timeout) instead of waiting forever.
    bounded_connect_wait: bool = True
    #: unreachable-segment: validate openSegment's id and bound retries.
    validate_segment_id: bool = True
    #: group-size-limit: largest group accepted at construction (Mooncake: 64).
    max_group_size: int = 64

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


SWITCHES: tuple[str, ...] = tuple(f.name for f in fields(Policy))

_LEGACY_1755 = dict(
    preload_reduce_kernels=False,
    host_region_wildcard_label=False,
    check_rpc_bind=False,
    reset_task_ids=False,
    zero_sync_flags=False,
)

#: Named presets. ``legacy-1755`` is the parent of Mooncake PR #1755 on the switches that PR changed;
#: ``snapshot-1755`` is the PR's merge commit itself (what later PRs still fixed is legacy there);
#: ``legacy`` is everything old at once.
PRESETS: dict[str, Policy] = {
    "fixed": Policy(),
    "legacy-1755": replace(Policy(), **_LEGACY_1755),
    "snapshot-1755": replace(
        Policy(),
        nonblocking_spin_stream=False,
        liveness_probe=False,
        use_boot_id=False,
        cpu_backend_wildcard_label=False,
        bounded_connect_wait=False,
        validate_segment_id=False,
        validate_reduce_before_enqueue=False,
        p2p_reset_fails_pending=False,
        serialize_task_slots=False,
    ),
}
PRESETS["legacy"] = replace(PRESETS["snapshot-1755"], **_LEGACY_1755, rdma_connecting_state=False)


def make_policy(preset: str, overrides: dict[str, Any] | None = None) -> Policy:
    """Build a policy from a preset name and single-switch overrides.

    Raises ``KeyError`` (preset) or ``ValueError`` (switch or value); scenario loading turns these into
    :class:`~mooncake_protocol.errors.InputError` with the file and key.
    """
    base = PRESETS[preset]
    if not overrides:
        return base
    for key, value in overrides.items():
        if key not in SWITCHES:
            raise ValueError(f"unknown policy switch {key!r}")
        want = type(getattr(base, key))
        if want is bool and not isinstance(value, bool):
            raise ValueError(f"switch {key!r} takes true or false, got {value!r}")
        if want is int and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"switch {key!r} takes a positive integer, got {value!r}")
    return replace(base, **overrides)
