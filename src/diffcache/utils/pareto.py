"""Quality against compute for a sweep: one PNG with quality vs MACs (and vs latency when measured), the
Pareto-optimal runs joined (lower MACs / latency and better quality)."""
from __future__ import annotations

from pathlib import Path

from .figures import save_figure

# the first of these that the runs report is the quality axis; True = higher is better
QUALITY = [("val/mnist_fid", False), ("val/fid", False), ("psnr_vs_full_db", True), ("val/psnr", True),
           ("mse_vs_full", False), ("train/mse", False)]


def pareto_front(points: list[tuple[float, float]], higher_better: bool) -> list[tuple[float, float]]:
    """Points no other point beats on both axes (x: lower is better)."""
    key = (lambda q: -q) if higher_better else (lambda q: q)
    return sorted(p for p in points if not any(o != p and o[0] <= p[0] and key(o[1]) <= key(p[1]) for o in points))


def pareto_png(rows: list[dict], path: str | Path) -> Path | None:
    """Draw the sweep's runs; None when they report no compute and quality pair."""
    ok = [r for r in rows if r.get("macs_fraction") is not None]
    metric = next(((m, hb) for m, hb in QUALITY if any(r.get(m) is not None for r in ok)), None)
    if not ok or metric is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name, higher = metric
    axes_x = [("macs_fraction", "MACs (fraction of the uncached sampler)")]
    if any(r.get("latency_cached_s") is not None for r in ok):
        axes_x.append(("latency_cached_s", "latency (s, median)"))
    fig, axs = plt.subplots(1, len(axes_x), figsize=(5.5 * len(axes_x), 4.2), dpi=110, squeeze=False)
    for ax, (key, label) in zip(axs[0], axes_x):
        pts = [(float(r[key]), float(r[name]), r["run"]) for r in ok if r.get(key) is not None and r.get(name) is not None]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], color="tab:blue")
        for x, y, run in pts:
            ax.annotate(run[:28], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        front = pareto_front([(x, y) for x, y, _ in pts], higher)
        ax.plot([p[0] for p in front], [p[1] for p in front], color="tab:red", lw=1.2, label="Pareto front")
        ax.set_xlabel(label)
        ax.set_ylabel(f"{name} ({'higher' if higher else 'lower'} is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{len(ok)} runs", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)
