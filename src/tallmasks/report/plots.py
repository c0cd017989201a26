"""Plots that are easier to look at than to read."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tallmasks.io.checkpoints import atomic_path


def draw_agreement(ax, agreement: Sequence[int], title: str) -> None:
    """Bars on ``ax``: share of weights switched on by exactly 0, 1, ..., T task masks."""
    total = max(sum(agreement), 1)
    shares = [100.0 * n / total for n in agreement]
    colors = ["#c0392b", "#e67e22"] + ["#2e86c1"] * max(len(shares) - 2, 0)
    ax.bar(range(len(shares)), shares, color=colors[: len(shares)])
    ax.set_xticks(range(len(shares)))
    ax.set_xlabel("number of tasks whose mask keeps the weight")
    ax.set_ylabel("share of weights (%)")
    ax.set_ylim(0, max(shares + [1.0]) * 1.15)
    ax.set_title(title)
    for index, label in ((0, "catastrophic"), (1, "selfish")):
        if index < len(shares):
            ax.annotate(f"{label}\n{shares[index]:.1f}%", (index, shares[index]), ha="center", va="bottom", fontsize=7)


def plot_agreement(agreement: Sequence[int], path: str | Path, title: str = "Mask agreement profile") -> Path:
    """Bar chart of one agreement profile (PNG, atomic)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(agreement) + 2), 3.2), dpi=120)
    draw_agreement(ax, agreement, title)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
