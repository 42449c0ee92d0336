"""int8: calibration reader, static QDQ quantization, the ΔmIoU gate, the compression table."""

import json
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch

from aerialseg.data.datasets import spread_indices
from aerialseg.stages.quantize import run as quantize_run
from aerialseg.compression.prune import PruneConfig, make_criterion, prune_model, save_pruned_model
from aerialseg.core.errors import AerialsegError
from aerialseg.compression.onnx_export import export_onnx
from aerialseg.models import create_model, get_spec, save_model
from aerialseg.compression.table import TableConfig, compression_table, table_markdown
from aerialseg.compression.quantize import (
    INT8_NAME,
    REJECTED_NAME,
    QuantizeConfig,
    TileCalibrationReader,
    delta_miou,
    onnx_predict,
    quantize_dynamic_int8,
    quantize_model_dir,
    quantize_static_int8,
    session,
    to_model_input,
)
from conftest import shared_path
from helpers.dubai import DUBAI_COLORS

SIZE = 64
NAME = "pspnet_resnet18"


def toy_tiles(n: int, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """uint8 tiles whose class is the dominant colour (learnable in a few steps), with some ignore pixels."""
    rng = np.random.default_rng(seed)
    palette = np.array([[200, 180, 150], [90, 90, 90], [30, 60, 160], [40, 140, 40], [180, 40, 40]], np.uint8)
    images, masks = [], []
    for _ in range(n):
        coarse = rng.integers(0, 5, (4, 4)).astype(np.uint8)
        mask = cv2.resize(coarse, (SIZE, SIZE), interpolation=cv2.INTER_NEAREST)
        noise = rng.integers(-20, 20, (SIZE, SIZE, 3))
        images.append(np.clip(palette[mask].astype(int) + noise, 0, 255).astype(np.uint8))
        mask[:2] = 255
        masks.append(mask)
    return images, masks


def train_quickly(model: torch.nn.Module, images: list[np.ndarray], masks: list[np.ndarray], epochs: int,
                  lr: float = 3e-3, batch: int = 6) -> torch.nn.Module:
    spec = get_spec(NAME)
    criterion = make_criterion()
    optimizer = torch.optim.AdamW(model.parameters(), lr)
    model.train()
    for _ in range(epochs):
        for i in range(0, len(images), batch):
            x = spec.normalize(torch.from_numpy(np.stack(images[i:i + batch])).permute(0, 3, 1, 2))
            y = torch.from_numpy(np.stack(masks[i:i + batch])).long()
            loss = criterion(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def fast_config(**overrides) -> QuantizeConfig:
    base = dict(tile_size=SIZE, calibration_tiles=8, latency_runs=1, latency_warmup=0, threads=1)
    return QuantizeConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def toy_data() -> dict[str, list[np.ndarray]]:
    train_images, train_masks = toy_tiles(18, seed=0)
    val_images, val_masks = toy_tiles(6, seed=1)
    return {"train_images": train_images, "train_masks": train_masks, "val_images": val_images,
            "val_masks": val_masks}


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory, toy_data) -> Path:
    torch.manual_seed(0)
    model = train_quickly(create_model(NAME), toy_data["train_images"], toy_data["train_masks"], epochs=8)
    return save_model(model, tmp_path_factory.mktemp("models") / "psp", NAME)


@pytest.fixture(scope="module")
def fp32_onnx(tmp_path_factory, trained_dir) -> Path:
    from aerialseg.compression.prune import load_model_dir

    model, _ = load_model_dir(trained_dir)
    return export_onnx(model, tmp_path_factory.mktemp("onnx") / "model.onnx", SIZE)


def test_model_input_is_normalised_and_padded():
    spec = get_spec(NAME)
    image = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    x = to_model_input(image, spec, SIZE)
    assert x.shape == (1, 3, SIZE, SIZE) and x.dtype == np.float32
    expected = spec.normalize(torch.from_numpy(image).permute(2, 0, 1)[None]).numpy()
    np.testing.assert_allclose(x[:, :, :40, :50], expected, rtol=1e-6)
    np.testing.assert_allclose(x[0, :, 40, :50], expected[0, :, 38, :])  # reflect padding
    with pytest.raises(AerialsegError, match="larger than the model input"):
        to_model_input(np.zeros((SIZE + 1, 8, 3), np.uint8), spec, SIZE)


def test_calibration_reader_feeds_every_tile_and_rewinds(toy_data):
    reader = TileCalibrationReader(toy_data["train_images"][:3], get_spec(NAME), SIZE)
    fed = [reader.get_next() for _ in range(4)]
    assert [f is None for f in fed] == [False, False, False, True]
    assert fed[0]["input"].shape == (1, 3, SIZE, SIZE)
    reader.rewind()
    np.testing.assert_array_equal(reader.get_next()["input"], fed[0]["input"])
    with pytest.raises(AerialsegError, match="no calibration tiles"):
        TileCalibrationReader([], get_spec(NAME), SIZE)


def test_static_int8_is_qdq_smaller_and_agrees(tmp_path, fp32_onnx, toy_data):
    int8 = quantize_static_int8(fp32_onnx, tmp_path / INT8_NAME,
                                TileCalibrationReader(toy_data["train_images"][:8], get_spec(NAME), SIZE),
                                fast_config())
    graph = onnx.load(str(int8)).graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    int8_weights = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert len(int8_weights) >= 20  # every conv weight stored as int8
    assert int8.stat().st_size < 0.35 * fp32_onnx.stat().st_size
    meta = {p.key: p.value for p in onnx.load(str(int8)).metadata_props}
    assert json.loads(meta["aerialseg_quantization"])["per_channel"] is True
    spec = get_spec(NAME)
    fp32_sess, int8_sess = session(fp32_onnx, 1), session(int8, 1)
    agree = np.mean([(onnx_predict(fp32_sess, img, spec) == onnx_predict(int8_sess, img, spec)).mean()
                     for img in toy_data["val_images"]])
    assert agree > 0.95


def test_dasnet_group_norm_graph_stays_runnable_after_int8(tmp_path):
    """Per-channel int8 of norm scales broke DAS-Net's GroupNorm (InstanceNormalization) in ORT: norms stay fp32."""
    torch.manual_seed(0)
    size, spec = 128, get_spec("dasnet")
    fp32 = export_onnx(create_model("dasnet").eval(), tmp_path / "das.onnx", size)
    tiles = [np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8) for i in range(2)]
    int8 = quantize_static_int8(fp32, tmp_path / "das.int8.onnx", TileCalibrationReader(tiles, spec, size),
                                fast_config(tile_size=size))
    nodes = onnx.load(str(int8)).graph.node
    assert any(n.op_type == "QuantizeLinear" for n in nodes)
    assert onnx_predict(session(int8, 1), tiles[0], spec).shape == (size, size)


