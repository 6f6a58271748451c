"""FID / IS / PSNR while training a router: validation every interval on a fixed seeded set, sampled with the
thresholded router and the uncached teacher, logged to CSV and W&B (offline), with an injected extractor."""
from __future__ import annotations

import json

import pandas as pd
import torch
from hydra_utils import FAST, ROOT, compose_cfg

from diffcache.tasks.train import train

BYO = ROOT / "tests" / "byo"
PIXEL = [f"hydra.searchpath=[file://{BYO / 'conf'}]", "backbone=tiny_dit", "backbone.overrides={in_channels:1}",
         "solver=ddim20", "trainer=cpu", "trainer.max_steps=4", "data.batch_size=2", "metrics=tiny", *FAST]


def test_validation_logs_quality_columns_at_each_interval(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = compose_cfg("train", [*PIXEL, "logger=wandb", "logger.wandb.offline=true", "+logger.csv._target_="
                                "lightning.pytorch.loggers.CSVLogger", f"+logger.csv.save_dir={tmp_path}",
                                "+logger.csv.name=csv", "+logger.csv.version=''"], tmp_path)
    metrics = train(cfg)
    import wandb

    wandb.finish()
    log = pd.read_csv(tmp_path / "csv" / "metrics.csv")
    cols = ["val/tiny_fid", "val/tiny_is", "val/psnr", "val/mse", "val/cached_fraction", "val/macs_fraction"]
    for c in cols:
        assert c in log.columns, (c, list(log.columns))
    rows = log.dropna(subset=["val/tiny_fid"])
    assert sorted(rows["step"].tolist()) == [1, 3]  # after optimiser steps 2 and 4 (0-based logging step)
    assert (rows["val/tiny_fid"] > 0).all() and (rows["val/tiny_is"] >= 1).all()
    assert ((rows["val/macs_fraction"] > 0) & (rows["val/macs_fraction"] <= 1)).all()
    assert metrics["val/tiny_fid"] == rows["val/tiny_fid"].iloc[-1]
    assert list((tmp_path / "val_samples").glob("*.png"))
    run = next((tmp_path / "wandb").glob("offline-run-*"))
    assert list(run.glob("files/media/images/val/samples_*.png"))
    ckpt_keys = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert ckpt_keys and all(k.startswith("policy.") for k in ckpt_keys)  # the extractor never enters a checkpoint
    assert json.loads((tmp_path / "summary.json").read_text())["global_step"] == 4


def test_caching_nothing_has_infinite_psnr_to_the_teacher(tmp_path):
    """An independent check of the PSNR wiring: theta 0 computes every branch, so cached == teacher."""
    cfg = compose_cfg("train", [*PIXEL, "policy.theta=0.0", "trainer.max_steps=2", "callbacks=none"], tmp_path)
    metrics = train(cfg)
    assert metrics["val/mse"] == 0.0 and metrics["val/psnr"] >= 100.0 and metrics["val/cached_fraction"] == 0.0
