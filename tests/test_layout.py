"""Package layout: no import cycles between the package's modules, and the production paths never import the
test-only reference path (docs/design.md §1).

The graph holds every import a module makes: top-level statements and those inside functions or under
``if TYPE_CHECKING:`` alike. A function-level import cannot fail at import time, but a circle through one still
ties two modules into one unit (neither can move, be read or tested without the other), so it counts.
"""

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"dylora_moe": REPO / "dylora_moe", "dylora_moe.kernels": REPO / "kernels"}


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[0] == "kernels" and package == "dylora_moe":  # the symlink to kernels/, listed on its own
                continue
            name = ".".join((package, *parts[:-1], *([] if parts[-1] == "__init__" else parts[-1:])))
            found[name] = path
    return found


def _import_nodes(tree: ast.Module, top_level: bool):
    """Every import node of the file, or (``top_level``) those that run when the module is imported."""
    if not top_level:
        return ast.walk(tree)
    return [n for n in tree.body if not (isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test))]


def _imports(module: str, path: Path, known: set[str], top_level: bool = False) -> set[str]:
    """The package's modules that ``module`` imports anywhere in its file (or at import time only)."""
    package = module if path.stem == "__init__" else module.rsplit(".", 1)[0]
    imported = set()
    for node in _import_nodes(ast.parse(path.read_text()), top_level):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            submodules = [f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in known]
            # `from package import submodule` imports the submodule; the package ran before any of its modules
            candidates = submodules if len(submodules) == len(node.names) else [target, *submodules]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
            candidates += [alias.name.rsplit(".", 1)[0] for alias in node.names if "." in alias.name]
        else:
            continue
        imported |= {name for name in candidates if name in known and name != module}
    return imported


def _graph(top_level: bool = False) -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules), top_level) for name, path in modules.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_the_package():
    graph = _graph()
    assert "dylora_moe.modules.layer" in graph and "dylora_moe.kernels.stacked" in graph
    assert "dylora_moe.modules.routing" in graph["dylora_moe.modules.layer"]  # a real edge (the check is not vacuous)


def test_finder_reports_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def _subgraph(kernels: bool) -> dict[str, set[str]]:
    """The modules of ``dylora_moe.kernels`` or of the rest (the kernels import nothing of the rest, so every circle
    lies inside one of the two)."""
    graph = _graph()
    keep = {name for name in graph if name.startswith("dylora_moe.kernels") == kernels}
    return {name: graph[name] & keep for name in keep}


def test_function_level_imports_are_in_the_graph():
    # dylora_moe.model imports the checkpoint module only inside its methods
    assert "dylora_moe.io.checkpoint" in _graph()["dylora_moe.model"]


def test_no_import_cycles():
    cycle = _find_cycle(_subgraph(kernels=False))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_import_cycles_in_the_kernels():
    cycle = _find_cycle(_subgraph(kernels=True))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("module", ["dylora_moe.io.checkpoint", "dylora_moe.model", "dylora_moe.modules.layer"])
def test_production_paths_do_not_import_the_reference_path(module):
    # at import time: the model loads the reference only when backend="reference" asks for it
    assert "dylora_moe.modules.reference" not in _graph(top_level=True)[module]


def test_kernels_know_nothing_of_models():
    graph = _graph()
    for name, imports in graph.items():
        if name.startswith("dylora_moe.kernels"):
            assert all(dep.startswith("dylora_moe.kernels") for dep in imports), (name, imports)


def test_the_library_never_imports_the_training_app():
    """The applications (training, functional evaluation) use the library, never the other way round."""
    graph = _graph()
    library = [name for name in graph if not name.startswith(("dylora_moe.train", "dylora_moe.evaluate"))]
    assert "dylora_moe.model" in library and "dylora_moe.train.cli" in graph
    for name in library:
        assert not any(dep.startswith("dylora_moe.train") for dep in graph[name]), (name, graph[name])


def test_the_evaluation_app_never_imports_the_training_app():
    """Training calls the functional evaluation; the evaluation reads corpora and base models from the library."""
    graph = _graph()
    evaluation = [name for name in graph if name.startswith("dylora_moe.evaluate")]
    assert "dylora_moe.evaluate.cli" in evaluation
    for name in evaluation:
        assert not any(dep.startswith("dylora_moe.train") for dep in graph[name]), (name, graph[name])


def test_nothing_refers_to_design_notes_outside_the_repository():
    """Design notes live in docs/design.md; a "DESIGN n" (the numbered sections of a document outside the repository)
    is a reference no reader can follow."""
    import re

    pattern = re.compile(r"DESIGN(\.md| ?§? ?\d| section)")
    files = [REPO / "README.md", REPO / "train.py", *(REPO / "docs").rglob("*.md")]
    for folder in ("dylora_moe", "tests", "benchmarks", "kernels"):
        files += [
            p for p in (REPO / folder).rglob("*.py") if p.relative_to(REPO).parts[:2] != ("dylora_moe", "kernels")
        ]
    found = [f"{p.relative_to(REPO)}:{i}" for p in files for i, line in enumerate(p.read_text().splitlines(), 1)
             if pattern.search(line)]  # fmt: skip
    assert len(files) > 50 and not found, found


def test_no_module_of_the_apps_is_over_600_lines():
    """A module the length of a book holds several jobs; the applications split theirs (issue 25)."""
    long = {name: n for name, path in _modules().items() if name.startswith(("dylora_moe.train", "dylora_moe.evaluate"))
            if (n := len(path.read_text().splitlines())) > 600}  # fmt: skip
    assert not long, long


def test_tests_are_named_by_unit_and_import_helpers_not_conftest():
    tests = REPO / "tests"
    assert not list(tests.rglob("test_trust_*.py")), "a test file is named after the work, not the unit it tests"
    importing = [
        p.relative_to(REPO) for p in tests.rglob("*.py") if re.search(r"^from \.?conftest import", p.read_text(), re.M)
    ]
    assert (tests / "helpers.py").is_file() and not importing, importing


def test_the_package_op_topk_route_is_not_shadowed_by_its_module():
    """kernels/topk_route.py shares its name with the op the package exports; importing the module (as the compile
    report and tools do) must leave `dylora_moe.kernels.topk_route` the op."""
    import importlib

    import dylora_moe.kernels as kernels

    module = importlib.import_module("dylora_moe.kernels.topk_route")
    assert callable(kernels.topk_route) and kernels.topk_route is not module
    assert kernels.topk_route.__module__ == "dylora_moe.kernels.ops"
