"""Simulated annotator: does labelling the windows rank-scenes picks improve the model faster than random?

    .venv/bin/python bench/bench_labelling_loop.py [--rounds 3] [--per-round 8] [--seeds 0 1 2] [--steps 40]

The embedded sample's true masks (label-to-mask's own code) stand in for the annotator. Scenes 1-4 are
the training area, cut into ``--window`` px windows; scene 5 validates, scene 6 is the test split.
Each strategy starts from the same ``--start`` random windows (per seed); each round the current model
scores every unlabelled window and the annotator labels ``--per-round`` more:
- ``rank``: rarity-weighted entropy (``aerialseg.inference.ranking``'s pixel uncertainty and class weights,
  share ** -``--rarity-power`` over the predicted pixels; rank-scenes' default before this measurement);
- ``entropy``: mean pixel entropy (rank-scenes with rarity power 0, its default since: docs/serve.md);
- ``random``: uniformly at random.
After labelling, the model is retrained briefly from its initial weights (the params' architecture unless
``--arch``, with its offline ImageNet encoder where it has one): ``--steps`` optimizer steps of ``--batch``
windows whatever the labelled count (the labelled windows are repeated to fill ``--epochs`` epochs, so a
strategy's later rounds are not favoured by more updates), validated on ``--val-windows`` windows of scene
5, then scored on every window of the test scene (mIoU). Prints a JSON table: mIoU per strategy, seed and labelled
share, and the mean over seeds; ``--out FILE`` also writes it.
"""

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch

import aerialseg  # noqa: F401
from aerialseg.annotations.anylabeling import load_label_json, parse_shapes, resolve_scene
from aerialseg.annotations.rasterize import rasterize_shapes
from aerialseg.core.config import load_params
from aerialseg.evaluation.metrics import ConfusionMatrix
from aerialseg.inference.predictor import Predictor
from aerialseg.inference.ranking import pixel_uncertainty
from aerialseg.models import get_spec, load_model
from aerialseg.stages.masks import label_table
from aerialseg.data.datasets import ArrayPatchDataset
from aerialseg.training.config import TrainConfig
from aerialseg.training.loop import train_model

REPO = Path(__file__).resolve().parents[1]
STRATEGIES = ("rank", "entropy", "random")
LEGEND = {"rank": "rank: rarity-weighted entropy", "entropy": "entropy (rank-scenes' default)", "random": "random"}


def scene_windows(n: int, window: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image (w, w, 3), true mask (w, w)) windows of sample scene ``n``, row by row."""
    path = REPO / "data" / "sample" / "labels" / f"dubai_tile{n}.json"
    doc = load_label_json(path)
    scene = resolve_scene(doc, path, None)
    shapes, _ = parse_shapes(doc, path, label_table(load_params(REPO / "params.yaml")))
    mask = rasterize_shapes(shapes, scene.width, scene.height)
    with rasterio.open(scene.path) as ds:
        rgb = ds.read([1, 2, 3]).transpose(1, 2, 0)
    return [(rgb[y:y + window, x:x + window], mask[y:y + window, x:x + window])
            for y in range(0, rgb.shape[0] - window + 1, window) for x in range(0, rgb.shape[1] - window + 1, window)]


def probabilities(model_dir: Path, pairs: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """(N, K, w, w) class probabilities of the model in ``model_dir`` for each window."""
    model, meta = load_model(model_dir)
    spec = get_spec(meta["name"])
    predict = Predictor(lambda x: model(x), spec.mean, spec.std, torch.device("cpu"), pad_multiple=spec.pad_multiple)
    images = np.stack([img.transpose(2, 0, 1) for img, _ in pairs])
    return np.concatenate([predict(images[i:i + 8]) for i in range(0, len(images), 8)])


def window_scores(probs: np.ndarray, rarity_power: float) -> np.ndarray:
    """rank-scenes' score per window: sum over classes of w_c x entropy of the pixels predicted c / pixels."""
    k = probs.shape[1]
    entropy_by_class, counts = np.zeros((len(probs), k)), np.zeros((len(probs), k))
    for i, p in enumerate(probs):
        entropy, _, classes = pixel_uncertainty(p)
        entropy_by_class[i] = np.bincount(classes.ravel(), weights=entropy.ravel(), minlength=k)[:k]
        counts[i] = np.bincount(classes.ravel(), minlength=k)[:k]
    share = counts.sum(axis=0) / max(counts.sum(), 1.0)
    weights = np.where(share > 0, np.maximum(share, 1e-6) ** -rarity_power, 0.0)
    weights /= max(float((share * weights).sum()), 1e-12)
    return (entropy_by_class * weights).sum(axis=1) / np.maximum(counts.sum(axis=1), 1)


