"""The denoiser: a backbone seen through a solver's eyes.

It maps evaluation ``nfe`` to the backbone's time input, splits learned-sigma outputs, converts eps <->
x0 with the solver's (alpha, sigma), and applies the backbone's classifier-free-guidance convention
exactly as the reference code does, read from the backbone class (``cfg_layout``, ``guide``):

* one batch ``[cond; uncond]`` (DiT ``forward_with_cfg``; guidance on the first 3 channels only, a
  DiT legacy quirk kept as ``DiT.guided_channels``; the other channels come from the cond half);
* one batch ``[uncond; cond]`` (PixArt, DPM-Solver ``model_wrapper``), ``u + s (c - u)``;
* two passes, cond then uncond (U-ViT), ``c + s (c - u)`` (s = 0.4 means w = 1.4).

Before every backbone call the bound policy (if any) learns where it is (:class:`StepContext`),
including the CFG branch, so cond and uncond caches never mix. Teacher and student passes of router
training go through :meth:`Denoiser.raw`, the same path as sampling. A half-precision backbone gets its
input in its own dtype and returns its output in the solver's. Pixel-space teachers (the MNIST demo)
set ``backbone.clip_denoised``: the x0 prediction is clipped to [-1, 1] and eps re-derived from it, as ADM's
samplers do with ``clip_denoised=True``; latent-space models keep DiT's ``clip_denoised=False``.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from .backbones.base import cat_cond
from .context import StepContext
from .solvers.base import ModelOutput, Solver


class Denoiser:
    """``den(x, nfe, solver, cond) -> ModelOutput`` for evaluation ``nfe`` of ``solver``."""

    def __init__(self, backbone, guidance: float | None = None, uncond=None):
        self.backbone = backbone
        self.guidance = guidance
        self.uncond = uncond  # explicit unconditional input (e.g. T5 of "" for diffusers PixArt)
        self.cfg = backbone.guidance_active(guidance)

    def _uncond(self, cond):
        return self.uncond if self.uncond is not None else self.backbone.null_cond(cond)

    def context(self, x: torch.Tensor, nfe: int, solver: Solver) -> tuple[torch.Tensor, StepContext]:
        """The backbone time input (B,) and the step context of evaluation ``nfe``."""
        t = torch.full((x.shape[0],), float(solver.model_times()[nfe]), dtype=x.dtype, device=x.device)
        ctx = StepContext(nfe=nfe, step=solver.step_of(nfe), num_steps=solver.num_steps, num_evals=solver.num_evals)
        return t, ctx

    def _run(self, x, t, cond, ctx: StepContext):
        """One backbone call. The solver state ``x`` keeps its dtype (float32, float64 in tests); the model
        sees it in its own dtype (bf16 / fp16 weights take bf16 / fp16 input; so do their caches) and its
        output is cast back, so the solver arithmetic never runs in half precision."""
        policy = self.backbone.policy
        if policy is not None:
            policy.begin(ctx)
        dtype = getattr(self.backbone, "dtype", x.dtype)
        return self.backbone(x.to(dtype), t, cond).to(x.dtype)

    def raw(self, x: torch.Tensor, nfe: int, solver: Solver, cond) -> torch.Tensor:
        """The backbone's native output at evaluation ``nfe`` without guidance (router distillation)."""
        t, ctx = self.context(x, nfe, solver)
        return self._run(x, t, cond, ctx)

    def __call__(self, x: torch.Tensor, nfe: int, solver: Solver, cond) -> ModelOutput:
        B = x.shape[0]
        bb = self.backbone
        C = bb.in_channels
        t, ctx = self.context(x, nfe, solver)
        if not self.cfg:
            raw = self._run(x, t, cond, ctx)
            eps = raw[:, :C]
            var = raw[:, C:] if raw.shape[1] > C else None
        else:
            if bb.cfg_layout == "two_pass":
                c = self._run(x, t, cond, ctx.with_branch("cond"))
                u = self._run(x, t, self._uncond(cond), ctx.with_branch("uncond"))
                raw = torch.cat([c, u])
            else:
                cond_first = bb.cfg_layout == "cond_uncond"
                pair = [cond, self._uncond(cond)] if cond_first else [self._uncond(cond), cond]
                raw = self._run(torch.cat([x, x]), torch.cat([t, t]), cat_cond(pair),
                                replace(ctx, cfg_layout=bb.cfg_layout))
                c, u = (raw[:B], raw[B:]) if cond_first else (raw[B:], raw[:B])
            eps = bb.guide(c, u, self.guidance)
            var = c[:, C:] if c.shape[1] > C else None
        alpha, sigma = solver.alpha_sigma(nfe)
        x0 = (x - sigma * eps) / alpha
        if bb.clip_denoised:  # ADM's clip_denoised: x0 into the data range, eps re-derived to match it
            x0 = x0.clamp(-1.0, 1.0)
            eps = (x - alpha * x0) / sigma
        return ModelOutput(eps=eps, x0=x0, var_values=var, raw=raw)
