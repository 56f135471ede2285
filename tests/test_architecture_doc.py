"""docs/architecture.md stays true: every module it names exists, every module of the package is in
its layout, and every name it places in a module is defined there (pure: reads source only)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "architecture.md").read_text()
PATH = r"`(vllm_magic/[\w/]+\.py)`"


def _named_paths() -> set[str]:
    return set(re.findall(PATH, DOC))


def _definitions(path: str) -> set[str]:
    """Top-level classes and functions of a module, and ``Class.member`` for their members."""
    tree = ast.parse((ROOT / path).read_text())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            for member in node.body:
                if isinstance(member, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    names.add(f"{node.name}.{member.name}")
                elif isinstance(member, ast.AnnAssign) and isinstance(member.target, ast.Name):
                    names.add(f"{node.name}.{member.target.id}")
    return names


def test_every_module_the_architecture_doc_names_exists():
    missing = sorted(p for p in _named_paths() if not (ROOT / p).is_file())
    assert not missing, f"docs/architecture.md names modules that do not exist: {missing}"


def test_every_module_of_the_package_is_in_the_doc_layout():
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "vllm_magic").rglob("*.py")
               if p.name not in ("__init__.py", "__main__.py")}
    absent = sorted(modules - _named_paths())
    assert not absent, f"modules missing from docs/architecture.md's layout: {absent}"


def test_every_name_the_cell_flow_places_in_a_module_is_defined_there():
    flow = DOC[DOC.index("## The flow of one"):]
    placed = re.findall(r"`([A-Za-z_][\w.]*)` (?:\(|in )" + PATH, flow)
    assert len(placed) >= 8, "the flow should place its steps in modules"
    wrong = [(name, path) for name, path in placed if name not in _definitions(path)]
    assert not wrong, f"the flow of a cell names what its modules do not define: {wrong}"
