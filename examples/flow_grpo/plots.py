"""The run's pictures: the reward curve, and the samples of the first and the last iteration side by side."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def reward_curve(history: list[dict], path: Path, title: str):
    its = np.array([h["iteration"] for h in history])
    mean = np.array([h["reward_mean"] for h in history])
    std = np.array([h["reward_std"] for h in history])
    fig, ax = plt.subplots(figsize=(5.5, 3.4), dpi=110)
    ax.plot(its, mean, marker="o", ms=3, lw=1.5, color="#1f77b4", label="mean reward")
    ax.fill_between(its, mean - std, mean + std, color="#1f77b4", alpha=0.18, lw=0, label="± std over samples")
    ax.set_xlabel("iteration (weight_version of the rollouts + 1)")
    ax.set_ylabel("reward")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def sample_grid(first: dict, last: dict, path: Path, max_rows: int = 2, max_cols: int = 4):
    """first / last: {"iteration", "images": [prompts][group] uint8 HxWx3 arrays, "rewards": same shape, "prompts"}."""
    panels = [first, last]
    rows = min(max_rows, len(first["images"]))
    cols = min(max_cols, len(first["images"][0]))
    fig, axes = plt.subplots(rows, 2 * cols, figsize=(2 * cols * 0.95, rows * 1.15 + 0.5), dpi=110, squeeze=False)
    for p, panel in enumerate(panels):
        for r in range(rows):
            for c in range(cols):
                ax = axes[r][p * cols + c]
                ax.imshow(panel["images"][r][c], interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_title(f"{panel['rewards'][r][c]:.2f}", fontsize=6, pad=1)
                if c == 0:
                    ax.set_ylabel(panel["prompts"][r][:18], fontsize=6)
        axes[0][p * cols].annotate(f"iteration {panel['iteration']}", xy=(0, 1.35), xycoords="axes fraction",
                                   fontsize=8, weight="bold")
    fig.tight_layout(pad=0.3)
    fig.savefig(path)
    plt.close(fig)
