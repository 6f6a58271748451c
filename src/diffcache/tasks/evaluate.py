"""``evaluate(cfg)``: sample with a cache policy and report what it costs and what it changes.

Reported per run: analytic MACs / FLOPs (cache-aware) and their ratio to the uncached sampler,
wall-clock latency, and the error of the cached samples against uncached samples from the *same*
noise and conditioning (MSE and PSNR in latent space): an honest fidelity measure that needs no
Inception weights. FID/IS come with the evaluation-at-scale work.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from omegaconf import DictConfig

from ..data.datamodule import random_cond
from ..metrics.latency import measure
from ..policies.none import NoCache
from ..sampling import sample
from ..utils.build import build_backbone, build_loggers, build_policy, build_solver

log = logging.getLogger(__name__)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _batches(cfg, backbone, device):
    """Noise and conditioning seeded per sample index, so results do not depend on the batch size."""
    from ..backbones.base import cat_cond

    n, bs = int(cfg.eval.num_samples), int(cfg.eval.batch_size)
    shape = (backbone.in_channels, backbone.input_size, backbone.input_size)
    for start in range(0, n, bs):
        idx = range(start, min(start + bs, n))
        gens = [torch.Generator().manual_seed(cfg.seed * 7919 + i) for i in idx]
        noise = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
        cond = cat_cond([random_cond(backbone, 1, g) for g in gens])
        cond = {k: v.to(device) for k, v in cond.items()} if isinstance(cond, dict) else cond.to(device)
        yield noise, cond


def evaluate(cfg: DictConfig) -> dict:
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = _device(cfg.eval.device)
    backbone = build_backbone(cfg.backbone).to(device).eval()
    solver = build_solver(cfg.solver)
    policy = build_policy(cfg.policy, backbone, solver, router_ckpt=cfg.get("router_ckpt")).to(device)
    guidance = float(cfg.eval.guidance)
    progress = bool(cfg.eval.progress)

    def run(pol):
        return torch.cat([sample(backbone, solver, pol, noise, cond, guidance=guidance, progress=progress).cpu()
                          for noise, cond in _batches(cfg, backbone, device)])

    cached = run(policy)
    result: dict = {"run_name": cfg.run_name, "num_samples": int(cached.shape[0]), "guidance": guidance,
                    "num_evals": solver.num_evals}
    if cfg.eval.compare_to_full and cfg.policy.name != "none":
        full = run(NoCache())
        policy.attach(backbone)
        mse = (cached - full).pow(2).mean().item()
        peak = full.abs().max().item()
        result.update({"mse_vs_full": mse, "psnr_vs_full_db": 10 * math.log10(peak ** 2 / max(mse, 1e-30))})
    result.update(_cost(backbone, solver, policy, guidance))
    if int(cfg.eval.latency_repeats) > 0:
        noise, cond = next(_batches(cfg, backbone, device))
        lat = measure(lambda: sample(backbone, solver, policy, noise, cond, guidance=guidance), device=device,
                      repeats=int(cfg.eval.latency_repeats), warmup=1)
        result.update({"latency_s": lat["mean_s"], "latency_std_s": lat["std_s"], "latency_batch": noise.shape[0]})
    if cfg.eval.save_grid:
        result["grid"] = str(save_grid(cached, out / "samples.png"))
    torch.save(cached, out / "samples.pt")
    (out / "summary.json").write_text(json.dumps(result, indent=2))
    for lg in build_loggers(cfg.get("logger")):
        lg.log_metrics({k: v for k, v in result.items() if isinstance(v, (int, float))}, step=0)
        lg.save()
    log.info("evaluation: %s", json.dumps(result))
    return result


def _cost(backbone, solver, policy, guidance: float) -> dict:
    from ..metrics.cost import policy_cost

    return policy_cost(backbone, solver, policy, guidance=guidance)


def save_grid(latents: torch.Tensor, path: Path, nrow: int = 8) -> Path:
    """Latents shown as images (first 3 channels, per-image min-max): a quick look without a VAE."""
    from torchvision.utils import save_image

    x = latents[:, :3].float()
    lo = x.flatten(1).min(1).values.view(-1, 1, 1, 1)
    hi = x.flatten(1).max(1).values.view(-1, 1, 1, 1)
    save_image((x - lo) / (hi - lo + 1e-8), path, nrow=nrow)
    return path
