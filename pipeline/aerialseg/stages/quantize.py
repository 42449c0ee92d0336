"""quantize stage (`aerialseg quantize`, params ``quantize``): ONNX Runtime static int8, gated on ΔmIoU.

``--out BUNDLE`` (a folder with bundle.json) quantizes into a bundle: its weights must be the model's, and
bundle.json then lists the int8 files with checksums and says whether serve may run them (``int8``)."""

import logging
from pathlib import Path
from typing import Any

import numpy as np

from aerialseg.compression.quantize import DISABLED_REASON, REPORT_NAME, QuantizeConfig, quantize_model_dir
from aerialseg.core.config import section
from aerialseg.core.errors import AerialsegError
from aerialseg.core.fileio import sha256_file, write_json
from aerialseg.core.paths import data_stage_outputs, train_out_dir
from aerialseg.data.datasets import split_arrays
from aerialseg.inference.bundle import MANIFEST, WEIGHTS, manifest_for, update_manifest_files
from aerialseg.inference.bundle_int8 import INT8_NAME, unusable

log = logging.getLogger(__name__)


def split_tiles(params: dict[str, Any], split: str, limit: int | None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Up to ``limit`` patches of a split of the data stages' outputs."""
    return split_arrays(*data_stage_outputs(params), split, limit)


def run(params: dict[str, Any], model_dir: str | Path | None = None,
                 out_dir: str | Path | None = None) -> dict[str, Any]:
    """The `aerialseg quantize` stage on ``quantize.model_dir`` (or the given directory)."""
    config = QuantizeConfig.from_params(section(params, "quantize"))
    out_dir = out_dir or (None if model_dir else config.out)
    if not config.enabled:
        record = {"enabled": False, "reason": DISABLED_REASON}
        if out_dir:  # never into the model's own folder (another stage's output)
            write_json(Path(out_dir) / REPORT_NAME, record)
        log.info("quantize: %s", DISABLED_REASON)
        return record
    model_dir = Path(model_dir or config.model_dir or train_out_dir(params))
    if not (model_dir / "model.json").is_file():
        raise AerialsegError("model not found", model_dir / "model.json",
                             "run `aerialseg train` (or `aerialseg prune`) first or set quantize.model_dir")
    bundle = Path(out_dir) if out_dir and (Path(out_dir) / MANIFEST).is_file() else None
    if bundle is not None and sha256_file(bundle / WEIGHTS) != sha256_file(model_dir / WEIGHTS):
        raise AerialsegError("this bundle holds other weights than the model to quantize", bundle,
                             f"pass --model-dir {bundle} to quantize the bundle's own model")
    calibration, _ = split_tiles(params, "train", config.calibration_tiles)
    val_images, val_masks = split_tiles(params, "val", config.val_tiles)
    report = quantize_model_dir(model_dir, calibration, val_images, val_masks, config, out_dir)
    if bundle is not None:
        record_in_bundle(bundle, report)
    log.info("int8: %.2f MB (fp32 ONNX %.2f MB), ΔmIoU %.2f points, %.1f ms vs PyTorch fp32 %.1f ms (%.2fx)",
             report["size_mb"]["onnx_int8"], report["size_mb"]["onnx_fp32"],
             report["accuracy"]["delta_miou_points"], report["latency_ms"]["onnx_int8"],
             report["latency_ms"]["torch_fp32"], report["latency_ms"]["speedup_int8_vs_torch"])
    return report


def record_in_bundle(bundle: Path, report: dict[str, Any]) -> None:
    """List the int8 files in bundle.json with checksums, and whether serve may run the model (``int8``)."""
    why = unusable(report, report.get("weights_sha256"), int(manifest_for(bundle)["tile_size"]))
    update_manifest_files(bundle, int8={"carried": True, "file": INT8_NAME, "gate": report["gate"],
                                        "delta_miou_points": report["accuracy"]["delta_miou_points"]}
                          if why is None else {"carried": False, "reason": why})
