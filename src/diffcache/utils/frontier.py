"""A sweep's comparison tables gathered into one frontier: every method's quality and compute, mean +- std
over seeds, and one PNG of quality against MACs with the Pareto-optimal methods joined.

Each run of a ``train.py -m`` sweep with ``compare`` writes ``comparison.json`` (the router next to full,
fewer steps, FORA and ToCa). Baseline rows repeat in every run of a seed (reused from the compare cache), so
rows are keyed by (method, seed) and counted once; L2C rows are named after the run's overrides without the
seed (``L2C policy.lam=1e-05 data=noise``). The std is over seeds (population std, 0 for one seed).
"""
from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

from .figures import save_figure
from .pareto import pareto_front

METRICS = ["mnist_fid", "mnist_is", "fid", "is", "psnr", "macs_fraction", "gmacs", "latency_s", "speedup_latency",
           "train_s", "search_s"]
QUALITY = [("mnist_fid", False), ("fid", False), ("tiny_fid", False), ("psnr", True)]  # first present is the axis


def _seed(overrides: list[str]) -> int:
    return next((int(o.split("=", 1)[1]) for o in overrides if o.startswith("seed=")), 0)


def _group(row: dict, overrides: list[str], lam=None) -> str:
    if row.get("kind") not in ("l2c", "budget"):  # baselines and searches: the same in every run of a seed
        return row["method"]
    skip = ("seed=", "hydra", "experiment=", "paths.", "compare.")  # not what makes the router
    rest = " ".join(o.lstrip("+") for o in overrides if not o.lstrip("+").startswith(skip))
    if lam is not None and "lam=" not in rest:  # e.g. an arm (conf/arm/) that sets lambda itself
        rest += f" lam={lam:g}"
    return f"L2C {rest}".strip() + f" ({row['method'].split(' ', 1)[1]})"


def gather(sweep_dir: str | Path) -> list[dict]:
    """Rows ``{"method", "kind", "seeds", "<metric>_mean", "<metric>_std", ...}`` of every run's comparison."""
    seen: dict[tuple[str, int], dict] = {}
    kinds: dict[str, str] = {}
    for run in sorted(p for p in Path(sweep_dir).iterdir() if p.is_dir()):
        comp, summ = run / "comparison.json", run / "summary.json"
        if not comp.is_file():
            continue
        summary = json.loads(summ.read_text()) if summ.is_file() else {}
        overrides = summary.get("overrides", [])
        for row in json.loads(comp.read_text()):
            g = _group(row, overrides, summary.get("lam"))
            kinds[g] = row.get("kind", "")
            seen.setdefault((g, _seed(overrides)), row)
    out = []
    for g in dict.fromkeys(k[0] for k in seen):
        runs = [r for (name, _), r in seen.items() if name == g]
        row = {"method": g, "kind": kinds[g], "seeds": len(runs)}
        for m in METRICS:
            vals = [float(r[m]) for r in runs if r.get(m) is not None]
            if vals:
                row[f"{m}_mean"] = statistics.fmean(vals)
                row[f"{m}_std"] = statistics.pstdev(vals) if len(vals) > 1 else 0.0
        out.append(row)
    return sorted(out, key=lambda r: -r.get("macs_fraction_mean", 0.0))


def write_frontier(rows: list[dict], sweep_dir: str | Path) -> Path | None:
    """``frontier.{md,csv}`` and ``frontier.png`` in ``sweep_dir``; returns the Markdown path."""
    if not rows:
        return None
    sweep_dir = Path(sweep_dir)
    cols = ["method", "seeds"] + [m for m in METRICS if any(f"{m}_mean" in r for r in rows)]
    with open(sweep_dir / "frontier.csv", "w", newline="") as fh:
        keys = ["method", "kind", "seeds"] + [f"{m}_{s}" for m in cols[2:] for s in ("mean", "std")]
        w = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    cell = lambda r, m: (f"{r[m + '_mean']:.4g} ± {r[m + '_std']:.2g}" if f"{m}_mean" in r else "")  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join([r["method"], str(r["seeds"])] + [cell(r, m) for m in cols[2:]]) + " |" for r in rows]
    md = sweep_dir / "frontier.md"
    md.write_text("\n".join(lines) + "\n")
    frontier_png(rows, sweep_dir / "frontier.png")
    return md


def short_label(row: dict) -> str:
    """A point's label: the arm / lambda of a trained router, the budget of a search (dp only: greedy lands on
    the same point), the method otherwise."""
    m = row["method"]
    if row.get("kind") == "search":
        return "" if " greedy " in f" {m} " else m.replace("search dp ", "search ")
    if row.get("kind") in ("l2c", "budget"):
        words = [w for w in m.split() if w.startswith("arm=")] or [w for w in m.split() if "lam=" in w]
        tail = m[m.rfind("(") + 1:-1] if m.endswith(")") else ""
        return " ".join([w.split("=", 1)[1] for w in words] + ([tail.split()[-1]] if row["kind"] == "budget" else []))
    return m.replace("fewer steps ", "").replace("steps ", "")


def frontier_png(rows: list[dict], path: Path) -> Path | None:
    """Quality (the first of QUALITY present, e.g. MNIST-FID) and, when present, PSNR to the full sampler, each
    against MACs with its Pareto front; one colour per kind of method."""
    metric = next(((m, hb) for m, hb in QUALITY if any(f"{m}_mean" in r for r in rows)), None)
    if metric is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [metric] + ([("psnr", True)] if metric[0] != "psnr" and any("psnr_mean" in r for r in rows) else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels), 5.5), dpi=110, squeeze=False)
    colors = {"full": "black", "steps": "tab:gray", "l2c": "tab:red", "fora": "tab:blue", "toca": "tab:green",
              "search": "tab:purple", "budget": "tab:orange"}
    for ax, (name, higher) in zip(axes[0], panels):
        pts = [r for r in rows if f"{name}_mean" in r and "macs_fraction_mean" in r and
               (name != "psnr" or r.get("kind") != "full")]  # the full sampler's PSNR to itself is infinite
        for kind in dict.fromkeys(r["kind"] for r in pts):
            sub = [r for r in pts if r["kind"] == kind]
            ax.errorbar([r["macs_fraction_mean"] for r in sub], [r[f"{name}_mean"] for r in sub],
                        yerr=[r[f"{name}_std"] for r in sub], fmt="o", capsize=3, color=colors.get(kind), label=kind)
            for r in sub:
                ax.annotate(short_label(r)[:28], (r["macs_fraction_mean"], r[f"{name}_mean"]), fontsize=6,
                            xytext=(3, 3), textcoords="offset points")
        front = pareto_front([(r["macs_fraction_mean"], r[f"{name}_mean"]) for r in pts], higher)
        ax.plot([x for x, _ in front], [y for _, y in front], "--", color="0.5", lw=1, label="Pareto front")
        ys = [r[f"{name}_mean"] for r in pts if r[f"{name}_mean"] > 0]
        if not higher and ys and max(ys) > 5 * min(ys):  # a few exploded rows would flatten the rest
            ax.set_yscale("log")
        ax.set_xlabel("MACs per image (fraction of the full sampler, CFG included)")
        ax.set_ylabel(f"{name} ({'higher' if higher else 'lower'} is better; mean ± std over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path)
