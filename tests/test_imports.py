"""The package's import graph, read from the source with ``ast`` (pure: nothing is imported).

Every import counts, at module level or inside a function: a function-level import is a dependency
too, only a later one. Relative imports are resolved; ``from package import name`` is an import of
the module ``package.name`` where that is a module, else of the package.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "vllm_magic"

#: The layers, from the bottom up: a module may import modules of its own layer and of the layers
#: below it, never above. ``name.*`` is a package with every module in it; a plain name is exactly
#: that module (a package's ``__init__``).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("errors, paths", ("vllm_magic.errors", "vllm_magic.paths")),
    ("demo", ("vllm_magic.demo.*",)),
    # Hub downloads need neither vLLM nor an engine: a model is fetched before vLLM is imported.
    ("hub", ("vllm_magic.hub.*",)),
    # The engine log sits beside compat: compat's import_vllm sends what vLLM prints while it is
    # imported to the log file, and the log imports nothing of the engine.
    ("engine.compat", ("vllm_magic.engine.compat", "vllm_magic.engine.log")),
    ("engine", ("vllm_magic.engine.config", "vllm_magic.engine.platform", "vllm_magic.engine.listeners",
                "vllm_magic.engine.flags", "vllm_magic.engine.gpu_memory", "vllm_magic.engine.model_list")),
    ("engine.requests", ("vllm_magic.engine.requests.*",)),
    ("engine.backends", ("vllm_magic.engine.backends.*",)),
    ("engine.session", ("vllm_magic.engine.session", "vllm_magic.engine.status", "vllm_magic.engine.embeddings",
                        "vllm_magic.engine")),
    ("front-ends", ("vllm_magic.magics.*", "vllm_magic.widgets.*", "vllm_magic.langchain.*", "vllm_magic.__main__",
                    "vllm_magic")),
]
FRONT_ENDS = "front-ends"
BACKENDS = "engine.backends"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _imports(module: str, path: Path) -> set[str]:
    """The package's modules that ``module`` imports anywhere in its source."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            targets = [f"{source}.{alias.name}" if _is_module(f"{source}.{alias.name}") else source
                       for alias in node.names]
        else:
            continue
        for target in targets:
            if target == "vllm_magic" or target.startswith("vllm_magic."):
                while not _is_module(target):  # ``import vllm_magic.x.Name`` names a module's attribute
                    target = target.rpartition(".")[0]
                found.add(target)
    return found - {module}


def _graph() -> dict[str, set[str]]:
    return {module: _imports(module, path) for module, path in _modules().items()}


def _layer(module: str) -> int | None:
    best: tuple[int, int] | None = None  # (length of the matching entry, layer)
    for index, (_, entries) in enumerate(LAYERS):
        for entry in entries:
            if entry.endswith(".*"):
                prefix = entry[:-2]
                matches = module == prefix or module.startswith(prefix + ".")
            else:
                matches = module == entry
            if matches and (best is None or len(entry) > best[0]):
                best = (len(entry), index)
    return None if best is None else best[1]


def _layer_named(name: str) -> int:
    return [label for label, _ in LAYERS].index(name)


def test_the_graph_sees_imports_inside_functions_and_relative_ones():
    graph = _graph()
    # engine.config imports the demo package inside resolve_engine_config's helper only.
    assert "vllm_magic.demo.model" in graph["vllm_magic.engine.config"]
    assert "vllm_magic.paths" in graph["vllm_magic.demo.model"]  # ``from .. import paths``


def test_every_module_has_a_layer():
    missing = sorted(module for module in _modules() if _layer(module) is None)
    assert not missing, f"modules missing from the layer table: {missing}"


def test_no_module_imports_from_a_layer_above_its_own():
    upward = []
    for module, imports in _graph().items():
        own = _layer(module)
        for target in sorted(imports):
            theirs = _layer(target)
            if own is not None and theirs is not None and theirs > own:
                upward.append(f"{module} ({LAYERS[own][0]}) -> {target} ({LAYERS[theirs][0]})")
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_front_ends_reach_the_engine_through_the_session_never_a_backend():
    front, backends = _layer_named(FRONT_ENDS), _layer_named(BACKENDS)
    direct = [f"{module} -> {target}" for module, imports in _graph().items() if _layer(module) == front
              for target in sorted(imports) if _layer(target) == backends]
    assert not direct, "front-ends importing a backend:\n" + "\n".join(direct)


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the groups of modules that reach each other."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [group for group in groups if len(group) > 1]


def test_no_import_cycle_between_modules():
    graph = _graph()
    packages = {module for module, path in _modules().items() if path.name == "__init__.py"}
    # A package's __init__ re-exporting its own modules is how a package exports, not a cycle with
    # them: those edges are left out (the package's imports of anything outside it stay).
    without_reexports = {module: {t for t in imports if not (module in packages and t.startswith(module + "."))}
                         for module, imports in graph.items()}
    cycles = []
    for group in _strongly_connected(without_reexports):
        members = set(group)
        edges = [f"{a} -> {b}" for a in group for b in sorted(without_reexports[a] & members)]
        cycles.append(" | ".join(edges))
    assert not cycles, "import cycles (the imports inside each cycle):\n" + "\n".join(cycles)


def test_only_compat_imports_vllm():
    compat = PACKAGE / "engine" / "compat.py"
    direct = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == compat:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            for name in names:
                if name == "vllm" or name.startswith("vllm."):
                    direct.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} imports {name}")
    assert not direct, "vLLM imported outside engine/compat.py:\n" + "\n".join(direct)
