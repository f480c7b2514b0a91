"""Imports point one way: fronts -> core -> models; clients never import the server."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(package: Path) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in package.rglob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        found[str(path.relative_to(ROOT))] = names
    return found


def offenders(package: str, forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for path, names in imported_modules(ROOT / package).items():
        for name in sorted(names):
            if name.split(".")[0] in forbidden or name.startswith(forbidden):
                bad.append(f"{path} imports {name}")
    return bad


def test_core_imports_neither_flask_nor_grpc() -> None:
    assert offenders("gateway/core", ("flask", "werkzeug", "grpc", "google", "clients")) == []


def test_models_import_no_front_and_no_core() -> None:
    forbidden = ("flask", "werkzeug", "grpc", "gateway.core", "gateway.rest", "gateway.rpc")
    assert offenders("gateway/models", forbidden) == []


def test_fronts_do_not_import_each_other() -> None:
    assert offenders("gateway/rest", ("grpc", "gateway.rpc", "clients")) == []
    assert offenders("gateway/rpc", ("flask", "werkzeug", "gateway.rest")) == []


def test_clients_never_import_the_server() -> None:
    assert offenders("clients", ("gateway",)) == []


@pytest.mark.parametrize("module", ["gateway.core.dataplane", "gateway.core.decode"])
def test_core_loads_without_frameworks(module: str) -> None:
    # The static check above misses dynamic imports; this one sees what really gets loaded.
    code = (
        f"import sys, {module}; "
        "bad = [m for m in ('flask', 'werkzeug', 'grpc') if m in sys.modules]; "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
