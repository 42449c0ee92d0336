"""apply-profile changes only the lines of the keys a profile sets: every other line and comment stays."""

import re
import shutil
from pathlib import Path

import yaml
from typer.testing import CliRunner

from aerialseg.cli import app
from aerialseg.core.config import merge_profile
from aerialseg.core.yamledit import merged_text


def _leaves(tree: dict, prefix: tuple = ()) -> dict[tuple, object]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_leaves(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out


def _keyed_lines(text: str) -> list[tuple[tuple, str]]:
    """(key path the line belongs to, line): by indentation; list items and comments belong to the key above."""
    stack: list[tuple[int, str]] = []
    out = []
    for line in text.splitlines():
        match = re.match(r"^(\s*)([\w.-]+):", line)
        if match:
            indent = len(match.group(1))
            while stack and stack[-1][0] >= indent:
                stack.pop()
            stack.append((indent, match.group(2)))
        out.append((tuple(k for _, k in stack), line))
    return out


def test_ci_profile_changes_only_its_keys(tmp_path, repo_root, monkeypatch):
    for name in ("params.yaml", "profiles"):
        (shutil.copytree if name == "profiles" else shutil.copy2)(repo_root / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    before = Path("params.yaml").read_text()
    result = CliRunner().invoke(app, ["apply-profile", "ci"])
    assert result.exit_code == 0, result.output
    after = Path("params.yaml").read_text()
    assert Path("params.yaml.bak").read_text() == before
    profile = yaml.safe_load(Path("profiles/ci.yaml").read_text())
    assert yaml.safe_load(after) == merge_profile(yaml.safe_load(before), profile)  # the same merge as before
    old_values = _leaves(yaml.safe_load(before))
    changed = {path for path, value in _leaves(profile).items() if old_values.get(path) != value}
    old, new = _keyed_lines(before), _keyed_lines(after)

    def touched(path: tuple, line: str) -> bool:  # a changed key's line (a flow mapping: its parent's line)
        if line.lstrip().startswith("#"):
            return False  # comment lines never change
        return path in changed or ("{" in line.partition(" #")[0] and any(c[: len(path)] == path for c in changed))

    # every line of a key the profile does not change (and every comment line) is identical, in order
    assert [line for path, line in old if not touched(path, line)] == \
        [line for path, line in new if not touched(path, line)]
    # each changed key is one line in the new file with the merged value, still carrying its comment
    merged = yaml.safe_load(after)
    old_line = {path: line for path, line in old if touched(path, line) and re.match(r"^\s*[\w.-]+:", line)}
    new_lines = [(path, line) for path, line in new if touched(path, line)]
    assert {p for p, _ in new_lines} == {p for p in old_line}
    for path, line in new_lines:
        value = merged
        for key in path:
            value = value[key]
        assert old_line[path].partition(" #")[2] in line and yaml.safe_load(line.strip()) == {path[-1]: value}
    assert len(before.splitlines()) - len(after.splitlines()) == 2  # quantize.table.entries: 3 lines -> 1


def test_new_keys_and_flow_values_keep_their_style():
    text = "a:\n  b: 1   # one\n  c: [1, 2]\n# end\n"
    out = merged_text(text, "a: {b: 2, d: {e: 3}}\n")
    assert out.startswith("a:\n  b: 2   # one\n  c: [1, 2]\n") and "d:" in out and "# end" in out
    assert yaml.safe_load(out) == {"a": {"b": 2, "c": [1, 2], "d": {"e": 3}}}
    assert merged_text(text, "a: {b: 1}\n") == text
