"""split stage: seeded train/val/test split of the tile manifest with no pixel shared across splits.

Patches are grouped into units — whole scenes (``group: scene``) or square spatial blocks of each scene
(``group: block``, ``block_px``; a patch belongs to the block holding its centre). Units are assigned to
train/val/test so the patch fractions come close to ``fractions``: each of ``candidates`` seeded shuffles
is dealt out greedily (each unit to the split furthest below its target; with 3+ units val and test get
one first), the best-scoring one is hill-climbed (moving or swapping units), and the best result wins.
Score = L1 fraction error + share of patches lost to the guard + 0.5 x class-share L1 distance of val and
test from all patches (+10 per empty val/test). The guard removes every train patch that overlaps a
val/test patch and every val patch that overlaps a test patch; the result is then verified: no pixel of
a val or test patch lies in a patch of another split. Output depends only on the manifest content and
the seed, never on file listing order. Larger blocks lose fewer train patches at block borders; smaller
ones balance classes better.
"""

import logging
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aerialseg.core.classes import NUM_CLASSES
from aerialseg.core.errors import AerialsegError
from aerialseg.core.fileio import atomic_path, sha256_file
from aerialseg.core.config import DEFAULT_PARAMS
from aerialseg.data.tiling import COUNT_KEYS, load_manifest

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")
SPLIT_COLORS = {"train": "#4c72b0", "val": "#dd8452", "test": "#55a868"}
EMPTY_PENALTY = 10.0  # score added per held-out split left empty (dominates every other term)
MISMATCH_WEIGHT = 0.5  # weight of the class-share L1 distance (val, test vs all kept patches)
REFINE_WORK = 50_000_000  # hill-climbing budget: evaluations x patches


@dataclass(frozen=True)
class SplitParams:
    """The knobs of the split stage (params.yaml `split`)."""

    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    group: str = "block"
    block_px: int = 384
    seed: int = 42
    candidates: int = 100


# --- geometry -------------------------------------------------------------------------------------

