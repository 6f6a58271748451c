"""The one Pareto plot: quality and PSNR to the full sampler against MACs, one colour per method, points
labelled by what distinguishes them (a trained router's swept values, a baseline's parameters), error bars
from the spread over seeds, and in each panel the front it names drawn through the non-dominated points."""
from __future__ import annotations

from pathlib import Path

from .figures import save_figure
from .record import QUALITY, Row, varying


def pareto_front(points: list[tuple[float, float]], higher_better: bool) -> list[tuple[float, float]]:
    """Points no other point beats on both axes (x: lower is better)."""
    key = (lambda q: -q) if higher_better else (lambda q: q)
    return sorted(p for p in points if not any(o != p and o[0] <= p[0] and key(o[1]) <= key(p[1]) for o in points))


def _panels(rows: list[Row]) -> list[tuple[str, str, bool]]:
    """The first reported distribution metric (FID-like) and PSNR to full, when reported."""
    have = [(k, h, hb) for k, h, hb in QUALITY if any(k in r.metrics for r in rows)]
    first = next((q for q in have if q[0] not in ("psnr", "mse", "precision", "recall")), None)
    return [q for q in (first, next((q for q in have if q[0] == "psnr"), None)) if q is not None]


def pareto_png(rows: list[Row], path: str | Path, caption: str = "") -> Path | None:
    """Draw ``rows`` (records with ``macs_fraction``); None when none reports a quality metric."""
    rows = [r for r in rows if r.macs_fraction is not None]
    panels = _panels(rows)
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels), 5.8), dpi=110, squeeze=False)
    swept = varying(rows)
    colours = {m: plt.cm.tab10(i % 10) for i, m in enumerate(dict.fromkeys(r.method for r in rows))}
    for ax, (key, header, higher) in zip(axes[0], panels):
        pts = [r for r in rows if key in r.metrics]
        for method in dict.fromkeys(r.method for r in pts):
            sub = [r for r in pts if r.method == method]
            ax.errorbar([r.macs_fraction for r in sub], [r.metrics[key] for r in sub],
                        yerr=[r.spread.get(key, 0.0) for r in sub], fmt="o", capsize=3, color=colours[method],
                        label=method)
            for r in sub:
                ax.annotate(r.short(swept)[:32], (r.macs_fraction, r.metrics[key]), fontsize=6, xytext=(3, 3),
                            textcoords="offset points")
        front = pareto_front([(r.macs_fraction, r.metrics[key]) for r in pts], higher)
        ax.plot([x for x, _ in front], [y for _, y in front], "--", color="0.4", lw=1, label="Pareto front")
        ys = [r.metrics[key] for r in pts if r.metrics[key] > 0]
        if not higher and ys and max(ys) > 5 * min(ys):  # a few exploded rows would flatten the rest
            ax.set_yscale("log")
        ax.set_xlabel("MACs per image (fraction of the full sampler, CFG included)")
        ax.set_ylabel(f"{header} ({'higher' if higher else 'lower'} is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if caption:
        fig.text(0.01, 0.01, caption, fontsize=7, ha="left", va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.05 if caption else 0, 1, 1))
    return save_figure(fig, path)
