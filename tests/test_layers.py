"""Imports flow one way: every module of hired_batch sits in a layer and imports only
from its own layer or lower ones, and no group of modules imports itself round a
cycle. The graph is read from the source with ``ast``, imports inside functions
included (a cycle hidden in a function is still a cycle)."""

import ast
import pathlib

import pytest

import hired_batch

PACKAGE = pathlib.Path(hired_batch.__file__).parent

# Lowest first; README "Layout" states the same order.
LAYERS = (
    ("base", {"config", "prompts", "hired", "dims", "token_plan"}),  # plain data and pure math: no model, no I/O
    ("engine", {"data", "vision", "loading", "memory", "model", "tiny", "vllm"}),  # one process runs the model
    ("job", {"tasks", "sources", "stages", "pipeline", "runner"}),  # a Ray Data job over a dataset
    ("tooling", {"metrics", "score", "score_cli", "visualize", "ideal", "presets",
                 "bench_workload", "bench_ideal", "bench_pipeline", "bench", "demo"}),  # reads/measures jobs
    ("entry", {"cli", "__main__", "__init__"}),  # the command line
)
LAYER_OF = {m: i for i, (_, mods) in enumerate(LAYERS) for m in mods}


def imported_modules(path: pathlib.Path) -> set[str]:
    """hired_batch modules a source file imports, at any depth of the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] != "hired_batch":
                continue
            if len(parts) > 1:
                found.add(parts[1])
            else:  # from hired_batch import x
                found |= {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("hired_batch.")}
        elif isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "SUBCOMMAND_MODULES" for t in node.targets):
            found |= {c.value for c in ast.walk(node.value) if isinstance(c, ast.Constant)}  # importlib'd by name
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules it imports; a subpackage (``vllm/``) is one node."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        node = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        graph.setdefault(node, set()).update(imported_modules(path))
    return {node: deps - {node} for node, deps in graph.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 finished
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_every_module_has_a_layer():
    graph = import_graph()
    assert set(graph) == set(LAYER_OF), "put a new module in LAYERS (and README's Layout)"
    assert all(dep in graph for deps in graph.values() for dep in deps)


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_imports_go_down_the_layers():
    upward = [f"{m} ({LAYERS[LAYER_OF[m]][0]}) imports {d} ({LAYERS[LAYER_OF[d]][0]})"
              for m, deps in import_graph().items() for d in sorted(deps) if LAYER_OF[d] > LAYER_OF[m]]
    assert upward == []


@pytest.mark.parametrize("graph, cyclic", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, True),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, False),
    ({"a": {"b", "c"}, "b": {"c"}, "c": set()}, False),
])
def test_the_cycle_check_finds_cycles(graph, cyclic):
    assert (find_cycle(graph) is not None) == cyclic


def test_a_function_level_import_counts(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from hired_batch.cli import main\n    from hired_batch import runner\n")
    assert imported_modules(src) == {"cli", "runner"}
