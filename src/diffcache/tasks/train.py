"""``train(cfg)``: router training, callable from tests without ``@hydra.main``."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from ..utils.build import build_backbone, build_callbacks, build_loggers, build_policy, build_solver

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict:
    """Train a cache router; returns the final metrics (also written to ``summary.json``)."""
    L.seed_everything(cfg.seed, workers=True)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    backbone = build_backbone(cfg.backbone)
    solver = build_solver(cfg.solver)
    policy = build_policy(cfg.policy)
    if not hasattr(policy, "sum_beta"):
        raise ValueError(f"router training needs policy=l2c; policy={policy.name} has nothing to train "
                         f"(measure it with evaluate.py policy={policy.name})")
    metrics = cfg.get("metrics")
    quality = instantiate(metrics.quality) if metrics else None
    val = {"val_samples": metrics.val_samples, "val_batch_size": metrics.val_batch_size} if metrics else {}
    datamodule = instantiate(cfg.data, **val).bind(backbone)
    module = instantiate(cfg.module)(backbone, solver, policy, quality=quality,
                                     val_guidance=metrics.guidance if metrics else None)
    trainer: L.Trainer = instantiate(cfg.trainer, logger=build_loggers(cfg.get("logger")) or False,
                                     callbacks=build_callbacks(cfg.get("callbacks")))
    log.info("training %s router: %s", policy.name, cfg.run_name)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if trainer.is_global_zero:
        router_path = policy.export_official(out / "router")
        metrics.update(policy.summary(backbone.layout, solver))
        summary = {"run_name": cfg.run_name, "router": str(router_path), "global_step": trainer.global_step,
                   "overrides": _task_overrides(), "lam": policy.lam, "theta": policy.theta,
                   "loss_reduction": module.loss_reduction, "clamp": policy.clamp, **metrics}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        log.info("router saved to %s", router_path)
        if cfg.get("compare"):
            from .compare import compare, write_table

            rows = compare(cfg, backbone.to(module.device), solver, router_path, out)
            print(f"\n{write_table(rows, out / 'comparison')}\nsaved: {out / 'comparison.md'} (.csv, .json), router "
                  f"{router_path}, heatmaps {out / 'router_heatmaps'}, validation grids {out / 'val_samples'}")
    return metrics


def _task_overrides() -> list[str]:
    """The command-line overrides of this run (for the sweep summary table)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
