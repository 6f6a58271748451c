"""The one sampling loop and the denoiser's guidance conventions."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tiny_models import perturbed

from diffcache.policies.none import NoCache
from diffcache.sampling import sample
from diffcache.solvers import make_solver
from diffcache.denoiser import Denoiser


def reference_dit_ddim(model, x, y, steps: int, scale: float):
    """DiT's sample.py with --ddim-sample, written out by hand: DiT section respacing, forward_with_cfg
    (guidance on the first 3 channels), ADM ddim_sample with eta=0 and clip_denoised=False."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    abar = np.cumprod(1.0 - betas)
    stride = (1000 - 1) / (steps - 1)
    kept = sorted({round(i * stride) for i in range(steps)})
    # ADM respacing: new betas from consecutive kept alpha_bars, alpha_bar re-accumulated
    new_betas, last = [], 1.0
    for t in kept:
        new_betas.append(1 - abar[t] / last)
        last = abar[t]
    r_abar = np.cumprod(1.0 - np.array(new_betas))
    B = x.shape[0]
    for i in reversed(range(steps)):
        t = torch.full((2 * B,), float(kept[i]))
        out = model(torch.cat([x, x]), t, torch.cat([y, torch.full_like(y, model.null_class)]))
        c, u = out[:B], out[B:]
        eps = torch.cat([u[:, :3] + scale * (c[:, :3] - u[:, :3]), c[:, 3:4]], dim=1)
        a = float(r_abar[i])
        a_prev = float(r_abar[i - 1]) if i > 0 else 1.0
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        eps = (math.sqrt(1.0 / a) * x - x0) / math.sqrt(1.0 / a - 1.0)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    return x


def test_sample_none_reproduces_hand_written_dit_ddim_loop():
    model = perturbed("tiny_dit")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    y = torch.tensor([3, 8])
    with torch.no_grad():
        ref = reference_dit_ddim(model, x, y, 20, 1.5)
        got = sample(model, make_solver("ddim", 20, "linear"), NoCache(), x, y, guidance=1.5)
        plain = sample(model, make_solver("ddim", 20, "linear"), None, x, y, guidance=1.5)
    assert torch.equal(got, ref)
    assert torch.equal(plain, ref)


def test_guidance_conventions():
    """Each family's CFG formula and batch layout, checked against direct backbone calls."""
    g = torch.Generator().manual_seed(0)
    solver = make_solver("ddim", 10, "linear")
    k, t = 3, float(solver.model_times()[3])
    a, s = solver.alpha_sigma(k)
    # DiT: [cond; uncond], first 3 channels guided, other channels from the cond half
    dit = perturbed("tiny_dit")
    x, y = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([1, 2])
    with torch.no_grad():
        out = Denoiser(dit, 4.0)(x, k, solver, y)
        c, u = dit(x, torch.full((2,), t), y), dit(x, torch.full((2,), t), torch.full_like(y, 10))
    torch.testing.assert_close(out.eps[:, :3], u[:, :3] + 4.0 * (c[:, :3] - u[:, :3]))
    torch.testing.assert_close(out.eps[:, 3:], c[:, 3:4])
    torch.testing.assert_close(out.var_values, c[:, 4:])
    torch.testing.assert_close(out.x0, (x - s * out.eps) / a)
    # U-ViT: two passes, c + s (c - u)
    uvit = perturbed("tiny_uvit")
    with torch.no_grad():
        out = Denoiser(uvit, 0.4)(x, k, solver, y)
        c, u = uvit(x, torch.full((2,), t), y), uvit(x, torch.full((2,), t), torch.full_like(y, 10))
    torch.testing.assert_close(out.eps, c + 0.4 * (c - u))
    assert out.var_values is None
    # PixArt: [uncond; cond], u + s (c - u) on all eps channels
    pix = perturbed("tiny_pixart")
    cond = {"y": torch.randn(2, 8, 32, generator=g), "mask": torch.tensor([[1] * 8, [1] * 5 + [0] * 3])}
    with torch.no_grad():
        out = Denoiser(pix, 4.5)(x, k, solver, cond)
        c, u = pix(x, torch.full((2,), t), cond), pix(x, torch.full((2,), t), pix.null_cond(cond))
    torch.testing.assert_close(out.eps, u[:, :4] + 4.5 * (c[:, :4] - u[:, :4]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.var_values, c[:, 4:], atol=1e-5, rtol=1e-5)


def test_no_guidance_is_one_pass():
    calls = []
    dit = perturbed("tiny_dit")
    dit.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    solver = make_solver("ddim", 4, "linear")
    sample(dit, solver, None, torch.randn(3, 4, 8, 8), torch.tensor([0, 1, 2]), guidance=1.0)
    assert calls == [3] * 4
    calls.clear()
    sample(dit, solver, None, torch.randn(3, 4, 8, 8), torch.tensor([0, 1, 2]), guidance=1.5)
    assert calls == [6] * 4


@pytest.mark.parametrize("arch,algo,steps,guidance,schedule", [("tiny_dit", "ddim", 10, 1.5, "linear"),
                                                               ("tiny_uvit", "dpm_solver2", 10, 0.4, "scaled_linear")])
def test_l2c_caching_nothing_equals_no_cache_bit_for_bit(arch, algo, steps, guidance, schedule):
    from diffcache.policies.l2c import L2CPolicy

    model = perturbed(arch)
    solver = make_solver(algo, steps, schedule)
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 5])
    ref = sample(model, solver, None, x, y, guidance)
    keep_all = L2CPolicy(theta=0.0, solver=solver)  # compute iff sigmoid > 0: always
    assert torch.equal(sample(model, solver, keep_all, x, y, guidance), ref)
    cache_all = L2CPolicy(theta=1.0, solver=solver)  # sigmoid > 1 never: reuse everything
    assert not torch.equal(sample(model, solver, cache_all, x, y, guidance), ref)


def test_clip_denoised_clips_x0_and_rederives_eps_and_is_off_by_default():
    """ADM's clip_denoised for pixel-space teachers: x0 in [-1, 1], eps re-derived so x = alpha x0 + sigma eps
    holds exactly (float64); a backbone without it (the default, DiT's latents) is untouched."""
    from diffcache.denoiser import Denoiser
    from diffcache.solvers import DDIM
    from tiny_models import perturbed

    model = perturbed("tiny_dit", scale=3.0, in_channels=1).double()  # large outputs: x0 far outside [-1, 1]
    solver = DDIM(10)
    x = torch.randn(2, 1, model.input_size, model.input_size, generator=torch.Generator().manual_seed(0)).double()
    y = torch.tensor([1, 2])
    k = 1
    plain = Denoiser(model)(x, k, solver, y)
    assert not model.clip_denoised and float(plain.x0.abs().max()) > 1.5
    model.clip_denoised = True
    out = Denoiser(model)(x, k, solver, y)
    a, s = solver.alpha_sigma(k)
    torch.testing.assert_close(out.x0, plain.x0.clamp(-1, 1), rtol=0, atol=0)
    torch.testing.assert_close(a * out.x0 + s * out.eps, x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.raw, plain.raw, rtol=0, atol=0)  # the network's output is untouched
