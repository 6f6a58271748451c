"""The picture of a searched schedule: the measured error table next to the chosen compute mask."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..utils.figures import save_figure


def schedule_heatmap(table, reuse: np.ndarray, path, title: str = "") -> Path:
    """Left: log10 of the error table (cache evaluation x site); right: the mask (white = compute, black = reuse)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    E = table.errors.numpy()
    rows = [f"nfe {e + 1} (r{r})" for e, r in zip(table.cache_evals, table.routers)]
    w = max(4.0, 0.22 * E.shape[1])
    fig, axes = plt.subplots(1, 2, figsize=(2 * w + 1.5, max(2.5, 0.32 * E.shape[0] + 1.2)), dpi=100)
    im = axes[0].imshow(np.log10(np.maximum(E, 1e-30)), cmap="magma", aspect="auto", interpolation="nearest")
    axes[0].set_title(f"log10 error ({table.proxy} proxy, {table.num_samples} samples)", fontsize=9)
    fig.colorbar(im, ax=axes[0], fraction=0.04)
    axes[1].imshow(~np.asarray(reuse, dtype=bool), cmap="gray", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    axes[1].set_title(title or "mask: white = compute, black = reuse", fontsize=9)
    for ax in axes:
        ax.set_yticks(range(len(rows)), rows, fontsize=7)
        ax.set_xticks(range(len(table.sites)), table.sites, fontsize=6, rotation=90)
        ax.set_xlabel("site (layer.branch)")
    axes[0].set_ylabel("cache evaluation")
    fig.tight_layout()
    return save_figure(fig, path)
