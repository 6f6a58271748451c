"""Diffusion training losses: DiT/ADM's eps-MSE + variational bound for a learned variance, and U-ViT's eps-MSE.

DiT (``create_diffusion`` defaults: linear betas, 1000 steps, ``learn_sigma=True``, loss type MSE) trains
``loss = mse(eps) + L_vlb``: the model's eps channels get the MSE, and its variance channels ``v`` in [-1, 1]
(interpolating log beta_t and the clipped posterior log variance) get the variational-bound term
``KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t))`` in bits/dim, the decoder NLL at t = 0, computed with the
model mean built from a *stopped-gradient* eps so the bound only trains the variance (Nichol & Dhariwal 2021).

U-ViT (``LSimple``): mean squared error of the noise prediction, the time input being the 1-based discrete
step ``n + 1`` (its ``Schedule`` prepends alpha_bar = 1 at index 0), which is ``time_input: scaled``.
Tables are float64 (as ADM's numpy tables) and cast per batch.

``loss_weight`` (ours, not in either reference; ``uniform`` is the faithful default): ``v`` weights each
sample's eps-MSE by ``min(1 / alpha_bar_t, weight_max)``, the weight under which eps-MSE equals the v-prediction
MSE (Salimans & Ho 2022) up to the cap. Why: with uniform weights the eps loss at high noise is ~1e-4 and
its x0 error (amplified by ``sigma / alpha``) is never trained down; a small pixel-space transformer then
predicts x0 at t > 700 *worse than the class-mean image* and samples the wrong class (`make teachers` stage 2
warm-starts with ``v``: DiT class accuracy 32% -> 93%). The variance's bound term is not weighted.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..solvers.schedules import alphas_cumprod_of, make_betas


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """Elementwise KL( N(mean1, exp logvar1) || N(mean2, exp logvar2) ) in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """ADM's tanh approximation of the standard normal CDF (kept for faithfulness)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales, cdf=approx_standard_normal_cdf, bin_halfwidth=1 / 255):
    """log P(x) of data in [-1, 1] quantised to 256 levels under N(means, exp(log_scales)^2); the end bins
    extend to -inf / +inf (ADM's decoder)."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = cdf(inv_std * (centered + bin_halfwidth))
    cdf_min = cdf(inv_std * (centered - bin_halfwidth))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(1)


class GaussianDiffusionLoss:
    """The discrete forward process of a named schedule and the two training objectives on it."""

    WEIGHTS = ("uniform", "v")

    def __init__(self, schedule: str = "linear", num_train_timesteps: int = 1000, loss_weight: str = "uniform",
                 weight_max: float = 1000.0):
        if loss_weight not in self.WEIGHTS:
            raise ValueError(f"module.loss_weight must be one of {self.WEIGHTS}, got {loss_weight!r}")
        if not float(weight_max) >= 1.0:
            raise ValueError(f"module.weight_max caps the loss weight and must be >= 1, got {weight_max}")
        self.loss_weight, self.weight_max = loss_weight, float(weight_max)
        self.T = int(num_train_timesteps)
        b = make_betas(schedule, self.T)
        ac = alphas_cumprod_of(b)
        ac_prev = np.append(1.0, ac[:-1])
        post_var = b * (1.0 - ac_prev) / (1.0 - ac)
        tables = {
            "betas": b, "alphas_cumprod": ac,
            "sqrt_ac": np.sqrt(ac), "sqrt_1m_ac": np.sqrt(1.0 - ac),
            "sqrt_recip_ac": np.sqrt(1.0 / ac), "sqrt_recipm1_ac": np.sqrt(1.0 / ac - 1.0),
            "post_log_var_clipped": np.log(np.append(post_var[1], post_var[1:])),  # t=0 variance is 0: clip
            "post_coef1": b * np.sqrt(ac_prev) / (1.0 - ac),
            "post_coef2": (1.0 - ac_prev) * np.sqrt(1.0 - b) / (1.0 - ac),
            "log_betas": np.log(b),
            "v_weight": np.minimum(1.0 / ac, float(weight_max)),
        }
        self.tables = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in tables.items()}

    def _at(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        v = self.tables[name].to(like.device)[t.long()].to(like.dtype)
        return v.view(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self._at("sqrt_ac", t, x0) * x0 + self._at("sqrt_1m_ac", t, x0) * noise

    def q_posterior(self, x0, xt, t):
        """Mean and clipped log variance of q(x_{t-1} | x_t, x_0)."""
        mean = self._at("post_coef1", t, xt) * x0 + self._at("post_coef2", t, xt) * xt
        return mean, self._at("post_log_var_clipped", t, xt)

    def p_mean_logvar(self, eps, var_values, xt, t):
        """Model mean (via x0 from eps, no clipping) and learned-range log variance."""
        frac = (var_values + 1.0) / 2.0
        log_var = frac * self._at("log_betas", t, xt) + (1.0 - frac) * self._at("post_log_var_clipped", t, xt)
        x0_pred = self._at("sqrt_recip_ac", t, xt) * xt - self._at("sqrt_recipm1_ac", t, xt) * eps
        mean, _ = self.q_posterior(x0_pred, xt, t)
        return mean, log_var

    def vb_terms_bpd(self, eps, var_values, x0, xt, t) -> torch.Tensor:
        """Per-sample L_t in bits/dim: KL for t > 0, decoder NLL for t = 0."""
        true_mean, true_log_var = self.q_posterior(x0, xt, t)
        mean, log_var = self.p_mean_logvar(eps, var_values, xt, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def weighted(self, mse: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Per-sample eps-MSE times the configured weight of its step (1 for ``uniform``)."""
        if self.loss_weight == "uniform":
            return mse
        return mse * self._at("v_weight", t, mse)

    def sample_t(self, batch: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        return torch.randint(0, self.T, (batch,), generator=generator).to(device)

    @staticmethod
    def network_time(learn_sigma: bool, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The time input each family trains on: DiT (learned sigma) the 0-based step ``t``, U-ViT the 1-based
        ``t + 1``. One rule for the two losses and for anything that probes a teacher at a step."""
        return t if learn_sigma else (t + 1).to(dtype)

    def dit_loss(self, model, x0, y, t, noise) -> dict[str, torch.Tensor]:
        """DiT's ``training_losses`` with learned sigma: per-sample ``mse + vb`` and the parts (batch means)."""
        C = x0.shape[1]
        xt = self.q_sample(x0, t, noise)
        out = model(xt, self.network_time(True, t, x0.dtype), y)
        if out.shape[1] != 2 * C:
            raise ValueError(f"the DiT loss needs learned sigma (2*{C} output channels), got {out.shape[1]}")
        eps, var_values = out[:, :C], out[:, C:]
        vb = self.vb_terms_bpd(eps.detach(), var_values, x0, xt, t)  # the bound trains the variance only
        mse = mean_flat((noise - eps) ** 2)
        return {"loss": (self.weighted(mse, t) + vb).mean(), "mse": mse.mean(), "vb": vb.mean()}

    def uvit_loss(self, model, x0, y, t, noise) -> dict[str, torch.Tensor]:
        """U-ViT's ``LSimple``: eps-MSE, the network seeing the 1-based step ``t + 1``."""
        xt = self.q_sample(x0, t, noise)
        eps = model(xt, self.network_time(False, t, x0.dtype), y)
        mse = mean_flat((noise - eps) ** 2)
        return {"loss": self.weighted(mse, t).mean(), "mse": mse.mean()}
