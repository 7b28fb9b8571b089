"""The house layout in the imports: the two sides never import each other, and ``shared`` stands alone.

DESIGN.md, "The house": ``shared/`` imports no other package of the project; ``client/`` (the
hospital) and ``server/`` (the operator) import ``shared/`` and never each other, since they meet
only through Flower messages; code that needs both sides lives in ``simulations/``; the top-level
``rectalfl`` package only composes the sides' commands. Every import statement counts, including
those inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("shared", "client", "server", "simulations", "rectalfl")

#: package -> the project packages it may import (besides itself)
ALLOWED: dict[str, set[str]] = {
    "shared": set(),
    "client": {"shared"},
    "server": {"shared"},
    "simulations": {"shared", "client", "server"},
    "rectalfl": {"shared", "client", "server", "simulations"},
}


def forbidden_imports(root: Path) -> list[str]:
    """``"path:line: <package> imports <other>"`` for every import that breaks :data:`ALLOWED`."""
    problems = []
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    targets = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    targets = [node.module]
                else:
                    continue  # relative imports stay inside their package
                for target in targets:
                    top = target.split(".")[0]
                    if top in PACKAGES and top != pkg and top not in ALLOWED[pkg]:
                        rel = path.relative_to(root).as_posix()
                        problems.append(f"{rel}:{node.lineno}: {pkg} imports {target}")
    return problems


def test_no_forbidden_import_in_the_project() -> None:
    problems = forbidden_imports(ROOT)
    assert not problems, "imports that break the house layout (DESIGN.md):\n" + "\n".join(problems)


@pytest.mark.parametrize(("pkg", "line", "bad"), [
    ("server", "from client.train import SliceSet", True),
    ("client", "    import server.store", True),  # inside a function still counts
    ("shared", "from simulations.synth import generate_cohort", True),
    ("client", "from shared.config import RectalFLConfig", False),
    ("simulations", "from client.cli import print_report", False),
    ("server", "from .store import RunStore", False),
])
def test_the_checker_names_file_and_line(tmp_path: Path, pkg: str, line: str, bad: bool) -> None:
    for p in PACKAGES:
        (tmp_path / p).mkdir()
    body = "def f():\n" + line + "\n" if line.startswith(" ") else "import os\n" + line + "\n"
    (tmp_path / pkg / "mod.py").write_text(body)
    problems = forbidden_imports(tmp_path)
    if bad:
        assert problems == [f"{pkg}/mod.py:2: {pkg} imports {line.split()[1]}"]
    else:
        assert problems == []


def test_every_package_says_who_runs_it() -> None:
    """Each package's opening docstring names its audience (hospital / operator / both / simulation)."""
    words = {"client": "hospital", "server": "operator", "shared": "both", "simulations": "simulation",
             "rectalfl": "command"}
    for pkg, word in words.items():
        doc = ast.get_docstring(ast.parse((ROOT / pkg / "__init__.py").read_text(encoding="utf-8"))) or ""
        assert word in doc.lower(), f"{pkg}/__init__.py docstring should say who runs it ({word!r})"
