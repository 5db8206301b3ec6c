"""The package's shape: no import circle between its modules, and no module too long to read in one sitting."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "peftlab"
MAX_LINES = 450


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_time_edges() -> dict[str, set[str]]:
    """module → the peftlab modules it imports when it is imported (module level; not inside functions and
    not under ``if TYPE_CHECKING:``), resolving ``from peftlab.pkg import name`` to ``peftlab.pkg.name``
    when that is a module."""
    modules = {module_name(p): p for p in SRC.rglob("*.py")}
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                if target in modules and target != name and not name.startswith(target + "."):
                    edges[name].add(target)  # a submodule importing its own package's __init__ is not a circle
    return edges


def test_no_import_circle_between_modules():
    edges = import_time_edges()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert "peftlab.model" not in edges["peftlab.peft_format"]  # converters import no model class
    assert len(edges) > 30


def test_the_detector_sees_a_circle(tmp_path, monkeypatch):
    """The check above would fail on a real circle (the PEFT converters importing model, as they once did)."""
    edges = import_time_edges()
    edges["peftlab.peft_format"].add("peftlab.model")
    reach = {"peftlab.model"}
    frontier = ["peftlab.model"]
    while frontier:
        for nxt in edges[frontier.pop()]:
            if nxt not in reach:
                reach.add(nxt)
                frontier.append(nxt)
    assert "peftlab.peft_format" in reach  # model → saving → peft_format, so peft_format → model closes a circle


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_no_module_is_too_long(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(SRC)} has {lines} lines; split it by concern (at most {MAX_LINES})"
