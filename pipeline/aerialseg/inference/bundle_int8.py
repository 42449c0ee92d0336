"""A bundle's int8 model: the quantize stage's ``model.int8.onnx`` + the ``quantize.json`` that describes it.

They are usable (serve runs them: aerialseg.inference.runtime_choice) only when
- the ΔmIoU gate passed (a quantize.json written before the gate field existed counts as passed: quantize
  refused to write failing models then);
- they were made from the bundle's own weights (quantize.json ``weights_sha256`` = model.safetensors), when
  quantize.json records them;
- the int8 model's input is the bundle's tile size;
- bundle.json lists both files with checksums (a verified bundle); a folder without bundle.json (a plain,
  unverified trained-model folder) needs no listing.
The bundle stage carries them from the quantize stage's folder (``bundle.int8``: ``carry_int8``), and
`aerialseg quantize --out BUNDLE` writes them into a bundle and records them there.
"""

import json
import shutil
from pathlib import Path
from typing import Any

from aerialseg.core.fileio import sha256_file

INT8_NAME = "model.int8.onnx"
QUANTIZE_REPORT = "quantize.json"
INT8_FILES = (INT8_NAME, QUANTIZE_REPORT)


def read_gate(report: dict[str, Any]) -> dict[str, Any]:
    """The gate of a quantize.json; files written before the gate was recorded had passed it."""
    return report.get("gate") or {"passed": True, "delta_miou_points": (report.get("accuracy") or {}).get(
        "delta_miou_points"), "max_delta_miou": report.get("max_delta_miou"), "reason": None}


def read_report(folder: Path) -> dict[str, Any] | None:
    """quantize.json of a folder (None when missing or unreadable)."""
    try:
        report = json.loads((Path(folder) / QUANTIZE_REPORT).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) else None


def unusable(report: dict[str, Any], weights_sha256: str | None, tile_size: int | None) -> str | None:
    """Why the int8 model a quantize.json describes may not run for these weights and tile (None: it may)."""
    if report.get("enabled") is False:
        return "quantize.enabled is false: no int8 model"
    gate = read_gate(report)
    if not gate.get("passed", False):
        return f"accuracy gate failed ({gate.get('reason') or 'see quantize.json'})"
    recorded = report.get("weights_sha256")
    if recorded and weights_sha256 and recorded != weights_sha256:
        return "quantize.json describes other weights than the bundle's (rerun `aerialseg quantize`)"
    size = report.get("tile_size")
    if tile_size and size and int(size) != int(tile_size):
        return f"its input is {size} px, the bundle's tile {tile_size} px (set quantize.tile_size)"
    return None


def carry_int8(source: Path, stage: Path, weights: Path, tile_size: int) -> dict[str, Any]:
    """Copy ``source``'s int8 model + quantize.json into the staged bundle ``stage`` when they are usable with
    ``weights`` at ``tile_size``; returns the record bundle.json keeps under ``int8`` (carried or why not)."""
    report = read_report(source)
    if report is None:
        return {"carried": False, "reason": f"no readable {QUANTIZE_REPORT} in {source} (run `aerialseg quantize`)"}
    if not report.get("weights_sha256") and report.get("enabled") is not False:
        return {"carried": False, "reason": f"{QUANTIZE_REPORT} does not say which weights it quantized (made by "
                                            "an older aerialseg): rerun `aerialseg quantize`"}
    why = unusable(report, sha256_file(weights), tile_size)
    if why is None and not (Path(source) / INT8_NAME).is_file():
        why = f"no {INT8_NAME} in {source}"
    if why is not None:
        return {"carried": False, "reason": why}
    for name in INT8_FILES:
        shutil.copy2(Path(source) / name, Path(stage) / name)
    return {"carried": True, "file": INT8_NAME, "gate": read_gate(report),
            "delta_miou_points": (report.get("accuracy") or {}).get("delta_miou_points")}
