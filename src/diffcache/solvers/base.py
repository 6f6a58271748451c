"""The solver contract: configuration plus *functional* state.

``state = solver.init(x)``; for each model evaluation ``nfe`` in ``range(solver.num_evals)``:
``x = solver.model_input(state, nfe)``, the denoiser evaluates the model there, and
``state = solver.update(state, out, nfe)``. History lives in the state object, so one solver instance
runs a teacher and a student trajectory side by side.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class ModelOutput:
    """One (guided) model evaluation in every parametrisation a solver may need.

    eps: noise prediction; x0: data prediction (from eps with this evaluation's alpha/sigma);
    var_values: DiT/PixArt learned-range variance channels in [-1, 1] (None without learned sigma);
    raw: the backbone's native output for the batch actually run (for distillation losses).
    """

    eps: torch.Tensor
    x0: torch.Tensor
    var_values: torch.Tensor | None = None
    raw: torch.Tensor | None = None


@dataclass
class SolverState:
    """Base state: the current sample plus solver-specific history in ``extra``."""

    x: torch.Tensor
    nfe: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def check_eval(solver: "Solver", state: SolverState, nfe: int) -> None:
    """Evaluations must be fed in order: ``nfe`` is the state's next evaluation."""
    if not 0 <= nfe < solver.num_evals:
        raise IndexError(f"evaluation {nfe} out of range for {solver.name} with {solver.num_evals} evaluations")
    if state.nfe != nfe:
        raise ValueError(f"{solver.name}: state expects evaluation {state.nfe}, got nfe={nfe} (updates must be in order)")


class Solver:
    """Abstract solver. Subclasses implement the methods below."""

    name: str = "solver"
    num_steps: int

    @property
    def num_evals(self) -> int:
        raise NotImplementedError

    def model_times(self) -> torch.Tensor:
        """Backbone time input per evaluation (float64, shape [num_evals])."""
        raise NotImplementedError

    def step_of(self, nfe: int) -> int:
        """Solver step (0 = noisiest) that evaluation ``nfe`` belongs to."""
        raise NotImplementedError

    def step_start(self, step: int) -> int:
        """First evaluation index of ``step``."""
        raise NotImplementedError

    def alpha_sigma(self, nfe: int) -> tuple[float, float]:
        """(alpha, sigma) of the marginal q(x_t | x_0) at evaluation ``nfe``: x_t = alpha x_0 + sigma eps."""
        raise NotImplementedError

    def init(self, x: torch.Tensor, start: int = 0) -> SolverState:
        """State whose next evaluation is ``start`` (a step start), with no history."""
        if not 0 <= start < self.num_evals:
            raise IndexError(f"{self.name}: start {start} out of range [0, {self.num_evals})")
        if self.step_start(self.step_of(start)) != start:
            raise ValueError(f"{self.name}: start {start} is not the first evaluation of a solver step")
        return SolverState(x=x, nfe=int(start), extra={})

    def model_input(self, state: SolverState, nfe: int) -> torch.Tensor:
        check_eval(self, state, nfe)
        return state.x

    def update(self, state: SolverState, out: ModelOutput, nfe: int, generator: torch.Generator | None = None) -> SolverState:
        raise NotImplementedError

    def final(self, state: SolverState) -> torch.Tensor:
        return state.x
