"""The architecture as the code states it: imports between msconv's modules form no loop, and in the engine and
the command line every import made inside a function says why it waits.

The graph is read from the source with ``ast`` (nothing is imported): an edge A -> B for each ``import``/``from
... import`` that runs when A loads (module body, class bodies, module-level ``if``/``try``; not ``if
TYPE_CHECKING:``), relative imports resolved; ``from pkg import name`` points at ``pkg.name`` when that is a module,
else at ``pkg``. A module's implicit import of its parent package is not an edge (Python loads the parent first
whatever the code says).
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set, Tuple

import pytest

SRC = Path(__file__).resolve().parents[1] / 'src'
PACKAGES = ('msconv', 'msconv_cli')
# where every import inside a function carries its reason (a comment on its line or on the lines right above)
REASONED = ('msconv.engine', 'msconv_cli')


def _module_files(src: Path = SRC) -> Dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((src / pkg).rglob('*.py')):
            parts = list(path.relative_to(src).with_suffix('').parts)
            if parts[-1] == '__init__':
                parts.pop()
            out['.'.join(parts)] = path
    return out


def _is_package(path: Path) -> bool:
    return path.name == '__init__.py'


def _absolute(module: str, path: Path, level: int, name: Optional[str]) -> str:
    """The absolute name of ``from <level dots><name> import ...`` written in ``module``."""
    if not level:
        return name or ''
    base = module.split('.')
    if not _is_package(path):
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return '.'.join(base + ([name] if name else []))


def _known(name: str, modules: Dict[str, Path]) -> Optional[str]:
    """``name`` or its nearest enclosing module of ours (``msconv.models.smt.Foo`` -> ``msconv.models.smt``)."""
    parts = name.split('.')
    while parts:
        if '.'.join(parts) in modules:
            return '.'.join(parts)
        parts.pop()
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == 'TYPE_CHECKING') or (
        isinstance(test, ast.Attribute) and test.attr == 'TYPE_CHECKING'
    )


def _imports(tree: ast.Module) -> Iterator[Tuple[ast.stmt, bool]]:
    """Every import statement with whether it runs at load time (True) or inside a function (False)."""

    def walk(nodes, at_load: bool):
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                yield node, at_load
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                yield from walk(ast.iter_child_nodes(node), False)
            elif isinstance(node, ast.If) and _is_type_checking(node.test):
                yield from walk(node.orelse, at_load)
            else:
                yield from walk(ast.iter_child_nodes(node), at_load)

    yield from walk(tree.body, True)


def _targets(node: ast.stmt, module: str, path: Path, modules: Dict[str, Path]) -> Set[str]:
    found = set()
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = _absolute(module, path, node.level, node.module)
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    for name in names:
        target = _known(name, modules)
        if target is not None and target != module:
            found.add(target)
    return found


def import_graph(src: Path = SRC) -> Tuple[Dict[str, Set[str]], List[Tuple[str, int, str]]]:
    """(module -> the modules of ours it imports at load time, [(module, line, target) of imports in functions])."""
    modules = _module_files(src)
    edges: Dict[str, Set[str]] = {m: set() for m in modules}
    deferred = []
    for module, path in modules.items():
        for node, at_load in _imports(ast.parse(path.read_text(), str(path))):
            targets = _targets(node, module, path, modules)
            if at_load:
                edges[module] |= targets
            else:
                deferred += [(module, node.lineno, t) for t in sorted(targets)]
    return edges, deferred


def import_loops(edges: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    loops = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                loops.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(loops)


def test_the_reader_sees_real_imports():
    """The graph reader resolves relative and package imports (so an empty loop list means something)."""
    edges, deferred = import_graph()
    assert 'msconv.models' in edges['msconv']  # from .models import ... in a package __init__
    assert 'msconv.engine.checkpoint' in edges['msconv.engine.trainer']  # from .checkpoint import (...)
    assert 'msconv.layers' in edges['msconv.models.smt'] or any(
        t.startswith('msconv.layers.') for t in edges['msconv.models.smt']
    )
    assert any(m.startswith('msconv_cli.commands.') and t.startswith('msconv.') for m, _, t in deferred)
    assert import_loops({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == [['a', 'b', 'c']]


def test_no_import_loop_in_the_package():
    loops = import_loops(import_graph()[0])
    assert loops == [], 'module-level import loops: ' + '; '.join(' <-> '.join(c) for c in loops)


def test_no_loop_hides_in_imports_inside_functions():
    """Counting the imports made inside functions too, there is still no loop: none of them dodges one."""
    edges, deferred = import_graph()
    for module, _, target in deferred:
        edges[module].add(target)
    loops = import_loops(edges)
    assert loops == [], 'import loops through function-level imports: ' + '; '.join(' <-> '.join(c) for c in loops)


def _has_reason(lines: List[str], lineno: int) -> bool:
    """A comment on the import's line, or on the line above it (skipping the imports grouped with it, blank lines
    included)."""
    i = lineno - 1
    if '#' in lines[i]:
        return True
    i -= 1
    while i >= 0 and (not lines[i].strip() or lines[i].strip().startswith(('import ', 'from '))):
        if '#' in lines[i]:
            return True
        i -= 1
    return i >= 0 and lines[i].strip().startswith('#')


@pytest.mark.parametrize('package', REASONED)
def test_imports_inside_functions_say_why(package):
    missing = []
    for module, path in _module_files().items():
        if not (module == package or module.startswith(package + '.')):
            continue
        lines = path.read_text().splitlines()
        for node, at_load in _imports(ast.parse('\n'.join(lines), str(path))):
            if not at_load and not _has_reason(lines, node.lineno):
                missing.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert missing == [], 'imports inside functions without a reason comment: ' + ', '.join(missing)