def rects_overlap(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """True when two patches of the same scene share at least one pixel (touching edges do not)."""
    return (a["scene_name"] == b["scene_name"]
            and a["row"] < b["row"] + b["height"] and b["row"] < a["row"] + a["height"]
            and a["col"] < b["col"] + b["width"] and b["col"] < a["col"] + a["width"])


def overlapping_pairs(patches: list[dict[str, Any]]) -> np.ndarray:
    """(P, 2) index pairs i < j of patches sharing a pixel; a spatial hash keeps it linear in patches."""
    pairs: list[tuple[int, int]] = []
    by_scene: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(patches):
        by_scene[p["scene_name"]].append(i)
    for members in by_scene.values():
        cell = max(max(patches[i]["height"], patches[i]["width"]) for i in members)
        buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i in members:
            buckets[(patches[i]["row"] // cell, patches[i]["col"] // cell)].append(i)
        for (br, bc), items in buckets.items():
            near = [j for dr in (-1, 0, 1) for dc in (-1, 0, 1) for j in buckets.get((br + dr, bc + dc), ())]
            pairs.extend((i, j) for i in items for j in near if i < j and rects_overlap(patches[i], patches[j]))
    return np.array(sorted(pairs), dtype=np.int64).reshape(-1, 2)


def find_leaks(patches: list[dict[str, Any]], splits: dict[str, list[str]]) -> list[tuple[str, str]]:
    """Pairs (id, id) of patches in different splits that share a pixel; empty means no leakage."""
    label = {pid: name for name in SPLITS for pid in splits.get(name, [])}
    assigned = [p for p in patches if p["id"] in label]
    pairs = overlapping_pairs(assigned)
    return [(assigned[i]["id"], assigned[j]["id"]) for i, j in pairs
            if label[assigned[i]["id"]] != label[assigned[j]["id"]]]


def unit_key(patch: dict[str, Any], sp: SplitParams) -> tuple[str, int, int]:
    """(scene, block row, block col) of the block holding the patch centre; (scene, 0, 0) by scene."""
    if sp.group == "scene":
        return patch["scene_name"], 0, 0
    centre_row = patch["row"] + patch["height"] / 2
    centre_col = patch["col"] + patch["width"] / 2
    return patch["scene_name"], int(centre_row // sp.block_px), int(centre_col // sp.block_px)


# --- assignment -----------------------------------------------------------------------------------

def assign_units(weights: np.ndarray, fractions: tuple[float, ...], order: np.ndarray) -> np.ndarray:
    """Split index per unit: walking units in `order`, give each to the split furthest below target.

    With 3 or more units, the first units in `order` seed each held-out split with a positive target,
    so val and test are never empty.
    """
    labels = np.zeros(len(weights), dtype=np.int64)
    filled = np.zeros(len(SPLITS))
    targets = np.asarray(fractions) * weights.sum()
    start = 0
    if len(weights) >= len(SPLITS):
        for split in (2, 1):
            if fractions[split] > 0:
                labels[order[start]] = split
                filled[split] += weights[order[start]]
                start += 1
    for unit in order[start:]:
        split = int(np.argmax(targets - filled))
        labels[unit] = split
        filled[split] += weights[unit]
    return labels


def guard(labels: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Boolean per patch: dropped because it overlaps a patch of a more held-out split (test > val > train)."""
    dropped = np.zeros(len(labels), dtype=bool)
    if len(pairs):
        a, b = labels[pairs[:, 0]], labels[pairs[:, 1]]
        dropped[pairs[:, 0][a < b]] = True  # the lower split (train < val < test) gives way
        dropped[pairs[:, 1][b < a]] = True
    return dropped


def class_shares_of(counts: np.ndarray) -> np.ndarray:
    """Shares of classes 0..4 among labelled pixels (ignore left out); zeros when nothing is labelled."""
    labelled = counts[:NUM_CLASSES].astype(np.float64)
    total = labelled.sum()
    return labelled / total if total else labelled


@dataclass
class Candidate:
    """One assignment of units to splits and how good it is."""

    index: int  # which seeded shuffle it started from
    unit_labels: np.ndarray  # split per unit
    labels: np.ndarray  # split per patch before the guard
    dropped: np.ndarray  # per patch: removed by the guard
    score: float
    terms: dict[str, float]


def score_candidate(labels: np.ndarray, dropped: np.ndarray, counts: np.ndarray,
                    fractions: tuple[float, ...]) -> tuple[float, dict[str, float]]:
    """Fraction error (L1) + share of patches lost to the guard + class-share mismatch + empty penalty."""
    kept = ~dropped
    n_kept = max(int(kept.sum()), 1)
    sizes = np.bincount(labels[kept], minlength=len(SPLITS))
    fraction_error = float(np.abs(sizes / n_kept - np.asarray(fractions)).sum())
    guard_loss = float(dropped.mean()) if len(dropped) else 0.0
    overall = class_shares_of(counts[kept].sum(axis=0))
    mismatch = sum(float(np.abs(class_shares_of(counts[kept & (labels == s)].sum(axis=0)) - overall).sum())
                   for s in (1, 2) if sizes[s])
    empty = sum(1 for s in range(len(SPLITS)) if fractions[s] > 0 and sizes[s] == 0)
    terms = {"fraction_error": fraction_error, "guard_loss": guard_loss, "class_share_mismatch": mismatch,
             "empty_splits": float(empty)}
    return fraction_error + guard_loss + MISMATCH_WEIGHT * mismatch + EMPTY_PENALTY * empty, terms


class Scorer:
    """Scores unit assignments of one manifest (patch geometry and counts fixed)."""

    def __init__(self, unit_of_patch: np.ndarray, counts: np.ndarray, pairs: np.ndarray,
                 fractions: tuple[float, ...]):
        self.unit_of_patch, self.counts, self.pairs, self.fractions = unit_of_patch, counts, pairs, fractions
        self.evaluations = 0

    def __call__(self, index: int, unit_labels: np.ndarray) -> Candidate:
        self.evaluations += 1
        labels = unit_labels[self.unit_of_patch]
        dropped = guard(labels, self.pairs)
        score, terms = score_candidate(labels, dropped, self.counts, self.fractions)
        return Candidate(index, unit_labels, labels, dropped, score, terms)


def neighbours(unit_labels: np.ndarray, fractions: tuple[float, ...]) -> Iterator[np.ndarray]:
    """Every assignment one move away: a unit to another split, or two units of different splits swapped."""
    n = len(unit_labels)
    for unit in range(n):
        for split in range(len(SPLITS)):
            if split != unit_labels[unit] and fractions[split] > 0:
                trial = unit_labels.copy()
                trial[unit] = split
                yield trial
    for a in range(n):
        for b in range(a + 1, n):
            if unit_labels[a] != unit_labels[b]:
                trial = unit_labels.copy()
                trial[a], trial[b] = unit_labels[b], unit_labels[a]
                yield trial


def refine(start: Candidate, scorer: Scorer, fractions: tuple[float, ...], budget: int) -> Candidate:
    """Hill-climb (first improvement, fixed order) over single moves and swaps within a work budget."""
    best = start
    improved = True
    while improved and scorer.evaluations < budget:
        improved = False
        for trial_labels in neighbours(best.unit_labels, fractions):
            trial = scorer(best.index, trial_labels)
            if trial.score < best.score - 1e-12:
                best, improved = trial, True
                break
            if scorer.evaluations >= budget:
                break
    return best


def best_candidate(unit_of_patch: np.ndarray, n_units: int, counts: np.ndarray, pairs: np.ndarray,
                   sp: SplitParams) -> Candidate:
    """Best of `sp.candidates` seeded shuffles (ties: the earliest), then refined by hill-climbing."""
    weights = np.bincount(unit_of_patch, minlength=n_units).astype(np.float64)
    scorer = Scorer(unit_of_patch, counts, pairs, sp.fractions)
    best: Candidate | None = None
    for k in range(sp.candidates):
        order = np.random.default_rng([sp.seed, k]).permutation(n_units)
        trial = scorer(k, assign_units(weights, sp.fractions, order))
        if best is None or trial.score < best.score - 1e-12:
            best = trial
    assert best is not None
    budget = scorer.evaluations + max(200, REFINE_WORK // max(len(unit_of_patch), 1))
    return refine(best, scorer, sp.fractions, budget)


# --- the split ------------------------------------------------------------------------------------

def make_split(manifest: dict[str, Any], sp: SplitParams) -> dict[str, Any]:
    """The split.json content for a manifest (deterministic in manifest content and seed)."""
    patches = sorted(manifest["patches"], key=lambda p: p["id"])
    if not patches:
        raise AerialsegError("the tile manifest holds no patch", None, "rerun aerialseg tiles")
    keys = [unit_key(p, sp) for p in patches]
    units = sorted(set(keys))
    unit_index = {u: i for i, u in enumerate(units)}
    unit_of_patch = np.array([unit_index[k] for k in keys], dtype=np.int64)
    counts = np.array([p["counts"] for p in patches], dtype=np.int64)
    pairs = overlapping_pairs(patches)
    best = best_candidate(unit_of_patch, len(units), counts, pairs, sp)
    final = {name: [p["id"] for p, lab, drop in zip(patches, best.labels, best.dropped) if lab == s and not drop]
             for s, name in enumerate(SPLITS)}
    empty = [name for s, name in enumerate(SPLITS) if sp.fractions[s] > 0 and not final[name]]
    if empty:
        raise AerialsegError(f"split(s) {', '.join(empty)} would be empty: only {len(units)} "
                             f"{'scene' if sp.group == 'scene' else 'block'}(s) hold patches",
                             DEFAULT_PARAMS, "lower split.block_px, use split.group: block, or add scenes")
    leaks = find_leaks(patches, final)
    if leaks:  # cannot happen after the guard; checked so a bug can never ship a leaky split
        raise RuntimeError(f"split leaks pixels between splits, e.g. {leaks[0]}")
    return {
        "version": 1, "seed": sp.seed, "group": sp.group, "block_px": sp.block_px if sp.group == "block" else None,
        "fractions": list(sp.fractions), "candidate": best.index, "score": round(best.score, 6),
        "score_terms": {k: round(v, 6) for k, v in best.terms.items()},
        "splits": final, "sizes": {name: len(ids) for name, ids in final.items()},
        "units": unit_records(units, unit_of_patch, best, sp, SPLITS),
        "guard_dropped": [{"id": p["id"], "assigned": SPLITS[lab]}
                          for p, lab, drop in zip(patches, best.labels, best.dropped) if drop],
        "leaks": 0,
    }


def unit_records(units: list[tuple[str, int, int]], unit_of_patch: np.ndarray, best: Candidate,
                 sp: SplitParams, names: tuple[str, ...]) -> list[dict[str, Any]]:
    """One record per scene/block: where it is, which split it went to, how many patches it held."""
    records = []
    for i, (scene, block_row, block_col) in enumerate(units):
        members = unit_of_patch == i
        record: dict[str, Any] = {"scene_name": scene, "split": names[int(best.unit_labels[i])],
                                  "patches": int(members.sum()),
                                  "dropped_by_guard": int(best.dropped[members].sum())}
        if sp.group == "block":
            record.update(block_row=block_row, block_col=block_col,
                          bounds=[block_row * sp.block_px, block_col * sp.block_px,
                                  (block_row + 1) * sp.block_px, (block_col + 1) * sp.block_px])
        records.append(record)
    return records


def class_shares(manifest: dict[str, Any], split: dict[str, Any]) -> dict[str, Any]:
    """Class pixel counts and shares per split (shares of classes 0..4 among labelled pixels sum to 1).

    Pixels in the overlap of two patches of one split count once per patch, as training sees them.
    """
    by_id = {p["id"]: p for p in manifest["patches"]}
    out: dict[str, Any] = {"count_keys": list(COUNT_KEYS), "classes": list(COUNT_KEYS[:NUM_CLASSES]), "splits": {}}
    for name in SPLITS:
        ids = split["splits"][name]
        counts = np.array([by_id[i]["counts"] for i in ids], dtype=np.int64).reshape(-1, len(COUNT_KEYS)).sum(0)
        shares = class_shares_of(counts)
        total = int(counts.sum())
        out["splits"][name] = {
            "patches": len(ids), "pixels": dict(zip(COUNT_KEYS, (int(c) for c in counts))),
            "shares": dict(zip(COUNT_KEYS[:NUM_CLASSES], (round(float(s), 6) for s in shares))),
            "ignore_fraction": round(float(counts[-1]) / total, 6) if total else 0.0,
        }
    return out


def share_table(shares: dict[str, Any]) -> str:
    """Class shares per split as a fixed-width text table."""
    classes = shares["classes"]
    head = f"{'split':<6}{'patches':>8}" + "".join(f"{c:>11}" for c in classes) + f"{'ignore':>9}"
    rows = [head]
    for name, s in shares["splits"].items():
        rows.append(f"{name:<6}{s['patches']:>8}" + "".join(f"{100 * s['shares'][c]:>10.1f}%" for c in classes)
                    + f"{100 * s['ignore_fraction']:>8.1f}%")
    return "\n".join(rows)


# --- figures --------------------------------------------------------------------------------------

def plot_split(manifest: dict[str, Any], split: dict[str, Any], shares: dict[str, Any], dest: Path) -> Path:
    """One PNG: class shares per split (bars) and, per scene, where train/val/test patches lie."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    scenes = manifest["scenes"]
    ncols = min(3, len(scenes))
    nrows = 1 + -(-len(scenes) // ncols)
    fig = plt.figure(figsize=(4.2 * max(ncols, 2), 3.4 * nrows))
    bars = fig.add_subplot(nrows, 1, 1)
    classes, width = shares["classes"], 0.8 / len(SPLITS)
    for k, name in enumerate(SPLITS):
        values = [100 * shares["splits"][name]["shares"][c] for c in classes]
        bars.bar(np.arange(len(classes)) + (k - 1) * width, values, width, color=SPLIT_COLORS[name],
                 label=f"{name} ({shares['splits'][name]['patches']} patches)")
    bars.set_xticks(np.arange(len(classes)), classes)
    bars.set_ylabel("% of labelled pixels")
    bars.set_title(f"class shares per split (group={split['group']}, seed={split['seed']})")
    bars.legend(fontsize=8)
    label = {pid: name for name in SPLITS for pid in split["splits"][name]}
    for i, scene in enumerate(scenes):
        ax = fig.add_subplot(nrows, ncols, ncols + i + 1)
        for p in manifest["patches"]:
            if p["scene_name"] != scene["scene_name"]:
                continue
            name = label.get(p["id"])
            ax.add_patch(Rectangle((p["col"], p["row"]), p["width"], p["height"], linewidth=0.4,
                                   facecolor=SPLIT_COLORS[name] if name else "none", alpha=0.45 if name else 1,
                                   edgecolor="black" if name is None else SPLIT_COLORS[name],
                                   hatch="xx" if name is None else None))
        ax.set_xlim(0, scene["width"])
        ax.set_ylim(scene["height"], 0)
        ax.set_aspect("equal")
        ax.set_title(scene["scene_name"], fontsize=9)
        ax.tick_params(labelsize=6)
    fig.tight_layout()
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return dest


def load_split(path: str | Path) -> dict[str, Any]:
    """Read data/split/split.json with a clear error when it is missing or broken."""
    from aerialseg.core.fileio import read_stage_json

    path = Path(path)
    split = read_stage_json(path, "split file", "split")
    if not isinstance(split, dict) or not isinstance(split.get("splits"), dict):
        raise AerialsegError("not a split file (no 'splits')", path, "rerun aerialseg split")
    return split


def split_patches(manifest: str | Path, split_file: str | Path, split: str) -> list[dict[str, Any]]:
    """The manifest records of one split's patches, checked against the manifest the split was made from."""
    manifest_data, split_data = load_manifest(manifest), load_split(split_file)
    made_from = split_data.get("manifest_sha256")
    if made_from and made_from != sha256_file(manifest):
        raise AerialsegError(f"split was made from another tile manifest than {manifest}", split_file,
                             "rerun aerialseg split (and augment) after aerialseg tiles")
    if split not in split_data["splits"]:
        raise AerialsegError(f"no split '{split}' (has {', '.join(split_data['splits'])})", split_file,
                             "use train, val or test")
    by_id = {p["id"]: p for p in manifest_data["patches"]}
    ids = split_data["splits"][split]
    unknown = [i for i in ids if i not in by_id]
    if unknown:
        raise AerialsegError(f"split names patch {unknown[0]} that the manifest lacks ({len(unknown)} in all)",
                             split_file, "rerun aerialseg split after aerialseg tiles")
    return [by_id[i] for i in ids]
