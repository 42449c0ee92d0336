"""Class colours outside aerialseg: a legend for PNG previews and a QGIS style file beside each map.

The colours come from ``core.classes`` (``COLORS``, ``colormap``), the same table written into the
COG's colour table and used by the report figures, so a class looks the same everywhere.
"""

import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning

from aerialseg.core.classes import COLORS, IGNORE, IGNORE_COLOR, colorize
from aerialseg.core.errors import AerialsegError
from aerialseg.core.fileio import write_text

LEGEND_ROW = 22  # px per legend entry
QGIS_VERSION = "3.28.0"


def class_colour(index: int) -> tuple[int, int, int]:
    """RGB of a class id (the COG colour table's entry)."""
    return COLORS[index % len(COLORS)]


def qml_document(class_names: tuple[str, ...] | list[str]) -> str:
    """A QGIS layer style (.qml): paletted renderer of band 1, one entry per class, nodata 255 transparent."""
    root = ET.Element("qgis", version=QGIS_VERSION, styleCategories="AllStyleCategories")
    pipe = ET.SubElement(root, "pipe")
    renderer = ET.SubElement(pipe, "rasterrenderer", type="paletted", band="1", opacity="1", alphaBand="-1",
                             nodataColor="")
    ET.SubElement(renderer, "rasterTransparency")
    palette = ET.SubElement(renderer, "colorPalette")
    for i, name in enumerate(class_names):
        r, g, b = class_colour(i)
        ET.SubElement(palette, "paletteEntry", value=str(i), color=f"#{r:02x}{g:02x}{b:02x}", alpha="255",
                      label=name)
    ET.SubElement(pipe, "rasterresampler", maxOversampling="2")
    ET.SubElement(root, "blendMode").text = "0"
    ET.indent(root)
    return "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n" + ET.tostring(root, "unicode") + "\n"


def write_qml(dest: str | Path, class_names: tuple[str, ...] | list[str]) -> Path:
    """Write the QGIS style of a class map atomically (QGIS loads <map>.qml beside <map>.tif by itself)."""
    write_text(dest, qml_document(class_names))
    return Path(dest)


def with_legend(mask: np.ndarray, class_names: tuple[str, ...] | list[str]) -> np.ndarray:
    """RGB (H, W', 3) of a class mask with a legend panel on its right: a swatch and the name of each class
    (and of nodata when the mask has any)."""
    import cv2

    entries = [(name, class_colour(i)) for i, name in enumerate(class_names)]
    if (mask == IGNORE).any():
        entries.append(("nodata", IGNORE_COLOR))
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, 0.45
    text_w = max(cv2.getTextSize(name, font, scale, 1)[0][0] for name, _ in entries)
    width, height = text_w + 40, max(mask.shape[0], LEGEND_ROW * len(entries) + 8)
    canvas = np.full((height, mask.shape[1] + width, 3), 255, dtype=np.uint8)
    canvas[: mask.shape[0], : mask.shape[1]] = colorize(mask)
    left = mask.shape[1] + 8
    for k, (name, colour) in enumerate(entries):
        top = 6 + k * LEGEND_ROW
        cv2.rectangle(canvas, (left, top), (left + 14, top + 14), tuple(int(c) for c in colour), -1)
        cv2.rectangle(canvas, (left, top), (left + 14, top + 14), (0, 0, 0), 1)
        cv2.putText(canvas, name, (left + 22, top + 12), font, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return canvas


def write_preview(src: str | Path, dest: str | Path, class_names: tuple[str, ...] | list[str],
                  max_side: int = 1024) -> None:
    """A colourised PNG quick-look of a class raster (longest side <= max_side) with its legend."""
    import cv2

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(src) as ds:
            f = max(ds.width, ds.height) / max_side
            shape = (max(1, round(ds.height / f)), max(1, round(ds.width / f))) if f > 1 else (ds.height, ds.width)
            mask = ds.read(1, out_shape=shape, resampling=Resampling.nearest)
    if not cv2.imwrite(str(dest), with_legend(mask, class_names)[:, :, ::-1]):
        raise AerialsegError("cannot write the preview PNG", dest, "check the output folder")
