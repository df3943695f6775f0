"""The package's imports point one way: down the layer order of docs/architecture.md.

Every ``import`` in every module is read from the source (also those inside functions and
under ``TYPE_CHECKING``), so a hidden upward import cannot slip through.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "memprune"

#: Bottom to top. A module may import its own component and the components below it.
#: ``_io``, ``_table``, ``_dist`` are the package's private foundation: every layer may use
#: their public names.
LAYERS = [
    "errors", "registry", "_dist", "_io", "_table", "results", "data", "attention",
    "checkpoints", "encoders", "sites", "hooks", "stats", "engine", "scores", "probe", "train",
    "pruning", "tuning", "report", "recipes", "cli",
]  # fmt: skip
RANK = {name: i for i, name in enumerate(LAYERS)}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path, module: str) -> list[tuple[str, str | None, int]]:
    """``(imported module, imported name or None, line)`` for every memprune import."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([base] if base else [])])
            out += [(base, a.name, node.lineno) for a in node.names]
    return [(m, n, line) for m, n, line in out if m == "memprune" or m.startswith("memprune.")]


def _component(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _violations() -> tuple[list[str], dict[str, set[str]]]:
    modules = _modules()
    problems, graph = [], {}
    for module, path in modules.items():
        if module == "memprune":  # the lazy root re-exports; it imports nothing at run time
            continue
        own = _component(module)
        assert own in RANK, f"{module} has no place in LAYERS: add it to docs/architecture.md"
        graph[module] = set()
        for target, name, line in _imports(path, module):
            where = f"{path.relative_to(PACKAGE.parent)}:{line}"
            # `from memprune.x import y` may import the module memprune.x.y
            full = f"{target}.{name}" if name and f"{target}.{name}" in modules else target
            other = _component(full)
            if full != "memprune" and other != own:
                if other not in RANK:
                    problems.append(f"{where}: imports {full}, which has no layer")
                elif RANK[other] > RANK[own]:
                    problems.append(f"{where}: {own} imports {full} from the layer above")
                private = [p for p in full.split(".")[2:] if p.startswith("_")]
                if private or (name or "").startswith("_"):
                    problems.append(f"{where}: {own} imports the private {full}.{name or ''}")
            if full in modules and full != module:
                graph[module].add(full)
    return problems, graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_imports_point_down_the_layers():
    problems, _ = _violations()
    assert not problems, "\n".join(problems)


def test_no_import_cycles():
    # a package imports its own modules from __init__: that edge is not a cycle of logic
    _, graph = _violations()
    for module in graph:
        graph[module] = {t for t in graph[module] if not module.startswith(t + ".")}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_every_component_is_in_the_architecture_doc():
    doc = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    missing = [name for name in LAYERS if f"`{name}" not in doc]
    assert not missing, f"docs/architecture.md does not describe {missing}"


@pytest.mark.parametrize(
    "source, expected",
    [
        ("from memprune.scores.unitmem import unit_mem", []),
        ("from memprune.tuning import finetune", ["from the layer above"]),
        ("from memprune.scores._helpers import x", ["private"]),
        ("from memprune.sites import _CONV", ["private"]),
    ],
)
def test_the_checker_catches_what_it_should(tmp_path, monkeypatch, source, expected):
    """The checker itself: a planted upward or private import is reported."""
    fake = tmp_path / "memprune"
    (fake / "probe").mkdir(parents=True)
    for name in ("__init__.py", "probe/__init__.py", "sites.py", "tuning.py"):
        (fake / name).write_text("")
    (fake / "scores").mkdir()
    (fake / "scores" / "__init__.py").write_text("")
    (fake / "scores" / "unitmem.py").write_text("")
    (fake / "probe" / "_api.py").write_text(source + "\n")
    monkeypatch.setattr(f"{__name__}.PACKAGE", fake)
    problems, _ = _violations()
    assert len(problems) == len(expected)
    assert all(e in p for e, p in zip(expected, problems))
