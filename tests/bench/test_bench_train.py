"""bench/bench_train.py: every variant is measured, ratios are per round against fp32, figures are written."""

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
import bench_train  # noqa: E402


def test_summary_takes_median_of_per_round_ratios():
    rates = {"fp32": [1.0, 2.0, 4.0], "fast": [2.0, 2.0, 12.0]}
    rows = {r["variant"]: r for r in bench_train.summarize(rates, "fp32")}
    assert rows["fp32"]["ratio_vs_fp32"] == 1.0 and rows["fp32"]["patches_per_s"] == 2.0
    assert rows["fast"]["ratio_vs_fp32"] == 2.0 and (rows["fast"]["min"], rows["fast"]["max"]) == (2.0, 12.0)


@pytest.mark.slow
def test_quick_bench_measures_every_variant(tmp_path, capsys):
    out = tmp_path / "bench.json"
    result = bench_train.main(["--quick", "--base-threads", "1", "--threads", "1", "--json", str(out)])
    printed = capsys.readouterr().out
    names = [r["variant"] for r in result["compute"]]
    assert names == ["fp32", "bf16", "channels_last", "channels_last+bf16"]
    assert all(r["patches_per_s"] > 0 and r["rounds"] == 2 for r in result["compute"])
    assert result["compute"][0]["ratio_vs_fp32"] == 1.0
    assert [r["variant"] for r in result["loader"]] == ["workers 0", "workers 1"]
    assert "| channels_last |" in printed and "| workers 1 |" in printed
    assert json.loads(out.read_text())["compute"] == result["compute"]
