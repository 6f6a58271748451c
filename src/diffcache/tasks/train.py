"""``train(cfg)``: router training, callable from tests without ``@hydra.main``.

Ctrl-C (SIGINT): Lightning stops fit gracefully (and exits); the router of the last *completed* step is
exported anyway, with ``"partial": true`` in ``summary.json``, and the process exits with status 130.
Resume with ``ckpt_path=<run>/checkpoints/last.ckpt`` (the run continues in that run's folder); a
checkpoint from another solver, interval or backbone is refused (``RouterDistill.on_load_checkpoint``).
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from ..utils.build import build_backbone, build_callbacks, build_loggers, build_policy, build_solver
from ..utils.console import StepProgressBar, model_summary_line, setup_console

log = logging.getLogger(__name__)


class LastCompletedStep(L.Callback):
    """A copy of the routers after each completed optimiser step (what an interrupted run exports)."""

    def __init__(self) -> None:
        self.step, self.logits = 0, None

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.step = trainer.global_step
        self.logits = [p.detach().clone() for p in module.policy.routers]

    def restore(self, policy) -> int:
        if self.logits is not None:
            with torch.no_grad():
                for p, t in zip(policy.routers, self.logits):
                    p.copy_(t)
            policy.clamp_()
        return self.step


def check_resume(path, policy) -> None:
    """``ckpt_path`` exists, is a router-training checkpoint and fits this policy (clear errors, before fit)."""
    from ..policies.l2c.checkpoint import load_official

    off = load_official(path)
    if off.fmt != "lightning":
        raise ValueError(f"ckpt_path={path} is a router file, not a Lightning checkpoint of train.py; resume from "
                         f"<run>/checkpoints/last.ckpt (or evaluate the router with router_ckpt=)")
    if (off.num_routers, off.num_sites) != (policy.num_routers, policy.num_sites):
        raise ValueError(f"ckpt_path={path} holds {off.num_routers} routers of {off.num_sites} sites, this run "
                         f"{policy.num_routers} of {policy.num_sites}: it was trained with another backbone or solver")


def train(cfg: DictConfig) -> dict:
    """Train a cache router; returns the final metrics (also written to ``summary.json``)."""
    setup_console()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
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
    if cfg.get("ckpt_path"):
        check_resume(cfg.ckpt_path, policy)
    last = LastCompletedStep()
    callbacks = [*build_callbacks(cfg.get("callbacks")), last]
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(StepProgressBar())
    trainer: L.Trainer = instantiate(cfg.trainer, logger=build_loggers(cfg.get("logger")) or False,
                                     callbacks=callbacks)
    log.info("training %s router: %s; %s", policy.name, cfg.run_name, model_summary_line(module))
    partial = False
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    except SystemExit:  # Lightning exits after a graceful shutdown on Ctrl-C
        if not trainer.interrupted:
            raise
        partial = True
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    step = last.restore(policy) if partial else trainer.global_step
    if trainer.is_global_zero:
        router_path = policy.export_official(out / "router")
        metrics.update(policy.summary(backbone.layout, solver))
        summary = {"run_name": cfg.run_name, "router": str(router_path), "global_step": step, "partial": partial,
                   "overrides": _task_overrides(), "lam": policy.lam, "theta": policy.theta,
                   "loss_reduction": module.loss_reduction, "clamp": policy.clamp,
                   "skipped_steps": module.skipped_steps, **_macs(backbone, solver, policy), **metrics}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        if partial:
            log.warning("interrupted: router of the last completed step (%d) saved to %s (partial)", step, router_path)
        else:
            log.info("router saved to %s", router_path)
            if cfg.get("compare"):
                from .compare import compare, write_table

                rows = compare(cfg, backbone.to(module.device), solver, router_path, out)
                print(f"\n{write_table(rows, out / 'comparison')}\nsaved: {out / 'comparison.md'} (.csv, .json), "
                      f"samples {out / 'comparison_samples.png'}, router {router_path}, heatmaps {out / 'router_heatmaps'}, "
                      f"validation grids {out / 'val_samples'}")
    if partial:
        sys.exit(130)
    return metrics


def _macs(backbone, solver, policy) -> dict:
    """Whole-sampler MACs of the trained router at its theta, as evaluate.py names them."""
    from ..metrics.cost import policy_cost

    cost = policy_cost(backbone, solver, policy)
    return {"macs_fraction": float(cost["macs_ratio"]), "speedup_macs": float(cost["speedup_macs"])}


def _task_overrides() -> list[str]:
    """The command-line overrides of this run (for the sweep summary table)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
