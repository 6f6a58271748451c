"""The comparison users care about: a trained router (or none) against the cheap alternatives, on one teacher
and one fixed seeded sample set, at equal compute.

The rows come from :data:`~diffcache.tasks.methods.METHODS` (full sampler; L2C at its theta or a
budget-conditioned router's budgets; fewer steps of the same solver, the one whose MACs reach the router's
tagged "fewer steps"; FORA; ToCa; searched schedules). Each is measured into a
:class:`~diffcache.utils.record.Row`: quality from the configured metrics (e.g. MNIST-FID / MNIST-IS), PSNR /
MSE to the full sampler on the same noise, MACs per image (CFG included), latency (median wall time of one
batch: of the quality batches themselves by default, or of ``latency_repeats`` extra runs after a warm-up) and
the measured speedup, search / training wall time. Written as ``results.json`` (the records) and
``comparison.{md,csv}`` (the table, with a caption: teacher, samples, commit, machine), with
``comparison_samples.png`` (one labelled row per method, the same noise and classes in every column) when the
backbone samples images. Measured rows are kept on disk (:class:`RowCache`); a reused row keeps the numbers
(and latency) measured when it was made, and its role in the table is recomputed for this run.
"""
from __future__ import annotations

import hashlib
import json
import logging
import statistics
from dataclasses import replace
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ..backbones import from_config
from ..data.seeded import seeded_inputs, step_generators
from ..metrics.cost import policy_cost
from ..metrics.latency import measure
from ..sampling import sample
from ..utils.atomic import write_atomically
from ..utils.build import build_solver
from ..utils.console import setup_console
from ..utils.grids import class_labels, labelled_grid
from ..utils.hashing import file_sha256
from ..utils.record import Row, caption, provenance, save_rows, teacher_label, write_table
from .methods import Context, candidates, mark_equal_compute

log = logging.getLogger(__name__)
GRID_COLUMNS = 12


def _samples(backbone, solver, policy, n: int, bs: int, guidance, seed: int, device):
    """The seeded set and the wall time of each full batch (the latency when ``latency_repeats`` is 0)."""
    out, times = [], []
    for start in range(0, n, bs):
        idx = range(start, min(start + bs, n))
        noise, cond = seeded_inputs(backbone, idx, seed, device)
        t = measure(lambda: out.append(sample(backbone, solver, policy, noise, cond, guidance,
                                              generator=step_generators(idx, seed)).cpu()),
                    repeats=1, warmup=0, device=device)
        if noise.shape[0] == bs:
            times.append(t["median_s"])
    return torch.cat(out), times


class RowCache:
    """Measured rows on disk, keyed by the teacher's weights, the sample set, the metrics and the row's identity:
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
                                "guidance": float(c.guidance), "metrics": metrics, "seeding": 2,
                                "latency_repeats": int(c.latency_repeats), "torch": torch.__version__,
                                "threads": torch.get_num_threads()}, sort_keys=True, default=str)

    def _path(self, key: str) -> Path:
        return self.dir / (hashlib.sha256((self.base + key).encode()).hexdigest()[:24] + ".pt")

    def get(self, key: str) -> tuple[Row, torch.Tensor] | None:
        """(the stored record, its first samples for the grid), or None."""
        if self.dir is None or not self._path(key).is_file():
            return None
        blob = torch.load(self._path(key), map_location="cpu", weights_only=True)
        return Row.from_dict(json.loads(blob["row"])), blob["grid"]

    def put(self, key: str, row: Row, grid: torch.Tensor) -> None:
        """Store the record without its role (the role belongs to the run that shows it)."""
        if self.dir is not None:
            blob = {"row": json.dumps(replace(row, role="").to_dict()), "grid": grid.detach().cpu().clone()}
            write_atomically(self._path(key), lambda tmp: torch.save(blob, tmp))


def _measure(ctx: Context, cand, teacher, quality, reference: Row | None) -> tuple[Row, torch.Tensor]:
    """One candidate's record and its samples."""
    c, backbone = ctx.c, ctx.backbone
    device = next(backbone.parameters()).device
    n, bs, seed = int(c.num_samples), int(c.batch_size), int(c.seed)
    row, policy = replace(cand.row), cand.policy
    if cand.make is not None:
        policy, made = cand.make(backbone)
        row.search_s = made.get("search_s")
    x, times = _samples(backbone, cand.solver, policy, n, bs, ctx.guidance, seed, device)
    if quality is not None:
        quality.reset()
        for i in range(0, n, bs):
            quality.update(x[i:i + bs].clamp(-1, 1), (x if teacher is None else teacher)[i:i + bs].clamp(-1, 1))
        row.metrics = {k: float(v) for k, v in quality.compute().items()}
        if reference is None:  # the full sampler against itself: no distance to report
            row.metrics = {k: v for k, v in row.metrics.items() if k not in ("psnr", "mse")}
    row.gmacs = policy_cost(backbone, cand.solver, policy, guidance=ctx.guidance)["macs_cfg"] / 1e9
    row.macs_fraction = row.gmacs / reference.gmacs if reference else 1.0
    if int(c.latency_repeats) > 0 or not times:
        noise, cond = seeded_inputs(backbone, range(bs), seed, device)
        times = [measure(lambda: sample(backbone, cand.solver, policy, noise, cond, ctx.guidance,
                                        generator=step_generators(range(bs), seed)),
                         repeats=max(int(c.latency_repeats), 1), warmup=1, device=device)["median_s"]]
    row.latency_s = statistics.median(times)
    row.speedup_latency = reference.latency_s / row.latency_s if reference else 1.0
    return row, x


