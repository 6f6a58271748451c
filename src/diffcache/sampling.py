"""``sample()``: the one sampling loop behind training, evaluation, benchmarks and tests."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .solvers.base import Solver
from .solvers.denoiser import Denoiser


@torch.no_grad()
def sample(backbone, solver: Solver, policy, noise: torch.Tensor, cond, guidance: float | None = None, *,
           progress: bool = False, generator: torch.Generator | None = None, uncond=None) -> torch.Tensor:
    """Run ``solver`` from ``noise`` with ``backbone`` under ``policy`` (None: the uncached model).

    The policy is reset first (a new run), attached to ``backbone`` if it is not, and told the step
    context of every evaluation by the :class:`Denoiser`. ``generator`` feeds stochastic solvers
    (DDPM, DDIM with eta > 0).
    """
    if policy is not None:
        if policy.backbone is not backbone:
            policy.attach(backbone)
        policy.reset()
    elif backbone.policy is not None:
        raise ValueError("backbone has a policy attached; pass it as policy= (or detach it for an uncached run)")
    den = Denoiser(backbone, guidance, uncond=uncond)
    state = solver.init(noise)
    desc = f"{getattr(solver, 'name', 'sample')} ({type(policy).__name__ if policy is not None else 'no cache'})"
    for k in tqdm(range(solver.num_evals), desc=desc, disable=not progress, leave=False):
        out = den(solver.model_input(state, k), k, solver, cond, policy)
        state = solver.update(state, out, k, generator=generator)
    return solver.final(state)
