"""A policy is bound to a backbone for one run only (issue 8's defects, each a test that failed before)."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from tiny_models import perturbed

from diffcache.data.datamodule import NoiseData
from diffcache.modules.router_distill import RouterDistill
from diffcache.policies.fora import FORAPolicy
from diffcache.policies.l2c import L2CPolicy
from diffcache.policies.none import NoCache
from diffcache.sampling import sample
from diffcache.solvers import make_solver


def _setup():
    model = perturbed("tiny_dit")
    solver = make_solver("ddim", 10)
    g = torch.Generator().manual_seed(0)
    return model, solver, torch.randn(2, 4, 8, 8, generator=g), torch.tensor([1, 5])


def test_backbone_is_uncached_after_sample():
    """Before: a plain backbone call after sample() still went through the policy (stale outputs; with CFG
    'cache holds a batch of 4')."""
    model, solver, x, y = _setup()
    t = torch.full((2,), 500.0)
    with torch.no_grad():
        plain = model(x, t, y)
        sample(model, solver, L2CPolicy(theta=1.0, solver=solver), x, y, guidance=1.5)
        assert model.policy is None
        assert torch.equal(model(x, t, y), plain)


def test_backbone_is_uncached_after_an_error_inside_the_run():
    model, solver, x, y = _setup()
    policy = L2CPolicy(theta=1.0, solver=make_solver("ddim", 20), layout=model.layout)  # 20 routers, 10 steps
    with pytest.raises(ValueError, match="made for 20 evaluations"):
        sample(model, solver, policy, x, y, guidance=1.5)
    assert model.policy is None
    fora = FORAPolicy(interval=2)
    with pytest.raises(RuntimeError, match="boom"), fora.bound(model, solver):
        raise RuntimeError("boom")
    assert model.policy is None and fora._cache == {}


def test_each_run_uses_the_policy_it_is_given():
    """Before: with a second policy attached after the first, sample(bb, ..., first) ran the second's sites
    (the released DDIM-20 router then reused 0 sub-layers instead of 248), and sample(bb, ..., NoCache())
    silently detached the real policy."""
    model, solver, x, y = _setup()
    cache_all, cache_none = L2CPolicy(theta=1.0, solver=solver), L2CPolicy(theta=0.0, solver=solver)
    ref_all = sample(model, solver, cache_all, x, y, guidance=1.5)
    ref_none = sample(model, solver, None, x, y, guidance=1.5)
    assert not torch.equal(ref_all, ref_none)
    assert torch.equal(sample(model, solver, cache_none, x, y, guidance=1.5), ref_none)
    assert torch.equal(sample(model, solver, cache_all, x, y, guidance=1.5), ref_all)  # not cache_none's sites
    assert torch.equal(sample(model, solver, NoCache(), x, y, guidance=1.5), ref_none)
    assert torch.equal(sample(model, solver, cache_all, x, y, guidance=1.5), ref_all)


def test_runs_do_not_nest():
    model, solver, x, y = _setup()
    outer = FORAPolicy(interval=2)
    with outer.bound(model, solver):
        with pytest.raises(RuntimeError, match="already bound to FORAPolicy"):
            sample(model, solver, NoCache(), x, y)
        with pytest.raises(RuntimeError, match="bound to FORAPolicy by another run"):
            sample(model, solver, None, x, y)
    assert model.policy is None


def test_sample_after_fit_routes_hard_and_caches(tmp_path):
    """Before: RouterDistill left policy.mode == "train", so sample() after trainer.fit soft-mixed and cached
    nothing. Now routing follows nn.Module.training and sample() always routes hard."""
    model, solver, x, y = _setup()
    policy = L2CPolicy(theta=0.5, solver=solver, init_seed=0)
    module = RouterDistill(model, solver, policy, lam=1e-6, label_drop=0.0)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=NoiseData(batch_size=2, num_batches=4).bind(model))
    policy.train()  # whatever mode training left behind (here: train, the soft one) ...
    after = sample(model, solver, policy, x, y, guidance=1.5)
    assert policy.training  # ... sample() routes hard for the run and restores the mode after
    hard = L2CPolicy(theta=0.5, solver=solver, layout=model.layout)
    hard.load_state_dict(policy.state_dict())
    assert not hard.training and torch.equal(after, sample(model, solver, hard, x, y, guidance=1.5))
    assert 0 < policy.cache_stats()["cached"] < policy.cache_stats()["cacheable"]  # it does cache something
