"""bundle stage (`aerialseg bundle MODEL_DIR`, params ``bundle`` and ``export``): weights, bundle.json and the
two ONNX files (model.onnx: logits for infer-scene; model.deepness.onnx: probabilities for QGIS Deepness),
and with ``bundle.int8`` the quantize stage's int8 model when its gate passed and it was made from these
weights (aerialseg.inference.bundle_int8): serve runs it. The stage runs after quantize (dvc.yaml)."""

from functools import partial
from pathlib import Path
from typing import Any

from aerialseg.compression.onnx_export import export_bundle_onnx
from aerialseg.core.config import section
from aerialseg.core.paths import train_out_dir
from aerialseg.inference.bundle import assemble_bundle, read_model_record


def build_bundle(model_dir: str | Path, out: str | Path | None = None, tile_size: int | None = None,
                 overlap: int | None = None, gsd_m: float | None = None, onnx: bool = True,
                 archive: bool = False, max_abs_diff: float = 1e-3, opset: int = 18,
                 int8_from: str | Path | None = None) -> Path:
    """Bundle a trained model dir (``out`` None: in place; ``archive``: one .zip); ``onnx`` exports and
    checks both ONNX files (aerialseg.compression.onnx_export); ``int8_from``: the quantize stage's folder,
    whose int8 model is carried when usable. Returns the bundle path."""
    export = partial(export_bundle_onnx, max_abs_diff=max_abs_diff, opset=opset) if onnx else None
    return assemble_bundle(model_dir, out, tile_size, overlap, gsd_m, archive, export, int8_from)


def int8_source(params: dict[str, Any]) -> Path:
    """The folder the quantize stage writes its int8 model to: quantize.out, else the model it quantizes."""
    cfg = section(params, "quantize")
    return Path(cfg.get("out") or cfg.get("model_dir") or train_out_dir(params))


def run(params: dict[str, Any], model_dir: str | Path, out: str | Path | None = None, archive: bool | None = None,
        onnx: bool | None = None, tile_size: int | None = None, overlap: int | None = None,
        gsd_m: float | None = None) -> Path:
    """The bundle stage: each argument left None takes its ``bundle`` value from params (the GSD: bundle.gsd_m,
    else model.json's gsd_m, else data.gsd_m); the parity gate and opset come from ``export``."""
    cfg, exp = section(params, "bundle"), section(params, "export")
    gsd = next((g for g in (gsd_m, cfg.get("gsd_m"), read_model_record(Path(model_dir)).get("gsd_m"),
                            section(params, "data").get("gsd_m")) if g is not None), None)
    dest = out if out is not None else (Path(cfg["out"]) if cfg.get("out") else None)
    return build_bundle(model_dir, dest, tile_size=tile_size or cfg.get("tile_size"),
                        overlap=overlap if overlap is not None else cfg.get("overlap"), gsd_m=gsd,
                        onnx=cfg.get("onnx", True) if onnx is None else onnx,
                        archive=cfg.get("zip", False) if archive is None else archive,
                        max_abs_diff=float(exp.get("max_abs_diff", 1e-3)), opset=int(exp.get("opset", 18)),
                        int8_from=int8_source(params) if cfg.get("int8", True) else None)


def export_onnx(params: dict[str, Any], model_dir: str | Path, out: str | Path | None = None) -> str:
    """`aerialseg export-onnx`: both ONNX files of a bundle or model dir with ``export``'s parity gate; returns
    what was written (two lines)."""
    exp = section(params, "export")
    result = export_bundle_onnx(model_dir, out, max_abs_diff=float(exp.get("max_abs_diff", 1e-3)),
                                opset=int(exp.get("opset", 18)), parity_count=int(exp.get("parity_tiles", 2)))
    parity, deepness = result["parity"], result["deepness_parity"]
    return (f"wrote {result['onnx']} (max |logit diff| {parity['max_abs_diff']:.2e}, argmax agreement "
            f"{parity['argmax_agreement']:.4f})\nwrote {result['deepness_onnx']} for QGIS Deepness (max |probability "
            f"diff| {deepness['max_abs_diff']:.2e}, argmax agreement {deepness['argmax_agreement']:.4f})")
