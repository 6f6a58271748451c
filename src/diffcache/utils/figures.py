"""One way to write a matplotlib figure to disk (parent folders made, figure closed)."""
from __future__ import annotations

from pathlib import Path


def save_figure(fig, path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
