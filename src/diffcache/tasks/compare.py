"""The comparison users care about: a trained router against the cheap alternatives, on one teacher and one
fixed seeded sample set, at equal compute.

Rows: the full sampler; L2C at its theta; the fewest-step version of the same solver whose MACs are >= L2C's
(the "fewer steps" baseline at equal compute); FORA at each interval asked for; ToCa with the backbone's
preset. Each row: quality from the configured metrics (e.g. MNIST-FID / MNIST-IS), PSNR / MSE to the full
sampler on the same noise, MACs per image (CFG included), latency (median wall time of one batch: of the
quality batches themselves by default, or of ``latency_repeats`` extra runs after a warm-up) and the measured
speedup. Written as ``comparison.{csv,md,json}`` and printed, with ``comparison_samples.png`` (one row of samples per method, same noise and labels in every column) when the
backbone samples images.
"""
from __future__ import annotations

import csv
import json
import logging
import statistics
from pathlib import Path

import torch
from hydra.utils import instantiate

from ..data.seeded import seeded_inputs
from ..metrics.cost import policy_cost
from ..metrics.latency import measure
from ..policies.fora import FORAPolicy
from ..policies.l2c import L2CPolicy
from ..policies.toca import ToCaPolicy
from ..sampling import sample

log = logging.getLogger(__name__)
GRID_COLUMNS = 12


def _samples(backbone, solver, policy, n: int, bs: int, guidance, seed: int, device):
    """The seeded set and the wall time of each full batch (the latency when ``latency_repeats`` is 0)."""
    out, times = [], []
    for start in range(0, n, bs):
        noise, cond = seeded_inputs(backbone, range(start, min(start + bs, n)), seed, device)
        t = measure(lambda: out.append(sample(backbone, solver, policy, noise, cond, guidance,
                                              generator=torch.Generator().manual_seed(seed + start)).cpu()),
                    repeats=1, warmup=0, device=device)
        if noise.shape[0] == bs:
            times.append(t["median_s"])
    return torch.cat(out), times


def fewer_steps(solver_cfg, backbone, target_macs: float, guidance):
    """The smallest step count of the same solver whose full MACs reach ``target_macs`` (None if none)."""
    full = instantiate(solver_cfg)
    for n in range(1, full.num_steps + 1):
        try:
            s = instantiate(solver_cfg, num_steps=n)
        except ValueError:  # e.g. an odd NFE for DPM-Solver-2
            continue
        if policy_cost(backbone, s, None, guidance=guidance)["macs_cfg"] >= target_macs:
            return s
    return None


def candidates(cfg, backbone, solver, router_path, guidance) -> list[tuple[str, object, object]]:
    theta = float(cfg.policy.theta)
    l2c = L2CPolicy.from_official(router_path, solver=solver, theta=theta)
    rows = [(f"full {solver.name}-{solver.num_steps}", solver, None), (f"L2C theta={theta:g}", solver, l2c)]
    few = fewer_steps(cfg.solver, backbone, policy_cost(backbone, solver, l2c, guidance=guidance)["macs_cfg"], guidance)
    if few is not None and few.num_steps < solver.num_steps:
        rows.append((f"fewer steps {few.name}-{few.num_steps}", few, None))
    for k in cfg.compare.fora_intervals:
        rows.append((f"FORA N={k}", solver, FORAPolicy(interval=int(k))))
    if cfg.compare.toca and backbone.toca_preset:
        rows.append((f"ToCa {backbone.toca_preset}", solver, ToCaPolicy(backbone.toca_preset)))
    return rows


def compare(cfg, backbone, solver, router_path, out_dir) -> list[dict]:
    c = cfg.compare
    guidance = float(c.guidance)
    device = next(backbone.parameters()).device
    quality = instantiate(cfg.metrics.quality) if cfg.get("metrics") else None
    n, bs, seed = int(c.num_samples), int(c.batch_size), int(c.seed)
    teacher = None
    rows, grid = [], []
    for name, s, policy in candidates(cfg, backbone, solver, router_path, guidance):
        x, times = _samples(backbone, s, policy, n, bs, guidance, seed, device)
        grid.append(x[:GRID_COLUMNS])
        teacher = x if teacher is None else teacher  # the first row is the full sampler
        row = {"method": name, "steps": s.num_steps}
        if quality is not None:
            quality.reset()
            for i in range(0, n, bs):
                quality.update(x[i:i + bs].clamp(-1, 1), teacher[i:i + bs].clamp(-1, 1))
            row.update(quality.compute())
        gmacs = policy_cost(backbone, s, policy, guidance=guidance)["macs_cfg"] / 1e9  # per image, CFG included
        row.update({"gmacs": gmacs, "macs_fraction": gmacs / rows[0]["gmacs"] if rows else 1.0})
        if int(c.latency_repeats) > 0 or not times:
            noise, cond = seeded_inputs(backbone, range(bs), seed, device)
            times = [measure(lambda: sample(backbone, s, policy, noise, cond, guidance),
                             repeats=max(int(c.latency_repeats), 1), warmup=1, device=device)["median_s"]]
        row["latency_s"] = statistics.median(times)
        row["speedup_latency"] = rows[0]["latency_s"] / lat["median_s"] if rows else 1.0
        rows.append(row)
        log.info("compare: %s", json.dumps(row))
    write_table(rows, Path(out_dir) / "comparison")
    if backbone.in_channels in (1, 3):
        save_grid(grid, Path(out_dir) / "comparison_samples.png")
    return rows


def save_grid(rows: list[torch.Tensor], path: Path) -> None:
    """One row per method (the table's order), upscaled x2 so 32 px digits are visible."""
    from torchvision.utils import save_image

    x = torch.cat(rows).float().clamp(-1, 1) * 0.5 + 0.5
    save_image(torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest"), str(path),
               nrow=rows[0].shape[0], padding=2)


def write_table(rows: list[dict], stem: Path) -> str:
    """CSV + Markdown + JSON; returns the Markdown (printed by the task)."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    stem.parent.mkdir(parents=True, exist_ok=True)
    with open(stem.with_suffix(".csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    md = "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                   + ["| " + " | ".join(fmt(r.get(k)) for k in cols) + " |" for r in rows]) + "\n"
    stem.with_suffix(".md").write_text(md)
    stem.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    return md
