"""The run's history: ``history.csv`` (for ``dvc plots``) and ``curves.png`` (loss and mIoU per epoch)."""

import csv
from pathlib import Path
from typing import Any

from aerialseg.core.fileio import atomic_path

HISTORY_FIELDS = ("epoch", "train_loss", "val_loss", "val_mIoU", "lr", "seconds")


def write_history(out_dir: Path, history: list[dict[str, Any]]) -> None:
    """history.csv (for ``dvc plots``) and curves.png (loss and mIoU per epoch)."""
    with atomic_path(out_dir / "history.csv") as tmp:
        with tmp.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(history)
    plot_history(history, out_dir / "curves.png")


def plot_history(history: list[dict[str, Any]], dest: Path) -> Path:
    """Two panels: train/val loss and val mIoU against epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_miou) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [row["train_loss"] for row in history], "o-", label="train")
    ax_loss.plot(epochs, [row["val_loss"] for row in history], "o-", label="val")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_loss.legend()
    ax_miou.plot(epochs, [row["val_mIoU"] for row in history], "o-", color="tab:green")
    ax_miou.set(xlabel="epoch", ylabel="mIoU", title="validation mIoU", ylim=(0, 1))
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_loss, ax_miou):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return dest
