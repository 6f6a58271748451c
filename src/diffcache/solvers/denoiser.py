"""The denoiser: a backbone seen through a solver's eyes.

It maps evaluation ``k`` to the backbone's time input, splits DiT/PixArt learned-sigma outputs, converts
eps <-> x0 with the solver's (alpha, sigma), and applies each family's classifier-free-guidance
convention exactly as the reference code does:

* DiT (``forward_with_cfg``): one batch ``[cond; uncond]``; ``u + s (c - u)`` on the first min(3, C) channels
  only (a DiT legacy quirk kept for faithfulness); the other channels come from the cond half.
* U-ViT: two passes, cond then uncond; ``c + s (c - u)`` (s = 0.4 means w = 1.4).
* PixArt (DPM-Solver ``model_wrapper``): one batch ``[uncond; cond]``; ``u + s (c - u)`` on eps.

Before every backbone call the policy learns where it is (:class:`StepContext`), including the CFG
branch, so cond and uncond caches never mix.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from ..backbones.base import cat_cond
from ..policies.base import StepContext
from .base import ModelOutput, Solver

_LAYOUT = {"dit": "cond_uncond", "pixart": "uncond_cond"}


def guidance_active(family: str, guidance: float | None) -> bool:
    """Whether ``guidance`` asks for a second (unconditional) pass under this family's convention."""
    if guidance is None:
        return False
    return guidance != (0.0 if family == "uvit" else 1.0)


class Denoiser:
    """``den(x, k, solver, cond, policy) -> ModelOutput`` for evaluation ``k`` of ``solver``."""

    def __init__(self, backbone, guidance: float | None = None, uncond=None):
        self.backbone = backbone
        self.family = backbone.family
        self.guidance = guidance
        self.uncond = uncond  # explicit unconditional input (e.g. T5 of "" for diffusers PixArt)
        self.cfg = guidance_active(self.family, guidance)

    def _uncond(self, cond):
        return self.uncond if self.uncond is not None else self.backbone.null_cond(cond)

    def _run(self, x, t, cond, policy, ctx: StepContext):
        if policy is not None:
            policy.begin(ctx)
        return self.backbone(x, t, cond)

    def __call__(self, x: torch.Tensor, k: int, solver: Solver, cond, policy=None) -> ModelOutput:
        B = x.shape[0]
        t = torch.full((B,), float(solver.model_times()[k]), dtype=x.dtype, device=x.device)
        ctx = StepContext(nfe=k, step=solver.step_of(k), num_steps=solver.num_steps, num_evals=solver.num_evals,
                          timestep=float(t[0]))
        C = self.backbone.in_channels
        s = self.guidance
        if not self.cfg:
            raw = self._run(x, t, cond, policy, ctx)
            eps = raw[:, :C]
            var = raw[:, C:] if raw.shape[1] > C else None
        elif self.family == "uvit":
            c = self._run(x, t, cond, policy, ctx.with_branch("cond"))
            u = self._run(x, t, self._uncond(cond), policy, ctx.with_branch("uncond"))
            raw = torch.cat([c, u])
            eps, var = c + s * (c - u), None
        else:
            layout = _LAYOUT[self.family]
            pair = [cond, self._uncond(cond)] if layout == "cond_uncond" else [self._uncond(cond), cond]
            raw = self._run(torch.cat([x, x]), torch.cat([t, t]), cat_cond(pair), policy,
                            replace(ctx, cfg_layout=layout))
            first, second = raw[:B], raw[B:]
            c, u = (first, second) if layout == "cond_uncond" else (second, first)
            if self.family == "dit":
                g = min(3, C)  # DiT guides the first 3 channels (of 4); a 1-channel model: its only one
                guided = u[:, :g] + s * (c[:, :g] - u[:, :g])
                eps = torch.cat([guided, c[:, g:C]], dim=1)
            else:
                eps = u[:, :C] + s * (c[:, :C] - u[:, :C])
            var = c[:, C:] if c.shape[1] > C else None
        alpha, sigma = solver.alpha_sigma(k)
        x0 = (x - sigma * eps) / alpha
        return ModelOutput(eps=eps, x0=x0, var_values=var, raw=raw)
