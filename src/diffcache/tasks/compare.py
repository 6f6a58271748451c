"""The comparison users care about: a trained router against the cheap alternatives, on one teacher and one
fixed seeded sample set, at equal compute.

Rows: the full sampler; L2C at its theta; the fewest-step version of the same solver whose MACs are >= L2C's
(the "fewer steps" baseline at equal compute); FORA at each interval asked for; ToCa with the backbone's
preset. Each row: quality from the configured metrics (e.g. MNIST-FID / MNIST-IS), PSNR / MSE to the full
sampler on the same noise, MACs per image (CFG included), latency (median wall time of one batch: of the
quality batches themselves by default, or of ``latency_repeats`` extra runs after a warm-up) and the measured
speedup. A budget-conditioned router (``module.objective=budget``) gives one row per ``compare.router_budgets``
instead of the theta row; ``compare.search.budgets`` adds searched schedules (greedy and DP, on a calibration
set disjoint from the evaluation set), each with its search wall time (``search_s``) next to the router's
training time (``train_s``). Written as ``comparison.{csv,md,json}`` and printed, with ``comparison_samples.png`` (one row of
samples per method, the same noise and labels in every column) when the backbone samples images. Rows are
cached on disk (:class:`RowCache`); a reused row keeps the latency measured when it was made.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import statistics
from pathlib import Path

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ..data.seeded import seeded_inputs
from ..metrics.cost import policy_cost
from ..metrics.latency import measure
from ..policies.fora import FORAPolicy
from ..policies.l2c import L2CPolicy
from ..policies.toca import ToCaPolicy
from ..sampling import sample
from ..utils.hashing import file_sha256

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
    for n in range(1, int(solver_cfg.num_steps) + 1):  # the config's num_steps (the NFE for DPM-Solver-2)
        try:
            s = instantiate(solver_cfg, num_steps=n)
        except (ValueError, InstantiationException):  # e.g. an odd NFE for DPM-Solver-2
            continue
        if policy_cost(backbone, s, None, guidance=guidance)["macs_cfg"] >= target_macs:
            return s
    return None



def router_rows(cfg, solver, router_path, full: str) -> list[dict]:
    """The trained router's rows: L2C at its theta, or one row per budget of a budget-conditioned router."""
    c, theta, sha = cfg.compare, float(cfg.policy.theta), file_sha256(router_path)
    if OmegaConf.select(cfg, "module.objective", default="l2c") == "budget":
        return [dict(method=f"L2C budget-conditioned b={float(b):g}", kind="budget",
                     key=f"budget:{full}:{sha}:{float(b)!r}", solver=solver,
                     policy=L2CPolicy.from_official(router_path, solver=solver, theta=theta, budget=float(b)))
                for b in c.get("router_budgets") or [0.2, 0.4, 0.6, 0.8]]
    return [dict(method=f"L2C theta={theta:g}", kind="l2c", key=f"l2c:{full}:{sha}:{theta!r}", solver=solver,
                 policy=L2CPolicy.from_official(router_path, solver=solver, theta=theta))]


def search_rows(cfg, solver, full: str) -> list[dict]:
    """Searched schedules (:class:`~diffcache.policies.search.ScheduleSearch`), one row per (method, budget);
    the error table is measured once, when the first row not in the cache needs it."""
    import time

    from ..policies.search import ScheduleSearch

    s = cfg.compare.get("search") or {}
    budgets, methods = list(s.get("budgets") or []), list(s.get("methods") or ["greedy", "dp"])
    if not budgets:
        return []
    kw = dict(budget_of=s.get("budget_of", "sampler"), proxy=s.get("proxy", "final"),
              cache_interval=int(cfg.policy.cache_interval), num_samples=int(s.get("num_samples", 16)),
              seed=int(cfg.compare.seed) + 1000, guidance=float(cfg.compare.guidance), progress=False)
    state: dict = {}

    def make(backbone, method: str, budget: float):
        kw["device"] = next(backbone.parameters()).device.type
        if "table" not in state:  # measured once for every budget and method of this comparison
            t0 = time.perf_counter()
            state["table"] = ScheduleSearch(**kw).measure(backbone, solver)
            state["table_s"] = time.perf_counter() - t0
        res = ScheduleSearch(budget=budget, method=method, **kw).run(backbone, solver, table=state["table"])
        return res.policy, {"search_s": state["table_s"] + res.times["select"]}

    tag = ":".join(f"{k}={v}" for k, v in sorted(kw.items()) if k != "progress")
    return [dict(method=f"search {m} b={float(b):g}", kind="search", key=f"search:{full}:{m}:{float(b)!r}:{tag}",
                 solver=solver, make=lambda bb, m=m, b=float(b): make(bb, m, b))
            for b in budgets for m in methods]


