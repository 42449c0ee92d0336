"""The layout's rules: layers import one way, no cycles, stages stand alone, DVC knows each stage's code,
and the torch-free commands start without torch."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "pipeline" / "aerialseg"

# Lower layers never import higher ones (same rank: the two packages may not import each other).
LAYERS = {"core": 0, "geo": 1, "annotations": 2, "data": 2, "models": 3, "inference": 4, "evaluation": 5,
          "training": 6, "compression": 7, "reporting": 8, "stages": 9, "cli": 10}
TORCH_FREE_COMMANDS = ("label-to-mask", "mask-to-label", "tiles", "split")
HEAVY = ("torch", "timm", "segmentation_models_pytorch")


sys.path.insert(0, str(REPO / "tools"))
from code_deps import GRAPH, MODULES, command_files, commands, rewrite  # noqa: E402


def _layer(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "root"


def _command_files(command: set[str]) -> set[Path]:
    """Files a CLI command runs: cli.py plus the import closure of its own code."""
    return {MODULES[m].resolve() for m in _closure(command)} | {(PKG / "cli.py").resolve()}


def test_every_module_sits_in_a_layer():
    assert {_layer(m) for m in MODULES} <= set(LAYERS) | {"root"}


def test_layers_import_one_way():
    wrong = []
    for mod, targets in GRAPH.items():
        for target in targets:
            a, b = _layer(mod), _layer(target)
            if a == b or b == "root":
                continue
            if a == "root" or LAYERS[b] >= LAYERS[a]:
                wrong.append(f"{mod} -> {target}")
    assert not wrong, "imports against the layer order:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles():
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_no_stage_imports_another_stage():
    wrong = [f"{m} -> {t}" for m, ts in GRAPH.items() if _layer(m) == "stages"
             for t in ts if _layer(t) == "stages" and t != "aerialseg.stages"]
    assert not wrong, wrong


def _dvc_stages() -> dict[str, dict]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def test_dvc_code_deps_are_exactly_what_each_stage_imports():
    """Every package file a stage's command imports is a dep, and no other code is: touching a module
    re-runs exactly the stages that run it (`python tools/code_deps.py --write` updates dvc.yaml)."""
    text = (REPO / "dvc.yaml").read_text()
    assert rewrite(text) == text, "dvc.yaml code deps are stale: run python tools/code_deps.py --write"
    stages = [s for s in _dvc_stages().values() if s["cmd"].split()[0] == "aerialseg"]
    assert len(stages) >= 10
    for stage in stages:
        deps = [(REPO / d).resolve() for d in stage["deps"] if d.startswith("pipeline/")]
        files = {f.resolve() for f in command_files(stage["cmd"].split()[1])}
        assert all(any(f == d or d in f.parents for d in deps) for f in files), stage["cmd"]
        assert all(any(f == d or d in f.parents for f in files) for d in deps), stage["cmd"]


@pytest.mark.parametrize("command", [None, *TORCH_FREE_COMMANDS])
def test_torch_free_commands_start_without_torch(command):
    """`aerialseg --help` and the data stages import no torch, timm or smp (checked in a fresh interpreter)."""
    code = ("import sys; from typer.testing import CliRunner; import aerialseg.cli as cli; "
            f"args = {[command, '--help'] if command else ['--help']!r}; "
            "r = CliRunner().invoke(cli.app, args); assert r.exit_code == 0, r.output; "
            "import aerialseg.cli")
    if command:  # the modules the command imports when it runs, too
        mods = sorted(commands()[command])
        code += "; " + "; ".join(f"import {m}" for m in mods)
    code += f"; print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


PARAMS_READERS = {"section", "load_params"}  # take the whole params mapping / file


def test_only_stages_and_the_cli_read_params():
    """Stages (and cli.py for commands outside the DVC pipeline) read params.yaml and resolve the stage paths
    (core.paths); the library takes typed options and paths, so what a stage reads is visible in one module."""
    import ast

    allowed = {"aerialseg.cli", "aerialseg.core.config", "aerialseg.core.paths"}
    readers = {"aerialseg.core.config": PARAMS_READERS, "aerialseg.core.paths": None}  # None: every name
    wrong = []
    for mod, path in MODULES.items():
        if mod in allowed or _layer(mod) == "stages":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module in readers:
                names = readers[node.module]
                wrong += [f"{mod} imports {a.name}" for a in node.names if names is None or a.name in names]
    assert not wrong, "params read outside stages/:\n" + "\n".join(sorted(wrong))


MAX_MODULE_LINES = 450
# Modules still over the budget (issue 25): the list may only shrink. Remove an entry once its module is split.
OVER_BUDGET = {"cli.py": 595, "annotations/anylabeling.py": 470}


def test_no_new_module_grows_past_the_line_budget():
    """A guard for the next god module: new code goes into a new small module, not into a big one."""
    sizes = {p.relative_to(PKG).as_posix(): len(p.read_text(encoding="utf-8").splitlines())
             for p in PKG.rglob("*.py")}
    over = {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES and n > OVER_BUDGET.get(name, 0)}
    assert not over, f"modules over {MAX_MODULE_LINES} lines (split them): {over}"
    stale = [name for name in OVER_BUDGET if sizes.get(name, 0) <= MAX_MODULE_LINES]
    assert not stale, f"now within the budget, remove from OVER_BUDGET: {stale}"


TESTS = REPO / "tests"
TEST_DIRS_BEYOND_THE_PACKAGE = {"cli", "bench", "helpers"}  # the CLI as users run it, bench/ scripts, shared code


def test_tests_mirror_the_package():
    """tests/<layer>/test_*.py beside pipeline/aerialseg/<layer>/: a module's tests are where its layer is."""
    layers = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    misplaced = [p.relative_to(TESTS).as_posix() for p in TESTS.rglob("test_*.py")
                 if p.parent != TESTS and p.parent.name not in layers | TEST_DIRS_BEYOND_THE_PACKAGE]
    loose = [p.name for p in TESTS.glob("test_*.py") if p.name != "test_architecture.py"]
    assert not misplaced and not loose, f"put tests under tests/<layer>/: {misplaced + loose}"


def test_no_test_module_imports_another():
    """Shared fixtures and builders live in tests/helpers (or conftest.py), never in a test module."""
    import re

    names = {p.stem for p in TESTS.rglob("test_*.py")}
    pattern = re.compile(r"^\s*(?:from|import)\s+(test_\w+)", re.M)
    wrong = {p.relative_to(TESTS).as_posix(): found for p in TESTS.rglob("*.py")
             if (found := sorted(set(pattern.findall(p.read_text(encoding="utf-8"))) & names))}
    assert not wrong, f"move what they share into tests/helpers: {wrong}"


def test_test_module_names_are_unique():
    """pytest imports test modules by file name (no __init__.py under tests/): two of one name would clash."""
    stems = [p.stem for p in TESTS.rglob("test_*.py")]
    assert len(stems) == len(set(stems)), sorted({s for s in stems if stems.count(s) > 1})
