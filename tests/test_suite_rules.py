"""The suite's own rules, where they can be checked mechanically (the AST of tests/*.py; nothing runs).

- No ``time.sleep`` and no ``threading.Timer``: a test waits for an event, a request's progress or an
  output, never for a guessed time (``polling.until`` polls outside states that send no event, such
  as a server's /metrics, and fails at its deadline).
- Every test can fail: it has an ``assert``, a ``pytest.raises``/``pytest.warns``/``pytest.fail``, or
  calls a helper of tests/ whose body (or a helper it calls) does; a test that overrides a base
  suite's test calls it through ``super()``.
- No silent pass: no ``return`` that ends a test early, no ``pytest.skip``/``skipif``/``importorskip``
  (the ``gpu`` marker is the one skip, decided in conftest).
- Every ``xfail`` names the failure it expects (``raises=``) and is strict.
- Every blocking wait says how long: ``result``, ``join`` and ``wait`` with a timeout (or another
  argument), ``wait_for_delta`` with a timeout.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
FILES = sorted(TESTS.glob("*.py"))


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _where(path: Path, node: ast.AST) -> str:
    return f"{path.name}:{node.lineno}"


def _dotted(node: ast.AST) -> str:
    """``a.b.c`` for an attribute chain or a name, "" for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def _own_nodes(function: ast.AST):
    """The nodes of a function's body, without those of functions and classes defined inside it."""
    stack = list(ast.iter_child_nodes(function))
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            stack.extend(ast.iter_child_nodes(node))


def _tests() -> list[tuple[Path, ast.FunctionDef | ast.AsyncFunctionDef]]:
    found = []
    for path in FILES:
        if not path.name.startswith("test_"):
            continue
        tree = _tree(path)
        scopes = [tree] + [node for node in tree.body if isinstance(node, ast.ClassDef)]
        for scope in scopes:
            for node in scope.body:
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test"):
                    found.append((path, node))
    return found


_CHECKS = {"pytest.raises", "pytest.warns", "pytest.fail", "pytest.approx"}


def _checks_itself(function: ast.AST) -> bool:
    for node in ast.walk(function):  # nested functions count: a check in a callback still fails the test
        if isinstance(node, ast.Assert):
            return True
        if isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if _dotted(exc) == "AssertionError":
                return True
        if isinstance(node, ast.Call) and _dotted(node.func) in _CHECKS:
            return True
    return False


def _called_names(function: ast.AST) -> set[str]:
    """Names a function calls: ``f(...)`` and ``obj.f(...)`` alike (helpers are module functions
    or methods of the tests' helper classes)."""
    names = set()
    for node in ast.walk(function):
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Name):
                names.add(node.func.id)
            elif isinstance(node.func, ast.Attribute):
                names.add(node.func.attr)
    return names


def _asserting_helpers() -> set[str]:
    """Names of functions and methods defined in tests/*.py (not tests themselves) that assert,
    directly or through another such helper."""
    bodies: dict[str, list[ast.AST]] = {}
    for path in FILES:
        for node in ast.walk(_tree(path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("test"):
                bodies.setdefault(node.name, []).append(node)
    asserting = {name for name, defs in bodies.items() if any(_checks_itself(d) for d in defs)}
    changed = True
    while changed:  # helpers that call asserting helpers
        changed = False
        for name, defs in bodies.items():
            if name not in asserting and any(_called_names(d) & asserting for d in defs):
                asserting.add(name)
                changed = True
    return asserting


def _calls_super_test(function: ast.AST) -> bool:
    for node in ast.walk(function):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr.startswith("test")
                and isinstance(node.func.value, ast.Call) and _dotted(node.func.value.func) == "super"):
            return True
    return False


def test_the_rules_see_the_whole_suite():
    tests = _tests()
    assert len(tests) > 250, f"only {len(tests)} tests found: the walk over tests/*.py misses some"
    assert "assert_still_answers" in _asserting_helpers()  # a helper found through its own asserts


def test_no_sleep_and_no_timer():
    found = []
    for path in FILES:
        if path.name == "polling.py":
            continue  # polling.until: the one poll, for outside states that send no event
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.ImportFrom) and node.module == "time" and any(
                    a.name == "sleep" for a in node.names):
                found.append(f"{_where(path, node)}: from time import sleep")
            if isinstance(node, ast.ImportFrom) and node.module == "threading" and any(
                    a.name == "Timer" for a in node.names):
                found.append(f"{_where(path, node)}: from threading import Timer")
            if isinstance(node, ast.Attribute) and _dotted(node) in ("time.sleep", "threading.Timer"):
                found.append(f"{_where(path, node)}: {_dotted(node)}")
            if (isinstance(node, ast.Call) and _dotted(node.func) == "asyncio.sleep"
                    and not (node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value == 0)):
                found.append(f"{_where(path, node)}: {ast.unparse(node)}")  # sleep(0) only yields to the loop
    assert not found, "waits for a guessed time instead of an event:\n" + "\n".join(found)


