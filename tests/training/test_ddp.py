"""Two-process DistributedDataParallel training on CPU (gloo): it finishes and both ranks agree."""

import aerialseg  # noqa: F401  (first, also in the spawned processes)

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from aerialseg.training.ddp import DistInfo, env_info
from aerialseg.data.loaders import make_train_loader
from aerialseg.training.config import TrainConfig
from aerialseg.training.loop import fit
from conftest import shared_path
from helpers.patches import small_datasets


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """One rank: join through the torchrun environment variables, train, save what this rank holds."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    cfg = TrainConfig(model="pspnet_resnet18", epochs=2, batch_size=2, device="cpu", seed=3)
    model, summary = fit(cfg, *small_datasets(), f"{out_dir}/run")
    torch.save({"state": model.state_dict(), "summary": summary}, f"{out_dir}/rank{rank}.pt")


@pytest.mark.slow
def test_two_cpu_ranks_train_to_identical_weights(tmp_path):
    shared_path("dubai-aerial-cc0")  # skip here: a skip inside a spawned rank would look like a crash
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert rank0["state"].keys() == rank1["state"].keys()
    assert all(torch.equal(rank0["state"][k], rank1["state"][k]) for k in rank0["state"])
    assert rank0["summary"]["world_size"] == 2 and rank0["summary"]["epochs_run"] == 2
    assert rank0["summary"]["best_val_mIoU"] == rank1["summary"]["best_val_mIoU"]  # val summed over ranks
    written = json.loads((tmp_path / "run" / "train_summary.json").read_text())  # rank 0 wrote the outputs
    assert written["world_size"] == 2 and (tmp_path / "run" / "model.safetensors").is_file()


def test_sampler_shards_the_data_between_ranks(monkeypatch):
    train, _ = small_datasets()
    shards = [list(make_train_loader(train, batch_size=2, seed=42, rank=r, world_size=2).sampler) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == (len(train) + 1) // 2
    assert set(shards[0]) | set(shards[1]) == set(range(len(train)))
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert env_info() == DistInfo(3, 4, 1) and env_info().distributed and not env_info().is_main
