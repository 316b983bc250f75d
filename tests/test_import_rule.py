"""The untrusted runtime never imports the trusted one: GPU-side code cannot reach masks or keys."""

import ast
import subprocess
import sys
from pathlib import Path

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
    assert "secure_split.runtime.channel" in loaded and "secure_split.runtime.gpu_executor" in loaded
    assert not [m for m in loaded if "enclave_runtime" in m]
