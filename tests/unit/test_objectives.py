"""HarmoniCa's image-error-proxy weights and the budget-conditioned objective."""
from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import torch
from tiny_models import perturbed

from diffcache.data.datamodule import NoiseData
from diffcache.metrics.cost import policy_cost
from diffcache.modules.objectives import budget_shift, iepo_weights
from diffcache.modules.router_distill import RouterDistill
from diffcache.policies.l2c import L2CPolicy
from diffcache.sampling import sample
from diffcache.solvers import make_solver


def _policy(model, solver, reuse_at: dict[int, list[int]]):
    """Routers that compute every site except, at cache evaluation e, the sites reuse_at[e]."""
    p = L2CPolicy(theta=0.5, solver=solver, layout=model.layout)
    with torch.no_grad():
        for r in p.routers:
            r.fill_(10.0)
        for e, sites in reuse_at.items():
            p.routers[p.schedule.router[e]][sites] = -10.0
    return p


def test_iepo_weight_is_largest_where_caching_dominates_the_final_error():
    """Only one cache evaluation (a middle one) caches, everything: it alone changes the final sample, so it
    alone gets weight, and that weight is the final-sample MSE an independent pair of runs gives."""
    model, solver = perturbed("tiny_dit"), make_solver("ddim", 10)
    evals = L2CPolicy(solver=solver).schedule.cache_evals()
    star = evals[2]
    p = _policy(model, solver, {star: list(range(model.layout.num_sites))})
    w = iepo_weights(model, solver, p, num_samples=4, guidance=1.5, seed=3)
    assert list(w) == evals and max(w, key=w.get) == star
    assert w[star] > 0 and all(w[e] == 0.0 for e in evals if e != star)
    from diffcache.data.seeded import seeded_inputs

    noise, cond = seeded_inputs(model, range(4), 3)
    ref = sample(model, solver, None, noise, cond, 1.5, generator=torch.Generator().manual_seed(3))
    cached = sample(model, solver, p, noise, cond, 1.5, generator=torch.Generator().manual_seed(3))
    assert w[star] == float((cached - ref).pow(2).mean())


def test_iepo_weights_are_marginal_in_sampling_order():
    """HarmoniCa's get_lambda: weight m is the change from also caching at m, given the earlier ones cache."""
    model, solver = perturbed("tiny_dit"), make_solver("ddim", 10)
    evals = L2CPolicy(solver=solver).schedule.cache_evals()
    p = _policy(model, solver, {e: [0, 3] for e in evals})
    w = iepo_weights(model, solver, p, num_samples=2, guidance=1.5, seed=1)
    from diffcache.data.seeded import seeded_inputs

    noise, cond = seeded_inputs(model, range(2), 1)
    runs = [sample(model, solver, _policy(model, solver, {e: [0, 3] for e in evals[:k]}), noise, cond, 1.5,
                   generator=torch.Generator().manual_seed(1)) for k in range(len(evals) + 1)]
    for k, e in enumerate(evals):
        assert w[e] == float((runs[k + 1] - runs[k]).pow(2).mean())


def test_soft_threshold_shifts_beta():
    model, solver = perturbed("tiny_dit"), make_solver("ddim", 4)
    p = L2CPolicy(solver=solver, layout=model.layout, init_seed=0).train()
    with p.bound(model, solver), p.soft_threshold(0.7, 2.0):
        from diffcache.context import StepContext

        x, t, y = torch.randn(1, 4, 8, 8), torch.full((1,), 500.0), torch.tensor([1])
        p.begin(StepContext(nfe=0, step=0, num_steps=4, num_evals=4))
        with p.recording():
            model(x, t, y)
        p.begin(StepContext(nfe=1, step=1, num_steps=4, num_evals=4))
        seen = []
        orig = p._cached
        p._cached = lambda key, h: (seen.append(key), orig(key, h))[1]
        out = model(x, t, y)
        assert torch.isfinite(out).all() and seen  # the soft branch ran
    r = p.routers[p.schedule.router[1]].detach()
    expect = torch.sigmoid((r - 0.7) / 2.0)
    assert torch.allclose(torch.sigmoid((r - p._soft[0]) / p._soft[1]), torch.sigmoid(r))  # restored after
    assert not torch.allclose(expect, torch.sigmoid(r))


def test_budget_objective_gives_one_router_for_every_budget(tmp_path):
    model, solver = perturbed("tiny_dit"), make_solver("ddim", 10)
    policy = L2CPolicy(solver=solver, layout=model.layout, init_seed=0)
    module = RouterDistill(model, solver, policy, objective="budget", budget_range=(0.2, 0.9), label_drop=0.0)
    L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, default_root_dir=tmp_path).fit(
        module, datamodule=NoiseData(batch_size=2, num_batches=4).bind(model))
    path = policy.export_official(tmp_path / "router")
    full = policy_cost(model, solver, None)["macs"]
    per_branch = {k: v for k, v in zip(("attn", "mlp"), (1.0, 2.0))}
    for b in (0.3, 0.6, 0.9):
        q = L2CPolicy.from_official(path, solver=solver, budget=b)
        s = q.summary()
        # cache-step branch MACs kept: at least b, overshooting by less than one (MLP) site of one cache step
        assert b <= s["cache_step_macs_kept"] < b + max(per_branch.values()) / (3 * 2 * 5 * 1.0)
        assert policy_cost(model, solver, q)["macs"] < full
    assert budget_shift(policy, 1.0) < budget_shift(policy, 0.2)  # a bigger budget lowers the threshold


def test_trajectory_finish_keeps_the_budget_when_logits_tie_at_the_clamp():
    """Long training pins many logits at the clamp (+5): the budget's top-k then keeps only some of the tied
    sites, and a theta between "lowest kept" and "highest dropped" (both +5) would drop all of them. finish()
    must leave a router whose plain theta rule keeps exactly the top-k mask (so its MACs are the budget's)."""
    from diffcache.modules.trajectory import TrajectoryObjective

    model, solver = perturbed("tiny_dit"), make_solver("ddim", 6)
    p = L2CPolicy(theta=0.1, clamp=(-5.0, 5.0), solver=solver, layout=model.layout, init_seed=0)
    used = sorted(set(p.schedule_for().used_routers()))
    with torch.no_grad():
        for i, r in enumerate(used):
            p.routers[r].fill_(5.0 if i % 2 == 0 else -5.0)  # half the cache steps tied at the top clamp
    p.budget = 0.25  # fewer sites than are tied at +5
    topk = {r: list(m) for r, m in p.inference_masks().items()}
    tied = sum(len(m) for i, m in enumerate(p.inference_masks().values()) if i % 2 == 0)
    assert 0 < sum(sum(m) for m in topk.values()) < tied  # the budget splits the tie
    TrajectoryObjective(budget=0.5).finish(SimpleNamespace(policy=p, global_step=0))
    assert p.budget is None and p.inference_masks() == topk
