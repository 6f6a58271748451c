"""``search(cfg)``: a searched static cache schedule for a frozen teacher, written as an L2C router."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ..backbones import from_config
from ..search.plot import schedule_heatmap
from ..utils.build import build_solver

log = logging.getLogger(__name__)


def search(cfg: DictConfig) -> dict:
    """Measure the error table, select under the budget, write router / table / summary / heatmap."""
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    backbone = from_config(cfg.backbone)
    solver = build_solver(cfg.solver)
    searcher = instantiate(cfg.searcher)
    res = searcher.run(backbone, solver)
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