def test_delta_miou_of_a_model_with_itself_is_zero(fp32_onnx, toy_data):
    sess = session(fp32_onnx, 1)
    result = delta_miou(sess, sess, toy_data["val_images"], toy_data["val_masks"], get_spec(NAME))
    assert result["delta_miou_points"] == 0.0 and result["prediction_agreement"] == 1.0
    assert result["fp32"]["mIoU"] > 0.5  # the toy model did learn the colours
    assert result["fp32"]["bf1"] is not None


def test_dynamic_int8_runs(tmp_path, fp32_onnx, toy_data):
    dynamic = quantize_dynamic_int8(fp32_onnx, tmp_path / "dyn.onnx")
    pred = onnx_predict(session(dynamic, 1), toy_data["val_images"][0], get_spec(NAME))
    assert pred.shape == (SIZE, SIZE)


def test_quantize_model_dir_writes_int8_and_report(trained_dir, toy_data):
    report = quantize_model_dir(trained_dir, toy_data["train_images"], toy_data["val_images"],
                                toy_data["val_masks"], fast_config(measure_dynamic=True))
    assert (trained_dir / INT8_NAME).is_file()
    saved = json.loads((trained_dir / "quantize.json").read_text())
    assert saved["accuracy"]["delta_miou_points"] == report["accuracy"]["delta_miou_points"]
    assert abs(report["accuracy"]["delta_miou_points"]) <= 1.0
    assert report["parity_fp32"]["max_abs_diff"] <= 1e-3
    assert report["size_mb"]["onnx_int8"] < report["size_mb"]["onnx_fp32"] / 3
    assert {"torch_fp32", "onnx_fp32", "onnx_int8", "onnx_int8_dynamic"} <= set(report["latency_ms"])
    assert report["calibration_tiles"] == 8


