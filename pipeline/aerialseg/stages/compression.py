"""compression stage (`aerialseg compression-table`, params ``quantize.table``): backbone x pruned x int8 table."""

from pathlib import Path
from typing import Any

from aerialseg.compression.quantize import DISABLED_REASON, QuantizeConfig
from aerialseg.compression.table import TableConfig, compression_table, disabled_table
from aerialseg.core.config import DEFAULT_PARAMS, section, typed_section
from aerialseg.core.errors import AerialsegError
from aerialseg.core.paths import data_fingerprint, data_stage_outputs
from aerialseg.data.datasets import split_arrays


def run(params: dict[str, Any]) -> dict[str, Any]:
    """The `aerialseg compression-table` stage (entries from quantize.table)."""
    config = QuantizeConfig.from_params(section(params, "quantize"))
    table = typed_section(TableConfig, "quantize.table", config.table)
    if not config.enabled:
        return disabled_table(table, DISABLED_REASON, data_fingerprint(params))
    if not table.entries:
        raise AerialsegError("quantize.table.entries is empty", DEFAULT_PARAMS,
                             "list {backbone, model_dir, pruned_dir} entries")
    calibration, _ = split_arrays(*data_stage_outputs(params), "train", config.calibration_tiles)
    val_images, val_masks = split_arrays(*data_stage_outputs(params), "val", table.val_tiles)
    search = [Path(config.out)] if config.out else []  # the quantize stage's int8 models, reused
    return compression_table(table.entries, calibration, val_images, val_masks, config, table, search,
                             data_fingerprint(params))