def compare(cfg, backbone, solver, router_path, out_dir, trained: dict | None = None) -> list[Row]:
    """Measure every candidate (or reuse it from the cache); ``router_path`` None compares the baselines alone;
    ``trained`` (e.g. ``{"train_s": ...}``) is added to the trained router's rows."""
    c = cfg.compare
    ctx = Context(cfg, backbone, solver, Path(router_path) if router_path else None, float(c.guidance),
                  _variant(cfg) if router_path else {})
    quality = instantiate(cfg.metrics.quality) if cfg.get("metrics") else None
    cache, prov, teacher_name = RowCache(cfg, backbone), provenance(), teacher_label(cfg.backbone)
    cands = candidates(ctx)
    rows, grid, teacher, reused = [], [], None, 0
    for k, cand in enumerate(cands, 1):
        key = cand.row.identity() + cand.cache_key
        hit = cache.get(key)
        if hit is None:
            log.info("comparing %d/%d: %s (%d samples)", k, len(cands), cand.row.label, int(c.num_samples))
            if teacher is None and cand is not cands[0]:  # the full row came from the cache: its samples did not
                teacher, _ = _samples(backbone, cands[0].solver, None, int(c.num_samples), int(c.batch_size),
                                      ctx.guidance, int(c.seed), next(backbone.parameters()).device)
            row, x = _measure(ctx, cand, teacher, quality, rows[0] if rows else None)
            teacher = x if teacher is None else teacher  # the first row is the full sampler
            row.provenance = {**prov, "teacher": teacher_name}
            shown = x[:GRID_COLUMNS]
            cache.put(key, row, shown)
        else:
            (row, shown), reused = hit, reused + 1
        row.provenance = {**row.provenance, "reused": hit is not None}
        if cand.trained and trained:
            row.train_s = trained.get("train_s")
        rows.append(row)
        grid.append(shown)
    mark_equal_compute(rows)
    if reused:
        log.info("compare: %d of %d rows reused from the cache %s (same teacher weights, router, sample set and "
                 "metrics; compare.cache_dir=null measures again)", reused, len(rows), cache.dir)
    out_dir = Path(out_dir)
    save_rows(rows, out_dir)
    text = caption("comparison", teacher_name, int(c.num_samples), int(c.seed), prov)
    write_table(rows, out_dir / "comparison", text)
    if backbone.in_channels in (1, 3):
        _grid(rows, grid, backbone, int(c.seed), out_dir / "comparison_samples.png", text)
    return rows


def _grid(rows: list[Row], grid: list[torch.Tensor], backbone, seed: int, path: Path, text: str) -> None:

    _, cond = seeded_inputs(backbone, range(grid[0].shape[0]), seed)
    labels = []
    for r in rows:
        psnr = r.metrics.get("psnr")
        labels.append(f"{r.label}\n{r.macs_fraction:.2f} MACs" + (f", {psnr:.1f} dB" if psnr is not None else ""))
    labelled_grid([x.float() * 0.5 + 0.5 for x in grid], labels, class_labels(cond, grid[0].shape[0]), path, text)


_NOT_ROUTER = ("seed", "hydra", "experiment", "paths", "compare", "router_ckpt", "trainer.enable_progress_bar")


def _variant(cfg) -> dict:
    """The run settings that made this router (the command line's overrides minus seed, paths, comparison):
    a sweep's frontier groups routers by them and labels points with them."""
    from hydra.core.hydra_config import HydraConfig

    over = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    pairs = [o.lstrip("+~").split("=", 1) for o in over if "=" in o]
    out = {k: v for k, v in pairs if not k.startswith(_NOT_ROUTER)}
    lam = OmegaConf.select(cfg, "policy.lam")
    if lam is not None and not any(k.endswith("lam") for k in out):  # e.g. an arm (conf/arm/) sets it
        out["lam"] = f"{float(lam):g}"
    return out


def report(out_dir) -> str:
    """What the console shows after a comparison: the table (with its caption) and the files that exist."""
    out_dir = Path(out_dir)
    files = [out_dir / f for f in ("comparison.md", "comparison.csv", "results.json", "comparison_samples.png",
                                   "router.pt", "router_heatmaps", "val_samples")]
    return f"\n{(out_dir / 'comparison.md').read_text()}\nsaved: " + ", ".join(str(f) for f in files if f.exists())


def run(cfg) -> list[Row]:
    """``compare.py``: build the teacher and sampler, compare, print the table (see the module docstring)."""

    setup_console()
    if not cfg.get("compare"):
        raise ValueError("compare=none leaves nothing to compare; pick compare=default (or an experiment that sets it)")
    router = cfg.get("router_ckpt")
    if router and not Path(router).is_file():
        raise FileNotFoundError(f"router_ckpt={router} does not exist; train one with train.py (<run>/router.pt) or "
                                f"pass router_ckpt=null to compare the baselines alone")
    name = str(cfg.get("device") or "auto")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else torch.device(name)
    backbone = from_config(cfg.backbone).to(device).eval()
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = compare(cfg, backbone, build_solver(cfg.solver), router, out)
    print(report(out))
    return rows