def test_failed_delta_miou_gate_is_a_recorded_result_not_an_error(tmp_path, toy_data):
    torch.manual_seed(1)
    directory = save_model(create_model(NAME), tmp_path / "m", NAME)
    (directory / INT8_NAME).write_bytes(b"an int8 model of an earlier run")
    report = quantize_model_dir(directory, toy_data["train_images"], toy_data["val_images"], toy_data["val_masks"],
                                fast_config(max_delta_miou=-100.0))
    gate = json.loads((directory / "quantize.json").read_text())["gate"]
    assert gate == report["gate"] and gate["passed"] is False and "points below fp32" in gate["reason"]
    assert (directory / REJECTED_NAME).is_file() and report["int8_file"] == REJECTED_NAME
    assert not (directory / INT8_NAME).exists()  # nothing may pick up an int8 model this report rejects

    table = TableConfig(out_json=str(tmp_path / "c.json"), out_md=str(tmp_path / "c.md"))
    result = compression_table([{"backbone": "toy", "model_dir": str(directory)}], toy_data["train_images"],
                               toy_data["val_images"], toy_data["val_masks"], fast_config(), table)
    int8_row = result["rows"][1]
    assert result["tile_size"] == report["tile_size"] and int8_row["int8_source"] == "quantize stage"
    assert int8_row["int8_gate"]["passed"] is False
    md = (tmp_path / "c.md").read_text()
    assert "x (gate failed)" in md and "int8 gate failed for toy" in md and "used by no bundle" in md


def test_compression_table_rows_and_files(tmp_path, trained_dir, toy_data):
    from aerialseg.compression.prune import load_model_dir

    model, _ = load_model_dir(trained_dir)
    batches = [(get_spec(NAME).normalize(torch.from_numpy(np.stack(toy_data["train_images"][:6])).permute(0, 3, 1, 2)),
                torch.from_numpy(np.stack(toy_data["train_masks"][:6])).long())]
    model, plan = prune_model(model, batches, PruneConfig(iterations=1, ratio_per_iteration=0.3, score_batches=1,
                                                          example_size=SIZE))
    pruned_dir = save_pruned_model(model, tmp_path / "pruned", NAME, plan)
    table = TableConfig(tile_size=SIZE, out_json=str(tmp_path / "c.json"), out_md=str(tmp_path / "c.md"))
    result = compression_table([{"backbone": "ResNet18", "model_dir": str(trained_dir), "pruned_dir": str(pruned_dir)}],
                               toy_data["train_images"], toy_data["val_images"], toy_data["val_masks"], fast_config(),
                               table)
    rows = result["rows"]
    assert [(r["pruned"], r["quantized"]) for r in rows] == [(False, False), (False, True), (True, False), (True, True)]
    assert rows[2]["params_m"] < rows[0]["params_m"] and rows[2]["params_m"] == rows[3]["params_m"]
    assert rows[1]["size_mb"] < rows[0]["size_mb"] / 3
    assert all(r["mIoU"] is not None and r["bf1"] is not None and r["latency_ms"] > 0 for r in rows)
    assert rows[3]["int8_source"].startswith("built for the table")
    md = (tmp_path / "c.md").read_text()
    assert md.count("| ResNet18 |") == 4 and "BF1" in md
    assert json.loads((tmp_path / "c.json").read_text())["rows"] == rows


def test_compression_table_leaves_out_a_disabled_prune_stage_and_says_why(tmp_path, trained_dir, toy_data):
    from aerialseg.stages.prune import run as prune_run

    off = tmp_path / "pruned_off"
    prune_run({"prune": {"out": str(off)}})  # the default: disabled, prune.json only
    table = TableConfig(tile_size=SIZE, out_json=str(tmp_path / "c.json"), out_md=str(tmp_path / "c.md"))
    result = compression_table([{"backbone": "ResNet18", "model_dir": str(trained_dir), "pruned_dir": str(off)}],
                               toy_data["train_images"], toy_data["val_images"], toy_data["val_masks"], fast_config(),
                               table)
    assert [(r["pruned"], r["quantized"]) for r in result["rows"]] == [(False, False), (False, True)]
    assert result["skipped"] == [{"backbone": "ResNet18", "model_dir": str(off),
                                  "reason": json.loads((off / "prune.json").read_text())["reason"]}]
    assert "Not in the table: ResNet18 pruned" in (tmp_path / "c.md").read_text()
    (off / "prune.json").unlink()  # neither a model nor a marker: still an error
    with pytest.raises(AerialsegError, match="model directory not found"):
        compression_table([{"backbone": "R", "model_dir": str(trained_dir), "pruned_dir": str(off)}],
                          toy_data["train_images"], toy_data["val_images"], toy_data["val_masks"], fast_config(),
                          table)


