"""Router training end to end: real Hydra composition, real Lightning Trainer, CSV logs, checkpoints."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from hydra_utils import FAST, compose_cfg, run_cli

from diffcache.tasks.train import train

TINY = [("tiny_uvit", "dpm20"), ("tiny_dit", "ddim20"), ("tiny_pixart", "dpmpp20")]


@pytest.mark.parametrize("backbone,solver", TINY)
def test_train_tiny_router(tmp_path, backbone, solver):
    cfg = compose_cfg("train", [f"backbone={backbone}", f"solver={solver}", "trainer=cpu", "trainer.max_steps=3",
                                "data.batch_size=2", "module.heatmap_every=2", *FAST], tmp_path)
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["global_step"] == 3
    assert (tmp_path / "router_heatmaps").is_dir() and any((tmp_path / "router_heatmaps").glob("*.png"))
    log = pd.read_csv(tmp_path / "csv" / "metrics.csv")
    assert log["train/loss"].notna().sum() == 3
    saved = log["router/macs_saved"].dropna()
    assert len(saved) and ((saved >= 0) & (saved < 0.5)).all()  # at most the cache steps' share can be saved
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["state_dict"] and all(k.startswith("policy.") for k in ckpt["state_dict"])


def test_real_backbone_without_checkpoint_says_what_to_pass(tmp_path):
    res = run_cli("train.py", ["backbone=uvit", "solver=dpm20", *FAST], tmp_path, timeout=200)
    assert res.returncode != 0
    assert "backbone.ckpt=" in res.stderr + res.stdout
    assert "Traceback" not in res.stderr


def _router(path):
    sd = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    return {k: v for k, v in sd.items()}


def test_resume_matches_uninterrupted(tmp_path):
    common = ["backbone=tiny_dit", "solver=ddim20", "trainer=cpu", "data.batch_size=2", "logger=csv", *FAST,
              "callbacks.model_checkpoint.every_n_train_steps=1", "seed=3"]
    full = compose_cfg("train", [*common, "trainer.max_steps=6"], tmp_path / "full")
    train(full)
    part = compose_cfg("train", [*common, "trainer.max_steps=3"], tmp_path / "part")
    train(part)
    resumed = compose_cfg("train", [*common, "trainer.max_steps=6",
                                    f"ckpt_path={tmp_path / 'part' / 'checkpoints' / 'last.ckpt'}"], tmp_path / "resumed")
    train(resumed)
    a = _router(tmp_path / "full" / "checkpoints" / "last.ckpt")
    b = _router(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    c = _router(tmp_path / "part" / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(not torch.equal(a[k], c[k]) for k in a), "3 more steps must have changed some router"


def test_ddp_two_cpu_processes(tmp_path):
    res = run_cli("train.py", ["trainer=ddp_sim", "trainer.max_steps=2", "data.batch_size=2",
                               "callbacks.model_checkpoint.every_n_train_steps=1", f"hydra.run.dir={tmp_path / 'run'}",
                               *FAST], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["global_step"] == 2
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert list(run.glob("router.*"))
    assert "world_size=2" in res.stdout + res.stderr or "GLOBAL_RANK: 1" in res.stdout + res.stderr


def test_multirun_sweep_summary(tmp_path):
    res = run_cli("train.py", ["-m", "policy.lam=1e-6,1e-2", "trainer.max_steps=2", "data.batch_size=2",
                               "callbacks=none", f"hydra.sweep.dir={tmp_path / 'sweep'}", *FAST], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    runs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir() and (p / "summary.json").exists())
    assert len(runs) == 2
    table = pd.read_csv(tmp_path / "sweep" / "summary.csv")
    assert sorted(table["lam"].tolist()) == [1e-6, 1e-2]
    assert (tmp_path / "sweep" / "summary.md").read_text().count("\n") == 4


def test_train_logs_to_wandb_offline(tmp_path, monkeypatch):
    """Real W&B in offline mode: metrics and the router heatmap image land in the offline run."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = compose_cfg("train", ["logger=wandb", "logger.wandb.offline=true", "trainer=cpu", "trainer.max_steps=2",
                                "data.batch_size=2", "module.heatmap_every=1", *FAST], tmp_path)
    train(cfg)
    import wandb

    wandb.finish()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].rglob("*.wandb")), "no offline run log written"
    assert list(runs[0].glob("files/media/images/router/heatmap_*.png"))


def test_train_bf16_autocast(tmp_path):
    cfg = compose_cfg("train", ["trainer=cpu", "trainer.precision=bf16-mixed", "trainer.max_steps=2",
                                "data.batch_size=2", "callbacks=none", *FAST], tmp_path)
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert json.loads((tmp_path / "summary.json").read_text())["global_step"] == 2
