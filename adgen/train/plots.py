"""loss.png: train loss per step (raw and smoothed) with eval loss points, and the learning rate."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

from adgen.io import atomic_write_bytes


def _smooth(values: Sequence[float], half: int) -> list[float]:
    """Centred moving average (no lag, unlike an EMA on short runs)."""
    out = []
    for i in range(len(values)):
        window = values[max(0, i - half) : i + half + 1]
        out.append(sum(window) / len(window))
    return out


def plot_losses(rows: Sequence[dict], path: str | Path, title: str = "",
                ylabel: str = "loss (mean token cross-entropy)") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    if train:
        steps = [r["step"] for r in train]
        losses = [r["loss"] for r in train]
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=1, label="train loss")
        if len(losses) > 5:
            half = max(1, min(50, len(losses) // 20))
            ax.plot(steps, _smooth(losses, half), color="tab:blue", linewidth=1.8,
                    label=f"train loss (moving average of {2 * half + 1} logged steps)")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", color="tab:orange",
                linewidth=1.8, label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if train and any("lr" in r for r in train):
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in train], [r.get("lr", 0.0) for r in train], color="tab:gray",
                 linestyle=":", linewidth=1, label="lr")
        ax2.set_ylabel("learning rate", color="tab:gray")
        ax2.tick_params(axis="y", colors="tab:gray")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, loc="upper right")
    else:
        ax.legend(loc="upper right")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
