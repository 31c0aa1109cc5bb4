"""The package's import graph, lazy imports included: no cycles, and the pure core imports no edge."""
from __future__ import annotations

import ast
import time
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "byol_ray"
# The pure core (docs/design.md): it runs where Ray, MLflow and FFCV cannot be installed.
CORE = ("augment", "augment_recipe", "byol", "cadence", "checkpoint", "config", "dist", "encoders", "engine", "errors", "lars", "loss",
        "preprocess", "progress", "schedules")
EDGE_PACKAGES = ("ray", "mlflow", "ffcv", "numba")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _parse(path: Path) -> ast.Module:
    """``ast.parse``, retried: CPython 3.11's AST validator keeps one recursion counter per interpreter, and a
    parse in another thread at the same moment (numba compiling an FFCV pipeline left by an earlier test)
    makes it raise "AST constructor recursion depth mismatch" (seen in full runs, never alone)."""
    for attempt in range(5):
        try:
            return ast.parse(path.read_text())
        except SystemError:
            if attempt == 4:
                raise
            time.sleep(0.2)
    raise AssertionError("unreachable")


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (functions' lazy imports too), as absolute names."""
    tree = _parse(path)
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return found


def graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        # an import of a.b.c also runs a.b's and a's __init__, but those import nothing upward here
        edges[name] = {m for m in _imports(path) if m in modules and m != name}
    return edges


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_sees_lazy_imports():
    edges = graph()
    # launch imports byol_ray.data inside a function: the graph must still hold that edge
    assert "byol_ray.data" in edges["byol_ray.launch"]
    assert "byol_ray.engine" in edges["byol_ray.session"]


def test_no_import_cycles():
    assert _cycle(graph()) is None, f"import cycle: {' -> '.join(_cycle(graph()))}"


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_core_imports_no_edge_and_nothing_above_it():
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    for name in CORE:
        path = modules[f"byol_ray.{name}"]
        imported = _imports(path)
        edge = sorted(m for m in imported if m.split(".")[0] in EDGE_PACKAGES)
        assert not edge, f"core module byol_ray.{name} imports {edge}"
        ours = {m for m in imported if m.startswith("byol_ray.") and m in modules}
        above = sorted(m for m in ours if m.removeprefix("byol_ray.").split(".")[0] not in CORE)
        assert not above, f"core module byol_ray.{name} imports upward: {above}"


def test_downstream_and_registry_do_not_reach_into_launchers_or_the_cli():
    edges = graph()
    for name, targets in edges.items():
        if name.startswith(("byol_ray.downstream", "byol_ray.registry", "byol_ray.data")):
            upward = sorted(t for t in targets if t in ("byol_ray.cli", "byol_ray.session", "byol_ray.train",
                                                        "byol_ray.ray_train", "byol_ray.tune", "byol_ray.launch",
                                                        "byol_ray.resume"))
            assert not upward, f"{name} imports upward: {upward}"


def test_design_module_map_names_every_module():
    """docs/design.md's module map is where a reader looks a module up: a new file must appear there."""
    design = (PACKAGE.parent / "docs" / "design.md").read_text()
    files = [p.relative_to(PACKAGE).as_posix() for p in sorted(PACKAGE.rglob("*.py")) if p.name != "__init__.py"]
    assert files
    missing = [f for f in files if f"`{f}`" not in design]
    assert not missing, f"docs/design.md's module map does not name {missing}"


def test_evaluation_sits_below_validation_and_the_downstream_jobs():
    """Frozen features and kNN serve held-out validation (part of a run) and the downstream jobs: neither above."""
    edges = graph()
    evaluation = [name for name in edges if name.startswith("byol_ray.evaluation")]
    assert len(evaluation) >= 4
    for name in evaluation:
        upward = sorted(t for t in edges[name] if t.startswith(("byol_ray.downstream", "byol_ray.validation",
                                                                "byol_ray.session", "byol_ray.registry")))
        assert not upward, f"{name} imports upward: {upward}"
    assert not any(t.startswith("byol_ray.downstream") for t in edges["byol_ray.validation"])


def _in_a_fresh_process(code: str) -> str:
    """What ``code`` prints, run by this interpreter in a new process (nothing imported yet); it must succeed."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_the_config_and_a_commands_bad_input_load_without_torch():
    """`byol-ray config` and a mistyped key answer without importing torch (about 1.3 s of a 2-core machine's CPU
    per command, and every refused command pays it before its one line)."""
    probe = ("import sys\n"
             "from byol_ray.config import load_config\n"
             "load_config(['demo'], ['train.epochs=2'])\n"
             "try:\n"
             "    load_config(['demo'], ['train.epoch=2'])\n"
             "except ValueError as exc:\n"
             "    assert 'train.epochs' in str(exc), exc\n"
             "else:\n"
             "    raise AssertionError('a mistyped key was accepted')\n"
             "print(sorted(m for m in ('torch', 'numpy', 'ray', 'mlflow') if m in sys.modules))\n")
    printed = _in_a_fresh_process(probe)
    assert printed.strip() == "[]", printed


def test_a_run_of_the_tiny_encoder_imports_no_torchvision():
    """torchvision (about 1 s of import on 2 cores) is for the ResNets only: every process of a tiny-encoder run (the
    demo, the tests), its Ray Train workers among them, starts without it."""
    probe = ("import sys\n"
             "import byol_ray.ray_train, byol_ray.train, byol_ray.registry\n"
             "from byol_ray.encoders import build_encoder\n"
             "assert build_encoder('tiny').feature_dim == 128\n"
             "print('torchvision' in sys.modules)\n"
             "assert build_encoder('resnet18').feature_dim == 512\n"
             "print('torchvision' in sys.modules)\n")
    printed = _in_a_fresh_process(probe)
    assert printed.split() == ["False", "True"], printed
