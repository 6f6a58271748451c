"""Router training end to end: real Hydra composition, real Lightning Trainer, CSV logs, checkpoints."""
from __future__ import annotations

import json
import os

import pandas as pd
import pytest
import torch
from hydra_utils import FAST, ROOT, compose_cfg, run_cli

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


def test_ddp_two_cpu_processes_keep_identical_routers(tmp_path):
    """Real DDP (2 gloo processes): each rank trains its own drawn cache step, gradients are all-reduced, so
    after training both ranks hold the same routers, and they moved away from the shared init."""
    byo = ROOT / "tests" / "byo"
    env = {"PYTHONPATH": os.pathsep.join([str(byo), os.environ.get("PYTHONPATH", "")])}
    res = run_cli("train.py", ["trainer=ddp_sim", "trainer.max_steps=3", "data.batch_size=2",
                               "callbacks.model_checkpoint.every_n_train_steps=1", f"hydra.run.dir={tmp_path / 'run'}",
                               "+callbacks.dump._target_=rank_dump.DumpPolicyPerRank",
                               f"+callbacks.dump.out_dir={tmp_path / 'ranks'}", *FAST], tmp_path, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["global_step"] == 3
    assert (run / "checkpoints" / "last.ckpt").is_file() and list(run.glob("router.*"))
    r0, r1 = torch.load(tmp_path / "ranks" / "rank0.pt"), torch.load(tmp_path / "ranks" / "rank1.pt")
    assert r0.keys() == r1.keys() and len(r0) == 20
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    g = torch.Generator().manual_seed(0)  # policy.init_seed = seed = 0: N(0,1), one router after the other
    init = [torch.randn(4, generator=g) for _ in range(20)]
    # DDIM-20 reads only the even routers: the odd ones keep their init exactly, some even one was trained
    assert all(torch.equal(r0[f"routers.{i}"], init[i]) for i in range(1, 20, 2))
    assert any(not torch.equal(r0[f"routers.{i}"], init[i]) for i in range(0, 20, 2))


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


def test_train_bf16_backbone(tmp_path):
    """backbone.dtype=bf16: the teacher held in bf16 weights, float32 routers and loss, finite steps."""
    cfg = compose_cfg("train", ["trainer=cpu", "backbone.dtype=bf16", "trainer.max_steps=2", "data.batch_size=2",
                                "callbacks=none", *FAST], tmp_path)
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert json.loads((tmp_path / "summary.json").read_text())["global_step"] == 2


def test_submitit_local_sweep_runs_real_jobs_and_gathers_table(tmp_path):
    """hydra/launcher=local (hydra-submitit-launcher's submitit_local): two real jobs as separate processes,
    gathered into one table (the same path a SLURM sweep takes, hydra/launcher=slurm). Without a comparison
    the runs report no quality, so no Pareto plot is drawn (a training loss is no quality axis)."""
    res = run_cli("train.py", ["-m", "hydra/launcher=local", "policy.theta=0.3,0.9", "trainer.max_steps=2",
                               "data.batch_size=2", "callbacks=none", f"hydra.sweep.dir={tmp_path / 'sweep'}", *FAST],
                  tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(list((tmp_path / "sweep" / ".submitit").rglob("*_result.pkl"))) == 2  # two submitit jobs ran
    table = pd.read_csv(tmp_path / "sweep" / "summary.csv")
    assert sorted(table["theta"].tolist()) == [0.3, 0.9] and (table["status"] == "ok").all()
    assert table["macs_fraction"].nunique() == 2  # different thresholds, different compute
    assert not (tmp_path / "sweep" / "pareto.png").exists() and not (tmp_path / "sweep" / "frontier.png").exists()
