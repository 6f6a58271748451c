"""Scaling on CPU: sampling time (full, FORA, L2C budget) and router-training step time vs token count
(latent size at patch 2) and depth, DiT-S width (384, 6 heads), batch 1 with CFG. One PNG.

What to read: the cached/full time ratio should approach the MAC ratio as tokens grow (per-call
overhead is fixed, work grows with T); at 16 tokens overhead dominates and caching gains little.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

from diffcache.backbones import load_backbone
from diffcache.metrics.cost import policy_cost
from diffcache.metrics.latency import measure
from diffcache.policies.fora import FORAPolicy
from diffcache.policies.l2c import L2CPolicy
from diffcache.sampling import sample
from diffcache.solvers import make_solver

from .common import markdown_table, seeded_inputs
from .speed import _interleaved

POLICIES = {"full": lambda: None, "fora": lambda: FORAPolicy(interval=3),
            "l2c": lambda: L2CPolicy(init_seed=0, budget=0.75)}


def point(input_size: int, depth: int, steps: int, guidance: float, repeats: int, train_batch: int) -> list[dict]:
    from .train import step_fn

    dev = torch.device("cpu")
    model = load_backbone("DiT-S/2", random_init=True, input_size=input_size, depth=depth)
    solver = make_solver("ddim", steps, schedule="linear")
    noise, y = seeded_inputs(model, 1, dev, torch.float32)
    full_macs = policy_cost(model, solver, None, guidance=guidance)["macs_cfg"]
    entries = []
    for name, make in POLICIES.items():
        pol = make()
        entries.append({"name": name, "fn": (lambda p=pol: sample(model, solver, p, noise, y, guidance=guidance)),
                        "ideal": full_macs / policy_cost(model, solver, pol, guidance=guidance)["macs_cfg"]})
    entries[0]["fn"]()  # warm
    _interleaved(entries, dev, repeats)  # round-robin: load drift hits every policy alike
    base = statistics.median(entries[0]["times"])
    rows = []
    for e in entries:
        med = statistics.median(e["times"])
        rows.append({"what": f"sample:{e['name']}", "tokens": model.num_tokens, "depth": depth,
                     "median_s": round(med, 4), "min_s": round(min(e["times"]), 4), "speedup": round(base / med, 3),
                     "ideal_speedup": round(e["ideal"], 3), "efficiency": round(base / med / e["ideal"], 3)})
    _, step = step_fn("DiT-S/2", train_batch, dev, steps=steps, input_size=input_size, depth=depth)
    lat = measure(step, repeats=repeats, warmup=1)
    rows.append({"what": "train_step:l2c", "tokens": model.num_tokens, "depth": depth,
                 "median_s": round(lat["median_s"], 4), "min_s": round(lat["min_s"], 4), "batch": train_batch})
    for r in rows:
        print(json.dumps(r), flush=True)
    return rows


def run(sizes=(8, 16, 32), depths=(4, 8, 12), base_size: int = 16, base_depth: int = 12, steps: int = 10,
        guidance: float = 1.5, repeats: int = 3, train_batch: int = 2) -> list[dict]:
    rows = []
    done = set()
    for s in sizes:
        rows += [dict(r, axis="tokens") for r in point(s, base_depth, steps, guidance, repeats, train_batch)]
        done.add((s, base_depth))
    for d in depths:
        pts = point(base_size, d, steps, guidance, repeats, train_batch) if (base_size, d) not in done else \
            [dict(r) for r in rows if r["tokens"] == (base_size // 2) ** 2 and r["depth"] == d]
        rows += [dict(r, axis="depth") for r in pts]
    return rows


def plot(rows: list[dict], path: Path, caption: str = "") -> Path:
    """Seconds against tokens and depth; ``caption`` (command, commit, machine) is printed under the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, axis, key, label in ((axes[0], "tokens", "tokens", "image tokens (latent 8/16/32, patch 2)"),
                                 (axes[1], "depth", "depth", "depth (blocks), 64 tokens")):
        sub = [r for r in rows if r["axis"] == axis]
        for what in sorted({r["what"] for r in sub}):
            pts = sorted((r[key], r["median_s"]) for r in sub if r["what"] == what)
            style = "--" if what.startswith("train") else "-"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=what)
        ax.set_xlabel(label)
        ax.set_ylabel("seconds (median)")
        if axis == "tokens":
            ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle("DiT-S width, CPU, batch 1 + CFG, DDIM-10 sampling; router-distillation step (batch 2)")
    if caption:
        fig.text(0.01, 0.01, caption, fontsize=7, ha="left", va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.06 if caption else 0, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


COLUMNS = [("axis", "axis"), ("what", "what"), ("tokens", "tokens"), ("depth", "depth"), ("median s", "median_s"),
           ("min s", "min_s"),
           ("speedup", "speedup"), ("ideal (MACs)", "ideal_speedup"), ("efficiency", "efficiency")]


def table(rows: list[dict]) -> str:
    return markdown_table(rows, COLUMNS)
