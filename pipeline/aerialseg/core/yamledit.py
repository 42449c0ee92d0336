"""Edit a YAML file the way a person would: change only the keys asked for, keep every comment and the layout.

``ruamel.yaml`` round-trips the file (comments, key order, flow/block style, quotes); the indentation is the
one of the candidates under which the unchanged file round-trips with the fewest changed lines (normally none).
"""

import difflib
import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aerialseg.core.errors import AerialsegError

INDENTS = ((2, 4, 2), (2, 2, 0), (4, 4, 2), (4, 6, 4), (4, 4, 0))  # (mapping, sequence, dash offset)


def _yaml(indent: tuple[int, int, int] = INDENTS[0]) -> Any:
    from ruamel.yaml import YAML

    yaml = YAML()  # round-trip
    yaml.preserve_quotes = True
    yaml.width = 4096  # never re-wrap long lines
    yaml.indent(mapping=indent[0], sequence=indent[1], offset=indent[2])
    yaml.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    return yaml


def _dump(yaml: Any, data: Any) -> str:
    out = io.StringIO()
    yaml.dump(data, out)
    return out.getvalue()


def _changed_lines(a: str, b: str) -> int:
    return sum(1 for line in difflib.ndiff(a.splitlines(), b.splitlines()) if line[:1] in "+-")


def load_roundtrip(text: str, path: Path | None = None) -> tuple[Any, Any]:
    """(data, yaml) of YAML text: the round-trip document and the dumper that writes it back as it was."""
    from ruamel.yaml.error import YAMLError

    best = None
    for indent in INDENTS:
        yaml = _yaml(indent)
        try:
            data = yaml.load(text)
        except YAMLError as exc:
            raise AerialsegError(f"not valid YAML ({str(exc).splitlines()[0][:100]})", path,
                                 "fix the YAML syntax") from None
        changed = _changed_lines(text, _dump(yaml, data))
        if best is None or changed < best[0]:
            best = (changed, data, yaml)
        if not changed:
            break
    return best[1], best[2]


def merge_into(node: Any, overlay: Mapping) -> None:
    """Set overlay's keys in a round-trip mapping: nested mappings merged, other values replaced; values
    already equal are left as they are (their formatting too)."""
    for key, value in overlay.items():
        current = node.get(key)
        if isinstance(value, Mapping) and isinstance(current, Mapping):
            merge_into(current, value)
        elif key not in node or current != value:
            node[key] = value


def merged_text(params_text: str, profile_text: str, params_path: Path | None = None,
                profile_path: Path | None = None) -> str:
    """params YAML text with the profile's keys set, every other line and comment unchanged."""
    data, yaml = load_roundtrip(params_text, params_path)
    overlay, _ = load_roundtrip(profile_text, profile_path)
    if not isinstance(overlay, Mapping):
        raise AerialsegError("a profile must be a mapping of params sections", profile_path)
    merge_into(data, overlay or {})
    return _dump(yaml, data)


def _flow(value: Any) -> Any:
    """Lists as flow sequences (``[a, b]``), the way params.yaml writes them; mappings walked."""
    from ruamel.yaml.comments import CommentedSeq

    if isinstance(value, Mapping):
        return {k: _flow(v) for k, v in value.items()}
    if isinstance(value, list):
        seq = CommentedSeq(value)
        seq.fa.set_flow_style()
        return seq
    return value


def set_keys(text: str, values: Mapping, path: Path | None = None) -> str:
    """YAML text with ``values`` (nested mappings of keys) set, every other line and comment unchanged."""
    data, yaml = load_roundtrip(text, path)
    merge_into(data, _flow(values))
    return _dump(yaml, data)
