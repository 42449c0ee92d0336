"""The `aerialseg` command: one thin command per pipeline stage, no logic of its own.

Every command reads its knobs from params.yaml (``--params``) unless a flag overrides them.
Input problems print one line, ``error: <file>: <what> — fix: <how>``, and exit with code 2.
"""

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

import aerialseg  # noqa: F401  (offline defaults and the torchvision fix come first)
from aerialseg.core.errors import AerialsegError
from aerialseg.core.terminal import HeldStderr, quiet_libraries, user_error

app = typer.Typer(
    help="aerialseg: labelled drone surveys -> land-cover models -> georeferenced maps.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

ParamsOpt = Annotated[Path, typer.Option("--params", help="params.yaml to read the stage's knobs from.")]


@app.callback()
def _root(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
          trust_unverified: Annotated[bool, typer.Option(
              "--trust-unverified", help="Run bundles without bundle.json (nothing verified).")] = False) -> None:
    """Turn AnyLabeling labels on drone orthophotos into models and full-scene maps."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s")
    if trust_unverified:
        os.environ["AERIALSEG_TRUST_UNVERIFIED"] = "1"  # inference.bundle.TRUST_ENV (read where bundles open)


# --- data path: labels -------------------------------------------------------------------

@app.command("label-to-mask")
def label_to_mask_command(
    labels: Annotated[list[Path] | None, typer.Argument(
        help="AnyLabeling/labelme JSON files, folders of them, or globs [data.labels].")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Output folder [masks.out].")] = None,
    images: Annotated[Path | None, typer.Option(
        "--images", help="Folder to look up images whose imagePath does not resolve [data.images].")] = None,
    allow_ungeoreferenced: Annotated[bool | None, typer.Option(
        "--allow-ungeoreferenced/--no-allow-ungeoreferenced",
        help="Accept TIFF scenes without georeferencing (plain PNG masks) [masks.allow_ungeoreferenced].")] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace files in --out that the previous run (index.json) did not write.")] = False,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Paint label JSON into class masks as the annotation tools do (GeoTIFF on the scene grid, else PNG)."""
    from aerialseg.core.config import load_params
    from aerialseg.stages import masks

    written = masks.run(load_params(params), labels=labels, out=out, images=images,
                        allow_ungeoreferenced=allow_ungeoreferenced, overwrite=overwrite)
    typer.echo(f"wrote {len(written)} mask(s) and {Path(written[0]).parent / 'index.json'}")


@app.command("mask-to-label")
def mask_to_label_command(
    masks: Annotated[list[Path], typer.Argument(help="Class masks (GeoTIFF or PNG of class ids 0-4, 255).")],
    out: Annotated[Path | None, typer.Option("--out", help="Output folder [the image's folder].")] = None,
    image: Annotated[Path | None, typer.Option(
        "--image", help="The image (one mask) or a folder of images named like the masks.")] = None,
    min_area: Annotated[float | None, typer.Option(
        "--min-area", help="Drop regions smaller than this many pixels [masks.min_area_px].")] = None,
    simplify: Annotated[float | None, typer.Option(
        "--simplify", help="Polygon simplification in px (Douglas-Peucker); 0 is exact [masks.simplify_px].")] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace an existing label file (it may hold hand labels).")] = False,
    backup: Annotated[bool, typer.Option(
        "--backup/--no-backup", help="With --overwrite, keep the old file as <name>.<time>.bak.")] = True,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Polygonise class masks into AnyLabeling JSON that label-to-mask (and labelme, X-AnyLabeling) paint back."""
    from aerialseg.core.config import load_params
    from aerialseg.stages import mask_to_label

    for path in mask_to_label.run(load_params(params), masks, out, image, simplify, min_area, overwrite, backup):
        typer.echo(f"wrote {path}")


# --- data path: tiles, split, augment ----------------------------------------------------

@app.command("tiles")
def tiles_command(params: ParamsOpt = Path("params.yaml")) -> None:
    """Index overlapping patch windows of every masked scene (data/tiles/manifest.json); drop empty ones."""
    from aerialseg.core.config import load_params
    from aerialseg.data.tiling import describe, load_manifest
    from aerialseg.stages import tiles

    manifest = tiles.run(load_params(params))
    typer.echo(describe(load_manifest(manifest)))
    typer.echo(f"wrote {manifest}")


@app.command("split")
def split_command(params: ParamsOpt = Path("params.yaml")) -> None:
    """Seeded train/val/test split of the patches by scene or spatial block, with no shared pixel."""
    from aerialseg.core.config import load_params
    from aerialseg.stages import split

    typer.echo(f"wrote {split.run(load_params(params))}")


@app.command("augment")
def augment_command(params: ParamsOpt = Path("params.yaml")) -> None:
    """Write augment.copies augmented copies of each train patch (data/augmented/*.npz + index.json)."""
    from aerialseg.stages import augment
    from aerialseg.core.config import load_params

    typer.echo(f"wrote {augment.run(load_params(params))}")


# --- models: pretrain, train, distil, evaluate, report ------------------------------------

OutOpt = Annotated[Path | None, typer.Option("--out", help="Output directory (default from params.yaml).")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue from OUT/checkpoints/last.pt.")]


@app.command("pretrain")
def pretrain_command(params: ParamsOpt = Path("params.yaml"), out: OutOpt = None, resume: ResumeOpt = False) -> None:
    """Pretrain model.name on OpenEarthMap (pretrain.root), remapped to the 5 classes [pretrain]."""
    from aerialseg.core.config import load_params
    from aerialseg.stages import pretrain

    typer.echo(pretrain.message(pretrain.run(load_params(params), out, resume=resume)))


@app.command("train")
def train_command(
    params: ParamsOpt = Path("params.yaml"),
    model: Annotated[str | None, typer.Option(help="Registered model name [model.name].")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed [train.seed].")] = None,
    epochs: Annotated[int | None, typer.Option(help="Number of epochs [train.epochs].")] = None,
    out: Annotated[Path | None, typer.Option(help="Run directory [train.out].")] = None,
    resume: ResumeOpt = False,
) -> None:
    """Train on the train split, validate on val; writes the run dir (model, checkpoints, curves)."""
    from aerialseg.core.config import load_params
    from aerialseg.stages import train

    summary = train.run(load_params(params), model, seed, epochs, out, resume=resume)
    typer.echo(f"{summary['model']}: best val mIoU {summary['best_val_mIoU']:.4f} at epoch {summary['best_epoch']} "
               f"({summary['epochs_run']} epochs, {summary['seconds_per_epoch']:.1f} s/epoch)")


@app.command("distil")
def distil_command(
    params: ParamsOpt = Path("params.yaml"),
    teacher: Annotated[Path | None, typer.Option(help="Trained teacher model dir [distil.teacher].")] = None,
    student: Annotated[str | None, typer.Option(help="Student model name [distil.student].")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed [train.seed].")] = None,
    out: Annotated[Path | None, typer.Option(help="Student run directory [distil.out].")] = None,
    resume: ResumeOpt = False,
) -> None:
    """Distil a frozen teacher into a student: task loss + alpha * T^2 * KL [distil]."""
    from aerialseg.core.config import load_params
    from aerialseg.stages import distil

    summary = distil.run(load_params(params), out, resume, teacher, student, seed)
    typer.echo(f"{summary['model']}: best val mIoU {summary['best_val_mIoU']:.4f}, agreement with the teacher "
               f"{summary.get('val_agreement_with_teacher', float('nan')):.4f}")


@app.command("evaluate")
def evaluate_command(
    params: ParamsOpt = Path("params.yaml"),
    model: Annotated[Path | None, typer.Option(help="Bundle or trained model dir [evaluate.model].")] = None,
    split: Annotated[str | None, typer.Option(help="train | val | test [evaluate.split].")] = None,
    out: Annotated[Path | None, typer.Option(help="Where metrics.json, confusion.json, samples.npz go "
                                                  "[evaluate.out].")] = None,
) -> None:
    """Metrics of the stitched scene maps (infer-scene's path) on a split; writes metrics.json."""
    from aerialseg.core.config import load_params
    from aerialseg.stages import evaluate

    metrics = evaluate.run(load_params(params), model, split, out)
    typer.echo(f"{metrics['model_dir']} on {metrics['split']}: mIoU {metrics['mIoU']}, pixel accuracy "
               f"{metrics['pixel_accuracy']}, BF1 {metrics['bf1']}")


@app.command("loso")
def loso_command(
    params: ParamsOpt = Path("params.yaml"), out: OutOpt = None,
    folds: Annotated[str | None, typer.Option(help="Folds, e.g. 0,2 (scenes by name) [loso.folds: all].")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs per fold [loso.epochs, else train.epochs].")] = None,
    profile: Annotated[str | None, typer.Option(help="Profile merged over params, e.g. quick [loso.profile].")] = None,
    adapt: Annotated[list[str] | None, typer.Option(help="Also score adabn|tent|self|all [loso.adapt].")] = None,
) -> None:
    """Leave-one-scene-out: train on the other scenes, map each held-out scene whole, mIoU mean ± std."""
    from aerialseg.core.config import load_params
    from aerialseg.stages import loso

    record = loso.run(load_params(params), folds, epochs, adapt, out, profile)
    typer.echo(" ".join(f"{k}: mIoU {v['mIoU_mean']} ± {v['mIoU_std']};" for k, v in record["summary"].items()))


@app.command("adapt")
def adapt_command(
    scenes: Annotated[list[Path], typer.Argument(help="Unlabelled target scenes (GeoTIFF, any size).")],
    model: Annotated[Path, typer.Option("--model", help="Bundle dir or .zip, or a trained model dir.")],
    out: Annotated[Path, typer.Option("--out", help="The adapted bundle (a folder, or .zip); never the input.")],
    method: Annotated[str | None, typer.Option(help="adabn | tent | self | all [adapt.method].")] = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Adapt a model to unlabelled scenes (AdaBN, TENT, self-training) and write a new verified bundle."""
    from aerialseg.core.config import load_params
    from aerialseg.stages import adapt as stage

    typer.echo(stage.summary(stage.run(load_params(params), model, scenes, out, method)))


@app.command("compare")
def compare_command(
    run_dirs: Annotated[list[Path], typer.Argument(help="Directories of evaluated runs (metrics.json + model/seed); "
                                                   "LABEL=DIR names the group.")],
    out: Annotated[Path | None, typer.Option(help="JSON to write; .md and .png go beside it [stats.out].")] = None,
    metric: Annotated[str | None, typer.Option(help="Primary metric [stats.primary].")] = None,
    baseline: Annotated[str | None, typer.Option(help="Compare every model with this one only.")] = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Mean ± std over seeds per model and paired tests between models."""
    from aerialseg.core.config import load_params
    from aerialseg.stages import seeds

    path = seeds.compare(load_params(params), run_dirs, out=out, primary=metric, baseline=baseline)
    typer.echo(f"wrote {path} ({path.with_suffix('.md').name}, {path.with_suffix('.png').name})")


@app.command("run-seeds")
def run_seeds_command(
    model: Annotated[list[str] | None, typer.Option("--model", help="Model name, repeatable [stats.models].")] = None,
    seed: Annotated[list[int] | None, typer.Option("--seed", help="Seed, repeatable [stats.seeds].")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs per run [stats.epochs].")] = None,
    runs_dir: Annotated[Path | None, typer.Option(help="Where runs go: DIR/<model>/seed<N> [stats.runs_dir].")] = None,
    out: Annotated[Path | None, typer.Option(help="Comparison JSON to write [stats.out].")] = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Train and evaluate each (model, seed) through the CLI, then compare them."""
    from aerialseg.core.config import load_params
    from aerialseg.stages import seeds

    run_dirs, path = seeds.run(load_params(params), model, seed, epochs, runs_dir, out, params_path=params)
    typer.echo(f"wrote {path} ({len(run_dirs)} runs)")


@app.command("profile-models")
def profile_models_command(
    model: Annotated[list[str] | None, typer.Option("--model", help="Registered name or model dir, repeatable "
                                                    "[report.profile.models].")] = None,
    tile: Annotated[int | None, typer.Option(help="Tile size in pixels [report.profile.tile].")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads, 0 = all [report.profile.threads].")] = None,
    runs: Annotated[int | None, typer.Option(help="Timed runs per model [report.profile.runs].")] = None,
    onnx: Annotated[list[str] | None, typer.Option("--onnx", help="MODEL=FILE.onnx: also time ONNX Runtime.")] = None,
    out: Annotated[Path | None, typer.Option(help="JSON to write; .md beside it [report.profile.out].")] = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Model table: parameters (total, used), GFLOPs at a tile size, CPU latency per tile."""
    from aerialseg.core.config import load_params
    from aerialseg.stages import profile

    pairs = [item.split("=", 1) for item in onnx or []]
    if any(len(pair) != 2 for pair in pairs):
        raise AerialsegError("--onnx takes MODEL=FILE.onnx", fix="e.g. --onnx pspnet=models/pspnet.onnx")
    path = profile.run(load_params(params), models=model, out=out, tile=tile, threads=threads, runs=runs,
                         onnx=dict(pairs))
    typer.echo(f"wrote {path} ({path.with_suffix('.md').name})")


@app.command("report")
def report_command(params: ParamsOpt = Path("params.yaml")) -> None:
    """reports/report.md with figures: metrics, confusion matrix, curves, samples, model table, seeds."""
    from aerialseg.core.config import load_params
    from aerialseg.stages import report

    typer.echo(f"wrote {report.run(load_params(params))}")


# --- inference: infer-scene, bundle -------------------------------------------------------

@app.command("infer-scene")
def infer_scene_command(
    scene: Annotated[Path, typer.Argument(help="Orthophoto (GeoTIFF, any size) to map.")],
    model: Annotated[Path | None, typer.Option("--model", help="Bundle dir or .zip (or a trained model dir) "
                                                "[infer.model].")] = None,
    out: Annotated[Path | None, typer.Option(help="Output map [infer.out_dir/<scene>_landcover.tif; "
                                             "anylabeling: <scene>.json].")] = None,
    overlap: Annotated[int | None, typer.Option(help="Tile overlap in px [the bundle's].")] = None,
    batch: Annotated[int | None, typer.Option(help="Tiles per forward pass [infer.batch].")] = None,
    tta: Annotated[bool | None, typer.Option("--tta/--no-tta", help="Flip TTA [infer.tta].")] = None,
    backend: Annotated[str | None, typer.Option(help="torch | onnx [infer.backend].")] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda [infer.device].")] = None,
    confidence: Annotated[bool | None, typer.Option("--confidence/--no-confidence",
                                                    help="Also write max-probability x 255 [infer.confidence].")] = None,
    vectors: Annotated[bool | None, typer.Option("--vectors/--no-vectors",
                                                 help="Also write polygons (GeoPackage) [infer.vectors].")] = None,
    areas: Annotated[bool | None, typer.Option("--areas/--no-areas",
                                               help="Also write per-class areas JSON [infer.areas].")] = None,
    fmt: Annotated[str | None, typer.Option("--format", help="geotiff | anylabeling [infer.format].")] = None,
    resample: Annotated[bool | None, typer.Option("--resample/--no-resample", help="Read at the training GSD "
                                                  "when the scene's differs > gsd_tolerance [infer.resample].")] = None,
    allow_ungeoreferenced: Annotated[bool | None, typer.Option(
        "--allow-ungeoreferenced/--no-allow-ungeoreferenced",
        help="Map a TIFF without CRS/geotransform on its pixel grid (plain JPEG/PNG need no flag) "
             "[infer.allow_ungeoreferenced].")] = None,
    overwrite: Annotated[bool | None, typer.Option(
        "--overwrite/--no-overwrite", help="--format anylabeling: replace an existing label file "
        "[infer.overwrite].")] = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Map a whole scene: seam-free tiles, constant memory, a COG on the scene's grid (QGIS-ready)."""
    from aerialseg.core.config import load_params
    from aerialseg.stages import infer_scene

    typer.echo(infer_scene.run(load_params(params), scene, model, out, overlap=overlap, batch=batch, tta=tta,
                               backend=backend, device=device, confidence=confidence, vectors=vectors, areas=areas,
                               format=fmt, resample=resample, allow_ungeoreferenced=allow_ungeoreferenced,
                               overwrite=overwrite).summary())


@app.command("bundle")
def bundle_command(
    model_dir: Annotated[Path, typer.Argument(help="Trained model dir (model.safetensors + model.json).")],
    out: Annotated[Path | None, typer.Option(help="Bundle dir (or .zip with --zip) [bundle.out; null = in place].")] = None,
    archive: Annotated[bool | None, typer.Option("--zip/--no-zip", help="Write a .zip [bundle.zip].")] = None,
    onnx: Annotated[bool | None, typer.Option("--onnx/--no-onnx",
                                              help="Export model.onnx + model.deepness.onnx [bundle.onnx].")] = None,
    tile_size: Annotated[int | None, typer.Option(help="Tile size [bundle.tile_size; null = the model's].")] = None,
    overlap: Annotated[int | None, typer.Option(help="Tile overlap px [bundle.overlap].")] = None,
    gsd_m: Annotated[float | None, typer.Option(help="Training GSD m/px [bundle.gsd_m; null = data.gsd_m].")] = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Package a trained model for infer-scene / QGIS: weights, ONNX, manifest (classes, GSD, tiles, metrics)."""
    from aerialseg.core.config import load_params
    from aerialseg.stages import bundle

    path = bundle.run(load_params(params), model_dir, out, archive, onnx, tile_size, overlap, gsd_m)
    typer.echo(f"wrote bundle {path}")


@app.command("export-onnx")
def export_onnx_command(
    model_dir: Annotated[Path, typer.Argument(help="Bundle or trained model dir.")],
    out: Annotated[Path | None, typer.Option(help="ONNX file [MODEL_DIR/model.onnx]; "
                                                  "*.deepness.onnx goes beside it.")] = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """ONNX at the bundle's tile size: logits for infer-scene, and *.deepness.onnx for QGIS; both checked."""
    from aerialseg.core.config import load_params
    from aerialseg.stages import bundle

    typer.echo(bundle.export_onnx(load_params(params), model_dir, out))


# --- seed models: postprocess, prune, export, quantize ------------------------------------

@app.command("postprocess")
def postprocess_command(
    class_raster: Annotated[Path, typer.Argument(help="Single-band class raster (GeoTIFF), e.g. from infer-scene.")],
    out: Annotated[Path | None, typer.Option(help="Output folder [postprocess.out].")] = None,
    classes: Annotated[str | None, typer.Option(help="Classes to count, ids or names, comma-separated "
                                                "[postprocess.classes].")] = None,
    min_area: Annotated[float | None, typer.Option(help="Keep objects this large or larger "
                                                   "[postprocess.min_area].")] = None,
    max_area: Annotated[float | None, typer.Option(help="Keep objects this large or smaller "
                                                   "[postprocess.max_area].")] = None,
    min_aspect: Annotated[float | None, typer.Option(help="Min bbox long/short side "
                                                     "[postprocess.min_aspect].")] = None,
    max_aspect: Annotated[float | None, typer.Option(help="Max bbox long/short side "
                                                     "[postprocess.max_aspect].")] = None,
    area_unit: Annotated[str | None, typer.Option(help="Unit of the area filter: px | m2 "
                                                  "[postprocess.area_unit].")] = None,
    band_rows: Annotated[int | None, typer.Option(help="Rows read per band [postprocess.band_rows].")] = None,
    clean: Annotated[bool | None, typer.Option("--clean/--no-clean", help="Also write the raster without the "
                                               "filtered-out objects [postprocess.clean].")] = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Objects per class (8-connected): count, area, centroid, bbox, aspect ratio -> GeoJSON + CSV."""
    from aerialseg.core.config import load_params
    from aerialseg.stages import postprocess

    summary = postprocess.run(load_params(params), class_raster, out=out, classes=classes, min_area=min_area,
                              max_area=max_area, min_aspect=min_aspect, max_aspect=max_aspect,
                              area_unit=area_unit, band_rows=band_rows, clean=clean)
    typer.echo(f"{summary['kept']} of {summary['objects']} objects kept; wrote {summary['files']['geojson']}, "
               f"{summary['files']['csv']}")


@app.command("prune")
def prune_command(
    model_dir: Annotated[Path | None, typer.Option("--model-dir", help="Trained model [prune.model_dir].")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Output model folder [prune.out].")] = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Taylor filter pruning (real channel removal) + fine-tune -> pruned model dir + prune.json."""
    from aerialseg.core.config import load_params
    from aerialseg.stages import prune

    report = prune.run(load_params(params), model_dir=model_dir, out_dir=out)
    if not report["enabled"]: return typer.echo(f"pruning disabled: {report['reason']}")  # noqa: E701
    typer.echo(f"pruned {report['model']}: {report['params_before'] / 1e6:.2f} M -> "
               f"{report['params_after'] / 1e6:.2f} M parameters, loss {report['loss_before']:.4f} -> "
               f"{report['loss_after_pruning']:.4f} (pruned) -> {report['loss_after_retrain']:.4f} (retrained); "
               f"wrote {report['out']}")


@app.command("quantize")
def quantize_command(
    model_dir: Annotated[Path | None, typer.Option("--model-dir",
                                                   help="Model to quantize [quantize.model_dir].")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Output folder [quantize.out, else the model dir; "
                                             "ignored with --model-dir unless given].")] = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Static int8 (ONNX Runtime QDQ, calibrated), fp32-parity and ΔmIoU gates -> model.int8.onnx (or .rejected)."""
    from aerialseg.core.config import load_params
    from aerialseg.stages import quantize

    report = quantize.run(load_params(params), model_dir=model_dir, out_dir=out)
    if not report.get("enabled", True):
        typer.echo(f"not run: {report['reason']}")
        return
    acc, lat = report["accuracy"], report["latency_ms"]
    if not report["gate"]["passed"]:
        typer.echo(f"int8 gate failed: {report['gate']['reason']} (a result: the int8 model is used by nothing)")
    typer.echo(f"wrote {Path(report['out_dir']) / report['int8_file']} ({report['size_mb']['onnx_int8']:.2f} MB): "
               f"mIoU fp32 {100 * acc['fp32']['mIoU']:.2f} / int8 {100 * acc['int8']['mIoU']:.2f} "
               f"(Δ {acc['delta_miou_points']:.2f} points); {lat['onnx_int8']:.1f} ms/tile vs PyTorch fp32 "
               f"{lat['torch_fp32']:.1f} ms ({lat['speedup_int8_vs_torch']:.2f}x, {lat['threads']} threads)")


@app.command("compression-table")
def compression_table_command(params: ParamsOpt = Path("params.yaml")) -> None:
    """Backbone x pruned x quantized table (paper Table II) -> reports/compression.{json,md}."""
    from aerialseg.core.config import load_params
    from aerialseg.stages import compression

    result = compression.run(load_params(params))
    typer.echo(f"{len(result['rows'])} rows; wrote {result['out_json']}, {result['out_md']}")


# --- model-assisted labelling: serve, rank-scenes ------------------------------------------

@app.command("serve")
def serve_command(
    model: Annotated[list[Path], typer.Option("--model", help="Bundle dir or .zip; repeat for several models "
                                              "(model id = its folder or file name).")],
    host: Annotated[str | None, typer.Option(help="Address to bind [serve.host: 127.0.0.1, this machine "
                                             "only].")] = None,
    port: Annotated[int | None, typer.Option(help="Port [serve.port; 0 = any free port].")] = None,
    api_key_file: Annotated[Path | None, typer.Option(
        "--api-key-file", help="File holding the API key (else $AERIALSEG_API_KEY; none = no key).")] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda [serve.device].")] = None,
    workers: Annotated[int | None, typer.Option(help="Inference threads [serve.workers].")] = None,
    queue: Annotated[int | None, typer.Option(help="Requests admitted at once; more get 503 [serve.queue].")] = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Serve bundles to X-AnyLabeling (its Remote-Server model): pre-label images while you annotate."""
    from aerialseg.core.config import load_params, section
    from aerialseg.inference.server import ServeOptions, read_api_key, serve

    options = ServeOptions.from_params(section(load_params(params), "serve"), host=host, port=port, device=device,
                                       workers=workers, queue=queue)
    serve(model, options, read_api_key(api_key_file, dict(os.environ)))


@app.command("rank-scenes")
def rank_scenes_command(
    scenes: Annotated[list[Path], typer.Argument(help="Unlabelled orthophotos (GeoTIFF) to rank windows of.")],
    model: Annotated[Path, typer.Option("--model", help="Bundle dir or .zip (`aerialseg bundle`).")],
    out: Annotated[Path | None, typer.Option(help="Output folder [rank.out].")] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", help="Windows to write [rank.top_k].")] = None,
    window: Annotated[int | None, typer.Option(help="Window side, px [rank.window].")] = None,
    crops: Annotated[bool | None, typer.Option("--crops/--no-crops", help="Write each window's GeoTIFF + "
                                               "AnyLabeling pre-label [rank.crops].")] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda [rank.device].")] = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Which windows to label next: model uncertainty (rare classes weighted) -> CSV, GeoPackage, pre-labels."""
    from aerialseg.core.config import load_params, section
    from aerialseg.inference.ranking import RankOptions, rank_scenes

    options = RankOptions.from_params(section(load_params(params), "rank"), out=str(out) if out else None,
                                      top_k=top_k, window=window, crops=crops, device=device)
    typer.echo(rank_scenes(scenes, model, options).summary())


@app.command("infer-survey")
def infer_survey_command(
    scenes: Annotated[list[Path] | None, typer.Argument(help="GeoTIFFs, folders, globs or list files "
                                                        "[survey.scenes in survey.scenes_dir].")] = None,
    model: Annotated[Path | None, typer.Option(help="Bundle dir or .zip [infer.model].")] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder [survey.out].")] = None,
    workers: Annotated[int | None, typer.Option(help="Local worker processes [survey.workers].")] = None,
    threads_per_worker: Annotated[int | None, typer.Option(help="[survey.threads_per_worker]")] = None,
    scheduler: Annotated[str | None, typer.Option(help="Existing Dask scheduler address [survey.scheduler].")] = None,
    vectors: Annotated[bool | None, typer.Option("--vectors/--no-vectors", help="[infer.vectors]")] = None,
    backend: Annotated[str | None, typer.Option(help="torch | onnx [infer.backend].")] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda [infer.device].")] = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Map a whole survey on Dask: resumable (survey.json), VRT mosaic, merged polygons and areas; exit 1 if
    some scenes failed."""
    from aerialseg.core.config import load_params
    from aerialseg.stages import survey

    done = survey.run(load_params(params), scenes, model, out=str(out) if out else None, workers=workers,
                      threads_per_worker=threads_per_worker, scheduler=scheduler, vectors=vectors, backend=backend,
                      device=device)
    typer.echo(survey.summary(done))
    for line in survey.errors(done):
        typer.echo(f"error: {line}", err=True)
    if done["failed"] or done["products"]["errors"]:
        raise typer.Exit(1)


@app.command("init")
def init_command(
    project: Annotated[Path, typer.Argument(help="Folder of the new survey project (git + DVC).")],
    labels: Annotated[Path, typer.Option("--labels", help="Folder of AnyLabeling/labelme JSON files.")],
    images: Annotated[Path, typer.Option("--images", help="Folder of the scenes (GeoTIFF, JPEG, PNG).")],
    scenes: Annotated[list[str] | None, typer.Option("--scenes", help="Globs of the scenes to map, in the "
                                                     "images folder [every scene].")] = None,
    copy: Annotated[bool, typer.Option("--copy", help="Copy labels and scenes into the project (scenes "
                                       "tracked by DVC); default: use them where they are.")] = False,
) -> None:
    """Create a survey project: the pipeline, params.yaml with your paths (comments kept), git and DVC."""
    from aerialseg.stages import init

    plan = init.run(project, labels, images, scenes, copy)
    typer.echo(f"survey project in {plan.project} (GSD {plan.gsd_m or 'unknown'} m): cd {plan.project} && dvc repro; "
               "then git add -A && git commit")


@app.command("apply-profile")
def apply_profile_command(
    profile: Annotated[str, typer.Argument(help="Profile name (profiles/NAME.yaml) or a YAML file of params sections.")],
    out: Annotated[Path, typer.Option(help="Params file to write; `dvc repro` reads params.yaml.")] = Path(
        "params.yaml"),
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Merge a profile (e.g. ci, gpu) over params into OUT, so `dvc repro` runs it and dvc.lock records it.

    Only the keys the profile sets change: every other line, comment and the layout stay as they were. The
    file replaced is kept as OUT.bak (an existing backup is never overwritten).
    """
    from aerialseg.stages import apply_profile

    typer.echo(apply_profile.run(profile, out, params))


RASTER_COMMANDS = {"label-to-mask", "mask-to-label", "infer-scene", "infer-survey", "tiles", "postprocess", "evaluate"}


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    sys.exit(2)


def main() -> None:
    """Console-script entry point: user errors become one line on stderr and exit code 2."""
    quiet_libraries()
    held = HeldStderr() if HeldStderr.wanted(RASTER_COMMANDS) else None
    try:
        app()
    except SystemExit:
        if held:
            held.release(show=True)
        raise
    except KeyboardInterrupt:
        if held:
            held.release(show=False)
        typer.echo("interrupted: no output was written", err=True)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001  (only errors the user can fix become one line)
        error = user_error(exc)
        if held:
            held.release(show=error is None)
        if error is None:
            raise
        _fail(str(error))
    finally:
        if held:
            held.release(show=True)


if __name__ == "__main__":
    main()
