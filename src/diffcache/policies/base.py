"""The cache-policy contract.

A policy owns every trainable parameter and every cached tensor. Backbones call
``policy.site(layer, kind, module, h, *args)``; the denoiser tells the policy where in sampling it is
with :class:`StepContext` (``at(ctx)``), including which CFG branch runs, so cond and uncond caches
never mix. ``disabled()`` turns the policy into a pass-through (the teacher pass in router training).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator

import torch
from torch import nn


@dataclass(frozen=True)
class StepContext:
    """Where a backbone call sits in a sampling run.

    nfe: 0-based model-evaluation index (a CFG pass pair shares one nfe).
    step: 0-based solver step (0 = noisiest); DPM-Solver-2 singlestep has two nfe per step.
    num_steps / num_evals: totals for the run.
    timestep: the backbone's time input for this evaluation.
    branch: "cond" | "uncond" (separate CFG passes, U-ViT) or "all" (one batch, or no CFG).
    cfg_layout: how "all" batches stack CFG halves: "cond_uncond" (DiT), "uncond_cond" (PixArt) or None.
    """

    nfe: int
    step: int
    num_steps: int
    num_evals: int
    timestep: float = 0.0
    branch: str = "all"
    cfg_layout: str | None = None

    def with_branch(self, branch: str) -> "StepContext":
        return replace(self, branch=branch)


class CachePolicy(nn.Module):
    """Base policy: a pass-through. Subclasses override :meth:`apply` and :meth:`reset`."""

    name = "base"

    def __init__(self) -> None:
        super().__init__()
        self.ctx: StepContext | None = None
        self._enabled = True
        object.__setattr__(self, "backbone", None)

    # ------------------------------------------------------------------ wiring
    def attach(self, backbone) -> "CachePolicy":
        object.__setattr__(self, "backbone", backbone)
        backbone.set_policy(self)
        self.reset()
        return self

    def detach(self) -> None:
        if self.backbone is not None:
            self.backbone.set_policy(None)
        object.__setattr__(self, "backbone", None)

    def reset(self) -> None:
        """Drop all cached tensors (a new sampling run starts)."""

    def begin(self, ctx: StepContext) -> None:
        """Called before each backbone evaluation. ``sample()`` calls :meth:`reset` at the start of a run."""
        self.ctx = ctx

    @contextlib.contextmanager
    def at(self, ctx: StepContext) -> Iterator["CachePolicy"]:
        self.begin(ctx)
        yield self

    @contextlib.contextmanager
    def disabled(self) -> Iterator["CachePolicy"]:
        prev, self._enabled = self._enabled, False
        try:
            yield self
        finally:
            self._enabled = prev

    # ------------------------------------------------------------------ the hook
    def site(self, layer: int, kind: str, module: Callable[..., torch.Tensor], h: torch.Tensor, *args: Any) -> torch.Tensor:
        if not self._enabled or self.ctx is None:
            return module(h, *args)
        return self.apply(layer, kind, module, h, *args)

    def apply(self, layer: int, kind: str, module, h: torch.Tensor, *args: Any) -> torch.Tensor:
        return module(h, *args)

    # ------------------------------------------------------------------ reporting
    def compute_mask(self, num_evals: int) -> dict[tuple[int, int, str], float] | None:
        """Optional: fraction of tokens computed per (nfe, layer, kind) for the MAC counter; None = all."""
        return None
