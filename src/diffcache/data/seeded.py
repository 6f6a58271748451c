"""Noise and conditioning seeded per sample index: a sample set that never depends on the batch size,
the number of ranks or the order batches run in (evaluation, validation, sharded sampling)."""
from __future__ import annotations

import torch

from ..backbones.base import cat_cond


def sample_generator(index: int, seed: int = 0) -> torch.Generator:
    """The generator of sample ``index`` in the seeded set ``seed`` (``seed * 7919 + index``)."""
    return torch.Generator().manual_seed(int(seed) * 7919 + int(index))


def seeded_inputs(backbone, indices, seed: int = 0, device="cpu", conditioning=None):
    """(noise (B, C, H, W), cond) for sample ``indices``: sample ``i`` uses generator ``seed * 7919 + i``.
    ``conditioning(indices, generators)`` (e.g. evaluate's labels / prompts) replaces random conditioning."""
    shape = (backbone.in_channels, backbone.input_size, backbone.input_size)
    indices = list(indices)
    gens = [sample_generator(i, seed) for i in indices]
    noise = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
    cond = conditioning(indices, gens) if conditioning is not None else cat_cond(
        [backbone.random_cond(1, g) for g in gens])
    cond = {k: v.to(device) for k, v in cond.items()} if isinstance(cond, dict) else cond.to(device)
    return noise, cond
