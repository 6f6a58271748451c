"""``train(cfg)``: router training, callable from tests without ``@hydra.main``.

Ctrl-C (SIGINT): Lightning stops fit gracefully (and exits); the router of the last *completed* step is
exported anyway, with ``"partial": true`` in ``summary.json``, and the process exits with status 130.
Resume with ``ckpt_path=<run>/checkpoints/last.ckpt`` (the run continues in that run's folder); a
checkpoint from another solver, interval or backbone is refused (``RouterDistill.on_load_checkpoint``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ..backbones import from_config
from ..metrics.cost import policy_cost
from ..modules.convergence import RouterConvergence
from ..policies.base import require_trainable
from ..policies.l2c.checkpoint import load_official
from ..utils.build import build_callbacks, build_loggers, build_policy, build_solver
from ..utils.console import StepProgressBar, model_summary_line, setup_console
from ..utils.hashing import file_sha256
from .compare import compare, write_table

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

    off = load_official(path)
    if off.fmt != "lightning":
        raise ValueError(f"ckpt_path={path} is a router file, not a Lightning checkpoint of train.py; resume from "
                         f"<run>/checkpoints/last.ckpt (or evaluate the router with router_ckpt=)")
    if (off.num_routers, off.num_sites) != (policy.num_routers, policy.num_sites):
        raise ValueError(f"ckpt_path={path} holds {off.num_routers} routers of {off.num_sites} sites, this run "
                         f"{policy.num_routers} of {policy.num_sites}: it was trained with another backbone or solver")


# trainer settings that do not change the trained router (the router cache ignores them)
_TRAINER_COSMETIC = {"default_root_dir", "enable_progress_bar", "log_every_n_steps", "enable_model_summary",
                     "val_check_interval", "limit_val_batches", "check_val_every_n_epoch", "num_sanity_val_steps",
                     "enable_checkpointing"}


def router_cache_dir(cfg) -> Path | None:
    """Where this run's router is kept for reuse: keyed by the teacher's weights (sha256) and every setting
    that shapes the router (not paths, loggers, callbacks, metrics or the comparison); None when the
    teacher is random weights, a resume is asked for, or ``router_cache`` is null."""

    root, ckpt = cfg.get("router_cache"), cfg.backbone.get("ckpt")
    if not root or not ckpt or not Path(ckpt).is_file() or cfg.get("ckpt_path"):
        return None
    parts = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("backbone", "solver", "policy", "module", "data")}
    parts["backbone"]["ckpt"] = file_sha256(ckpt)
    parts["trainer"] = {k: v for k, v in OmegaConf.to_container(cfg.trainer, resolve=True).items()
                        if k not in _TRAINER_COSMETIC}
    parts["seed"] = cfg.seed
    key = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return Path(root) / key


def _reuse_router(cache: Path | None, out: Path) -> dict | None:
    if cache is None or not (cache / "summary.json").is_file():
        return None
    for f in cache.glob("router*"):
        shutil.copy2(f, out / f.name)
    summary = json.loads((cache / "summary.json").read_text())
    summary["router"] = str(out / Path(summary["router"]).name)
    return summary


def train(cfg: DictConfig) -> dict:
    """Train a cache router; returns the final metrics (also written to ``summary.json``)."""
    setup_console()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    backbone = from_config(cfg.backbone)
    solver = build_solver(cfg.solver)
    policy = build_policy(cfg.policy)
    require_trainable(policy)
    metrics = cfg.get("metrics")
    quality = instantiate(metrics.quality) if metrics else None
    val = {"val_samples": metrics.val_samples, "val_batch_size": metrics.val_batch_size} if metrics else {}
    cache = router_cache_dir(cfg)
    reused = _reuse_router(cache, out)
    if reused is not None:
        log.info("router reused from the cache %s: the same teacher weights, settings and seed were trained "
                 "before (router_cache=null retrains)", cache)
        (out / "summary.json").write_text(json.dumps({**reused, "reused_router": str(cache)}, indent=2))
        _compare(cfg, backbone, solver, Path(reused["router"]), out, reused.get("train_s"))
        return {k: v for k, v in reused.items() if isinstance(v, float)}
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
    partial, t0 = False, time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    except SystemExit:  # Lightning exits after a graceful shutdown on Ctrl-C
        if not trainer.interrupted:
            raise
        partial = True
    train_s = time.perf_counter() - t0  # the fit's wall time (validation included), next to a search's time
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    step = last.restore(policy) if partial else trainer.global_step
    length = _length_report(trainer, module)
    if trainer.is_global_zero:
        router_path = policy.export_official(out / "router")
        metrics.update(policy.summary(backbone.layout, solver))
        summary = {"run_name": cfg.run_name, "router": str(router_path), "global_step": step, "partial": partial,
                   "train_s": round(train_s, 2),
                   "overrides": _task_overrides(), "lam": policy.lam, "theta": policy.theta,
                   "loss_reduction": module.loss_reduction, "clamp": policy.clamp,
                   "skipped_steps": module.skipped_steps, **length, **_macs(backbone, solver, policy), **metrics}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        if partial:
            log.warning("interrupted: router of the last completed step (%d) saved to %s (partial)", step, router_path)
        else:
            log.info("router saved to %s", router_path)
            if cache is not None:
                cache.mkdir(parents=True, exist_ok=True)
                for f in out.glob("router*"):
                    if f.is_file():
                        shutil.copy2(f, cache / f.name)
                shutil.copy2(out / "summary.json", cache / "summary.json")  # last: marks the entry complete
            _compare(cfg, backbone.to(module.device), solver, router_path, out, train_s)
    if partial:
        sys.exit(130)
    return metrics


def _compare(cfg, backbone, solver, router_path: Path, out: Path, train_s: float | None = None) -> None:
    if not cfg.get("compare"):
        return

    rows = compare(cfg, backbone, solver, router_path, out, None if train_s is None else {"train_s": round(train_s, 2)})
    print(f"\n{write_table(rows, out / 'comparison')}\nsaved: {out / 'comparison.md'} (.csv, .json), "
          f"samples {out / 'comparison_samples.png'}, router {router_path}, heatmaps {out / 'router_heatmaps'}, "
          f"validation grids {out / 'val_samples'}")


def _length_report(trainer, module) -> dict:
    """Updates per router (least / most trained) and why training stopped, logged and kept in the summary."""

    cb = next((c for c in trainer.callbacks if isinstance(c, RouterConvergence)), None)
    if cb is None:
        return {}
    rep = cb.report(module)
    log.info("router training: %d-%d updates per router in %d iterations (draw=%s), stopped by %s",
             rep["updates_per_router_min"], rep["updates_per_router_max"], trainer.global_step, module.draw,
             rep["stopped_by"])
    return {**rep, "draw": module.draw}


def _macs(backbone, solver, policy) -> dict:
    """Whole-sampler MACs of the trained router at its theta, as evaluate.py names them."""

    cost = policy_cost(backbone, solver, policy)
    return {"macs_fraction": float(cost["macs_ratio"]), "speedup_macs": float(cost["speedup_macs"])}


def _task_overrides() -> list[str]:
    """The command-line overrides of this run (for the sweep summary table)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
