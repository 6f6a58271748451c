"""Shared test helpers: tiny backbones moved off their official init, and a site-recording policy."""
from __future__ import annotations

import torch

from diffcache.backbones import build_backbone
from diffcache.policies.base import CachePolicy


def perturbed(arch: str, seed: int = 0, scale: float = 0.1, **kw):
    """A tiny backbone in eval mode with ``scale``-sized noise added to every parameter.

    The official DiT / PixArt init zeroes adaLN gates, cross-attention projections and the output layer,
    so an unperturbed tiny model returns zeros and any comparison of outputs would pass trivially.
    """
    torch.manual_seed(seed)  # the init too: equal seeds give equal models
    m = build_backbone(arch, **kw).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return m


def bound_for_test(policy, backbone, solver=None):
    """Bind ``policy`` to ``backbone`` for the rest of a test that calls the backbone directly (the
    backbone is built for that test alone, so nothing outlives it)."""
    binding = policy.bound(backbone, solver)
    binding.__enter__()
    object.__setattr__(policy, "_test_binding", binding)  # kept alive: a collected binding would release
    return policy


class Recorder(CachePolicy):
    """Computes every branch and records which sites ran, in order, with their input shapes."""

    def __init__(self):
        super().__init__()
        self.visited, self.shapes = [], []

    def apply(self, layer, kind, branch):
        self.visited.append((layer, kind))
        h = branch.input()
        self.shapes.append(tuple(h.shape))
        return branch.run(h)
