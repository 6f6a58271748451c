"""Diffusion solvers behind one functional contract (:mod:`.base`), built by :func:`make_solver`.

``ddim`` / ``ddpm`` run DiT-respaced discrete chains; ``dpm_solver2`` (singlestep, ``num_steps`` = NFE) and
``dpm_solver_pp`` (2M multistep) run on the continuous VP view of the same discrete schedule.
"""
from __future__ import annotations

from .base import ModelOutput, Solver, SolverState
from .ddim import DDIM
from .ddpm import DDPM
from .dpm_solver import DPMSolver2, DPMSolverPP2M

ALGORITHMS = ("ddim", "ddpm", "dpm_solver2", "dpm_solver_pp")
KWARGS = ("eta", "prediction", "skip_type", "t_end", "time_input", "num_train_timesteps", "spacing")
_APPLICABLE = {
    "ddim": ("eta", "spacing", "num_train_timesteps"),
    "ddpm": ("spacing", "num_train_timesteps"),
    "dpm_solver2": ("prediction", "skip_type", "t_end", "time_input", "num_train_timesteps"),
    "dpm_solver_pp": ("skip_type", "t_end", "time_input", "num_train_timesteps"),
}
_CLASSES = {"ddim": DDIM, "ddpm": DDPM, "dpm_solver2": DPMSolver2, "dpm_solver_pp": DPMSolverPP2M}


def make_solver(algorithm: str, num_steps: int, schedule: str = "linear", **kw) -> Solver:
    """Build a solver. ``num_steps`` is the step count, except for ``dpm_solver2`` where it is the NFE.

    Keyword arguments not used by the chosen algorithm are rejected unless None, so a config that sets e.g.
    ``eta`` for a DPM solver fails loudly. ``time_input`` is accepted for DDIM/DDPM only as ``"discrete"``
    (their backbone times are the original discrete timesteps).
    """
    if algorithm not in _CLASSES:
        raise ValueError(f"unknown solver algorithm {algorithm!r}; choose one of {ALGORITHMS}")
    unknown = sorted(set(kw) - set(KWARGS))
    if unknown:
        raise ValueError(f"unknown solver argument(s) {unknown}; valid: {list(KWARGS)}")
    args = {}
    for key, val in kw.items():
        if val is None:
            continue
        if key in _APPLICABLE[algorithm]:
            args[key] = val
        elif key == "time_input" and algorithm in ("ddim", "ddpm") and val == "discrete":
            continue
        else:
            raise ValueError(f"solver {algorithm!r} does not take {key!r}; it takes {list(_APPLICABLE[algorithm])}")
    return _CLASSES[algorithm](int(num_steps), schedule=schedule, **args)


__all__ = ["ALGORITHMS", "DDIM", "DDPM", "DPMSolver2", "DPMSolverPP2M", "ModelOutput", "Solver", "SolverState",
           "make_solver"]
