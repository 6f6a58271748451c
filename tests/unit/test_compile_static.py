"""Static schedules compiled (``eval.compile``): one graph per distinct caching decision, reused across runs.

Backend ``eager`` (dynamo tracing, no code generation) keeps the test fast and the outputs bit-identical."""
from __future__ import annotations

import pytest
import torch
from tiny_models import perturbed

from diffcache.context import StepContext
from diffcache.policies.fora import FORAPolicy
from diffcache.policies.l2c import L2CPolicy
from diffcache.sampling import compile_backbone, sample, uncompile_backbone
from diffcache.solvers import make_solver


def decisions(policy, model, solver) -> set:
    """Every evaluation's decision, read off the policy outside any compiled code."""
    seen = set()
    with policy.bound(model, solver), policy.inference():
        for k in range(solver.num_evals):
            policy.begin(StepContext(nfe=k, step=solver.step_of(k), num_steps=solver.num_steps,
                                     num_evals=solver.num_evals))
            seen.add(policy.decision)
    return seen


@pytest.mark.parametrize("make", [lambda: FORAPolicy(interval=3), lambda: L2CPolicy(init_seed=0, budget=0.7)],
                         ids=["fora", "l2c"])
def test_one_graph_per_distinct_decision_and_none_after_the_first_run(make):
    from torch._dynamo.utils import counters

    model = perturbed("tiny_dit", 0, scale=0.05)
    solver = make_solver("ddim", 8, "linear")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([1, 2])
    policy = make()
    eager = sample(model, solver, policy, x, y, guidance=1.5)
    expect = decisions(policy, model, solver)
    assert 1 < len(expect) < solver.num_evals  # the schedule repeats decisions: fewer graphs than evaluations
    torch._dynamo.reset()
    counters.clear()
    try:
        compile_backbone(model, backend="eager", max_graphs=solver.num_evals + 2)
        first = sample(model, solver, policy, x, y, guidance=1.5)
        graphs = counters["stats"]["unique_graphs"]
        second = sample(model, solver, policy, x, y, guidance=1.5)
        assert graphs == len(expect)
        assert counters["stats"]["unique_graphs"] == graphs  # a second run compiles nothing
    finally:
        uncompile_backbone(model)
        torch._dynamo.reset()
    assert torch.equal(first, eager) and torch.equal(second, eager)


def test_router_training_compiled_learns_what_eager_learns_from_a_few_graphs(tmp_path):
    """``module.compile``: the soft student, the recorded prefix and the teacher each trace once; the cache
    step drawn per iteration changes no graph; the routers end where eager training ends them; the backbone
    is handed back uncompiled (evaluation decides its own compilation)."""
    import lightning as L
    from torch._dynamo.utils import counters

    from diffcache.data.datamodule import SyntheticData
    from diffcache.modules.router_distill import RouterDistill

    def fit(compile):
        model, solver = perturbed("tiny_dit", 0, scale=0.05), make_solver("ddim", 10, "linear")
        policy = L2CPolicy(solver=solver, layout=model.layout, init_seed=0)
        module = RouterDistill(model, solver, policy, lam=1e-4, draw="batch", label_drop=0.0, compile=compile)
        seen, distill = [], module._distill_at
        module._distill_at = lambda m, *a: (seen.append(m), distill(m, *a))[1]
        init = [p.detach().clone() for p in policy.parameters()]
        L.seed_everything(0)
        L.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, default_root_dir=tmp_path).fit(
            module, datamodule=SyntheticData(num_samples=12, batch_size=2, shuffle=False).bind(model))
        return model, policy, seen, init

    _, eager, _, init = fit(None)
    torch._dynamo.reset()
    counters.clear()
    try:
        model, compiled, steps, _ = fit("aot_eager")
        graphs = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert len(set(steps)) >= 3  # several cache steps were trained ...
    assert 0 < graphs <= 3  # ... from one graph per way the step calls the backbone
    assert model._compiled_call_impl is None
    moved = [bool((b - p0).abs().max() > 1e-3) for b, p0 in zip(compiled.parameters(), init)]
    assert sum(moved) == len(set(steps))  # DDIM: one router per cache step, trained where it was drawn
    for a, b in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_router_training_compiles_the_final_sample_objective_too(tmp_path):
    """``module.compile`` holds for ``objective=trajectory`` as well (its set-up runs eagerly first)."""
    import lightning as L
    from torch._dynamo.utils import counters

    from diffcache.data.datamodule import SyntheticData
    from diffcache.modules.router_distill import RouterDistill

    model, solver = perturbed("tiny_dit", 0, scale=0.05), make_solver("ddim", 6, "linear")
    policy = L2CPolicy(solver=solver, layout=model.layout, init_seed=0)
    module = RouterDistill(model, solver, policy, objective="trajectory", label_drop=0.0, compile="aot_eager",
                           trajectory=dict(budget=0.8, pool=4, select_every=0, scale_samples=2))
    torch._dynamo.reset()
    counters.clear()
    try:
        L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, default_root_dir=tmp_path).fit(
            module, datamodule=SyntheticData(num_samples=4, batch_size=2).bind(model))
        graphs = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert graphs > 0 and model._compiled_call_impl is None
