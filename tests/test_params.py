"""params.yaml loading: the repository's defaults outside the checkout, clear errors otherwise."""

import pytest

from aerialseg.core.errors import AerialsegError
from aerialseg.core.config import PARAMS_YAML, check_keys, load_params


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
