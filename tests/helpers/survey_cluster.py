"""A 2-worker local Dask cluster (loopback) with a tiny toy model registered on every worker, its bundle, three
cropped sample scenes and option builders: shared by the infer-survey tests."""

from pathlib import Path

import pytest
import rasterio
import torch
from rasterio.windows import Window
from torch import nn

from aerialseg.inference.scene import InferOptions
from aerialseg.inference.survey import SurveyOptions
from aerialseg.models import list_models, register_model, save_model
from aerialseg.stages.bundle import build_bundle

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample" / "scenes"
TOY = "toy_fcn_survey"


def _build_toy(classes: int = 5, in_channels: int = 3) -> nn.Module:
    return nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, classes, 1))


if TOY not in list_models():
    register_model(TOY, tile_size=128, pad_multiple=1, mean=(0.4, 0.4, 0.4), std=(0.2, 0.2, 0.2))(_build_toy)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A tiny random-init bundle with model.onnx (workers run ONNX Runtime: no model registry needed there)."""
    root = tmp_path_factory.mktemp("bundle")
    torch.manual_seed(0)
    save_model(_build_toy(), root / "trained", TOY, extra={"gsd_m": 0.5, "data_hash": "test"})
    return build_bundle(root / "trained", root / "bundle", overlap=16, onnx=True)


from distributed.diagnostics.plugin import WorkerPlugin  # noqa: E402


class _Toy(WorkerPlugin):
    """Worker plugin: unpickling it imports this module on the worker (spawned workers inherit sys.path),
    which registers the toy model there (also on a worker that replaces a killed one)."""

    def setup(self, worker=None) -> None:
        assert TOY in list_models()


@pytest.fixture(scope="module")
def cluster():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as local, Client(local) as client:
        client.register_plugin(_Toy(), name="toy-model")
        yield local


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> list[Path]:
    """Three sample scenes, cropped to 400 x 300 px (their georeference kept)."""
    root = tmp_path_factory.mktemp("scenes")
    out = []
    for name in ("dubai_tile1", "dubai_tile2", "dubai_tile3"):
        with rasterio.open(SAMPLE / f"{name}.tif") as src:
            win = Window(100, 50, 400, 300)
            profile = {**src.profile, "width": 400, "height": 300, "transform": src.window_transform(win)}
            profile.pop("blockxsize", None), profile.pop("blockysize", None), profile.pop("tiled", None)
            with rasterio.open(root / f"{name}.tif", "w", **profile) as dst:
                dst.write(src.read(window=win))
        out.append(root / f"{name}.tif")
    return out


def _opts(**kw) -> InferOptions:
    return InferOptions(backend="onnx", device="cpu", progress=False, preview=False, **kw)


def _survey(cluster, out: Path, **kw) -> SurveyOptions:
    return SurveyOptions(out=str(out), scheduler=cluster.scheduler_address, progress=False, **kw)


def _maps(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*_landcover.tif"))}
