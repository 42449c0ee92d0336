"""The package's import graph, read from source (AST; function-level imports included).

Used by tests/test_architecture.py (layer rules, cycles, DVC coverage) and to keep dvc.yaml's code deps
exact:  python tools/code_deps.py --write   rewrites each stage's `- pipeline/...` dep lines with the
files its command imports (a folder when every file in it is imported);  --check  exits 1 when they differ.
"""

import ast
import re
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "pipeline" / "aerialseg"


def modules() -> dict[str, Path]:
    """aerialseg.x.y -> file."""
    return {".".join(("aerialseg",) + f.relative_to(PKG).with_suffix("").parts).removesuffix(".__init__"): f
            for f in sorted(PKG.rglob("*.py"))}


MODULES = modules()


def _resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports(node: ast.AST) -> set[str]:
    """aerialseg modules imported anywhere under ``node``."""
    names: set[str] = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Import):
            names |= {a.name for a in n.names}
        elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
            names |= {n.module} | {f"{n.module}.{a.name}" for a in n.names}
    return {m for m in (_resolve(x) for x in names if x.startswith("aerialseg")) if m}


GRAPH = {mod: imports(ast.parse(path.read_text())) - {mod} for mod, path in MODULES.items()}


def closure(start: set[str]) -> set[str]:
    """Modules reached from ``start``, with the packages whose __init__ each import runs."""
    seen, todo = set(), list(start)
    while todo:
        mod = todo.pop()
        if mod not in seen:
            seen.add(mod)
            todo += GRAPH.get(mod, ())
    for mod in list(seen):
        parts = mod.split(".")
        seen |= {".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in MODULES}
    return seen


def commands() -> dict[str, set[str]]:
    """CLI command -> modules its code imports (the command's function + cli.py's top level)."""
    tree = ast.parse((PKG / "cli.py").read_text())
    top = set().union(*(imports(n) for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))))
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            for dec in node.decorator_list:
                if isinstance(dec, ast.Call) and getattr(dec.func, "attr", "") == "command" and dec.args:
                    found[dec.args[0].value] = (imports(node) | top) - {"aerialseg.cli"}
    return found


def command_files(command: str) -> set[Path]:
    """Files a CLI command runs: cli.py plus the import closure of its own code."""
    return {MODULES[m] for m in closure(commands()[command])} | {PKG / "cli.py"}


def compact(files: set[Path]) -> list[str]:
    """Repo-relative deps: a folder when all its .py files are used, else the files."""
    out = []
    for folder in sorted({f.parent for f in files}):
        used = {f for f in files if f.parent == folder}
        if folder != PKG and used == set(folder.glob("*.py")):
            out.append(str(folder.relative_to(REPO)))
        else:
            out += [str(f.relative_to(REPO)) for f in sorted(used)]
    return out


def stage_commands() -> dict[str, str]:
    """dvc.yaml stage -> the aerialseg command it runs."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return {name: st["cmd"].split()[1] for name, st in stages.items() if st["cmd"].split()[0] == "aerialseg"}


def rewrite(text: str) -> str:
    """dvc.yaml with each aerialseg stage's `- pipeline/...` dep lines replaced by the computed ones."""
    cmds, lines, out, stage = stage_commands(), text.splitlines(), [], None
    i = 0
    while i < len(lines):
        line = lines[i]
        head = re.match(r"^  ([\w-]+):", line)
        if head:
            stage = head.group(1)
        out.append(line)
        if stage in cmds and re.match(r"^    deps:\s*$", line):
            i += 1
            while i < len(lines) and re.match(r"^      - pipeline/", lines[i]):
                i += 1
            out += [f"      - {dep}" for dep in compact(command_files(cmds[stage]))]
            continue
        i += 1
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    path = REPO / "dvc.yaml"
    current, wanted = path.read_text(), rewrite(path.read_text())
    if "--write" in sys.argv:
        path.write_text(wanted)
        from sync_templates import sync  # `aerialseg init` ships the same pipeline

        sync()
    elif current != wanted:
        print("dvc.yaml code deps differ from the import graph: run python tools/code_deps.py --write")
        sys.exit(1)
