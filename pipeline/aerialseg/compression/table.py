"""The compression table (the pruning paper's Table II): backbone x pruned x int8, accuracy, size, latency.

Each model directory gives two rows, fp32 and int8. The int8 row reuses the model the quantize stage made
(its quantize.json names the model directory it quantized) when one was made at the table's tile size, and
says whether that model passed the ΔmIoU gate; otherwise it quantizes the model for the table.
"""

import json
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aerialseg.compression.quantize import (
    INT8_NAME,
    REPORT_NAME,
    QuantizeConfig,
    TileCalibrationReader,
    export_fp32,
    onnx_latency_ms,
    onnx_scores,
    quantize_static_int8,
    read_gate,
    session,
    size_mb,
    torch_latency_ms,
)
from aerialseg.core.classes import CLASS_NAMES, IGNORE
from aerialseg.core.errors import AerialsegError
from aerialseg.core.fileio import write_json, write_text
from aerialseg.models import ModelSpec, count_parameters, get_spec, load_model  # pruned ones too (their plan)

log = logging.getLogger(__name__)


@dataclass
class TableConfig:
    """``quantize.table``: which model directories form the table and where it goes."""

    entries: list[dict[str, Any]] = field(default_factory=list)  # [{backbone, model_dir, pruned_dir}]
    val_tiles: int | None = None
    tile_size: int | None = None            # None = the tile the quantize stage's int8 model was made at
    out_json: str = "reports/compression.json"
    out_md: str = "reports/compression.md"


@dataclass
class Int8Source:
    """An int8 model for a table row: where it is, where it came from, and the quantize gate's verdict."""

    path: Path
    origin: str
    gate: dict[str, Any] | None = None


def quantized_by_stage(model_dir: Path, search: Sequence[Path]) -> tuple[Path, dict[str, Any]] | None:
    """The (int8 file, quantize.json) that the quantize stage wrote for ``model_dir``, if any."""
    for folder in dict.fromkeys([*search, model_dir]):
        report_path = Path(folder) / REPORT_NAME
        if not report_path.is_file():
            continue
        report = json.loads(report_path.read_text(encoding="utf-8"))
        if not isinstance(report, dict) or Path(report.get("model_dir", "")).resolve() != model_dir.resolve():
            continue
        int8 = Path(folder) / str(report.get("int8_file", INT8_NAME))
        if int8.is_file():
            return int8, report
    return None


def int8_for_table(model_dir: Path, spec: ModelSpec, tile: int, fp32_path: Path, calibration: Sequence[np.ndarray],
                   config: QuantizeConfig, search: Sequence[Path], tmp: Path) -> Int8Source:
    """The quantize stage's int8 model of ``model_dir`` at ``tile`` px, or one quantized here for the table."""
    found = quantized_by_stage(model_dir, search)
    if found and int(found[1].get("tile_size", -1)) == tile:
        return Int8Source(found[0], "quantize stage", read_gate(found[1]))
    log.warning("%s: no int8 model from the quantize stage at %d px; quantizing it for the table", model_dir, tile)
    path = Path(tmp) / INT8_NAME
    quantize_static_int8(fp32_path, path, TileCalibrationReader(calibration[: config.calibration_tiles], spec,
                                                                tile), config)
    return Int8Source(path, f"built for the table at {tile}px")


def table_tile(table: "TableConfig", config: QuantizeConfig, entries: Sequence[dict[str, Any]],
               search: Sequence[Path]) -> int:
    """The table's tile: as set, else the quantize stage's tile for the first entry, else that model's own."""
    if table.tile_size:
        return int(table.tile_size)
    first = Path(entries[0]["model_dir"])
    found = quantized_by_stage(first, search)
    if found:
        return int(found[1]["tile_size"])
    return int(config.tile_size or get_spec(load_model(first)[1]["name"]).tile_size)


