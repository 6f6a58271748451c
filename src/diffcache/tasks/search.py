"""``search(cfg)``: a searched static cache schedule for a frozen teacher, written as an L2C router."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ..backbones import from_config
from ..callbacks.resume import resume_command
from ..search.plot import schedule_heatmap
from ..utils.build import build_solver

log = logging.getLogger(__name__)


def search(cfg: DictConfig) -> dict:
    """Measure the error table, select under the budget, write router / table / summary / heatmap; after
    Ctrl-C, ``error_table.partial.json`` and ``{"partial": True}`` (``search.py`` exits with 130)."""
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    backbone = from_config(cfg.backbone)
    solver = build_solver(cfg.solver)
    searcher = instantiate(cfg.searcher)
    try:
        res = searcher.run(backbone, solver)
    except KeyboardInterrupt:
        return _interrupted(searcher, out)
    router = res.policy.export_official(out / "router", args=searcher.router_args(solver))
    res.table.to_json(out / "error_table.json")
    res.table.to_csv(out / "error_table.csv")
    s = res.summary()
    png = schedule_heatmap(res.table, res.masks[res.method], out / "schedule.png",
                           title=f"{res.method}, budget {res.budget:g} ({res.budget_of}): MACs {s['macs_fraction']:.4f} "
                                 f"of full\nwhite = compute, black = reuse")
    summary = {"run_name": cfg.run_name, "router": str(router), "heatmap": str(png), "solver": solver.name,
               "num_steps": int(solver.num_steps), "backbone": OmegaConf.select(cfg, "backbone.arch") or "custom", **s}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info("searched schedule: %s", json.dumps(summary))
    return summary


def _interrupted(searcher, out: Path) -> dict:
    """Keep the entries measured so far and say how to continue (one message, no traceback)."""
    path = out / "error_table.partial.json"
    done, total = searcher.save_partial(path)
    args = [o for o in (HydraConfig.get().overrides.task if HydraConfig.initialized() else [])
            if not o.startswith("searcher.table=")]
    log.warning("interrupted: %d of %d error-table entries measured, kept in %s; continue with:\n  %s", done, total,
                path, resume_command([*args, f"searcher.table={path}"], None, "search.py"))
    return {"partial": True, "partial_table": str(path)}