def test_every_test_can_fail():
    helpers = _asserting_helpers()
    vacuous = [_where(path, test) + f" {test.name}" for path, test in _tests()
               if not (_checks_itself(test) or _called_names(test) & helpers or _calls_super_test(test))]
    assert not vacuous, "tests with no assert, pytest.raises or asserting helper:\n" + "\n".join(vacuous)


def test_no_test_ends_early_or_skips_itself():
    found = []
    for path, test in _tests():
        for node in _own_nodes(test):
            if isinstance(node, ast.Return):
                found.append(f"{_where(path, node)}: return in {test.name}")
    for path in FILES:
        if path.name in ("conftest.py", "test_suite_rules.py"):
            continue  # conftest decides the gpu skips; this file names what it forbids
        for node in ast.walk(_tree(path)):
            name = _dotted(node.func) if isinstance(node, ast.Call) else _dotted(node)
            if name in ("pytest.skip", "pytest.importorskip", "pytest.mark.skip", "pytest.mark.skipif",
                        "pytest.xfail"):
                found.append(f"{_where(path, node)}: {name}")
    assert not found, "a test that can pass without checking anything:\n" + "\n".join(sorted(set(found)))


def _xfail_marks():
    marks = []
    for path in FILES:
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Call) and _dotted(node.func) == "pytest.mark.xfail":
                marks.append((path, node))
            elif isinstance(node, ast.Attribute) and _dotted(node) == "pytest.mark.xfail":
                marks.append((path, node))  # bare @pytest.mark.xfail, or the func of a call above
    return marks


def test_every_xfail_names_the_failure_and_is_strict():
    bad = []
    marks = _xfail_marks()
    calls = {id(node.func) for _, node in marks if isinstance(node, ast.Call)}
    for path, node in marks:
        if isinstance(node, ast.Attribute):
            if id(node) not in calls:
                bad.append(f"{_where(path, node)}: bare xfail")
            continue
        keywords = {k.arg: k.value for k in node.keywords}
        if "raises" not in keywords:
            bad.append(f"{_where(path, node)}: xfail without raises=")
        strict = keywords.get("strict")
        if not (isinstance(strict, ast.Constant) and strict.value is True):
            bad.append(f"{_where(path, node)}: xfail not strict=True")
    assert not bad, "\n".join(bad)


# Blocking waits and the argument that bounds them: (positional arguments that include the
# timeout, or None when only timeout= does).
_WAITS = {"result": 1, "join": 1, "wait": 1, "wait_for_delta": 2}


def test_every_blocking_wait_has_a_timeout():
    unbounded = []
    for path in FILES:
        for node in ast.walk(_tree(path)):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            needed = _WAITS.get(node.func.attr)
            if needed is None or _dotted(node.func.value) in ("os.path", "asyncio"):
                continue
            if len(node.args) >= needed or any(k.arg == "timeout" for k in node.keywords):
                continue
            unbounded.append(f"{_where(path, node)}: {ast.unparse(node)}")
    assert not unbounded, "waits without a timeout:\n" + "\n".join(unbounded)


@pytest.mark.parametrize("source, rule", [
    ("import time\ndef test_x():\n    time.sleep(1)\n    assert True\n", "sleep"),
    ("import asyncio\nasync def test_x():\n    await asyncio.sleep(0.1)\n    assert True\n", "sleep"),
    ("import threading\ndef test_x():\n    threading.Timer(1, print).start()\n    assert True\n", "sleep"),
    ("import pytest\ndef test_x():\n    pytest.skip('no')\n", "return"),
    ("def test_x():\n    x = 1\n", "no check"),
    ("def test_x():\n    if 1:\n        return\n    assert True\n", "return"),
    ("import pytest\n@pytest.mark.xfail(reason='r', strict=True)\ndef test_x():\n    assert False\n", "xfail"),
    ("import pytest\n@pytest.mark.xfail(reason='r', raises=KeyError)\ndef test_x():\n    assert False\n", "xfail"),
    ("import pytest\n@pytest.mark.xfail\ndef test_x():\n    assert False\n", "xfail"),
    ("def test_x(h):\n    assert h.result()\n", "wait"),
    ("def test_x(h):\n    assert h.wait_for_delta(0)\n", "wait"),
    ("def test_x(t):\n    t.join()\n    assert True\n", "wait"),
])
def test_each_rule_catches_a_broken_example(tmp_path, monkeypatch, source, rule):
    """The rules above fail on a file that breaks them (so they are not vacuous themselves)."""
    bad = tmp_path / "test_bad.py"
    bad.write_text(source)
    monkeypatch.setitem(globals(), "FILES", [bad])
    check = {"sleep": test_no_sleep_and_no_timer, "no check": test_every_test_can_fail,
             "return": test_no_test_ends_early_or_skips_itself,
             "xfail": test_every_xfail_names_the_failure_and_is_strict,
             "wait": test_every_blocking_wait_has_a_timeout}[rule]
    with pytest.raises(AssertionError):
        check()