def table_rows_for(model_dir: Path, backbone: str, calibration: Sequence[np.ndarray],
                   val_images: Sequence[np.ndarray], val_masks: Sequence[np.ndarray], config: QuantizeConfig,
                   tile: int, search: Sequence[Path] = ()) -> list[dict[str, Any]]:
    """Two rows (fp32, int8) for one model directory: accuracy, size, params, CPU latency."""
    model, meta = load_model(model_dir)
    spec, pruned = get_spec(meta["name"]), "pruning" in meta
    base = {"backbone": backbone, "model": meta["name"], "model_dir": str(model_dir), "pruned": pruned,
            "params_m": round(count_parameters(model) / 1e6, 3)}
    runs, warmup, threads = config.latency_runs, config.latency_warmup, config.threads
    rows = []
    with tempfile.TemporaryDirectory(prefix="aerialseg-table-") as tmp:
        fp32_path = Path(tmp) / "model.fp32.onnx"
        export_fp32(model, meta, fp32_path, tile, config)
        int8 = int8_for_table(model_dir, spec, tile, fp32_path, calibration, config, search, Path(tmp))
        for quantized, path in ((False, fp32_path), (True, int8.path)):
            scores, _ = onnx_scores(session(path, threads), val_images, val_masks, spec,
                                    f"{backbone} {'P' if pruned else '-'}{'Q' if quantized else '-'}")
            row = {**base, "quantized": quantized, "pixel_accuracy": scores["pixel_accuracy"],
                   "mIoU": scores["mIoU"], "bf1": scores["bf1"],
                   "size_mb": size_mb(path if quantized else model_dir / "model.safetensors"),
                   "latency_ms": onnx_latency_ms(path, threads, runs, warmup), "runtime": "onnxruntime"}
            if quantized:
                row["int8_source"], row["int8_gate"] = int8.origin, int8.gate
            else:
                row["torch_latency_ms"] = torch_latency_ms(model, tile, meta["in_channels"], threads, runs, warmup)
            rows.append(row)
    return rows


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def _q_mark(row: dict[str, Any]) -> str:
    if not row["quantized"]:
        return ""
    gate = row.get("int8_gate")
    return "x (gate failed)" if gate and not gate.get("passed", True) else "x"


