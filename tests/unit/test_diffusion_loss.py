"""DiT/ADM's variational-bound loss and U-ViT's eps loss against independent float64 computations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from diffcache.modules.diffusion_loss import GaussianDiffusionLoss, discretized_gaussian_log_likelihood, normal_kl

# DiT's linear schedule, written here from the reference (ADM get_named_beta_schedule("linear", 1000))
BETAS = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
ALPHA_BAR = np.cumprod(1.0 - BETAS)


def test_normal_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    lv1, lv2 = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    ref = kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), ref, rtol=1e-12, atol=1e-12)


def test_posterior_is_bayes_rule():
    """q(x_{t-1} | x_t, x_0) from N(sqrt(abar_{t-1}) x0, 1 - abar_{t-1}) times N(x_t; sqrt(alpha_t) x_{t-1}, beta_t)."""
    d = GaussianDiffusionLoss("linear", 1000)
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([1, 5, 100, 500, 999])
    x0 = torch.randn(5, 1, 2, 2, generator=g, dtype=torch.float64)
    xt = torch.randn(5, 1, 2, 2, generator=g, dtype=torch.float64)
    mean, log_var = d.q_posterior(x0, xt, t)
    tn = t.numpy()
    prev_var, lik_var = 1.0 - ALPHA_BAR[tn - 1], BETAS[tn]
    prec = 1.0 / prev_var + (1.0 - BETAS[tn]) / lik_var
    var = torch.tensor(1.0 / prec).view(-1, 1, 1, 1)
    ref_mean = var * (torch.tensor(np.sqrt(ALPHA_BAR[tn - 1]) / prev_var).view(-1, 1, 1, 1) * x0
                      + torch.tensor(np.sqrt(1.0 - BETAS[tn]) / lik_var).view(-1, 1, 1, 1) * xt)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(log_var.flatten(), var.log().flatten(), rtol=1e-10, atol=1e-12)
    # t = 0 has zero posterior variance; ADM clips its log to that of t = 1
    _, lv0 = d.q_posterior(x0[:1], xt[:1], torch.tensor([0]))
    assert float(lv0) == pytest.approx(float(log_var[0]), rel=1e-12)


def test_discretized_likelihood_is_bin_mass():
    g = torch.Generator().manual_seed(2)
    x = torch.tensor([-1.0, -1 + 2 / 255 * 40, 0.0039215686, 1 - 2 / 255 * 3, 1.0], dtype=torch.float64)
    means = torch.randn(5, generator=g, dtype=torch.float64) * 0.3
    log_scales = torch.full((5,), math.log(0.3), dtype=torch.float64)  # bin masses well above the 1e-12 clamp
    got = discretized_gaussian_log_likelihood(x, means, log_scales, cdf=torch.special.ndtr)
    n = Normal(means, log_scales.exp())
    lo, hi = n.cdf(x - 1 / 255), n.cdf(x + 1 / 255)
    ref = torch.log(hi - lo)
    ref[0], ref[-1] = torch.log(hi[0]), torch.log(1 - lo[-1])  # edge bins extend to -inf / +inf
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)


def test_vb_is_the_kl_to_the_model_gaussian():
    d = GaussianDiffusionLoss("linear", 1000)
    g = torch.Generator().manual_seed(3)
    B = 4
    t = torch.tensor([3, 50, 400, 999])
    x0 = torch.rand(B, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(B, 1, 4, 4, generator=g, dtype=torch.float64)
    xt = d.q_sample(x0, t, noise)
    eps = torch.randn(B, 1, 4, 4, generator=g, dtype=torch.float64)
    v = torch.rand(B, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    vb = d.vb_terms_bpd(eps, v, x0, xt, t)
    tn = t.numpy()
    ab, ab_prev = (torch.tensor(a).view(-1, 1, 1, 1) for a in (ALPHA_BAR[tn], ALPHA_BAR[tn - 1]))
    post_var = torch.tensor(BETAS[tn] * (1 - ALPHA_BAR[tn - 1]) / (1 - ALPHA_BAR[tn])).view(-1, 1, 1, 1)
    beta = torch.tensor(BETAS[tn]).view(-1, 1, 1, 1)

    def post_mean(x_start):  # Bayes-rule posterior mean, as in the test above
        return post_var * (ab_prev.sqrt() * x_start / (1 - ab_prev) + (1 - beta).sqrt() * xt / beta)

    x0_hat = (xt - (1 - ab).sqrt() * eps) / ab.sqrt()
    model_var = torch.exp((v + 1) / 2 * beta.log() + (1 - v) / 2 * post_var.log())
    kl = kl_divergence(Normal(post_mean(x0), post_var.sqrt()), Normal(post_mean(x0_hat), model_var.sqrt()))
    torch.testing.assert_close(vb, kl.flatten(1).mean(1) / math.log(2), rtol=1e-9, atol=1e-12)
    # the exact noise and the posterior variance (v = -1) make the bound vanish
    exact = d.vb_terms_bpd(noise, -torch.ones_like(v), x0, xt, t)
    torch.testing.assert_close(exact, torch.zeros(B, dtype=torch.float64), rtol=0, atol=1e-9)


class _Fixed(torch.nn.Module):
    """A 'model' whose output is a free parameter, recording its time input."""

    def __init__(self, out):
        super().__init__()
        self.out = torch.nn.Parameter(out)
        self.seen_t = None

    def forward(self, x, t, y):
        self.seen_t = t
        return self.out


def test_dit_loss_vb_trains_only_the_variance():
    d = GaussianDiffusionLoss("linear", 1000)
    g = torch.Generator().manual_seed(4)
    x0 = torch.rand(3, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 10, 700])
    model = _Fixed(torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64) * 0.5)
    out = d.dit_loss(model, x0, torch.zeros(3, dtype=torch.long), t, noise)
    out["loss"].backward()
    eps = model.out.detach()[:, :1]
    # d/d eps of mean_b mean_dims (noise - eps)^2 = -2 (noise - eps) / (B * D): the vb term adds nothing
    torch.testing.assert_close(model.out.grad[:, :1], -2 * (noise - eps) / (3 * 16), rtol=1e-10, atol=1e-14)
    assert model.out.grad[:, 1:].abs().sum() > 0  # the variance channels learn from the bound
    torch.testing.assert_close(out["loss"], out["mse"] + out["vb"])
    assert model.seen_t.tolist() == [0, 10, 700]  # DiT sees the 0-based discrete step


def test_uvit_loss_is_eps_mse_at_one_based_step():
    d = GaussianDiffusionLoss("linear", 1000)
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    pred = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    model = _Fixed(pred.clone())
    out = d.uvit_loss(model, x0, torch.zeros(2, dtype=torch.long), torch.tensor([0, 999]), noise)
    assert model.seen_t.tolist() == [1.0, 1000.0]
    torch.testing.assert_close(out["loss"], ((noise - pred) ** 2).mean())


def test_q_sample_uses_alpha_bar():
    d = GaussianDiffusionLoss("linear", 1000)
    x0, noise = torch.ones(1, 1, 1, 1, dtype=torch.float64), torch.full((1, 1, 1, 1), 2.0, dtype=torch.float64)
    got = d.q_sample(x0, torch.tensor([250]), noise)
    assert float(got) == pytest.approx(math.sqrt(ALPHA_BAR[250]) + 2 * math.sqrt(1 - ALPHA_BAR[250]), rel=1e-12)


@pytest.mark.parametrize("cap", [1e9, 50.0])
def test_v_weight_is_the_v_prediction_mse_up_to_the_cap(cap):
    """loss_weight=v: the eps-MSE of each sample becomes the MSE of v = alpha eps - sigma x0 (computed here from
    the eps prediction and the x0 it implies), capped at ``cap`` times the eps-MSE; uniform is the plain MSE."""
    g = torch.Generator().manual_seed(6)
    x0 = torch.rand(4, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(4, 1, 4, 4, generator=g, dtype=torch.float64)
    pred = noise + 0.1 * torch.randn(4, 1, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 300, 800, 999])
    a = torch.as_tensor(np.sqrt(ALPHA_BAR[t.numpy()])).view(-1, 1, 1, 1)
    s = torch.sqrt(1 - a ** 2)
    xt = a * x0 + s * noise
    x0_hat = (xt - s * pred) / a
    v_mse = ((a * noise - s * x0) - (a * pred - s * x0_hat)).pow(2).flatten(1).mean(1)
    eps_mse = (noise - pred).pow(2).flatten(1).mean(1)
    want = torch.minimum(v_mse, cap * eps_mse).mean()
    got = GaussianDiffusionLoss("linear", 1000, loss_weight="v", weight_max=cap).uvit_loss(
        _Fixed(pred.clone()), x0, torch.zeros(4, dtype=torch.long), t, noise)
    torch.testing.assert_close(got["loss"], want, rtol=1e-9, atol=0)
    torch.testing.assert_close(got["mse"], eps_mse.mean())  # the logged MSE stays unweighted
    plain = GaussianDiffusionLoss("linear", 1000).uvit_loss(_Fixed(pred.clone()), x0, torch.zeros(4, dtype=torch.long),
                                                            t, noise)
    torch.testing.assert_close(plain["loss"], eps_mse.mean())
    with pytest.raises(ValueError, match="loss_weight"):
        GaussianDiffusionLoss("linear", 1000, loss_weight="snr")
