"""The package's shape, guarded: no import cycles, and pipeline stages never import interpretability modules
(training, data and evaluation must run, and be read, without the instruments that study them)."""

import ast
from pathlib import Path

import mechsub

PKG = Path(mechsub.__file__).parent
# the pipeline: what makes teachers, data, students and their evaluation
PIPELINE = {"data", "generate", "teacher", "teachers", "student", "train", "training", "evaluate", "divergence",
            "filter", "numbers", "mnist"}  # fmt: skip
# the instruments that study what the pipeline made
INTERPRETABILITY = {"capture", "steering", "patching", "sae", "entangle", "views", "analyze", "diff",
                    "dashboards"}  # fmt: skip


def internal_imports() -> dict[str, set[str]]:
    """module → the mechsub modules it imports anywhere (top level or inside functions)."""
    mods = {p.stem for p in PKG.glob("*.py") if p.stem != "__init__"}
    graph: dict[str, set[str]] = {}
    for m in mods:
        deps: set[str] = set()
        for node in ast.walk(ast.parse((PKG / f"{m}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                if node.module == "mechsub":
                    deps |= {a.name for a in node.names if a.name in mods}
                elif node.module.startswith("mechsub."):
                    deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("mechsub.")}
        graph[m] = deps - {m}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], dict.fromkeys(graph, 0), []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                found.append([*stack[stack.index(d) :], d])
            elif state.get(d) == 0:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if state[m] == 0:
            visit(m)
    return found


def test_no_import_cycles():
    assert cycles(internal_imports()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]


def test_pipeline_stages_do_not_import_interpretability():
    bad = {m: sorted(d & INTERPRETABILITY) for m, d in internal_imports().items() if m in PIPELINE}
    assert {m: d for m, d in bad.items() if d} == {}


def test_library_never_imports_analyses_or_tests():
    for p in PKG.glob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
            assert not any(n.split(".")[0] in ("analyses", "tests") for n in names), p.name