def table_markdown(rows: Sequence[dict[str, Any]], tile: int, threads: int, tiles: int,
                   skipped: Sequence[dict[str, Any]] = ()) -> str:
    """The table in the layout of the paper's Table II, what pruning cost per backbone, the int8 gates that
    failed, and the model dirs left out (and why)."""
    lines = [
        "# Compression: Taylor pruning (P) and int8 quantization (Q)",
        "",
        f"Validation tiles: {tiles}. Latency: median ONNX Runtime CPU ms per {tile}x{tile} tile, {threads} "
        "threads (PyTorch eager fp32 in brackets). Size: model.safetensors (fp32) or the int8 ONNX file.",
        "",
        "| Backbone | P | Q | Pixel acc % | mIoU % | BF1 % | Size MB | Params M | CPU ms / tile |",
        "|---|:-:|:-:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        latency = f"{r['latency_ms']:.1f}" + (f" ({r['torch_latency_ms']:.1f})" if "torch_latency_ms" in r else "")
        lines.append(f"| {r['backbone']} | {'x' if r['pruned'] else ''} | {_q_mark(r)} | "
                     f"{_pct(r['pixel_accuracy'])} | {_pct(r['mIoU'])} | {_pct(r['bf1'])} | {r['size_mb']:.2f} | "
                     f"{r['params_m']:.2f} | {latency} |")
    lines += ["", *pruning_verdict(rows), *gate_lines(rows),
              *(f"Not in the table: {s['backbone']} pruned (`{s['model_dir']}`): {s['reason']}." for s in skipped)]
    return "\n".join(lines).rstrip() + "\n"


def gate_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One line per int8 model that failed the quantize stage's ΔmIoU gate."""
    return [f"int8 gate failed for {r['backbone']}{' pruned' if r['pruned'] else ''} (`{r['model_dir']}`): "
            f"{r['int8_gate']['reason']}. That int8 model is kept as a result and used by no bundle or server; "
            "see docs/training.md (int8) for calibration settings that hold."
            for r in rows if r["quantized"] and r.get("int8_gate") and not r["int8_gate"].get("passed", True)]


PRUNING_BUDGET_POINTS = 2.0  # a pruned model may lose at most this much val mIoU (issue 13, the seed paper: 1-3)


def pruning_verdict(rows: list[dict[str, Any]]) -> list[str]:
    """One line per backbone: what pruning cost in mIoU points and bought in ONNX Runtime latency (fp32 rows)."""
    lines = []
    for backbone in dict.fromkeys(r["backbone"] for r in rows):
        fp32 = {r["pruned"]: r for r in rows if r["backbone"] == backbone and not r["quantized"]}
        if True not in fp32 or False not in fp32:
            continue
        full, pruned = fp32[False], fp32[True]
        delta = 100 * (pruned["mIoU"] - full["mIoU"])
        speed = pruned["latency_ms"] / full["latency_ms"]
        met = "within" if -delta <= PRUNING_BUDGET_POINTS and speed < 1 else "**outside**"
        lines.append(f"Pruning {backbone}: {delta:+.1f} mIoU points at {speed:.2f}x the ONNX Runtime latency "
                     f"({full['params_m']:.2f} M -> {pruned['params_m']:.2f} M parameters): {met} the budget of "
                     f"-{PRUNING_BUDGET_POINTS:g} points with a latency gain (docs/training.md, section 2).")
    return lines


def pruning_disabled(directory: Path) -> str | None:
    """Why a pruned_dir holds no model (prune.json of a disabled prune stage), or None."""
    marker = directory / "prune.json"
    if (directory / "model.json").is_file() or not marker.is_file():
        return None
    record = json.loads(marker.read_text(encoding="utf-8"))
    return None if record.get("enabled", True) else str(record.get("reason", "pruning is disabled"))


def table_dirs(entries: Sequence[dict[str, Any]]) -> tuple[list[tuple[Path, str]], list[dict[str, Any]]]:
    """(model dir, backbone) pairs of the table, and the pruned dirs left out with why."""
    dirs: list[tuple[Path, str]] = []
    skipped: list[dict[str, Any]] = []
    for entry in entries:
        pruned = Path(entry["pruned_dir"]) if entry.get("pruned_dir") else None
        reason = pruning_disabled(pruned) if pruned else None
        if reason:
            skipped.append({"backbone": str(entry.get("backbone", pruned.name)), "model_dir": str(pruned),
                            "reason": reason})
        for directory in [Path(d) for d in (entry.get("model_dir"), None if reason else pruned) if d]:
            if not (directory / "model.json").is_file():
                raise AerialsegError("model directory not found", directory / "model.json",
                                     "train/prune it first or fix quantize.table.entries")
            dirs.append((directory, str(entry.get("backbone", directory.name))))
    return dirs, skipped


def compression_table(entries: Sequence[dict[str, Any]], calibration: Sequence[np.ndarray],
                      val_images: Sequence[np.ndarray], val_masks: Sequence[np.ndarray], config: QuantizeConfig,
                      table: TableConfig, search: Sequence[Path] = (), data_fingerprint: str | None = None
                      ) -> dict[str, Any]:
    """Rows backbone x pruned x quantized; writes table.out_json (stamped with ``data_fingerprint``, the data
    of the val patches) and table.out_md. ``search``: folders where the quantize stage wrote its int8 models
    (besides each model directory)."""
    dirs, skipped = table_dirs(entries)
    tile = table_tile(table, config, entries, search)
    rows = [row for directory, backbone in dirs
            for row in table_rows_for(directory, backbone, calibration, val_images, val_masks, config, tile, search)]
    result = {"data_fingerprint": data_fingerprint, "tile_size": tile, "threads": config.threads, "val_tiles": len(val_images),
              "class_names": list(CLASS_NAMES), "ignore_index": IGNORE, "out_json": table.out_json,
              "out_md": table.out_md, "rows": rows, "skipped": skipped}
    write_json(table.out_json, result)
    write_text(table.out_md, table_markdown(rows, tile, config.threads, len(val_images), skipped))
    return result


def disabled_table(table: TableConfig, reason: str, data_fingerprint: str | None = None) -> dict[str, Any]:
    """The table's files when compression is switched off: they say so (the report embeds the .md, a
    statement about this run's data, hence its fingerprint)."""
    result = {"data_fingerprint": data_fingerprint, "enabled": False, "reason": reason, "rows": [],
              "out_json": table.out_json, "out_md": table.out_md}
    write_json(table.out_json, result)
    write_text(table.out_md, f"# Compression: not run\n\n{reason}.\n")
    return result
