"""The package's layout keeps its promises: layers with no upward import and no circle,
modules under 500 lines, functions under 60, and a docstring at the top of each subpackage
saying what it holds and what it may import.

The layers, bottom to top (a module may import its own subpackage and any lower layer):

0. ``language`` (the task language) and ``boundary`` (the one way in and out)
1. ``drawing``
2. ``model``
3. ``training``
4. ``labelling`` and ``serve`` (applications; neither imports the other)
5. ``cli``, ``widgets``, ``testing`` and the package's ``__init__``; ``__main__`` above them

Imports inside functions count too: a lazy import is still a dependency.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "florence_helpers"
LAYERS = {
    "language": 0,
    "boundary": 0,
    "drawing": 1,
    "model": 2,
    "training": 3,
    "masks": 3,
    "labelling": 4,
    "serve": 4,
    "cli": 5,
    "widgets": 5,
    "testing": 5,
    "__main__": 6,  # python -m florence_helpers: runs the CLI
}
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60  # code lines: the docstring is not counted


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The package modules ``path`` imports, at the top or inside functions."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            if node.module:
                found.add(".".join([*base, node.module]))
            else:
                found |= {".".join([*base, alias.name]) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PACKAGE.name):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("florence_helpers")}
    return found - {name}


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}
GRAPH = {name: imports(path) for name, path in MODULES.items()}


def layer(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else None  # None: the package's __init__


def test_every_module_belongs_to_a_known_layer():
    unknown = sorted({layer(m) for m in MODULES if layer(m) is not None} - set(LAYERS))
    assert unknown == [], "add new subpackages to LAYERS, in the right place"


def test_no_module_imports_from_a_layer_above_its_own_or_a_sibling_application():
    upward = [
        f"{module} imports {target}"
        for module, targets in GRAPH.items()
        for target in targets
        if layer(module) is not None
        and layer(target) in LAYERS
        and layer(target) != layer(module)
        and LAYERS[layer(target)] >= LAYERS[layer(module)]
    ]
    assert upward == []


def test_the_imports_have_no_circle():
    circles, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(GRAPH.get(module, ())):
            if target not in GRAPH:
                continue
            if state.get(target) == "open":
                circles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in GRAPH:
        if module not in state:
            visit(module, [module])
    assert circles == []


def test_modules_stay_under_500_lines():
    long = {
        name: n
        for name, path in MODULES.items()
        if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}


def code_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    lines = node.end_lineno - node.lineno + 1
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant):
        lines -= first.end_lineno - first.lineno + 1
    return lines


def test_functions_stay_under_60_lines():
    long = [
        f"{name}.{node.name} ({code_lines(node)} lines)"
        for name, path in MODULES.items()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and code_lines(node) > MAX_FUNCTION_LINES
    ]
    assert long == []


@pytest.mark.parametrize("package", sorted(p for p in LAYERS if (PACKAGE / p).is_dir()))
def test_each_subpackage_says_what_it_holds_and_may_import(package):
    docstring = ast.get_docstring(ast.parse((PACKAGE / package / "__init__.py").read_text()))
    assert docstring, f"florence_helpers/{package}/__init__.py has no docstring"
    assert f"Layer {LAYERS[package]}" in docstring
    assert "import" in docstring.split(f"Layer {LAYERS[package]}", 1)[1]


def test_the_checks_catch_what_they_look_for(tmp_path):
    """The layer and circle checks fail on a graph that breaks them."""
    bad = {"florence_helpers.model.x": {"florence_helpers.serve.y"}}
    assert any(LAYERS[layer(t)] >= LAYERS[layer(m)] for m, ts in bad.items() for t in ts)
    source = "def f():\n    '''doc\n    more'''\n" + "    x = 1\n" * 61
    node = ast.parse(source).body[0]
    assert code_lines(node) == 62 > MAX_FUNCTION_LINES
