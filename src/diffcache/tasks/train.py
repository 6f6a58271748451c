"""``train(cfg)``: router training, callable from tests without ``@hydra.main``.

Ctrl-C (SIGINT): the running step finishes, ``checkpoints/last.ckpt`` is written there and training stops
(:mod:`~diffcache.callbacks.resume`); the router of that step is exported with ``"partial": true`` in
``summary.json``, the exact resume command is printed, and ``train.py`` exits with status 130. Resume with
``ckpt_path=<run>/checkpoints/last.ckpt``: the run continues in that folder, its ``csv/metrics.csv`` keeps the
rows before the checkpoint (:mod:`~diffcache.utils.loggers`) and ``train_s`` sums every segment (Lightning's
``Timer`` state travels in the checkpoint); a checkpoint from another solver, interval or backbone is refused.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Timer
from omegaconf import DictConfig, OmegaConf

from ..backbones import from_config
from ..callbacks.progress import StepProgress
from ..callbacks.resume import StopOnInterrupt, resume_command
from ..metrics.cost import policy_cost
from ..modules.convergence import RouterConvergence, updates_per_iteration
from ..policies.base import require_trainable
from ..utils.build import build_callbacks, build_loggers, build_policy, build_solver
from ..utils.console import model_summary_line, setup_console
from ..utils.hashing import file_sha256
from .compare import compare, report
from .inputs import check_router_fits

log = logging.getLogger(__name__)


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
    """Train a cache router; returns the final metrics (also written to ``summary.json``), with
    ``partial: True`` after Ctrl-C (``train.py`` then exits with status 130)."""
    setup_console()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    backbone = from_config(cfg.backbone)
    solver = build_solver(cfg.solver)
    policy = build_policy(cfg.policy)
    require_trainable(policy)
    cache = router_cache_dir(cfg)
    reused = _reuse_router(cache, out)
    if reused is not None:
        log.info("router reused from the cache %s: the same teacher weights, settings and seed were trained "
                 "before (router_cache=null retrains)", cache)
        (out / "summary.json").write_text(json.dumps({**reused, "reused_router": str(cache)}, indent=2))
        _compare(cfg, backbone, solver, Path(reused["router"]), out, reused.get("train_s"))
        return {k: v for k, v in reused.items() if isinstance(v, float)}
    trainer, module, interrupted, train_s = _fit(cfg, backbone, solver, policy, out)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    length = _length_report(trainer, module, interrupted)
    if trainer.is_global_zero:
        router_path = policy.export_official(out / "router")
        metrics.update(policy.summary(backbone.layout, solver))
        _write_summary(cfg, out, trainer, module, router_path, interrupted, train_s,
                       {**length, **_macs(backbone, solver, policy), **metrics})
        if interrupted:
            ckpt = out / "checkpoints" / "last.ckpt"
            log.warning("interrupted at step %d: router %s saved at that step (partial), checkpoint %s at step %s; "
                        "resume with:\n  %s", trainer.global_step, router_path, ckpt, _ckpt_step(ckpt),
                        resume_command(_task_overrides(), ckpt))
        else:
            log.info("router saved to %s", router_path)
            _store(cache, out)
            _compare(cfg, backbone.to(module.device), solver, router_path, out, train_s)
    return {**metrics, "partial": interrupted}


def _write_summary(cfg, out: Path, trainer, module, router_path, interrupted: bool, train_s: float,
                   figures: dict) -> None:
    """``summary.json``: the run, its recipe and every final figure (what the row cache and a resume read)."""
    policy = module.policy
    summary = {"run_name": cfg.run_name, "router": str(router_path), "global_step": trainer.global_step,
               "partial": interrupted, "train_s": round(train_s, 2), "overrides": _task_overrides(),
               "lam": policy.lam, "theta": policy.theta, "loss_reduction": module.loss_reduction,
               "clamp": policy.clamp, "skipped_steps": module.skipped_steps, **figures}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))


def _fit(cfg, backbone, solver, policy, out: Path):
    """(trainer, module, interrupted, training seconds summed over every segment of a resumed run)."""
    metrics = cfg.get("metrics")
    quality = instantiate(metrics.quality) if metrics else None
    val = {"val_samples": metrics.val_samples, "val_batch_size": metrics.val_batch_size} if metrics else {}
    datamodule = instantiate(cfg.data, **val).bind(backbone)
    module = instantiate(cfg.module)(backbone, solver, policy, quality=quality,
                                     val_guidance=metrics.guidance if metrics else None)
    if cfg.get("ckpt_path"):  # the preflight checked it already when train.py runs; train(cfg) may be called directly
        check_router_fits(cfg, cfg.ckpt_path, "ckpt_path")
        _resume_note(datamodule)
    timer = Timer(duration=None, verbose=False)  # its elapsed time travels in the checkpoint
    stop = StopOnInterrupt(out / "checkpoints")
    callbacks = [*build_callbacks(cfg.get("callbacks")), timer, stop]
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(StepProgress(total=_planned_steps(module, datamodule, cfg)))
    trainer: L.Trainer = instantiate(cfg.trainer, logger=build_loggers(cfg.get("logger")) or False,
                                     callbacks=callbacks)
    log.info("training %s router: %s; %s", policy.name, cfg.run_name, model_summary_line(module))
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    except SystemExit:  # Lightning exits after its shutdown on a second Ctrl-C
        if not trainer.interrupted:
            raise
    return trainer, module, trainer.interrupted or stop.requested, timer.time_elapsed("train")


def _resume_note(datamodule) -> None:
    """Lightning warns on every resume that a plain loader restarts its epoch; say what that means here."""
    import warnings

    warnings.filterwarnings("ignore", message=r".*your dataloader is not resumable.*")
    if datamodule.shuffle:
        log.info("data=%s: the resumed run starts a new shuffled pass over the data, so it is not bit-identical to "
                 "an uninterrupted run (data=noise is: its batches are seeded by the step)", datamodule.name)


def _ckpt_step(path: Path):

    return torch.load(path, map_location="cpu", weights_only=False).get("global_step") if path.is_file() else None


def _planned_steps(module, datamodule, cfg) -> int | None:
    """The iterations ``module.updates_per_router`` stands for (the bar's total when max_steps is open)."""

    if not module.updates_per_router:
        return None
    draw = "trajectory" if module.objective == "trajectory" else module.draw
    devices = cfg.trainer.get("devices", 1)
    per = updates_per_iteration(draw, len(module.cache_evals), datamodule.batch_size,
                                devices if isinstance(devices, int) and devices > 0 else 1)
    return math.ceil(module.updates_per_router / per)


def _store(cache: Path | None, out: Path) -> None:
    """Keep a finished router for reuse by an identical later run."""
    if cache is None:
        return
    cache.mkdir(parents=True, exist_ok=True)
    for f in out.glob("router*"):
        if f.is_file():
            shutil.copy2(f, cache / f.name)
    shutil.copy2(out / "summary.json", cache / "summary.json")  # last: marks the entry complete


def _compare(cfg, backbone, solver, router_path: Path, out: Path, train_s: float | None = None) -> None:
    if not cfg.get("compare"):
        return
    compare(cfg, backbone, solver, router_path, out, None if train_s is None else {"train_s": round(train_s, 2)})
    print(report(out))


def _length_report(trainer, module, interrupted: bool = False) -> dict:
    """Updates per router (least / most trained) and why training stopped, logged and kept in the summary."""

    cb = next((c for c in trainer.callbacks if isinstance(c, RouterConvergence)), None)
    if cb is None:
        return {}
    rep = cb.report(module)
    if interrupted:
        rep["stopped_by"] = "interrupt"
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