def test_table_says_whether_pruning_kept_the_budget():
    def row(pruned, quantized, miou, ms, params):
        return {"backbone": "default", "pruned": pruned, "quantized": quantized, "mIoU": miou, "latency_ms": ms,
                "params_m": params, "pixel_accuracy": 0.8, "bf1": 0.5, "size_mb": 1.0}

    rows = [row(False, False, 0.6947, 122.2, 5.2), row(False, True, 0.6929, 75.7, 5.2),
            row(True, False, 0.6190, 72.3, 2.05), row(True, True, 0.6160, 51.4, 2.05)]
    md = table_markdown(rows, 512, 2, 21)
    assert "Pruning default: -7.6 mIoU points at 0.59x" in md and "**outside**" in md
    rows[2] = row(True, False, 0.6850, 90.0, 3.9)
    assert "-1.0 mIoU points at 0.74x" in (md := table_markdown(rows, 512, 2, 21)) and "within the budget" in md
    rows[2] = row(True, False, 0.6950, 130.0, 3.9)  # no loss but slower: no gain, outside
    assert "**outside**" in table_markdown(rows, 512, 2, 21)
    assert "Pruning" not in table_markdown(rows[:2], 512, 2, 21)  # no pruned rows, no verdict


def test_config_is_checked():
    with pytest.raises(AerialsegError, match="calibrate_method"):
        QuantizeConfig.from_params({"calibrate_method": "KL"})
    with pytest.raises(AerialsegError, match="unknown quantize key"):
        QuantizeConfig.from_params({"calibration_tile": 3})


def test_quantize_run_without_model_is_a_user_error(tmp_path):
    with pytest.raises(AerialsegError, match="model not found"):
        quantize_run({"quantize": {"model_dir": str(tmp_path / "missing")}})


def test_spread_indices():
    assert spread_indices(10, None) == list(range(10))
    assert spread_indices(10, 3) == [0, 4, 9] or spread_indices(10, 3) == [0, 5, 9]
    assert spread_indices(3, 10) == [0, 1, 2]


def dubai_crops(parts: list[int], scale: float = 0.25) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """64x64 crops of downscaled Dubai parts (real imagery and labels, mapped to the 5 classes)."""
    root = shared_path("dubai-aerial-cc0", "tile_1")
    images, masks = [], []
    for part in parts:
        image = cv2.cvtColor(cv2.imread(str(root / "images" / f"image_part_00{part}.jpg")), cv2.COLOR_BGR2RGB)
        rgb = cv2.cvtColor(cv2.imread(str(root / "masks" / f"image_part_00{part}.png")), cv2.COLOR_BGR2RGB)
        mask = np.full(rgb.shape[:2], 255, np.uint8)
        for colour, cls in DUBAI_COLORS.items():
            mask[(rgb == colour).all(-1)] = cls
        image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        mask = cv2.resize(mask, image.shape[1::-1], interpolation=cv2.INTER_NEAREST)
        for r in range(0, image.shape[0] - SIZE + 1, SIZE):
            for c in range(0, image.shape[1] - SIZE + 1, SIZE):
                images.append(image[r:r + SIZE, c:c + SIZE])
                masks.append(mask[r:r + SIZE, c:c + SIZE])
    return images, masks


def test_real_dubai_int8_within_one_miou_point(tmp_path):
    train_images, train_masks = dubai_crops([1, 2, 3, 4, 5, 6])
    val_images, val_masks = dubai_crops([7, 8, 9])
    torch.manual_seed(0)
    model = train_quickly(create_model(NAME), train_images, train_masks, epochs=4)
    directory = save_model(model, tmp_path / "dubai", NAME)
    report = quantize_model_dir(directory, train_images, val_images, val_masks,
                                fast_config(calibration_tiles=16, max_delta_miou=1.0))
    accuracy = report["accuracy"]
    assert accuracy["fp32"]["mIoU"] > 0.2  # better than chance on 5 classes after a few steps
    assert abs(accuracy["delta_miou_points"]) <= 1.0
    assert accuracy["prediction_agreement"] > 0.95


