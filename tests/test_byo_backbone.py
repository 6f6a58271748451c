"""Bring your own backbone: a class defined under tests/ (not src/) trains and evaluates an L2C router
through the real CLI, selected only by its config's ``_target_``."""
from __future__ import annotations

import json
import os

import torch
from hydra_utils import ROOT, run_cli

BYO = ROOT / "tests" / "byo"


def test_user_backbone_trains_and_evaluates_a_router(tmp_path):
    env = {"PYTHONPATH": os.pathsep.join([str(BYO), os.environ.get("PYTHONPATH", "")])}
    common = [f"hydra.searchpath=[file://{BYO / 'conf'}]", "backbone=my_mixer", "solver=ddim20"]
    tr = run_cli("train.py", [*common, "trainer.max_steps=3", "data.batch_size=2", "callbacks=none",
                              "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path / 'train'}"], tmp_path, env=env)
    assert tr.returncode == 0, tr.stderr[-3000:]
    summary = json.loads((tmp_path / "train" / "summary.json").read_text())
    assert summary["run_name"].startswith("TinyMixer-ddim_20-l2c") and summary["global_step"] == 3
    assert summary["cacheable"] == 10 * 3 * 2  # 10 cache steps x depth 3 x (attn, mlp) of the user's layout
    router = torch.load(tmp_path / "train" / "router.pt", weights_only=False)
    assert len(router["routers"]) == 20 and router["routers"]["1.prob"].shape == (6,)
    ev = run_cli("evaluate.py", [*common, "policy=l2c", f"router_ckpt={tmp_path / 'train' / 'router.pt'}",
                                 "eval.num_samples=2", "eval.batch_size=2", "eval.latency_repeats=1", "eval.progress=false",
                                 f"hydra.run.dir={tmp_path / 'eval'}"], tmp_path, env=env)
    assert ev.returncode == 0, ev.stderr[-3000:]
    res = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert res["macs_fraction"] <= 1.0 and res["num_samples"] == 2 and "psnr_vs_full_db" in res
