"""params.yaml loading: the repository's defaults outside the checkout, clear errors otherwise."""

import pytest

from aerialseg.core.errors import AerialsegError
from aerialseg.core.config import PARAMS_YAML, check_keys, load_params, typed_section


def test_default_params_resolve_outside_the_repository(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no params.yaml here
    params = load_params(PARAMS_YAML)
    assert params["tiles"]["size"] > 0 and "classes" in params


def test_explicit_missing_or_malformed_params_are_one_line_errors(tmp_path):
    with pytest.raises(AerialsegError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("tiles: [1, 2\n")
    with pytest.raises(AerialsegError, match="not valid YAML"):
        load_params(bad)
    with pytest.raises(AerialsegError, match="unknown prune key\\(s\\) iteratons"):
        check_keys("prune", {"iteratons": 3}, ("iterations", "out"))


def test_typed_section_builds_the_dataclass_checks_keys_and_validates():
    from dataclasses import dataclass

    @dataclass
    class Knobs:
        size: int = 4
        name: str = "a"

        def validate(self) -> None:
            if self.size < 1:
                raise AerialsegError("knobs.size must be >= 1", "params.yaml")

    assert typed_section(Knobs, "knobs", {"size": 8}) == Knobs(size=8)
    with pytest.raises(AerialsegError, match="unknown knobs key\\(s\\) colour — fix: use only: size, name"):
        typed_section(Knobs, "knobs", {"colour": 1})
    with pytest.raises(AerialsegError, match="knobs.size must be >= 1"):
        typed_section(Knobs, "knobs", {"size": 0})


def test_errors_about_params_keys_name_the_file_that_was_read(tmp_path, capsys, monkeypatch):
    """`--params other.yaml`: an error about one of its keys names other.yaml, not params.yaml."""
    import sys

    import yaml

    from aerialseg import cli
    from aerialseg.core.config import load_params

    other = tmp_path / "other.yaml"
    params = load_params()
    params["tiles"] = {**params["tiles"], "overlap": 9999}
    other.write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["aerialseg", "tiles", "--params", str(other)])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith(f"error: {other}: tiles.overlap")


def test_paths_in_a_params_file_are_relative_to_that_file(tmp_path, monkeypatch):
    import yaml

    project = tmp_path / "survey"
    project.mkdir()
    (project / "params.yaml").write_text(yaml.safe_dump({
        "data": {"labels": "labels", "images": "/abs/orthos", "gsd_m": 0.5},
        "train": {"out": "models/run", "epochs": 3},
        "quantize": {"table": {"entries": [{"backbone": "b", "model_dir": "models/a", "pruned_dir": None}]}}}))
    monkeypatch.chdir(tmp_path)  # elsewhere: relative paths follow the params file
    params = load_params(project / "params.yaml")
    assert params["data"]["labels"] == str(project.resolve() / "labels") and params["data"]["images"] == "/abs/orthos"
    assert params["train"] == {"out": str(project.resolve() / "models/run"), "epochs": 3}
    assert params["quantize"]["table"]["entries"][0]["model_dir"] == str(project.resolve() / "models/a")
    monkeypatch.chdir(project)  # beside it: unchanged (what dvc.lock records)
    assert load_params("params.yaml")["data"]["labels"] == "labels"
