"""Typed errors: library callers and tests tell a config error from an input error or a missing stage output
by type, and each still reads as the one line the CLI prints (file — message — fix)."""

import pytest

from aerialseg.annotations.anylabeling import load_label_json
from aerialseg.core.config import load_params, section
from aerialseg.core.errors import AerialsegError, ConfigError, InputError, MissingStageOutput
from aerialseg.core.paths import data_stage_outputs


def _one_line(exc: AerialsegError, path: object) -> None:
    text = str(exc)
    assert "\n" not in text and str(path) in text and " — fix: " in text


def test_a_misspelt_params_key_is_a_config_error():
    with pytest.raises(ConfigError) as caught:
        section({"tiles": {"size": 256, "sizee": 1}}, "tiles")
    assert isinstance(caught.value, AerialsegError) and "unknown tiles key(s) sizee" in str(caught.value)


def test_a_params_file_that_is_not_yaml_is_a_config_error(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("tiles: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_params(bad)
    _one_line(caught.value, bad)


def test_a_truncated_label_file_is_an_input_error(tmp_path):
    bad = tmp_path / "scene.json"
    bad.write_text('{"shapes": [', encoding="utf-8")
    with pytest.raises(InputError) as caught:
        load_label_json(bad)
    _one_line(caught.value, bad)
    assert not isinstance(caught.value, ConfigError)


def test_a_missing_tiles_manifest_names_the_stage_to_run(tmp_path):
    params = {"tiles": {"out": str(tmp_path / "tiles")}, "split": {"out": str(tmp_path / "split")}}
    with pytest.raises(MissingStageOutput) as caught:
        data_stage_outputs(params)
    _one_line(caught.value, tmp_path / "tiles")
    assert "aerialseg tiles" in str(caught.value)
