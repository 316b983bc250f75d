"""The untrusted runtime never imports the trusted one: GPU-side code cannot reach masks or keys."""

import ast
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add(("." * node.level) + (node.module or ""))
    return names


def test_runtime_sources_do_not_import_enclave_runtime():
    files = sorted((ROOT / "runtime").glob("*.py"))
    assert files
    for path in files:
        for name in imported_modules(path):
            assert "enclave_runtime" not in name, f"{path.name} imports {name}"
            assert not name.startswith("secure_split.") or name.startswith("secure_split.runtime"), (path, name)


def test_loading_the_runtime_loads_no_trusted_code():
    code = (
        "import sys, pkgutil, importlib, secure_split.runtime as r\n"
        "[importlib.import_module('secure_split.runtime.' + m.name) for m in pkgutil.iter_modules(r.__path__)]\n"
        "print(sorted(m for m in sys.modules if m.startswith('secure_split')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = eval(out)
    assert "secure_split.runtime.channel" in loaded and "secure_split.runtime.stage_backend" in loaded
    assert not [m for m in loaded if "enclave_runtime" in m]


# -- the package-level dependency graph ------------------------------------------------------------------

PACKAGE_DIRS = {"face": "secure_split", "passes": "passes", "partitioner": "partitioner", "runtime": "runtime",
                "enclave_runtime": "enclave_runtime"}  # fmt: skip


def resolved_imports(path: Path, package: str) -> set[str]:
    """The absolute names of the modules a file imports; relative imports resolved against its `package`."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, node.module] if node.module else base)
            names.add(module)
            names.update(f"{module}.{a.name}" for a in node.names if not node.module)  # from . import x
    return names


def package_of(module: str) -> str | None:
    """Which of our packages a module belongs to ("face" for secure_split/*.py), None for anything else."""
    parts = module.split(".")
    if parts[0] != "secure_split":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in PACKAGE_DIRS else "face"


def package_imports() -> dict[str, dict[str, set[str]]]:
    """package -> imported package -> the files that import it."""
    graph: dict[str, dict[str, set[str]]] = {p: {} for p in PACKAGE_DIRS}
    for package, folder in PACKAGE_DIRS.items():
        dotted = "secure_split" if package == "face" else f"secure_split.{package}"
        files = sorted((ROOT / folder).glob("*.py"))
        assert files, folder
        for path in files:
            for target in {package_of(m) for m in resolved_imports(path, dotted)} - {None, package}:
                graph[package].setdefault(target, set()).add(f"{folder}/{path.name}")
    return graph


def test_passes_and_partitioner_import_no_runtime():
    """The compiler's passes and partitioner run on neither side: they import neither runtime."""
    graph = package_imports()
    for package in ("passes", "partitioner"):
        for runtime in ("runtime", "enclave_runtime"):
            assert runtime not in graph[package], f"{sorted(graph[package][runtime])} import {runtime}"


def test_the_untrusted_runtime_imports_none_of_our_other_packages():
    assert package_imports()["runtime"] == {}


def test_packages_import_each_other_without_cycles():
    """face -> partitioner -> passes; face -> enclave_runtime -> {passes, runtime}; runtime -> nothing of ours."""
    graph = package_imports()
    edges = nx.DiGraph([(a, b) for a in graph for b in graph[a]])
    cycles = [{f"{a} -> {b}": sorted(graph[a][b]) for a, b in pairwise([*c, c[0]])} for c in nx.simple_cycles(edges)]
    assert not cycles, f"import cycles between packages: {cycles}"
