"""The time sinusoid: float32 exactly as upstream for float32 (and lower-precision) models, float64 end to end for a
``.double()`` model."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tiny_models import perturbed

from diffcache.backbones.layers import sinusoid_dtype, timestep_embedding

T = torch.tensor([0.0, 1.0, 17.0, 500.5, 949.05, 999.0], dtype=torch.float64)


def upstream_fp32(t, dim, shift=0, max_period=10000):
    """DiT/ADM/U-ViT ``timestep_embedding`` as their repositories write it (float32; diffusers' downscale shift)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / (half - shift))
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def reference_fp64(t, dim):
    """cos / sin of t * 10000^(-k / half) in numpy float64."""
    half = dim // 2
    args = np.asarray(t, dtype=np.float64)[:, None] * 10000.0 ** (-np.arange(half) / half)
    return np.concatenate([np.cos(args), np.sin(args)], axis=1)


@pytest.mark.parametrize("dim,shift", [(256, 0), (256, 1), (64, 0)])
def test_float32_default_is_bit_identical_to_upstream(dim, shift):
    for t in (T, T.float()):
        got = timestep_embedding(t, dim, freq_shift=shift)
        assert got.dtype == torch.float32 and torch.equal(got, upstream_fp32(t, dim, shift))
    for low in (torch.float32, torch.float16, torch.bfloat16):
        assert sinusoid_dtype(low) == torch.float32
    assert sinusoid_dtype(torch.float64) == torch.float64


def _time_mlp_input(model, x, t, y):
    """The sinusoid the backbone feeds its time MLP (DiT/PixArt ``t_embedder.mlp[0]``, U-ViT ``time_embed``)."""
    seen = []
    layer = model.time_embed if model.family == "uvit" else model.t_embedder.mlp[0]
    handle = layer.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    with torch.no_grad():
        model(x, t, y)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("arch", ["tiny_dit", "tiny_uvit", "tiny_pixart"])
def test_float64_model_embeds_time_in_float64(arch):
    model = perturbed(arch).double()
    B = len(T)
    x = torch.randn(B, 4, 8, 8, dtype=torch.float64)
    if model.family == "pixart":
        y = {"y": torch.randn(B, model.token_num, model.caption_channels, dtype=torch.float64),
             "mask": torch.ones(B, model.token_num, dtype=torch.long)}
    else:
        y = torch.zeros(B, dtype=torch.long)
    freq = _time_mlp_input(model, x, T, y)
    dim = freq.shape[1]
    ref = reference_fp64(T.numpy(), dim)
    assert freq.dtype == torch.float64
    # |t f| <= 1e3: float64 rounding of the argument is ~1e3 * 2^-53 ~ 1e-13
    np.testing.assert_allclose(freq.numpy(), ref, rtol=0, atol=1e-12)
    assert np.abs(upstream_fp32(T, dim).double().numpy() - ref).max() > 1e-6  # float32 would not pass
    model32 = perturbed(arch)  # the float32 model still feeds the upstream float32 sinusoid
    y32 = {"y": y["y"].float(), "mask": y["mask"]} if isinstance(y, dict) else y
    assert torch.equal(_time_mlp_input(model32, x.float(), T.float(), y32), upstream_fp32(T.float(), dim))
