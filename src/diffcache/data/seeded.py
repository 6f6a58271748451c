"""The one seeding rule: sample ``i`` of the seeded set ``seed`` draws its initial noise, its random
conditioning *and* its per-step solver noise (DDPM, DDIM with eta > 0) from generators seeded by
``(seed, i)`` alone, so a sample set never depends on the batch size, the shard, the number of ranks or
the order batches run in. Every sample set (evaluate, compare, validation, sharded sampling, the schedule
search's calibration set, the teacher's quality check) draws through this module."""
from __future__ import annotations

import torch

from ..backbones.base import cat_cond

_STEP_STREAM = 1 << 62  # offsets the per-step stream from the initial-noise stream of the same sample


def _key(index: int, seed: int) -> int:
    return int(seed) * 7919 + int(index)


def sample_generator(index: int, seed: int = 0) -> torch.Generator:
    """The generator of sample ``index``'s initial noise and conditioning (``seed * 7919 + index``)."""
    return torch.Generator().manual_seed(_key(index, seed))


def step_generators(indices, seed: int = 0) -> list[torch.Generator]:
    """Fresh per-sample generators of the solver's step noise (``generator=`` of :func:`~diffcache.sampling.sample`):
    row ``j`` of every step draws from sample ``indices[j]``'s own stream. Two runs given fresh lists (a cached
    and an uncached sampler) share their step noise exactly."""
    return [torch.Generator().manual_seed(_STEP_STREAM + _key(i, seed)) for i in indices]


def seeded_noise(shape, indices, seed: int = 0) -> torch.Tensor:
    """Initial noise ``(len(indices), *shape)`` of samples ``indices``, without conditioning."""
    return torch.stack([torch.randn(tuple(shape), generator=sample_generator(i, seed)) for i in indices])


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
