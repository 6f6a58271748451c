"""Sample grids a reader can use: every row says what made it (method, MACs, PSNR), every column which class
(or prompt) it was asked for, and the figure names its source in a caption inside the image."""
from __future__ import annotations

from pathlib import Path

import torch

from .figures import save_figure


def _strip(x: torch.Tensor):
    """(N, C, H, W) images in [0, 1] -> one (H, N * (W + 2), 3) strip for ``imshow``."""
    from torchvision.utils import make_grid

    x = x.float().clamp(0, 1)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return make_grid(x[:, :3], nrow=x.shape[0], padding=2, pad_value=1.0).permute(1, 2, 0).numpy()


def labelled_grid(rows: list[torch.Tensor], row_labels: list[str], col_labels: list[str] | None, path,
                  caption: str = "") -> Path:
    """One strip per row (images in [0, 1], the same count in every row), its label on the left, the column
    labels above the first row, ``caption`` below the grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = rows[0].shape[0]
    chars = max(len(line) for label in row_labels for line in label.split("\n"))  # the label column's width
    width = max(6.0, 0.55 * n + 0.07 * chars + 0.5)
    fig, axes = plt.subplots(len(rows), 1, figsize=(width, 0.62 * len(rows) + 0.9), dpi=130, squeeze=False)
    for ax, x, label in zip(axes[:, 0], rows, row_labels):
        img = _strip(x)
        ax.imshow(img, interpolation="nearest")
        ax.set_yticks([])
        ax.set_xticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
        for side in ax.spines.values():
            side.set_visible(False)
    if col_labels:
        top = axes[0, 0]
        w = _strip(rows[0]).shape[1] / n
        top.set_xticks([w * (i + 0.5) for i in range(n)])
        top.set_xticklabels(col_labels[:n], fontsize=7)
        top.xaxis.tick_top()
        top.tick_params(length=0)
    if caption:
        fig.text(0.01, 0.005, caption, fontsize=6, ha="left", va="bottom", wrap=True)
    fig.subplots_adjust(left=min(0.6, (0.07 * chars + 0.2) / width), right=0.99, top=0.9 if col_labels else 0.98,
                        bottom=0.12 if caption else 0.02, hspace=0.08)
    return save_figure(fig, path)


def class_labels(cond, n: int) -> list[str] | None:
    """Column labels of class-conditional samples (``class 3``); None for other conditioning."""
    if isinstance(cond, torch.Tensor) and cond.ndim == 1 and cond.dtype in (torch.int64, torch.int32):
        return [f"class {int(c)}" for c in cond[:n]]
    return None
