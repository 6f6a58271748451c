"""The cache-policy contract.

A policy owns every trainable parameter and every cached tensor, and is bound to a backbone only for
the duration of a run: ``with policy.bound(backbone, solver):`` prepares the policy's plan for that
layout and solver, routes the backbone's cache sites through :meth:`site`, and on exit (even on an
exception) leaves the backbone uncached and the policy's caches empty. ``sample()`` does this.

The denoiser tells the bound policy where in sampling it is (:class:`StepContext`), including which
CFG branch runs, so cond and uncond caches never mix. How a site behaves is decided by scoped state
only: ``self.training`` (soft vs hard routing, for policies that learn), and the context managers
:meth:`disabled` (a pure pass-through: the teacher pass), :meth:`recording` (compute every branch and
store it: the no-grad prefix of router training) and :meth:`inference` (hard routing inside training).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..backbones.base import Branch, as_branch
from ..context import StepContext


class CachePolicy(nn.Module):
    """Base policy: a pass-through. Subclasses override :meth:`prepare`, :meth:`apply` and :meth:`reset`."""

    name = "base"
    trainable = False  # per-step routers that router training optimises and router files hold (L2C)

    def __init__(self) -> None:
        super().__init__()
        self.ctx: StepContext | None = None
        self._enabled = True
        self._recording = False

    # ------------------------------------------------------------------ binding
    def prepare(self, layout, solver=None) -> None:
        """Set up what a run on ``layout`` (a :class:`~diffcache.backbones.base.SiteLayout`) with ``solver``
        needs (plans, router shapes); idempotent. Called on entry to :meth:`bound`."""

    def setup(self, backbone, solver=None) -> None:
        """:meth:`prepare` for ``backbone``'s layout; policies that read other backbone conventions
        (a default preset, a checkpoint format) override this."""
        self.prepare(backbone.layout, solver)

    @contextlib.contextmanager
    def bound(self, backbone, solver=None) -> Iterator["CachePolicy"]:
        """Bind to ``backbone`` for one run; on exit the backbone is uncached and the caches are dropped."""
        self.setup(backbone, solver)
        self.reset()
        try:
            with backbone.bind(self):
                yield self
        finally:
            self.ctx = None
            self.release()

    def reset(self) -> None:
        """Drop all cached tensors and per-run counters (a new sampling run starts)."""

    def release(self) -> None:
        """Drop the cached tensors when a run ends (memory); per-run counters stay readable."""
        self.reset()

    def begin(self, ctx: StepContext) -> None:
        """Called by the denoiser before each backbone evaluation."""
        self.ctx = ctx

    @contextlib.contextmanager
    def at(self, ctx: StepContext) -> Iterator["CachePolicy"]:
        """``begin(ctx)`` for a direct backbone call inside a bound run (tests, custom loops)."""
        self.begin(ctx)
        yield self

    # ------------------------------------------------------------------ scoped behaviour
    @contextlib.contextmanager
    def _scoped(self, attr: str, value) -> Iterator["CachePolicy"]:
        prev = getattr(self, attr)
        setattr(self, attr, value)
        try:
            yield self
        finally:
            setattr(self, attr, prev)

    def disabled(self):
        """A pure pass-through that neither reads nor writes the cache (the teacher pass)."""
        return self._scoped("_enabled", False)

    def recording(self):
        """Compute every branch and store its output as the cache (router training's no-grad prefix)."""
        return self._scoped("_recording", True)

    @contextlib.contextmanager
    def inference(self) -> Iterator["CachePolicy"]:
        """Hard (inference) routing inside the block, whatever ``self.training`` was; restored after."""
        prev = self.training
        self.train(False)
        try:
            yield self
        finally:
            self.train(prev)

    # ------------------------------------------------------------------ the hook
    def site(self, layer: int, kind: str, branch: Branch | Callable[..., torch.Tensor], *inputs: Any) -> torch.Tensor:
        """The backbone's hook: ``branch`` is a :class:`~diffcache.backbones.base.Branch` (or the older
        ``module, h, *args``). A policy computes it (``branch()``), on some tokens (``branch(idx)``), or
        returns a cached output without touching it (then the branch's input is never computed)."""
        branch = as_branch(branch, inputs)
        if not self._enabled or self.ctx is None:
            return branch()
        return self.apply(layer, kind, branch)

    def apply(self, layer: int, kind: str, branch: Branch) -> torch.Tensor:
        return branch()

    # ------------------------------------------------------------------ reporting
    def compute_mask(self, layout, solver) -> dict[tuple[int, int, str], float] | None:
        """Optional: fraction of tokens computed per (nfe, layer, kind) at inference, for the MAC counter;
        None = everything computed."""
        return None

    def summary(self, layout=None, solver=None) -> dict[str, float]:
        """Flat floats describing what the policy does (for run summaries and loggers)."""
        return {}


def require_trainable(policy: CachePolicy | type) -> None:
    """Router training needs trainable routers; ``policy`` is an instance or (config time) its class."""
    cls = policy if isinstance(policy, type) else type(policy)
    if not (issubclass(cls, CachePolicy) and cls.trainable):
        name = getattr(cls, "name", cls.__name__)
        raise ValueError(f"router training needs policy=l2c; policy={name} has nothing to train (measure it with "
                         f"evaluate.py policy={name})")
