"""The package's shape: public imports, layers, and no import cycles (pure logic, no engine)."""

from __future__ import annotations

import ast
from pathlib import Path

import vllm_magic

PACKAGE = Path(vllm_magic.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports_at_import_time(path: Path) -> set[str]:
    """The package modules ``path`` imports when it is imported (not inside functions)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            names = [f"{target}.{alias.name}" for alias in node.names]
            candidates = [target, *names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found.update(c for c in candidates if c.startswith("vllm_magic") and _exists(c))
    return found - {module}


def _exists(module: str) -> bool:
    path = PACKAGE.parent.joinpath(*module.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports_at_import_time(p) for p in PACKAGE.rglob("*.py")}


def test_public_imports_stay_where_users_find_them():
    import ipywidgets
    from IPython.core.magic import Magics
    from langchain_core.language_models import BaseChatModel, BaseLLM

    from vllm_magic import get_session
    from vllm_magic.engine.session import EngineSession
    from langchain_core.embeddings import Embeddings
    from vllm_magic.langchain import VLLM, ChatVLLM, VLLMEmbeddings
    from vllm_magic.magics import VllmMagics
    from vllm_magic.widgets import Playground, SamplingPanel

    # Each name is the object it was, not a placeholder or a re-export of something else.
    assert isinstance(get_session(), EngineSession) and get_session() is get_session()
    assert issubclass(VLLM, BaseLLM) and issubclass(ChatVLLM, BaseChatModel)
    assert issubclass(VLLMEmbeddings, Embeddings)
    assert issubclass(VllmMagics, Magics) and "vllm_load" in VllmMagics.magics["line"]
    assert issubclass(Playground, ipywidgets.Widget) and issubclass(SamplingPanel, ipywidgets.Widget)


def test_no_module_imports_itself_back():
    graph = _graph()
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        for nxt in graph.get(node, ()):
            if nxt == path[0]:
                cycles.append(" -> ".join(path + [nxt]))
            elif nxt not in path and len(path) < 12:
                visit(nxt, path + [nxt])

    for module in graph:
        # A package's __init__ importing its own modules is how packages export; not a cycle.
        if not module.endswith("__init__"):
            visit(module, [module])
    real = [c for c in cycles if not _through_own_package_init(c)]
    assert not real, "\n".join(sorted(set(real)))


def _through_own_package_init(cycle: str) -> bool:
    steps = cycle.split(" -> ")
    return any(b.startswith(a + ".") for a, b in zip(steps, steps[1:]))


def test_the_engine_core_knows_no_front_end():
    for module, imports in _graph().items():
        if module.startswith("vllm_magic.engine"):
            front = [i for i in imports if i.startswith(("vllm_magic.magics", "vllm_magic.widgets", "vllm_magic.langchain"))]
            assert not front, f"{module} imports {front}"


def test_only_the_magics_speak_ipython_errors():
    for path in PACKAGE.rglob("*.py"):
        if "UsageError(" in path.read_text() or "import UsageError" in path.read_text():
            assert path.parent.name == "magics", f"{path.relative_to(PACKAGE)} uses IPython's UsageError"
