"""The import graph runs one way: the domain (gateway.core) below the worker and the web
layer, the worker below nothing but the domain, embedded mode's fakeredis loaded only when
chosen. Checked on the source (every import, lazy ones included) and on a live import."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module_of(root: Path, path: Path) -> str:
    """The installed name of a source file (worker/ ships as gateway.worker)."""
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "worker":
        parts = ["gateway", *parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(root: Path, path: Path) -> set[str]:
    """Every module a file imports, anywhere in it, as an absolute name."""
    module = _module_of(root, path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{alias.name}" for alias in node.names)
    return found


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _violations(folder: str, forbidden: tuple[str, ...], root: Path = ROOT) -> list[str]:
    """The forbidden imports under `folder`, found in a fresh interpreter: ast.parse in a
    process that has run other tests can fail with CPython 3.11's "AST constructor
    recursion depth mismatch" (a SystemError that says nothing about the files)."""
    script = (
        "import json, sys; from pathlib import Path; from tests.test_layers import _scan; "
        "a = json.loads(sys.argv[1]); print(json.dumps(_scan(a[0], tuple(a[1]), Path(a[2]))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, json.dumps([folder, forbidden, str(root)])],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        timeout=60,
    ).stdout
    return json.loads(out)


def _scan(folder: str, forbidden: tuple[str, ...], root: Path) -> list[str]:
    return sorted(
        f"{path.relative_to(root).as_posix()} imports {name}"
        for path in (root / folder).rglob("*.py")
        for name in _imports(root, path)
        if _under(name, forbidden)
    )


ENTRY_POINTS = ("gateway.api", "gateway.proxy", "gateway.cli", "gateway.server", "gateway.library")


def test_the_domain_imports_neither_the_worker_nor_the_web_layer():
    assert _violations("gateway/core", ("gateway.worker", "worker", *ENTRY_POINTS)) == []


def test_the_worker_imports_the_domain_only():
    assert _violations("worker", (*ENTRY_POINTS, "worker")) == []


@pytest.mark.parametrize("folder", ["gateway/payments", "gateway/plans", "gateway/migrate"])
def test_the_selling_services_import_neither_the_worker_nor_the_web_layer(folder):
    assert _violations(folder, ("gateway.worker", "worker", *ENTRY_POINTS)) == []


def test_nothing_imports_the_worker_by_a_generic_top_level_name():
    assert _violations("gateway", ("worker",)) == []
    assert _violations("tests", ("worker",)) == []
    assert _violations("loadtest", ("worker",)) == []


def test_the_check_sees_a_cycle(tmp_path):
    """The source check itself: an upward import, lazy inside a function, is caught."""
    (tmp_path / "gateway" / "core").mkdir(parents=True)
    (tmp_path / "gateway" / "core" / "probe.py").write_text(
        "def f():\n    from ..worker.service import build_worker\n"
    )
    assert _violations("gateway/core", ("gateway.worker",), tmp_path) == [
        "gateway/core/probe.py imports gateway.worker.service",
        "gateway/core/probe.py imports gateway.worker.service.build_worker",
    ]


def _loaded_after(imports: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"import sys\n{imports}\nprint('\\n'.join(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        timeout=60,
    ).stdout
    return set(out.split())


@pytest.mark.parametrize(
    "module", ["gateway.core.engine", "gateway.api.app", "gateway.cli", "gateway.server"]
)
def test_importing_the_gateway_loads_neither_fakeredis_nor_the_worker(module):
    loaded = _loaded_after(f"import {module}")
    assert module in loaded
    assert not {m for m in loaded if _under(m, ("fakeredis", "worker", "gateway.worker"))}


def test_importing_the_worker_loads_no_web_code():
    loaded = _loaded_after("import gateway.worker.service")
    assert "gateway.worker.runner" in loaded
    assert not {m for m in loaded if _under(m, ("gateway.api", "gateway.proxy", "fastapi", "fakeredis"))}


def test_every_package_of_the_source_is_in_the_wheel():
    """pyproject lists the packages by hand (two of them live outside gateway/): a folder
    missing from the list installs in editable mode and is absent from a real install."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    config = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    folders = {v: k for k, v in config["package-dir"].items()}
    found = set()
    for init in root.glob("*/**/__init__.py"):
        rel = init.parent.relative_to(root)
        top = rel.parts[0]
        if top not in folders:
            continue
        found.add(".".join([folders[top], *rel.parts[1:]]))
    assert found - listed == set(), "packages missing from pyproject's [tool.setuptools] packages"
