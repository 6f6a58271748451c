"""Where a backbone call sits in a run, and how a policy is bound for one run.

Below the denoiser, the sampling loop and the policies, so that none of them imports another to share
these two names: the loop never needs to know which policy runs.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Any, Iterator


@dataclass(frozen=True)
class StepContext:
    """Where a backbone call sits in a sampling run.

    nfe: 0-based model-evaluation index (a CFG pass pair shares one nfe).
    step: 0-based solver step (0 = noisiest); DPM-Solver-2 singlestep has two nfe per step.
    num_steps / num_evals: totals for the run.
    branch: "cond" | "uncond" (separate CFG passes, U-ViT) or "all" (one batch, or no CFG).
    cfg_layout: how "all" batches stack CFG halves: "cond_uncond" (DiT), "uncond_cond" (PixArt) or None.
    """

    nfe: int
    step: int
    num_steps: int
    num_evals: int
    branch: str = "all"
    cfg_layout: str | None = None

    def with_branch(self, branch: str) -> "StepContext":
        return replace(self, branch=branch)


@contextlib.contextmanager
def run_with(policy: Any, backbone, solver) -> Iterator[Any]:
    """``policy.bound(backbone, solver)`` with hard routing (any
    :class:`~diffcache.policies.base.CachePolicy`), or the uncached backbone when ``policy`` is None."""
    if policy is None:
        if backbone.policy is not None:
            raise RuntimeError(f"{type(backbone).__name__} is bound to {type(backbone.policy).__name__} by another "
                               f"run; an uncached run cannot nest inside it")
        yield None
        return
    with policy.bound(backbone, solver), policy.inference():
        yield policy
