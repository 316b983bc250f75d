"""The Python examples of README.md and of every docs/*.md page run as written.

A ```python block runs when it imports something; a fragment without an import (a one-line sketch) is prose.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]


def examples(page: Path) -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    return [b for b in blocks if "import" in b]


EXAMPLES = [(page.relative_to(ROOT).as_posix(), i, code) for page in PAGES for i, code in enumerate(examples(page))]


def test_readme_and_docs_have_examples():
    assert len(examples(README)) >= 2
    assert len(PAGES) > 1 and len(EXAMPLES) >= 3


def test_readme_links_point_to_files():
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README.read_text()):
        if "://" not in target:
            assert (ROOT / target).exists(), target


@pytest.mark.parametrize(("page", "index", "code"), EXAMPLES, ids=[f"{p}-{i}" for p, i, _ in EXAMPLES])
def test_example_runs(page, index, code):
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{page}, example {index}:\n{proc.stderr[-3000:]}"
