"""Every section of params.yaml is read through a check: a misspelt key in any of them is a one-line
ConfigError where the stage reads it, never a silent default."""

from pathlib import Path

import pytest
import yaml

from aerialseg.core.config import SECTION_KEYS, section
from aerialseg.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
PARAMS = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))


def _typed(module: str, cls: str):
    """A reader of the typed section: its dataclass's from_params (imported when the test runs)."""
    def read(params, name):
        import importlib

        return getattr(importlib.import_module(module), cls).from_params(params[name])
    return read


def _stage(module: str, function: str):
    """A reader that is a stage function taking the whole params (it checks its own section)."""
    def read(params, name):
        import importlib

        return getattr(importlib.import_module(module), function)(params)
    return read


def _postprocess(params, name):
    from aerialseg.stages.postprocess import run

    return run(params, "missing.tif")


def _pretrain(params, name):
    from aerialseg.stages.pretrain import run

    return run(params)


READERS = {
    "infer": _typed("aerialseg.inference.scene", "InferOptions"),
    "survey": _typed("aerialseg.inference.survey", "SurveyOptions"),
    "rank": _typed("aerialseg.inference.ranking", "RankOptions"),
    "serve": _typed("aerialseg.inference.server", "ServeOptions"),
    "prune": _typed("aerialseg.compression.prune", "PruneConfig"),
    "quantize": _typed("aerialseg.compression.quantize", "QuantizeConfig"),
    "train": _stage("aerialseg.stages.train", "train_config"),
    "distil": _stage("aerialseg.stages.distil", "distil_section"),
    "postprocess": _postprocess,
    "pretrain": _pretrain,
}


def test_every_section_has_a_checked_reader():
    unchecked = sorted(set(PARAMS) - set(SECTION_KEYS) - set(READERS))
    assert not unchecked, f"sections read without a key check: {unchecked}"


@pytest.mark.parametrize("name", sorted(set(PARAMS)))
def test_a_misspelt_key_in_any_section_is_a_config_error(name):
    params = {**PARAMS, name: {**PARAMS[name], "sizee": 1}}
    reader = READERS.get(name, lambda p, n: section(p, n))
    with pytest.raises(ConfigError, match=f"unknown {name} key.*sizee") as caught:
        reader(params, name)
    assert "\n" not in str(caught.value) and "fix: use only:" in str(caught.value)
