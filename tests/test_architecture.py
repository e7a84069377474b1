"""The package's shape: helpers import one another in one direction only (no cycle, no pair importing each other),
and config, which every notebook and module reads, pulls in neither the runner nor preflight."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "helpers"


def helper_imports(path: Path) -> set[str]:
    """The helpers modules one file imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("helpers.")}
        elif isinstance(node, ast.ImportFrom):
            if node.module and node.module.startswith("helpers."):
                found.add(node.module.split(".")[1])
            elif node.module == "helpers" or (node.level and not node.module):
                found |= {a.name for a in node.names}
            elif node.level:
                found.add(node.module.split(".")[0])
    return found - {path.stem}


def import_graph() -> dict[str, set[str]]:
    return {p.stem: helper_imports(p) for p in SRC.glob("*.py")}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_scan_sees_imports_and_cycles():
    # the checker itself, on hand-made cases, so a passing scan below means something
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    graph = import_graph()
    assert {"config", "train", "runner", "preflight"} <= set(graph)
    assert {"model", "evaluate", "device"} <= graph["train"]  # a known edge of the real package
    assert {"preflight", "experiment"} <= graph["runner"]


def test_no_two_helpers_import_each_other_and_no_cycle():
    graph = import_graph()
    pairs = sorted((a, b) for a in graph for b in graph[a] if a < b and a in graph.get(b, ()))
    assert pairs == []
    assert find_cycle(graph) is None


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_reports_side_never_reaches_the_pipeline():
    # report, review and pages re-make every result from saved files: no path from them to training or the pipeline
    assert reachable({"a": {"b"}, "b": {"c"}}, "a") == {"b", "c"}
    graph = import_graph()
    for module in ("report", "review", "pages"):
        assert not reachable(graph, module) & {"experiment", "train", "runs", "runner", "preflight"}, module


def test_importing_config_loads_neither_runner_nor_preflight():
    code = ("import sys, helpers.config; "
            "print(sorted(m for m in sys.modules if m in ('helpers.runner', 'helpers.preflight', 'helpers.experiment')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
