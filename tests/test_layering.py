"""Layering (architecture.md): the protocol imports no driver, SimPy, zmq or CuPy; the drivers not each other."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN_IN_PROTOCOL = ("simpy", "zmq", "cupy", "mooncake_sim", "mooncake_real")


def _modules(package: str) -> list[str]:
    path = ROOT / package
    return [f"{package}.{m.name}" for m in pkgutil.iter_modules([str(path)])]


def _imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_protocol_runtime_imports() -> None:
    mods = _modules("mooncake_protocol")
    assert "mooncake_protocol.engine" in mods
    code = (
        "import importlib, sys\n"
        f"for m in {mods!r}:\n"
        "    importlib.import_module(m)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN_IN_PROTOCOL!r})\n"
        "print(bad)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]", f"mooncake_protocol pulled in: {res.stdout.strip()}"


@pytest.mark.parametrize("path", sorted((ROOT / "mooncake_protocol").glob("*.py")), ids=lambda p: p.name)
def test_protocol_source_imports(path: Path) -> None:
    bad = _imports_of(path) & set(FORBIDDEN_IN_PROTOCOL)
    assert not bad, f"{path.name} imports {sorted(bad)}"


@pytest.mark.parametrize(("package", "other"), [("mooncake_sim", "mooncake_real"), ("mooncake_real", "mooncake_sim")])
def test_drivers_do_not_import_each_other(package: str, other: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    if not files:
        pytest.skip(f"{package} has no source yet")
    offenders = [str(f.relative_to(ROOT)) for f in files if other in _imports_of(f)]
    assert not offenders, f"{package} imports {other}: {offenders}"


def test_sim_runtime_does_not_load_real() -> None:
    code = (
        "import importlib, sys\n"
        f"for m in {_modules('mooncake_sim')!r}:\n"
        "    importlib.import_module(m)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'mooncake_real'))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
