"""``teach(cfg)``: train a demo teacher from scratch on MNIST (``teach.py``, ``conf/teach.yaml``).

Why a task of its own: the offline demo cannot download pretrained DiT / U-ViT weights, so it trains its own
small teachers, and that recipe must be as reproducible as the router recipes: composed by Hydra (module,
data and Trainer from config), logged to ``csv/metrics.csv``, with the usual progress lines. The module
(:class:`~diffcache.modules.teacher_pretrain.TeacherPretrain`) samples grids from and exports the weights it
holds at each validation; the EMA (Lightning's ``EMAWeightAveraging``), the progress line and the CSV logger
are ``callbacks`` / ``logger`` entries of the config. This task adds the final grid and ``figures.json``
(steps, wall time, final losses, the resolved config), which ``scripts/train_teachers.py`` turns into the
asset records.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ..backbones import count_parameters, load_backbone
from ..modules.teacher_pretrain import official_file_name
from ..utils.build import build_callbacks, build_loggers
from ..utils.console import setup_console

log = logging.getLogger(__name__)


def teach(cfg: DictConfig) -> dict:
    """Train, export the EMA weights to ``cfg.export_dir``, draw the final grid; returns the figures."""
    setup_console()
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    out, export = Path(cfg.paths.output_dir), Path(cfg.export_dir)
    out.mkdir(parents=True, exist_ok=True)
    arch, init = str(cfg.backbone.arch), cfg.backbone.get("ckpt")
    backbone = load_backbone(arch, ckpt=init, random_init=True,  # the variant's own clip_denoised for its grids
                             **(cfg.backbone.get("overrides") or {}))
    module = instantiate(cfg.module)(backbone, out_dir=str(export), grid_dir=str(out / "grids"),
                                     export_name=official_file_name(backbone, arch))
    minutes = cfg.get("max_minutes")
    trainer = instantiate(cfg.trainer, max_time=None if minutes is None else {"minutes": float(minutes)},
                          logger=build_loggers(cfg.get("logger")) or False,
                          callbacks=build_callbacks(cfg.get("callbacks")))
    log.info("training teacher %s from %s: %d steps at most, batch %d", arch, init or "scratch",
             int(cfg.trainer.max_steps), int(cfg.data.batch_size))
    t0 = time.time()
    trainer.fit(module, instantiate(cfg.data))
    module.sample_grid()  # the final grid and export (also after a max_time stop)
    final = export / "grids" / Path(module.grids[-1]).name
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.resolve() != Path(module.grids[-1]).resolve():  # export_dir is the run folder by default
        shutil.copyfile(module.grids[-1], final)
    config = OmegaConf.to_container(cfg, resolve=True)
    fig = {"files": [module.export_name, final.relative_to(export).as_posix()], "steps": int(trainer.global_step),
           "train_wall_s": round(time.time() - t0, 1), "final_losses": module.last_losses,
           "config": {**{k: config.get(k) for k in ("module", "data", "trainer", "callbacks", "max_minutes", "seed")},
                      "init": init},
           "params": count_parameters(backbone)}
    (out / "figures.json").write_text(json.dumps(fig, indent=2))
    log.info("teacher %s: %d steps, EMA weights %s, grid %s", arch, fig["steps"], export / module.export_name, final)
    return fig
