"""Where a rank started by torchrun or SLURM learns who it is: :func:`launch_env`.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT. SLURM sets SLURM_PROCID,
SLURM_NTASKS, SLURM_LOCALID; the master then comes from MASTER_ADDR/MASTER_PORT if set, else from the first
host of SLURM_JOB_NODELIST (or SLURM_NODELIST) and the default port. torchrun's variables win when both are
present. Every problem is one line naming the variable and what to set.

Rank 0 serves the job's store on MASTER_ADDR at :attr:`LaunchEnv.store_port`: MOONCAKE_REAL_STORE_PORT if
set, else MASTER_PORT + 1 under torchrun (its agent serves its own TCPStore on MASTER_PORT; torchrun sets
TORCHELASTIC_RUN_ID in every worker), else MASTER_PORT.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_MASTER_PORT = 29500


class LaunchEnvError(ValueError):
    """A missing or invalid launcher variable (one line; the CLI exits 2)."""


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun" | "slurm"
    store_port: int = 0  # where rank 0 serves the job's store (module docstring)


def _int(environ: Mapping[str, str], name: str, minimum: int = 0) -> int:
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        raise LaunchEnvError(f"{name} is not set; launch with torchrun or srun, or set {name}")
    try:
        v = int(raw.strip())
    except ValueError:
        raise LaunchEnvError(f"{name}={raw!r} is not an integer") from None
    if v < minimum:
        raise LaunchEnvError(f"{name}={v} must be >= {minimum}")
    return v


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[03-05,07],cpu1" -> "gpu03"."""
    m = re.match(r"\s*([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not m or not m.group(1):
        raise LaunchEnvError(f"SLURM_JOB_NODELIST={nodelist!r} cannot be parsed; set MASTER_ADDR")
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def launch_env(environ: Mapping[str, str]) -> LaunchEnv:
    """Parse the launcher's variables. Raises :class:`LaunchEnvError` with one line."""
    if "RANK" in environ or "WORLD_SIZE" in environ:
        source = "torchrun"
        rank = _int(environ, "RANK")
        world = _int(environ, "WORLD_SIZE", 1)
        local = _int(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else rank
    elif "SLURM_PROCID" in environ:
        source = "slurm"
        rank = _int(environ, "SLURM_PROCID")
        world = _int(environ, "SLURM_NTASKS", 1)
        local = _int(environ, "SLURM_LOCALID") if "SLURM_LOCALID" in environ else 0
    else:
        raise LaunchEnvError("neither RANK/WORLD_SIZE (torchrun) nor SLURM_PROCID/SLURM_NTASKS (SLURM) is set; start "
                             "`mooncake-real rank` under torchrun or srun (see `mooncake-real rank --help`), or use "
                             "`mooncake-real run` for a job on this machine")
    if rank >= world:
        raise LaunchEnvError(f"rank {rank} is not below the world size {world}; check RANK/WORLD_SIZE")
    addr = environ.get("MASTER_ADDR", "").strip()
    if not addr:
        nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
        if source == "slurm" and nodelist:
            addr = first_slurm_host(nodelist)
        else:
            raise LaunchEnvError("MASTER_ADDR is not set; set it to the host that runs rank 0")
    if "MASTER_PORT" in environ:
        port = _int(environ, "MASTER_PORT", 1)
        if port > 65535:
            raise LaunchEnvError(f"MASTER_PORT={port} is not a TCP port (1-65535)")
    elif source == "slurm":
        port = DEFAULT_MASTER_PORT
    else:
        raise LaunchEnvError("MASTER_PORT is not set; set it to a free TCP port on MASTER_ADDR")
    if environ.get("MOONCAKE_REAL_STORE_PORT", "").strip():
        store_port = _int(environ, "MOONCAKE_REAL_STORE_PORT", 1)
        if store_port > 65535:
            raise LaunchEnvError(f"MOONCAKE_REAL_STORE_PORT={store_port} is not a TCP port (1-65535)")
    elif "TORCHELASTIC_RUN_ID" in environ:  # torchrun's agent holds MASTER_PORT with its own store
        store_port = port + 1
        if store_port > 65535:
            raise LaunchEnvError(f"MASTER_PORT={port} leaves no port above it for the job's store; set "
                                 "MOONCAKE_REAL_STORE_PORT to a free TCP port on MASTER_ADDR")
    else:
        store_port = port
    return LaunchEnv(rank, world, local, addr, port, source, store_port)
