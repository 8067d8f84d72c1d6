"""The package's shape: no import cycles (function-level imports included), inference free of training
code, short training functions, and a test file (or a stated reason) for every top-level module."""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
TESTS = Path(__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """ditkit module -> the ditkit modules it imports anywhere in its file (`from P import m` counts as
    importing module P.m when that is a module, else P)."""
    files = {module_name(p): p for p in (SRC / "ditkit").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name.startswith("ditkit"))
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ditkit"):
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    edges.add(sub if sub in files else node.module)
        graph[name] = {e for e in edges if e in files and e != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_inference_reaches_no_training_code():
    """The pipeline and the web page import (anywhere in their files, and in what those import) no module of
    ditkit.train: checkpoints, configs and the per-kind inference classes live outside it."""
    graph = import_graph()
    app = [m for m in graph if m == "ditkit.app" or m.startswith("ditkit.app.")]
    inference = ["ditkit.pipeline", "ditkit.kinds", "ditkit.checkpoint", *app]
    seen, todo = set(), list(inference)
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(graph[node])
    assert {"ditkit.sampling", "ditkit.models.dit"} <= seen  # the walk follows imports
    assert sorted(m for m in seen if m == "ditkit.train" or m.startswith("ditkit.train.")) == []


def long_functions(root: Path, limit: int = 60) -> list[str]:
    """'file:function (N lines)' for every function or method under root longer than `limit` lines."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    found.append(f"{path.relative_to(root)}:{node.name} ({length} lines)")
    return found


def test_every_function_in_the_package_is_short():
    """train() reads top to bottom, sample() and build_parser too: no function in the package is over 60 lines."""
    assert long_functions(SRC / "ditkit") == []


def test_the_length_check_finds_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(60))
    (tmp_path / "m.py").write_text(f"def short():\n    return 1\n\n\ndef long():\n{body}\n")
    assert long_functions(tmp_path) == ["m.py:long (61 lines)"]


def test_cli_commands_are_thin():
    for node in ast.parse((SRC / "ditkit" / "cli.py").read_text()).body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith("cmd_"):
            assert node.end_lineno - node.lineno + 1 <= 30, f"{node.name} is over 30 lines"


# modules tested through another module's test file, or with nothing of their own to test
TESTED_ELSEWHERE = {
    "cli": "every command is run in the test of what it drives (test_train, test_pipeline, test_cli_errors, ...)",
    "io": "atomic writes: test_train (no .tmp left behind), test_images",
    "prompts": "PromptTable: test_text_to_image and test_text_models",
    "diffusion": "test_gaussian_diffusion and test_flow_matching",
    "models": "test_dit, test_dit_parity, test_designs_and_flops, test_text_models, test_video, test_control",
    "checksums": "test_run_safety (damaged and hand-edited files) and test_cli_errors (through the CLI)",
    "extras": "test_run_safety (missing extras name the pip extra) and test_cli_errors",
    "notes": "test_run_safety (warnings print the message only)",
    "config": "test_train (overrides, files, resume), test_cli_errors (every bad key and value)",
    "checkpoint": "test_run_safety (damaged files, atomic writes), test_train (exact resume), test_pipeline",
}


def test_every_top_level_module_has_a_test_or_a_reason():
    tests = {p.stem for p in TESTS.glob("test_*.py")}
    for path in sorted((SRC / "ditkit").iterdir()):
        name = path.stem if path.suffix == ".py" else path.name
        if name.startswith("_") or not (path.suffix == ".py" or (path / "__init__.py").is_file()):
            continue
        covered = f"test_{name}" in tests or any(t.startswith(f"test_{name}_") for t in tests)
        assert covered or name in TESTED_ELSEWHERE, f"ditkit.{name} has no tests/test_{name}.py and no reason"
