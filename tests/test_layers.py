"""Imports flow one way: every module of hired_batch sits in a layer and imports only
from its own layer or lower ones, and no group of modules imports itself round a
cycle. The graph is read from the source with ``ast``, imports inside functions
included (a cycle hidden in a function is still a cycle)."""

import ast
import pathlib

import pytest

import hired_batch

PACKAGE = pathlib.Path(hired_batch.__file__).parent

# Lowest first, by folder; docs/architecture.md states the same order.
LAYERS = (
    ("base", ("config", "jsonio")),  # every config dataclass, ConfigError; strict JSON files: plain data
    ("engine", ("engine",)),  # one process runs the model; no Ray
    ("job", ("job",)),  # the Ray Data job over a dataset
    ("tooling", ("bench", "eval")),  # reads and measures jobs
    ("entry", ("cli", "demo", "doctor", "__main__", "__init__")),  # the command line
)
# The pure math: no model library, no Ray, no I/O.
PURE = ("config", "engine.anyres", "engine.selectors", "engine.token_plan", "engine.dims", "engine.prompts")


def node_of_path(path: pathlib.Path) -> str:
    """A source file's node: its dotted module path; a subpackage below a layer folder
    (``engine/vllm/``) is one node."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if len(parts) > 2:
        parts = parts[:2]
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


NODES = {node_of_path(p) for p in PACKAGE.rglob("*.py")}


def resolve(dotted: str) -> str | None:
    """The node a dotted name below hired_batch belongs to (longest known prefix)."""
    parts = dotted.split(".")
    while parts:
        if ".".join(parts) in NODES:
            return ".".join(parts)
        parts.pop()
    return None


def layer_of(node: str) -> int:
    top = node.split(".")[0]
    return next(i for i, (_, tops) in enumerate(LAYERS) if top in tops)


def imported_modules(path: pathlib.Path) -> set[str]:
    """hired_batch nodes a source file imports, at any depth of the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] != "hired_batch":
                continue
            base = ".".join(parts[1:])
            for a in node.names:  # from hired_batch.job import runner: the module runner
                found.add(resolve(f"{base}.{a.name}".lstrip(".")) or resolve(base))
        elif isinstance(node, ast.Import):
            found |= {resolve(a.name.split(".", 1)[1]) for a in node.names if a.name.startswith("hired_batch.")}
        elif isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "SUBCOMMAND_MODULES" for t in node.targets):
            found |= {
                resolve(c.value) for c in ast.walk(node.value) if isinstance(c, ast.Constant)
            }  # importlib'd by name
    return found


def third_party_imports(path: pathlib.Path) -> set[str]:
    """Top-level names of the non-hired_batch packages a source file imports, at any depth."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
    return found - {"hired_batch"}


def import_graph() -> dict[str, set[str]]:
    """Node -> the nodes it imports."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        node = node_of_path(path)
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
                return path[path.index(nxt) :] + [nxt]
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
    assert all(layer_of(node) >= 0 for node in graph), "put a new top-level module in LAYERS (and docs/architecture.md)"
    assert all(dep in graph for deps in graph.values() for dep in deps), "an import names no module of the package"


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_imports_go_down_the_layers():
    upward = [
        f"{m} ({LAYERS[layer_of(m)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})"
        for m, deps in import_graph().items()
        for d in sorted(deps)
        if layer_of(d) > layer_of(m)
    ]
    assert upward == []


def test_the_engine_knows_nothing_of_ray_and_the_pure_math_no_model_library():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        node, imports = node_of_path(path), third_party_imports(path)
        banned = {"ray"} if node.startswith("engine") else set()
        if node in PURE:
            banned |= {"ray", "transformers", "vllm"}
        bad += [f"{path.relative_to(PACKAGE)} imports {name}" for name in sorted(imports & banned)]
    assert bad == []


@pytest.mark.parametrize(
    "graph, cyclic",
    [
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, True),
        ({"a": {"b"}, "b": {"c"}, "c": set()}, False),
        ({"a": {"b", "c"}, "b": {"c"}, "c": set()}, False),
    ],
)
def test_the_cycle_check_finds_cycles(graph, cyclic):
    assert (find_cycle(graph) is not None) == cyclic


def test_a_function_level_import_counts(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from hired_batch.cli import main\n    from hired_batch.job import runner\n")
    assert imported_modules(src) == {"cli", "job.runner"}
