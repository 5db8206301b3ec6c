"""The package's shape: no import circle between its modules (imports inside functions count too), no module
too long to read in one sitting, a recipes/ folder whose rooms say what they hold, and every ``peftlab`` name
that README.md shows still importable."""

from __future__ import annotations

import ast
import importlib
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "peftlab"
MAX_LINES = 450


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.AST, lazy: bool) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements of a module: at module level only, or (``lazy``) also inside functions and classes;
    never those under ``if TYPE_CHECKING:`` (they do not run)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif lazy or isinstance(node, (ast.If, ast.Try, ast.With)):
            yield from _imports(node, lazy)


def import_edges(lazy: bool = True) -> dict[str, set[str]]:
    """module → the peftlab modules it imports: when it is imported, and (``lazy``) inside its functions when they
    run. ``from peftlab.pkg import name`` resolves to ``peftlab.pkg.name`` when that is a module."""
    modules = {module_name(p): p for p in SRC.rglob("*.py")}
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _imports(ast.parse(path.read_text()), lazy):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                if target in modules and target != name and not name.startswith(target + "."):
                    edges[name].add(target)  # a submodule importing its own package's __init__ is not a circle
    return edges


def find_circle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle (its modules, the first repeated at the end), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_circle_between_modules():
    """Imports inside functions count: a lazy import that closes a loop is a circle hidden, not a circle gone."""
    edges = import_edges()
    circle = find_circle(edges)
    assert circle is None, "import circle: " + " -> ".join(circle)
    assert "peftlab.model" not in edges["peftlab.peft_format"]  # converters import no model class
    assert len(edges) > 30


@pytest.mark.parametrize(("source", "target"), [
    ("peftlab.peft_format", "peftlab.model"),  # model → saving → peft_format
    ("peftlab.config", "peftlab.methods"),  # every method imports config
    ("peftlab.diffusion.conditioning", "peftlab.diffusion.pipeline"),  # pipeline attaches the condition encoder
])
def test_the_detector_sees_a_circle_closed_by_a_lazy_import(tmp_path, source, target):
    """A module that imports, inside a function, one that imports it back is a circle (the three the layout once
    had: config ↔ methods, conditioning ↔ pipeline, interop → saving → model → saving)."""
    edges = import_edges()
    assert find_circle(edges) is None
    edges[source].add(target)
    assert find_circle(edges) is not None
    lazy = tmp_path / "lazy.py"
    lazy.write_text(f"def f():\n    import {target}\n")
    assert [n.names[0].name for n in _imports(ast.parse(lazy.read_text()), lazy=True)] == [target]
    assert list(_imports(ast.parse(lazy.read_text()), lazy=False)) == []


def test_recipes_top_level_holds_at_most_twelve_modules():
    """recipes/ shows what it holds: the shared machinery at its top, task recipes in sub-packages named for what
    they hold (text/, image/); commands that are not recipes live in peftlab/commands/."""
    top = sorted(p.name for p in (SRC / "recipes").glob("*.py"))
    assert len(top) <= 12, f"recipes/ has {len(top)} modules at its top level: {top}"
    packages = sorted(p.name for p in (SRC / "recipes").iterdir() if (p / "__init__.py").is_file())
    assert packages == ["image", "text"]
    commands = {p.stem for p in (SRC / "commands").glob("*.py")}
    assert {"compare", "analyze", "serve", "saved", "generate"} <= commands
    assert not (commands - {"__init__"}) & {p.removesuffix(".py") for p in top}


def test_library_modules_never_import_the_commands():
    """peftlab.commands (compare, serve, generate, ...) sit on top of the library: no recipe or library module
    imports one of them, also inside a function (the image recipes once took their prompt check and sample grid
    from commands.generate)."""
    edges = import_edges()
    upward = sorted(f"{source} -> {target}" for source, targets in edges.items() for target in targets
                    if target.startswith("peftlab.commands") and not source.startswith("peftlab.commands")
                    and source != "peftlab.cli")
    assert upward == []


def readme_names() -> list[str]:
    """Every ``peftlab`` name README.md shows in code (fenced blocks and inline code): ``from peftlab.x import a,
    b`` gives ``peftlab.x.a`` and ``peftlab.x.b``; a dotted ``peftlab.x.y`` is taken as it stands."""
    text = (SRC.parents[1] / "README.md").read_text()
    code = "\n".join(re.findall(r"```[^\n]*\n(.*?)```", text, re.S) + re.findall(r"`([^`\n]+)`", text))
    names = set()
    for module, imported in re.findall(r"from (peftlab[\w.]*) import ([\w, ]+)", code):
        names |= {f"{module}.{name.strip()}" for name in imported.split(",") if name.strip()}
    names |= set(re.findall(r"(?<![\w/.-])peftlab(?:\.[A-Za-z_]\w*)+", code))
    return sorted(names)


def test_readme_names_the_package_in_its_code():
    names = readme_names()
    assert {"peftlab.HRAConfig", "peftlab.interop.load_peft_adapter", "peftlab.cli"} <= set(names)


@pytest.mark.parametrize("name", readme_names())
def test_every_peftlab_name_in_readme_imports(name):
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):  # the longest prefix that is a module, then attributes
        try:
            found = importlib.import_module(".".join(parts[:cut]))
            break
        except ModuleNotFoundError:
            continue
    for attribute in parts[cut:]:
        assert hasattr(found, attribute), f"README names {name}, but {'.'.join(parts[:cut])} has no {attribute}"
        found = getattr(found, attribute)


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_no_module_is_too_long(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(SRC)} has {lines} lines; split it by concern (at most {MAX_LINES})"


@pytest.mark.parametrize("module", ["peftlab.cli", "peftlab"])
def test_the_command_line_runs_as_a_module(module):
    """README runs ``-m peftlab.cli train`` under torchrun / accelerate; ``-m peftlab`` is the same command."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", module, "train", "--help"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--method" in done.stdout and "usage: peftlab train" in done.stdout
