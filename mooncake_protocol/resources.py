"""Find topology and scenario files: a bare name means a bundled file, anything else a path.

``resolve("gb200-nvl72", "topologies")`` finds ``topologies/gb200-nvl72.yaml`` shipped with the package;
``resolve("my/rack.yaml", "topologies")`` is that path (relative to ``relative_to`` when given, else to the
current directory). Reading files a user named, and checking that a path a user named for output can be
written (:func:`check_output`, before a long run rather than after it), is the only I/O the protocol layer
does.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from .errors import InputError


def bundled_names(package: str) -> list[str]:
    """Names (without ``.yaml``) of the files bundled in ``package`` (``topologies`` or ``scenarios``)."""
    root = resources.files(package)
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def bundled_path(package: str, name: str) -> Path:
    return Path(str(resources.files(package).joinpath(f"{name}.yaml")))


def resolve(ref: str, package: str, relative_to: Path | None = None, *, file: str = "", key: str = "") -> Path:
    """Turn a bundled name or a path into an existing file path, or raise :class:`InputError`."""
    looks_like_path = "/" in ref or ref.endswith((".yaml", ".yml")) or ref.startswith(".")
    if not looks_like_path:
        p = bundled_path(package, ref)
        if p.is_file():
            return p
        names = ", ".join(bundled_names(package))
        kind = {"topologies": "topology", "scenarios": "scenario"}.get(package, package)
        raise InputError(file or ref, key, f"no bundled {kind} named {ref!r}; use one of: {names}, or give a path to a .yaml file")
    path = Path(ref)
    if not path.is_absolute() and relative_to is not None:
        candidate = relative_to / path
        if candidate.exists() or not path.exists():
            path = candidate
    if path.is_dir():
        raise InputError(file or ref, key, f"{ref!r} is a directory; name a .yaml file in it")
    if not path.is_file():
        raise InputError(file or ref, key, f"file {ref!r} not found; check the path (relative paths are taken from the file that names them)")
    return path


def check_output(path: str, option: str, *, directory: bool = False) -> None:
    """Raise :class:`InputError` (naming ``option``) when ``path`` cannot be written: a file (``directory``
    False; ``-`` is stdout) whose directory is missing or read-only, or that is a directory itself; or a
    directory (``directory`` True, made with its parents when missing) under a file or a read-only parent.
    Commands call it before they run, so a long run is not lost to a typo in an output path."""
    if not directory and path == "-":
        return
    p = Path(path)
    if directory:
        if p.exists() and not p.is_dir():
            raise InputError(option, "", f"cannot use {path}: it is a file, not a directory; pick another path")
        parent = p
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise InputError(option, "", f"cannot make {path}: {parent} is a file; pick another path")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise InputError(option, "", f"cannot write in {parent}: permission denied; pick another path")
        return
    if p.is_dir():
        raise InputError(option, "", f"cannot write {path}: it is a directory; name a file")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(option, "", f"cannot write {path}: directory {parent} does not exist; create it or pick "
                                     "another path")
    if not os.access(parent, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise InputError(option, "", f"cannot write {path}: permission denied; pick another path")