def pick(strategy: str, model_dir: Path | None, pool: list, unlabelled: list[int], k: int,
         rng: np.random.Generator, rarity_power: float) -> list[int]:
    """The next ``k`` windows to label (indices into ``pool``)."""
    if strategy == "random" or model_dir is None:
        return [int(i) for i in rng.choice(unlabelled, size=min(k, len(unlabelled)), replace=False)]
    probs = probabilities(model_dir, [pool[i] for i in unlabelled])
    scores = window_scores(probs, rarity_power if strategy == "rank" else 0.0)
    return [unlabelled[i] for i in np.argsort(-scores, kind="stable")[:k]]


def repeated(pairs: list, items: int) -> list:
    """``pairs`` cycled to exactly ``items`` entries (a fixed number of optimizer steps per epoch)."""
    return [pairs[i % len(pairs)] for i in range(max(items, len(pairs)))]


def train_and_score(pairs: list, val: list, test: list, args: argparse.Namespace, seed: int,
                    out: Path) -> float:
    """Train ``args.steps`` steps on ``pairs``; mIoU on the test windows."""
    cfg = TrainConfig(model=args.arch, epochs=args.epochs, batch_size=args.batch, patch_size=None, seed=seed,
                      device="cpu", amp=False, num_workers=0, online_augment=False, model_kwargs=args.model_kwargs,
                      threads=args.threads)
    items = -(-args.steps // args.epochs) * args.batch
    train_model(cfg, (ArrayPatchDataset(repeated(pairs, items)), ArrayPatchDataset(val)), out)
    probs = probabilities(out, test)
    matrix = ConfusionMatrix()
    for p, (_, mask) in zip(probs, test):
        matrix.update(p.argmax(axis=0).astype(np.uint8), mask)
    return float(matrix.summary()["mIoU"])


def run(args: argparse.Namespace) -> dict[str, Any]:
    pool = [w for n in (1, 2, 3, 4) for w in scene_windows(n, args.window)]
    val, test = scene_windows(5, args.window), scene_windows(6, args.window)
    val = [val[i] for i in np.random.default_rng(0).choice(len(val), min(args.val_windows, len(val)), replace=False)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="labelling-loop-") as tmp:
        for seed in args.seeds:
            start = [int(i) for i in np.random.default_rng(seed).choice(len(pool), args.start, replace=False)]
            first = Path(tmp) / f"start-s{seed}"  # round 0 is the same model for every strategy
            first_miou = train_and_score([pool[i] for i in start], val, test, args, seed, first)
            for strategy in STRATEGIES:
                rng, labelled, model_dir = np.random.default_rng(seed + 1000), list(start), first
                for rnd in range(args.rounds + 1):
                    miou = first_miou
                    if rnd:
                        unlabelled = [i for i in range(len(pool)) if i not in labelled]
                        labelled += pick(strategy, model_dir, pool, unlabelled, args.per_round, rng,
                                         args.rarity_power)
                        model_dir = Path(tmp) / f"{strategy}-s{seed}-r{rnd}"
                        miou = train_and_score([pool[i] for i in labelled], val, test, args, seed, model_dir)
                    rows.append({"strategy": strategy, "seed": seed, "round": rnd, "windows": len(labelled),
                                 "labelled_share": round(len(labelled) / len(pool), 4), "test_miou": round(miou, 4)})
                    print(json.dumps(rows[-1]), flush=True)
    return {**summarise(rows, args.rounds), "window_px": args.window, "arch": args.arch, "epochs": args.epochs,
            "steps": args.steps, "batch": args.batch, "start": args.start, "per_round": args.per_round,
            "test_windows": len(test), "val_windows": len(val), "rarity_power": args.rarity_power}


def summarise(rows: list[dict[str, Any]], rounds: int) -> dict[str, Any]:
    """Mean test mIoU per strategy and round over the seeds that have every round of every strategy, and the
    labelled share at which each strategy's mean first reaches random's final mean."""
    per_seed = len(STRATEGIES) * (rounds + 1)
    seeds = sorted({r["seed"] for r in rows if sum(q["seed"] == r["seed"] for q in rows) == per_seed})
    done = [r for r in rows if r["seed"] in seeds]
    mean = {s: [round(float(np.mean([r["test_miou"] for r in done if r["strategy"] == s and r["round"] == k])), 4)
                for k in range(rounds + 1)] for s in STRATEGIES}
    shares = [next(r["labelled_share"] for r in done if r["round"] == k) for k in range(rounds + 1)]
    reach = {s: next((shares[k] for k, m in enumerate(curve) if m >= mean["random"][-1]), None)
             for s, curve in mean.items()}
    return {"seeds": seeds, "labelled_share": shares, "mean_test_miou": mean, "share_to_reach_random_final": reach,
            "pool_windows": round(done[0]["windows"] / done[0]["labelled_share"]), "rows": done}


def plot(result: dict[str, Any], path: Path) -> None:
    """mIoU against labelled share per strategy: mean over seeds, each seed faint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    for strategy, colour in zip(STRATEGIES, ("tab:red", "tab:orange", "tab:blue")):
        for seed in result["seeds"]:
            rows = [r for r in result["rows"] if r["strategy"] == strategy and r["seed"] == seed]
            ax.plot([100 * r["labelled_share"] for r in rows], [r["test_miou"] for r in rows], color=colour,
                    alpha=0.25, lw=1)
        ax.plot([100 * s for s in result["labelled_share"]], result["mean_test_miou"][strategy], "o-", color=colour,
                label=f"{LEGEND[strategy]} (mean of {len(result['seeds'])} seeds)")
    ax.set_xlabel("labelled share of the training area (%)")
    ax.set_ylabel("test mIoU")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--start", type=int, default=8, help="windows labelled before the first round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--per-round", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per retrain")
    parser.add_argument("--epochs", type=int, default=2, help="epochs the steps are spread over (val per epoch)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--val-windows", type=int, default=24, help="scene-5 windows that pick the best epoch")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: fastest on a shared machine)")
    parser.add_argument("--arch", default=None, help="default: params.yaml model.name")
    parser.add_argument("--rarity-power", type=float, default=0.5, help="the rank strategy's rarity power")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--plot", type=Path, help="also draw mIoU against labelled share into this PNG")
    parser.add_argument("--from-log", type=Path, help="summarise (and --plot) the rows a run printed instead")
    args = parser.parse_args()
    if args.from_log:
        lines = args.from_log.read_text(errors="replace").replace("\r", "\n").splitlines()
        rows = [json.loads(line) for line in lines if line.startswith('{"strategy"')]
        result = summarise(rows, max(r["round"] for r in rows))
        print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2))
        if args.plot:
            plot(result, args.plot)
        return
    params = load_params(REPO / "params.yaml")
    args.arch = args.arch or params["model"]["name"]
    args.model_kwargs = dict(params["model"].get("kwargs") or {}) if args.arch == params["model"]["name"] else {}
    torch.set_num_threads(args.threads)
    result = run(args)
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        plot(result, args.plot)


if __name__ == "__main__":
    main()
