"""bench/bench_distil.py: every part is timed at every size, ratios refer to the first size's distil step."""

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
import bench_distil  # noqa: E402


def test_quick_bench_times_every_part_at_every_size(tmp_path, capsys):
    out = tmp_path / "distil.json"
    assert bench_distil.main(["--quick", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["size"], r["part"]) for r in rows] == [
        (size, part) for size in (64, 48) for part in ("teacher fwd", "student fwd+bwd", "distil step")]
    assert all(r["median_ms"] > 0 for r in rows)
    assert rows[2]["x_distil_step_first_size"] == 1.0
    assert "distil step" in capsys.readouterr().out