def candidates(cfg, backbone, solver, router_path, guidance) -> list[dict]:
    """The rows to measure: ``{"method", "kind", "key", "solver", "policy" | "make"}``; ``key`` names what the
    row's numbers depend on besides the teacher and the sample set (the row cache's key); ``make(backbone)``
    builds a row's policy only when it is measured, returning (policy, extra columns)."""
    c = cfg.compare
    full = f"{solver.name}-{solver.num_evals}"  # named by model evaluations (NFE), as the configs are
    trained = router_rows(cfg, solver, router_path, full)
    rows = [dict(method=f"full {full}", kind="full", key=f"full:{full}", solver=solver, policy=None), *trained]
    few = fewer_steps(cfg.solver, backbone, policy_cost(backbone, solver, trained[0]["policy"], guidance=guidance)["macs_cfg"],
                      guidance)
    steps = sorted({int(n) for n in c.get("steps", [])} | ({few.num_evals} if few is not None else set()))
    for n in steps:
        if n < solver.num_evals:
            s = instantiate(cfg.solver, num_steps=n)
            tag = "fewer steps" if few is not None and n == few.num_evals else "steps"
            rows.append(dict(method=f"{tag} {s.name}-{n}", kind="steps", key=f"full:{s.name}-{n}", solver=s, policy=None))
    for k in c.fora_intervals:
        rows.append(dict(method=f"FORA N={k}", kind="fora", key=f"fora:{full}:{int(k)}", solver=solver,
                         policy=FORAPolicy(interval=int(k))))
    if c.toca and backbone.toca_preset:
        for v in [{}, *[dict(o) for o in c.get("toca_variants", [])]]:
            p = ToCaPolicy(backbone.toca_preset, **v)
            label = "".join(f" {'N' if k == 'fresh_threshold' else 'r'}={val:g}" for k, val in sorted(v.items()))
            rows.append(dict(method=f"ToCa {backbone.toca_preset}{label}", kind="toca",
                             key=f"toca:{full}:{backbone.toca_preset}:{sorted(v.items())}", solver=solver, policy=p))
    return rows + search_rows(cfg, solver, full)


class RowCache:
    """Measured rows on disk, keyed by the teacher's weights, the sample set, the metrics and the row's key:
    a second run on the same teacher reuses them (and says so) instead of sampling again."""

    def __init__(self, cfg, backbone):
        c = cfg.compare
        self.dir = Path(c.cache_dir) if c.get("cache_dir") else None
        ckpt = cfg.backbone.get("ckpt")
        if self.dir is None or not ckpt or not Path(ckpt).is_file():
            self.dir = None  # random weights: nothing identifies the teacher
            return
        metrics = OmegaConf.to_container(cfg.metrics.quality, resolve=True) if cfg.get("metrics") else {}
        metrics = {k: (file_sha256(v) if isinstance(v, str) and Path(v).is_file() else v)  # e.g. the classifier
                   for k, v in metrics.items()}
        self.base = json.dumps({"teacher": file_sha256(ckpt), "clip": bool(backbone.clip_denoised),
                                "n": int(c.num_samples), "bs": int(c.batch_size), "seed": int(c.seed),
                                "guidance": float(c.guidance), "metrics": metrics,
                                "latency_repeats": int(c.latency_repeats), "torch": torch.__version__,
                                "threads": torch.get_num_threads()}, sort_keys=True, default=str)

    def _path(self, key: str) -> Path:
        return self.dir / (hashlib.sha256((self.base + key).encode()).hexdigest()[:24] + ".pt")

    def get(self, key: str) -> tuple[dict, torch.Tensor] | None:
        """(the row, its first samples for the grid), or None."""
        if self.dir is None or not self._path(key).is_file():
            return None
        blob = torch.load(self._path(key), map_location="cpu", weights_only=True)
        return json.loads(blob["row"]), blob["grid"]

    def put(self, key: str, row: dict, grid: torch.Tensor) -> None:
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = self._path(key).with_suffix(".tmp")
            torch.save({"row": json.dumps(row), "grid": grid.detach().cpu().clone()}, tmp)
            os.replace(tmp, self._path(key))


def compare(cfg, backbone, solver, router_path, out_dir, trained: dict | None = None) -> list[dict]:
    """Measure every candidate row (or reuse it from the cache); ``trained`` (e.g. ``{"train_s": ...}``) is
    added to the trained router's rows."""
    c = cfg.compare
    guidance = float(c.guidance)
    device = next(backbone.parameters()).device
    quality = instantiate(cfg.metrics.quality) if cfg.get("metrics") else None
    n, bs, seed = int(c.num_samples), int(c.batch_size), int(c.seed)
    cache = RowCache(cfg, backbone)
    cands = candidates(cfg, backbone, solver, router_path, guidance)
    rows, grid, teacher, reused = [], [], None, 0
    for k, cand in enumerate(cands, 1):
        s, policy, extra = cand["solver"], cand.get("policy"), dict(trained or {}) if cand["kind"] in ("l2c", "budget") else {}
        hit = cache.get(cand["key"])
        if hit is not None:
            row, shown = hit
            rows.append({**row, **extra, "reused": True})
            grid.append(shown)
            reused += 1
            continue
        log.info("comparing %d/%d: %s (%d samples)", k, len(cands), cand["method"], n)
        if teacher is None and cand is not cands[0]:  # the full row came from the cache: its samples did not
            teacher, _ = _samples(backbone, cands[0]["solver"], None, n, bs, guidance, seed, device)
        if "make" in cand:
            policy, made = cand["make"](backbone)
            extra.update(made)
        x, times = _samples(backbone, s, policy, n, bs, guidance, seed, device)
        teacher = x if teacher is None else teacher  # the first row is the full sampler
        row = {"method": cand["method"], "kind": cand["kind"], "nfe": s.num_evals}
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
        row["speedup_latency"] = rows[0]["latency_s"] / row["latency_s"] if rows else 1.0
        row.update({k: v for k, v in extra.items() if k == "search_s"})  # a search's time belongs to the row
        cache.put(cand["key"], row, x[:GRID_COLUMNS])
        rows.append({**row, **extra, "reused": False})
        grid.append(x[:GRID_COLUMNS])
        log.info("compare: %s", json.dumps(row))
    if reused:
        log.info("compare: %d of %d rows reused from the cache %s (same teacher weights, router, sample set and "
                 "metrics; compare.cache_dir=null measures again)", reused, len(rows), cache.dir)
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
