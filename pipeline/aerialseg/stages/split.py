"""split stage (`aerialseg split`, params ``split``): seeded 8/1/1 split by spatial block, leak-free.

Writes ``split.out``/split.json, class_shares.json and split.png.
"""

import logging
from pathlib import Path
from typing import Any

from aerialseg.core.config import DEFAULT_PARAMS, section
from aerialseg.core.errors import AerialsegError
from aerialseg.core.fileio import fingerprint, sha256_file, write_json
from aerialseg.data.labelled import labelled_classes, not_labelled, train_pixels, warn_not_labelled
from aerialseg.data.split import SplitParams, class_shares, make_split, plot_split, share_table
from aerialseg.data.tiling import MANIFEST_NAME, load_manifest

log = logging.getLogger(__name__)


def split_params(params: dict[str, Any]) -> SplitParams:
    """Read and check params.yaml `split`."""
    sp = section(params, "split")
    try:
        fractions = tuple(float(f) for f in sp.get("fractions", (0.8, 0.1, 0.1)))
        out = SplitParams(fractions=fractions, group=str(sp.get("group", "block")),  # type: ignore[arg-type]
                          block_px=int(sp.get("block_px", 384)), seed=int(sp.get("seed", 42)),
                          candidates=int(sp.get("candidates", 100)))
    except (TypeError, ValueError) as exc:
        raise AerialsegError(f"split: {exc}", DEFAULT_PARAMS, "use numbers for fractions, block_px, seed") from None
    if len(out.fractions) != 3 or min(out.fractions) < 0 or abs(sum(out.fractions) - 1) > 1e-6 \
            or out.fractions[0] <= 0:
        raise AerialsegError(f"split.fractions must be three non-negative numbers (train > 0) summing to 1, "
                             f"got {list(out.fractions)}", DEFAULT_PARAMS, "e.g. fractions: [0.8, 0.1, 0.1]")
    if out.group not in ("block", "scene"):
        raise AerialsegError(f"split.group must be 'block' or 'scene', got '{out.group}'", DEFAULT_PARAMS)
    if out.block_px < 1 or out.candidates < 1:
        raise AerialsegError("split.block_px and split.candidates must be positive", DEFAULT_PARAMS)
    return out



def run(params: dict[str, Any]) -> Path:
    """Split data/tiles/manifest.json; write split.json, class_shares.json (with the labelled classes and the
    data fingerprint) and split.png; print the table and warn about classes without training pixels."""
    sp = split_params(params)
    manifest_path = Path(section(params, "tiles").get("out", "data/tiles")) / MANIFEST_NAME
    out_dir = Path(section(params, "split").get("out", "data/split"))
    manifest = load_manifest(manifest_path)
    split = {**make_split(manifest, sp), "manifest": str(manifest_path),
             "manifest_sha256": sha256_file(manifest_path)}
    shares = class_shares(manifest, split)
    pixels = train_pixels(shares)
    labelled = labelled_classes(pixels, section(params, "classes").get("labelled"))
    warn_not_labelled(labelled, pixels, "split")
    dest = write_json(out_dir / "split.json", split)
    write_json(out_dir / "class_shares.json", {**shares, "labelled_classes": labelled,
                                               "not_labelled": not_labelled(labelled),
                                               "data_fingerprint": fingerprint([manifest_path, dest])})
    plot_split(manifest, split, shares, out_dir / "split.png")
    log.info(share_table(shares))
    dropped = len(split["guard_dropped"])
    log.info("%d patches split %s; %d dropped by the overlap guard; 0 leaks",
             sum(split["sizes"].values()), split["sizes"], dropped)
    return dest
