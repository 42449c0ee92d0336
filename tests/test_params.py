"""params.yaml loading: the repository's defaults outside the checkout, clear errors otherwise."""

import pytest

from aerialseg.core.errors import AerialsegError
from aerialseg.core.config import DEFAULT_PARAMS, check_keys, load_params


def test_default_params_resolve_outside_the_repository(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no params.yaml here
    params = load_params(DEFAULT_PARAMS)
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
