"""FID / IS / PSNR while training a router: validation every interval on a fixed seeded set, sampled with the
thresholded router and the uncached teacher, logged to CSV and W&B (offline), with an injected extractor."""
from __future__ import annotations

import json
from pathlib import Path

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


def test_compare_table_puts_the_router_next_to_the_cheap_alternatives(tmp_path, capsys):
    from diffcache.utils.record import load_rows

    cfg = compose_cfg("train", [*PIXEL, "trainer.max_steps=2", "callbacks=none", "compare=default", "policy.theta=0.9",
                                "compare.num_samples=4", "compare.batch_size=2", "compare.latency_repeats=1"], tmp_path)
    train(cfg)
    rows = load_rows(tmp_path / "results.json")
    assert [r.method for r in rows[:2]] == ["full", "l2c"] and rows[1].params == {"θ": 0.9}
    assert any(r.method == "fora" and r.params == {"N": 2} for r in rows) and any(r.method == "toca" for r in rows)
    full, l2c = rows[0], rows[1]
    assert "psnr" not in full.metrics and full.macs_fraction == 1.0  # no distance of the full sampler to itself
    few = [r for r in rows if r.role == "fewer steps"]
    assert l2c.macs_fraction < 0.9  # theta 0.9 on N(0, 1) logits: most cache-step branches reused
    # equal compute: the fewest DDIM steps whose MACs reach L2C's
    assert len(few) == 1 and few[0].method == "steps" and few[0].nfe < 20 and few[0].gmacs >= l2c.gmacs
    assert (few[0].nfe - 1) * full.gmacs / 20 < l2c.gmacs
    for r in rows:
        assert {"tiny_fid", "tiny_is"} <= set(r.metrics) and r.gmacs > 0 and r.latency_s > 0
        assert r.provenance["commit"] and r.provenance["machine"] and r.provenance["reused"] is False
    md = (tmp_path / "comparison.md").read_text()
    assert md.count("\n") == len(rows) + 4  # caption, blank line, header, rule, one line per row
    assert "| method | NFE |" in md and "PSNR to full (dB)" in md and "GMACs / image" in md and "latency (s / batch)" in md
    assert f"fewer steps: DDIM-{few[0].nfe} " in md
    out = capsys.readouterr().out
    assert "comparison.md" in out and "teacher tiny_dit (random weights), 4 samples (seed" in out
    saved = out.rsplit("saved: ", 1)[1].strip().split(", ")
    assert str(tmp_path / "comparison_samples.png") in saved and all(Path(p).exists() for p in saved)
    assert str(tmp_path / "router_heatmaps") not in saved  # callbacks=none: never named when it was not written


def test_compare_rows_of_a_budget_conditioned_router_and_of_searched_schedules(tmp_path):
    """One budget-conditioned router gives a row per requested budget; searched schedules (greedy and DP) are
    rows whose MACs lie within one branch below their budget, with their search time next to the training time."""
    from diffcache.metrics.cost import policy_cost
    from diffcache.search.searcher import site_macs
    from diffcache.backbones import from_config
    from diffcache.utils.build import build_solver
    from diffcache.utils.record import load_rows

    cfg = compose_cfg("train", [*PIXEL, "trainer.max_steps=2", "callbacks=none", "compare=default",
                                "module.objective=budget", "compare.router_budgets=[0.3,0.7]",
                                "compare.search.budgets=[0.9,0.95]", "compare.search.num_samples=2",
                                "compare.fora_intervals=[]", "compare.toca=false",
                                "compare.num_samples=4", "compare.batch_size=2"], tmp_path)
    train(cfg)
    rows = load_rows(tmp_path / "results.json")
    b3, b7 = (next(r for r in rows if r.method == "budget" and r.params == {"b": b}) for b in (0.3, 0.7))
    assert b3.macs_fraction < b7.macs_fraction < 1.0
    assert b3.train_s > 0 and b3.train_s == b7.train_s
    bb, solver = from_config(cfg.backbone), build_solver(cfg.solver)
    branch = float(site_macs(bb).max()) / policy_cost(bb, solver)["macs"]
    for b in (0.9, 0.95):
        for m in ("greedy", "dp"):
            r = next(r for r in rows if r.method == "search" and r.params == {"algo": m, "b": b})
            assert r.search_s > 0 and r.train_s is None and r.label == f"search {m} b={b:g}"
            assert b - branch - 1e-9 < r.macs_fraction <= b + 1e-9, (m, b, r.macs_fraction, branch)
