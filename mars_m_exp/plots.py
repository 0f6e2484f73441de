"""The run's loss plot, drawn from `metrics.jsonl`."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .metrics import read_metrics  # noqa: E402


def plot_losses(metrics_path: str | Path, out_path: str | Path, title: str = "") -> None:
    """Plot training and validation loss against tokens seen into a PNG file."""
    records = read_metrics(metrics_path)
    train = [(r["tokens"], r["train_loss"]) for r in records if r.get("event") == "train" and isinstance(r.get("train_loss"), float)]
    val = [(r["tokens"], r["val_loss"]) for r in records if r.get("event") == "eval" and isinstance(r.get("val_loss"), float)]

    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot(*zip(*train), label="train", alpha=0.7)
    if val:
        ax.plot(*zip(*val), marker="o", label="validation")
    ax.set_xlabel("tokens")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
