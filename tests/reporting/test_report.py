"""The report stage on inputs built from real Dubai pixels: every section, missing inputs, bad inputs, CLI."""

import csv
import json
import re
from pathlib import Path

import cv2
import matplotlib.image as mpimg
import numpy as np
import pytest
from typer.testing import CliRunner

from aerialseg.core.classes import CLASS_NAMES, IGNORE
from aerialseg.cli import app
from aerialseg.core.errors import AerialsegError
from aerialseg.core.fileio import write_json
from aerialseg.evaluation.metrics import BoundaryF1, ConfusionMatrix
from aerialseg.reporting.report import load_class_shares
from aerialseg.stages.report import inputs, run as report_stage
from aerialseg.evaluation.stats import compare_runs, load_run, write_comparison
from conftest import shared_path
from helpers.dubai import DUBAI_COLORS
from helpers.runs import make_run

PATCH = 192
DATA = "d1" * 32  # the data fingerprint every input of the run under test carries
OTHER = "e2" * 32  # another survey's


def dubai_patches(n: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """n real image patches (N, H, W, 3) uint8 and their masks (N, H, W) from Dubai tile 2."""
    images, masks = [], []
    for part in ("001", "005", "009")[:n]:
        image = cv2.imread(str(shared_path("dubai-aerial-cc0", "tile_2", "images", f"image_part_{part}.jpg")))
        rgb_mask = cv2.imread(str(shared_path("dubai-aerial-cc0", "tile_2", "masks", f"image_part_{part}.png")))
        image, rgb_mask = image[:PATCH, :PATCH, ::-1], rgb_mask[:PATCH, :PATCH, ::-1]
        mask = np.full(image.shape[:2], IGNORE, np.uint8)
        for color, cls in DUBAI_COLORS.items():
            mask[np.all(rgb_mask == color, axis=-1)] = cls
        images.append(np.ascontiguousarray(image))
        masks.append(mask)
    return np.stack(images), np.stack(masks)


def fake_prediction(truth: np.ndarray, seed: int = 0) -> np.ndarray:
    """Truth with realistic errors: buildings grown by 3 px, a block of road called background, noise."""
    rng = np.random.default_rng(seed)
    pred = np.where(truth == IGNORE, 0, truth).astype(np.uint8)
    for i in range(len(pred)):
        grown = cv2.dilate((pred[i] == 4).astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
        pred[i][grown] = 4
        pred[i][40:80, 100:160][pred[i][40:80, 100:160] == 1] = 0
    noise = rng.random(pred.shape) < 0.02
    pred[noise] = rng.integers(0, 5, size=int(noise.sum()))
    return pred


def build_inputs(root: Path, optional: bool = True) -> dict:
    """Files as the evaluate stage writes them (metrics.json with BF1 and per-scene scores, confusion.json)
    from real masks, and when ``optional`` every optional input; returns the params."""
    images, truth = dubai_patches()
    pred = fake_prediction(truth)
    cm, bf1 = ConfusionMatrix(), BoundaryF1()
    cm.update(pred, truth)
    bf1.update(pred, truth)
    summary = cm.summary()
    matrix = summary.pop("confusion_matrix")
    per_scene = {"tile_2": {k: summary[k] for k in ("mIoU", "pixel_accuracy", "mF1", "iou", "pixels")}}
    write_json(root / "reports/metrics.json", {"split": "test", "model": "unet", "model_dir": "models/unet",
                                               "seed": 0, "patches": 3, **summary, **bf1.summary(),
                                               "per_scene": per_scene, "data_fingerprint": DATA})
    write_json(root / "reports/confusion.json", {"classes": list(CLASS_NAMES), "matrix": matrix,
                                                 "data_fingerprint": DATA})
    cfg = {"out": str(root / "reports/report.md"), "figures": str(root / "reports/figures"),
           "metrics": str(root / "reports/metrics.json"), "confusion": str(root / "reports/confusion.json"),
           "class_shares": str(root / "data/split/class_shares.json"),
           "history": str(root / "models/*/history.csv"), "samples": str(root / "reports/samples.npz"),
           "models": str(root / "reports/models.json"), "compare": str(root / "reports/compare.json"),
           "compression": str(root / "reports/compression.md"), "loso": str(root / "reports/loso/loso.md")}
    (root / "reports/loso").mkdir(parents=True, exist_ok=True)
    (root / "reports/loso/loso.md").write_text("# Leave-one-scene-out\n\n| fold | base |\n|---|---:|\n| 0 | 41.3 |\n")
    write_json(root / "reports/loso/loso.json", {"folds": [], "data_fingerprint": DATA})
    (root / "reports/compression.md").write_text("# Compression\n\n| P | Q | mIoU % |\n|---|---|---|\n|  | x | 45.3 |\n")
    write_json(root / "reports/compression.json", {"rows": [], "data_fingerprint": DATA})
    if not optional:
        return {"report": cfg}
    np.savez(root / "reports/samples.npz", images=images, truth=truth, pred=pred, ids=np.array(["a", "b", "c"]),
             data_fingerprint=np.asarray(DATA))
    write_json(root / "data/split/class_shares.json", {"classes": list(CLASS_NAMES), "data_fingerprint": DATA,
                                                       "splits": {
        split: {"patches": 10, "shares": {n: float(s) for n, s in zip(CLASS_NAMES, shares)}} for split, shares in
        (("train", [0.5, 0.15, 0.1, 0.1, 0.15]), ("val", [0.45, 0.2, 0.1, 0.05, 0.2]),
         ("test", [0.55, 0.1, 0.15, 0.1, 0.1]))}})
    for run, speed in (("unet", 1.0), ("pspnet", 1.4)):
        (root / "models" / run).mkdir(parents=True)
        write_json(root / "models" / run / "model.json", {"name": run, "training_data_sha256": DATA})
        with open(root / "models" / run / "history.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["epoch", "train_loss", "val_loss", "val_mIoU", "lr", "seconds"])
            for e in range(1, 11):
                writer.writerow([e, 1.2 / (e * speed) ** 0.5, 1.3 / (e * speed) ** 0.45,
                                 0.7 * (1 - np.exp(-e * speed / 3)), 1e-3 * (1 - e / 11) ** 0.9, 30.5])
    runs = [load_run(stamp(make_run(root / "seeds", m, s, q) / "metrics.json")) for s in (0, 1, 2)
            for m, q in (("unet", 0.8), ("pspnet", 0.75))]
    write_comparison({**compare_runs(runs), "made": "made at commit abc1234"}, root / "reports/compare.json")
    write_json(root / "reports/models.json", {"rows": [
        {"model": "unet", "source": str(root / "seeds/unet-0"), "tile": 512, "params_total_M": 5.2,
         "params_used_M": 5.2, "gflops": 9.1, "gmacs": 4.55, "cpu": {"median_ms": 300.0, "threads": 2}},
        {"model": "pspnet", "source": "registry (random init)", "tile": 512, "params_total_M": 11.35,
         "params_used_M": 0.85, "gflops": 11.6, "gmacs": 5.8, "cpu": {"median_ms": 97.0, "threads": 2},
         "onnx": {"median_ms": 41.0}}]})
    return {"report": cfg}


def stamp(path: Path, fingerprint: str | None = DATA) -> Path:
    """Set (or with None remove) a JSON file's data fingerprint; returns its folder."""
    record = json.loads(path.read_text())
    record.pop("data_fingerprint", None)
    write_json(path, {**record, **({"data_fingerprint": fingerprint} if fingerprint else {})})
    return path.parent


def figure_links(report: Path) -> list[Path]:
    return [report.parent / link for link in re.findall(r"!\[[^]]*\]\(([^)]+)\)", report.read_text())]


def test_full_report(tmp_path):
    params = build_inputs(tmp_path)
    report = report_stage(params)
    text = report.read_text()
    assert "_not run_" not in text
    for heading in ("Evaluation metrics", "Confusion matrix", "Class shares per split", "Training curves",
                    "Sample predictions", "Model table", "Multi-seed comparison", "Metric definitions"):
        assert f"## {heading}" in text
    metrics = json.loads((tmp_path / "reports/metrics.json").read_text())
    assert f"| mIoU (macro) | {metrics['mIoU']:.4f} |" in text
    assert f"boundary F1 (tolerance 2.0 px) | {metrics['bf1']:.4f}" in text
    assert "### Per scene" in text and f"| tile_2 | {metrics['mIoU']:.4f} |" in text
    own = json.loads((tmp_path / "seeds/unet-0/metrics.json").read_text())["mIoU"]  # the row's own run
    assert f"| 300.0 (2 thr) | – | {own:.4f} |" in text
    assert "| pspnet | registry (random init) | 11.350 | 0.850 |" in text
    assert "± " in text.split("## Model table")[1].split("\n\n")[2]  # seed mean joined for pspnet
    assert "(`aerialseg run-seeds`, made at commit abc1234)" in text.split("## Multi-seed comparison")[1]
    links = figure_links(report)
    assert len(links) == 6 and all(p.is_file() for p in links)
    for png in links:
        height, width = mpimg.imread(png).shape[:2]
        assert height > 250 and width > 400
    assert not list((tmp_path / "reports").rglob(".aerialseg-tmp-*"))


def test_missing_optional_inputs_say_not_run(tmp_path):
    params = build_inputs(tmp_path)
    report_stage(params)
    for name in ("reports/samples.npz", "reports/compare.json", "reports/models.json", "reports/compression.md",
                 "data/split/class_shares.json"):
        (tmp_path / name).unlink()
    for history in tmp_path.glob("models/*/history.csv"):
        history.unlink()
    (tmp_path / "reports/confusion.json").unlink()
    text = report_stage(params).read_text()
    assert text.count("_not run for this data_") == 7
    assert [p.name for p in figure_links(tmp_path / "reports/report.md")] == ["per_class_iou.png"]
    assert sorted(p.name for p in (tmp_path / "reports/figures").iterdir()) == ["per_class_iou.png"]


def test_confusion_in_metrics_and_image_key(tmp_path):
    """The other accepted layout: confusion_matrix inside metrics.json, samples.npz with ``image``."""
    params = build_inputs(tmp_path, optional=False)
    metrics = json.loads((tmp_path / "reports/metrics.json").read_text())
    confusion = tmp_path / "reports/confusion.json"
    metrics["confusion_matrix"] = json.loads(confusion.read_text())["matrix"]
    confusion.unlink()
    write_json(tmp_path / "reports/metrics.json", metrics)
    images, truth = dubai_patches(1)
    np.savez(tmp_path / "reports/samples.npz", image=images, truth=truth, pred=fake_prediction(truth),
             data_fingerprint=np.asarray(DATA))
    text = report_stage(params).read_text()
    assert "figures/confusion.png" in text and "figures/samples.png" in text


def test_missing_metrics_names_file_and_stage(tmp_path):
    with pytest.raises(AerialsegError, match=r"metrics\.json: metrics not found .*evaluate"):
        report_stage({"report": {"metrics": str(tmp_path / "metrics.json"), "out": str(tmp_path / "r.md")}})
    write_json(tmp_path / "metrics.json", {"hello": 1})
    with pytest.raises(AerialsegError, match="not a metrics file"):
        report_stage({"report": {"metrics": str(tmp_path / "metrics.json"), "out": str(tmp_path / "r.md")}})
    assert not (tmp_path / "r.md").exists()


def test_bad_samples_are_an_error(tmp_path):
    params = build_inputs(tmp_path, optional=False)
    np.savez(tmp_path / "reports/samples.npz", image=np.zeros((2, 8, 8, 3), np.uint8), truth=np.zeros((2, 8, 8)),
             data_fingerprint=np.asarray(DATA))
    with pytest.raises(AerialsegError, match="lacks array"):
        report_stage(params)
    np.savez(tmp_path / "reports/samples.npz", image=np.zeros((2, 8, 8, 3), np.uint8),
             truth=np.zeros((2, 8, 8), np.uint8), pred=np.zeros((2, 8, 9), np.uint8), data_fingerprint=np.asarray(DATA))
    with pytest.raises(AerialsegError, match="shapes do not fit"):
        report_stage(params)


@pytest.mark.parametrize("content", [
    {"train": {"background": 60, "road": 40}},  # percentages
    {"train": {"0": 600, "1": 400}},  # pixel counts keyed by class id
    {"shares": {"train": {"shares": {"background": 0.6, "road": 0.4}, "pixels": 1000}}},  # nested
    {"count_keys": ["background", "road", "ignore"], "classes": ["background", "road"],  # split stage
     "splits": {"train": {"patches": 3, "pixels": {"background": 6, "road": 4, "ignore": 9},
                          "shares": {"background": 0.6, "road": 0.4}, "ignore_fraction": 0.47}}},
])
def test_class_shares_are_read_leniently(tmp_path, content):
    write_json(tmp_path / "shares.json", content)
    assert load_class_shares(tmp_path / "shares.json") == {"train": pytest.approx({"background": 0.6, "road": 0.4})}
    assert load_class_shares(tmp_path / "missing.json") is None


def test_cli_report(tmp_path):
    params = build_inputs(tmp_path, optional=False)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(json.dumps(params))  # JSON is YAML
    result = CliRunner().invoke(app, ["report", "--params", str(params_file)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "reports/report.md").is_file()


def test_compression_table_is_embedded_when_present(tmp_path):
    from aerialseg.reporting.sections import compression_section

    missing = compression_section(tmp_path / "compression.md", DATA)
    assert "not run for this data" in missing
    table = tmp_path / "compression.md"
    table.write_text("# Compression\n\n| P | Q | mIoU % |\n|---|---|---|\n|  | x | 45.34 |\n")
    write_json(tmp_path / "compression.json", {"data_fingerprint": DATA})
    section = compression_section(table, DATA)
    assert "| 45.34 |" in section and "# Compression\n" not in section



def test_leave_one_scene_out_table_is_embedded_for_this_data(tmp_path):
    text = report_stage(build_inputs(tmp_path)).read_text()
    section = text.split("## Accuracy on a new area (leave-one-scene-out)\n\n", 1)[1].split("\n## ", 1)[0]
    assert "| 0 | 41.3 |" in section and "# Leave-one-scene-out" not in section


def test_default_history_is_the_runs_the_stage_depends_on(tmp_path):
    """report.history null: only the train and distil outputs are plotted, not stray experiment dirs."""
    params = {"train": {"out": str(tmp_path / "models/default")}, "distil": {"out": str(tmp_path / "models/st")}}
    assert inputs(params).history == [str(tmp_path / "models/default/history.csv"),
                                      str(tmp_path / "models/st/history.csv")]
    assert inputs({**params, "report": {"history": "runs/*/history.csv"}}).history == "runs/*/history.csv"


def test_inputs_of_other_data_say_not_run_for_this_data(tmp_path):
    """A user's survey report beside the sample's seed and compression tables (issue 22): no figure from them."""
    params = build_inputs(tmp_path)
    compare = json.loads((tmp_path / "reports/compare.json").read_text())
    seed_mean = f"{compare['models']['pspnet']['mIoU']['mean']:.4f} ± "
    write_json(tmp_path / "reports/compare.json", {**compare, "data_fingerprint": OTHER})
    stamp(tmp_path / "reports/compression.json", None)  # made before fingerprints
    stamp(tmp_path / "reports/loso/loso.json", OTHER)
    stamp(tmp_path / "data/split/class_shares.json", OTHER)
    stamp(tmp_path / "seeds/unet-0/metrics.json", OTHER)  # the model table row's own run
    write_json(tmp_path / "models/pspnet/model.json", {"name": "pspnet", "training_data_sha256": OTHER})
    text = report_stage(params).read_text()
    sections = {part.split("\n", 1)[0]: part for part in text.split("\n## ")[1:]}
    for heading in ("Multi-seed comparison", "Compression (pruning x int8)", "Class shares per split",
                    "Accuracy on a new area (leave-one-scene-out)"):
        assert sections[heading].split("\n\n")[1].startswith("_not run for this data_: `"), heading
    assert "was made from other data (data fingerprint e2e2e2e2e2e2, this run's d1d1d1d1d1d1)" in text
    assert "compression.json` carries no data fingerprint" in text
    assert seed_mean not in text and "45.3" not in text and "(n=3)" not in text and "41.3" not in text
    own = json.loads((tmp_path / "seeds/unet-0/metrics.json").read_text())["mIoU"]
    assert f"{own:.4f}" not in sections["Model table"]
    assert "Left out, trained on other data (model.json `training_data_sha256`): pspnet." in sections["Training curves"]
    assert "| unet | 10 |" in sections["Training curves"] and "| pspnet |" not in sections["Training curves"]
    assert "### Multi-seed statistics" not in text
    names = sorted(p.name for p in (tmp_path / "reports/figures").iterdir())
    assert "seeds.png" not in names and "class_shares.png" not in names and "training_curves.png" in names


def test_evaluation_without_fingerprint_shows_only_its_own_figures(tmp_path):
    params = build_inputs(tmp_path)
    stamp(tmp_path / "reports/metrics.json", None)
    text = report_stage(params).read_text()
    assert "no data fingerprint (evaluation.json predates fingerprints" in text
    assert text.count("_not run for this data_") == 7  # all but the model table (architecture figures)


def test_not_labelled_classes_are_named_and_left_out_of_the_headline(tmp_path):
    params = build_inputs(tmp_path, optional=False)
    metrics = json.loads((tmp_path / "reports/metrics.json").read_text())
    iou = {**metrics["iou"], "road": None, "water": None}
    write_json(tmp_path / "reports/metrics.json", {**metrics, "iou": iou, "mIoU": 0.443, "mIoU_all_classes": 0.266,
                                                   "not_labelled": ["road", "water"]})
    write_json(tmp_path / "data/split/class_shares.json", {"data_fingerprint": DATA, "not_labelled": ["road", "water"],
                                                         "splits": {"train": {"background": 5, "tree": 3}}})
    text = report_stage(params).read_text()
    assert "**Not labelled: road, water** — no labelled pixels in the training data" in text
    assert "(over every class present in truth or map, mIoU would be 0.2660)" in text
    assert "| mIoU (macro) | 0.4430 |" in text
    assert "| road | not labelled |" in text and "| water | not labelled |" in text
    assert "Not labelled (no pixel in the train split): road, water." in text


def test_seed_comparison_carries_the_runs_data_fingerprint(tmp_path):
    runs = [stamp(make_run(tmp_path, "unet", s, 0.8) / "metrics.json") for s in (0, 1)]
    assert compare_runs([load_run(r) for r in runs])["data_fingerprint"] == DATA
    stamp(runs[1] / "metrics.json", OTHER)
    result = compare_runs([load_run(r) for r in runs])
    assert result["data_fingerprint"] is None and any("different data" in w for w in result["warnings"])
