"""Defaults live in one place: each typed section's code defaults equal the values params.yaml ships."""

import dataclasses

import pytest

from aerialseg.annotations.rasterize import MaskOptions
from aerialseg.compression.prune import PruneConfig
from aerialseg.compression.quantize import QuantizeConfig
from aerialseg.core.config import load_params
from aerialseg.data.split import SplitParams
from aerialseg.data.tiling import TileParams
from aerialseg.inference.scene import InferOptions
from aerialseg.training.config import TrainConfig

# (section, typed config, keys whose code default means "derive it" and params.yaml names the derived value)
SECTIONS = [("infer", InferOptions, ()), ("tiles", TileParams, ()), ("split", SplitParams, ()),
            ("masks", MaskOptions, ()), ("prune", PruneConfig, ()),
            ("quantize", QuantizeConfig, ("out", "table")),
            ("train", TrainConfig, ("init_from",))]  # code: no init; params.yaml: the pretrain stage's output


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING


@pytest.mark.parametrize("name,config,derived", SECTIONS, ids=[s[0] for s in SECTIONS])
def test_code_defaults_equal_params_yaml(name, config, derived):
    shipped = load_params()[name]
    fields = {f.name: f for f in dataclasses.fields(config)}
    differ = {}
    for key, value in shipped.items():
        if key in fields and key not in derived:
            default = _default(fields[key])
            default = list(default) if isinstance(default, tuple) else default
            if default != value:
                differ[key] = (value, default)
    assert not differ, f"params.yaml vs code defaults in '{name}': {differ}"
