"""The README's Layout block is a claim about the code: every module is listed, one line each, and
"a module imports only modules listed above it (the import graph has no cycle, not even through an
import inside a function)". Both are checked here from the source (every import statement, at any
depth), so a new module or import that breaks the order fails with the pair that breaks it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "atas"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _layout() -> list[str]:
    """The modules of the README's Layout block, in its order."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"^## Layout\n.*?^```\n(.*?)^```", text, flags=re.M | re.S)
    assert block, "README.md has no Layout block"
    files = [line.split()[0] for line in block.group(1).splitlines() if line.startswith("atas/")]
    return [_module_name(ROOT / f) for f in files if f.endswith(".py")]


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The atas modules `path` imports anywhere in it (functions included): `import atas.x`,
    `from atas.x import y` (y itself when it is a module: `from atas import guard` imports
    atas.guard, not the package's __init__), relative ones."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            submodules = {f"{base}.{alias.name}" for alias in node.names} & known
            found |= submodules
            if len(submodules) < len(node.names):  # names defined in `base` itself: it is imported
                found.add(base)
    return {m for m in found if m in known and m != name}


def test_every_module_is_in_the_readme_layout_and_every_listed_one_exists():
    listed, modules = _layout(), _modules()
    assert len(listed) == len(set(listed)), "a module is listed twice"
    assert sorted(set(modules) - set(listed)) == [], "modules missing from README's Layout block"
    assert sorted(set(listed) - set(modules)) == [], "README's Layout block lists modules that do not exist"


def test_a_module_imports_only_modules_listed_above_it():
    listed, modules = _layout(), _modules()
    order = {name: i for i, name in enumerate(listed)}
    known = set(modules)
    broken = []
    for name, path in modules.items():
        if name not in order:
            continue  # unlisted: the test above names it
        for target in sorted(_imports(path, name, known)):
            if target in order and order[target] > order[name]:
                broken.append(f"{name} imports {target}, listed below it")
    assert broken == []


@pytest.mark.parametrize("kind", ["function", "class"])
def test_no_two_public_names_of_the_package_mean_different_things(kind):
    """One public function (or class) name, one meaning: no two modules define the same public
    top-level name, and no module is shadowed by a function or class of its package's __init__."""
    node_type = ast.FunctionDef if kind == "function" else ast.ClassDef
    where: dict[str, list[str]] = {}
    for name, path in _modules().items():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, node_type) and not node.name.startswith("_"):
                where.setdefault(node.name, []).append(name)
    assert {k: v for k, v in where.items() if len(v) > 1} == {}
    modules = set(_modules())
    import atas

    shadowed = [
        f"atas.{attr}"
        for attr in dir(atas)
        if f"atas.{attr}" in modules and not isinstance(getattr(atas, attr), type(atas))
    ]
    assert shadowed == [], "a module whose name the package's __init__ rebinds to something else"