@pytest.mark.slow
def test_cli_prune_quantize_table_on_real_data_stages(tmp_path):
    """prune -> quantize (base and pruned) -> compression-table through the CLI on real Dubai stage outputs."""
    import yaml
    from typer.testing import CliRunner

    from aerialseg.stages.augment import run as augment_stage
    from aerialseg.cli import app
    from aerialseg.stages.split import run as split_stage
    from aerialseg.stages.tiles import run as tiles_stage
    from helpers.dubai import dubai_pairs, stage_params

    dubai_pairs(tmp_path, ("tile_2",))
    params = stage_params(tmp_path, tiles={"size": 128, "overlap": 0}, split={"block_px": 512})
    tiles_stage(params)
    split_stage(params)
    augment_stage(params)
    base, pruned = tmp_path / "models" / "base", tmp_path / "models" / "pruned"
    torch.manual_seed(0)
    save_model(create_model(NAME), base, NAME)
    params.update({
        "train": {"out": str(base), "loss": {"name": "ce"}},
        "prune": {"enabled": True, "out": str(pruned), "iterations": 2, "ratio_per_iteration": 0.2, "score_batches": 2,
                  "retrain_epochs": 1, "max_patches": 8, "batch_size": 4, "example_size": 128},
        "quantize": {"tile_size": 128, "calibration_tiles": 4, "val_tiles": 4, "max_delta_miou": 100.0,
                     "latency_runs": 1, "latency_warmup": 0, "threads": 1,
                     "table": {"entries": [{"backbone": "ResNet18", "model_dir": str(base), "pruned_dir": str(pruned)}],
                               "val_tiles": 4, "tile_size": 128, "out_json": str(tmp_path / "reports" / "c.json"),
                               "out_md": str(tmp_path / "reports" / "c.md")}},
    })
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params), encoding="utf-8")
    runner = CliRunner()
    for args in (["prune"], ["quantize"], ["quantize", "--model-dir", str(pruned)], ["compression-table"]):
        result = runner.invoke(app, [*args, "--params", str(params_file)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    prune_report = json.loads((pruned / "prune.json").read_text())
    assert prune_report["params_after"] < prune_report["params_before"]
    for directory in (base, pruned):
        report = json.loads((directory / "quantize.json").read_text())
        assert report["accuracy"]["tiles"] == 4 and report["calibration_tiles"] == 4
        assert (directory / INT8_NAME).is_file()
    assert json.loads((pruned / "quantize.json").read_text())["pruned"] is True
    rows = json.loads((tmp_path / "reports" / "c.json").read_text())["rows"]
    assert len(rows) == 4  # the int8 rows reuse what the quantize stage made, not a second quantization
    assert all(r.get("int8_source", "quantize stage") == "quantize stage" for r in rows)


def test_bench_models_quick(tmp_path, capsys):
    import importlib.util

    script = Path(__file__).parents[2] / "bench" / "bench_models.py"
    spec = importlib.util.spec_from_file_location("bench_models", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--quick", "--models", NAME, "--threads", "1", "--out", str(tmp_path / "b.json")])
    row = result["rows"][0]
    assert row["model"] == NAME and row["tile"] == 128
    assert row["gflops"] > 0 and row["params_m"] > 0
    assert row["torch_fp32_ms"] > 0 and row["onnx_fp32_ms"] > 0 and row["onnx_int8_ms"] > 0
    assert row["onnx_int8_mb"] < row["onnx_fp32_mb"] / 3
    assert json.loads((tmp_path / "b.json").read_text())["rows"] == result["rows"]
    out = capsys.readouterr().out
    assert NAME in out and ("no GPU" in out) == (not torch.cuda.is_available())
    with pytest.raises(AerialsegError, match="unknown model"):
        bench.main(["--quick", "--models", "nope", "--out", str(tmp_path / "x.json")])


def test_disabled_quantize_writes_only_its_record_and_the_table_says_not_run(tmp_path, monkeypatch):
    from aerialseg.stages import compression, quantize

    monkeypatch.setattr(compression, "data_fingerprint", lambda params: "this-data")  # no data stages here

    table = {"entries": [{"backbone": "default", "model_dir": str(tmp_path / "none")}],
             "out_json": str(tmp_path / "c.json"), "out_md": str(tmp_path / "c.md")}
    params = {"quantize": {"enabled": False, "out": str(tmp_path / "int8"), "table": table}}
    record = quantize.run(params)
    assert record["enabled"] is False and sorted(p.name for p in (tmp_path / "int8").iterdir()) == ["quantize.json"]
    compression.run(params)
    assert "not run" in (tmp_path / "c.md").read_text() and "quantize.enabled is false" in (tmp_path / "c.md").read_text()
    assert json.loads((tmp_path / "c.json").read_text())["data_fingerprint"] == "this-data"  # the report shows it
