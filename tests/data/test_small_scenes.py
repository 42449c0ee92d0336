"""Small things on small surveys: one augment shard for many one-patch scenes; a disabled pretrain stage
answers at once (no torch import)."""

import json
import subprocess
import sys

import numpy as np

from aerialseg.data.augment import ShardWriter


def test_one_patch_scenes_share_a_shard(tmp_path):
    writer = ShardWriter(tmp_path, 4)
    for k in range(6):  # six scenes of one patch each
        writer.add(f"scene{k}", np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8), f"p{k}_aug0", f"p{k}")
    shards = writer.close()
    assert [s["count"] for s in shards] == [4, 2] and sorted(p.name for p in tmp_path.glob("*.npz")) == \
        ["shard-000.npz", "shard-001.npz"]
    assert shards[0]["scenes"] == ["scene0", "scene1", "scene2", "scene3"]
    assert [i for s in shards for i in s["ids"]] == [f"p{k}_aug0" for k in range(6)]


def test_disabled_pretrain_imports_no_torch(tmp_path):
    code = ("import sys; from aerialseg.stages import pretrain; "
            f"r = pretrain.run({{'pretrain': {{'enabled': False, 'out': {str(tmp_path / 'pre')!r}}}}}); "
            "assert 'torch' not in sys.modules, 'torch imported'; print(r['enabled'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr
    assert json.loads((tmp_path / "pre" / "pretrain.json").read_text())["enabled"] is False
