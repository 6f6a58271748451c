"""Static schedules compiled (``eval.compile``): one graph per distinct caching decision, reused across runs.

Backend ``eager`` (dynamo tracing, no code generation) keeps the test fast and the outputs bit-identical."""
from __future__ import annotations

import pytest
import torch
from tiny_models import perturbed

from diffcache.context import StepContext
from diffcache.policies.fora import FORAPolicy
from diffcache.policies.l2c import L2CPolicy
from diffcache.sampling import compile_backbone, sample
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
        model._compiled_call_impl = None
        torch._dynamo.reset()
    assert torch.equal(first, eager) and torch.equal(second, eager)
