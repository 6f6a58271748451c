"""``sample()``: the one sampling loop behind training, evaluation, benchmarks and tests.

:func:`advance` is the loop itself (evaluations ``state.nfe .. stop-1``); ``sample()`` binds the policy
for the run and advances from noise to the end, and router distillation advances its no-grad prefix
through the same function.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .denoiser import Denoiser
from .context import run_with
from .solvers.base import Solver, SolverState


def advance(den: Denoiser, solver: Solver, state: SolverState, cond, stop: int | None = None, *,
            generator=None, progress: bool = False, desc: str | None = None) -> SolverState:
    """Run evaluations ``state.nfe`` .. ``stop - 1`` (default: to the end) and return the new state."""
    stop = solver.num_evals if stop is None else int(stop)
    for nfe in tqdm(range(state.nfe, stop), desc=desc or solver.name, disable=not progress, leave=False):
        out = den(solver.model_input(state, nfe), nfe, solver, cond)
        state = solver.update(state, out, nfe, generator=generator)
    return state


@torch.no_grad()
def sample(backbone, solver: Solver, policy, noise: torch.Tensor, cond, guidance: float | None = None, *,
           progress: bool = False, generator=None, uncond=None) -> torch.Tensor:
    """Run ``solver`` from ``noise`` with ``backbone`` under ``policy`` (None: the uncached model).

    The policy is bound for this run only, with hard (inference) routing, and released on return or
    error. ``generator`` feeds stochastic solvers (DDPM, DDIM with eta > 0): one ``torch.Generator`` for the
batch, or one per sample (:func:`~diffcache.data.seeded.step_generators`: batch-size independent).
    """
    den = Denoiser(backbone, guidance, uncond=uncond)
    desc = f"{solver.name} ({type(policy).__name__ if policy is not None else 'no cache'})"
    with run_with(policy, backbone, solver):
        state = advance(den, solver, solver.init(noise), cond, generator=generator, progress=progress, desc=desc)
    return solver.final(state)


def compile_backbone(backbone, backend: str = "inductor", max_graphs: int = 64):
    """Compile the whole backbone forward for static schedules (``eval.compile=<backend>``).

    FORA, L2C and searched schedules decide every site before an evaluation starts (``policy.decision``) and
    the site reads nothing else, so dynamo specialises the forward on that decision: one graph per distinct
    caching decision (plus one uncached), reused by every later evaluation and run that makes the same
    decision. ``max_graphs`` bounds the graphs kept (dynamo's recompile limit); past it dynamo runs eagerly.
    """
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(int(torch._dynamo.config.recompile_limit), int(max_graphs))
    backbone.compile(backend=backend, dynamic=False)
    return backbone


def uncompile_backbone(backbone):
    """Undo :func:`compile_backbone` (``nn.Module.compile`` keeps the compiled call in ``_compiled_call_impl``):
    after training, evaluation decides its own compilation (``eval.compile``)."""
    backbone._compiled_call_impl = None
    return backbone

