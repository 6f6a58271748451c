"""How good is a shipped MNIST teacher? Class accuracy, MNIST-FID and MNIST-IS of its CFG samples.

The extractor is the project's own MNIST classifier (``assets/mnist_classifier.pt``): accuracy is the share
of samples it assigns to their conditioning class (the quality bar is 90%); "MNIST-FID" is the Frechet
distance between its 128-d penultimate features of the samples and of the held-out digits, reported next
to the floor of 1,000 *real* train digits against the same held-out set; "MNIST-IS" is exp E KL(p(y|x)||p(y))
of its softmax. These are not Inception FID / IS and must never be labelled so.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ..backbones import load_backbone
from ..data.mnist import load_mnist
from ..data.seeded import seeded_noise, step_generators
from ..metrics.generative import to_uint8
from ..metrics.mnist import build_mnist_metrics
from ..sampling import sample
from .diffusion_loss import GaussianDiffusionLoss
from .teacher_pretrain import CONF, grid_solver


@torch.no_grad()
def generate(backbone, labels: torch.Tensor, guidance: float | None, schedule: str, time_input: str,
             seed: int = 0, batch: int = 250) -> torch.Tensor:
    """CFG samples with the family's 20-evaluation sampler; noise of sample i seeded by (seed, i)."""

    solver = grid_solver(backbone, schedule, 20, time_input)
    noise = seeded_noise((backbone.in_channels, backbone.input_size, backbone.input_size), range(len(labels)), seed)
    out = [sample(backbone, solver, None, noise[i:i + batch], labels[i:i + batch], guidance,
                  generator=step_generators(range(i, min(i + batch, len(labels))), seed))
           for i in range(0, len(labels), batch)]
    return torch.cat(out).clamp(-1, 1)


def load_teacher(name: str, assets: str | Path):
    """(the shipped teacher ``name`` from ``assets/``, its backbone config), sampling by the variant's convention."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(CONF / "backbone" / f"{name}.yaml")
    ckpt = Path(assets) / Path(OmegaConf.to_container(cfg)["ckpt"]).name  # the config's file, in ``assets``
    return load_backbone(cfg.arch, ckpt=str(ckpt)), cfg


def evaluate_teacher(name: str, assets: str | Path, n_per_class: int = 100, guidance: float | None = None,
                     seed: int = 0) -> dict:
    """Sample ``n_per_class`` digits per class from ``assets/<teacher>``; accuracy, MNIST-FID/IS and floors."""
    from torchvision.utils import save_image

    assets = Path(assets)
    backbone, cfg = load_teacher(name, assets)
    s = float(cfg.guidance if guidance is None else guidance)
    n = int(n_per_class)
    labels = torch.arange(10).repeat_interleave(n)
    t0 = time.time()
    x = generate(backbone, labels, s, cfg.schedule, cfg.time_input, seed=int(seed))
    wall = time.time() - t0
    xt, yt = load_mnist("train")
    real = torch.cat([xt[yt == c][:100] for c in range(10)])  # 1,000 real train digits, 100 a class
    metrics = build_mnist_metrics(assets / "mnist_classifier.pt", "heldout", is_splits=1, precision_recall=False,
                                  teacher_fidelity=False)
    scores = {}
    for key, images in (("samples", x), ("real", real)):
        metrics.reset()
        metrics.update(images)
        scores[key] = metrics.compute()
    with torch.no_grad():
        logits = metrics.extractor(to_uint8(x))[1]
    hits = logits.argmax(1) == labels
    grid = torch.stack([x[labels == c][:10] for c in range(10)], 1).flatten(0, 1)  # row: one sample of each class
    png = assets / f"{name}_samples.png"
    save_image((grid + 1) / 2, str(png), nrow=10, padding=1)
    return {"guidance": s, "samples": len(labels), "sampler": type(grid_solver(backbone, cfg.schedule, 20)).__name__ + "-20",
            "class_accuracy": float(hits.float().mean()),
            "per_class_accuracy": [round(float(hits[labels == c].float().mean()), 3) for c in range(10)],
            "mnist_fid_vs_heldout": round(scores["samples"]["mnist_fid"], 3),
            "mnist_fid_floor_train1000_vs_heldout": round(scores["real"]["mnist_fid"], 3),
            "mnist_is": round(scores["samples"]["mnist_is"], 3), "mnist_is_real_train1000": round(scores["real"]["mnist_is"], 3),
            "sampling_wall_s": round(wall, 1), "grid": png.name}


@torch.no_grad()
def denoising_profile(name: str, assets: str | Path, timesteps=(100, 300, 500, 700, 850, 950), n: int = 400,
                      seed: int = 0) -> dict:
    """Where a teacher is weak: x0-MSE of its (clipped) x0 prediction on held-out digits noised to each ``t``,
    with the right label, a wrong one (``y + 1 mod 10``) and the null class, next to the x0-MSE of the trivial
    predictors (the class-mean and the global-mean train image). A teacher worse than the class mean at high
    noise has not learned the global layout, and its samples land in the wrong class."""

    bb, cfg = load_teacher(name, assets)
    d = GaussianDiffusionLoss(cfg.schedule, 1000)
    xt_train, yt_train = load_mnist("train")
    x, y = load_mnist("heldout")
    x, y = x[:n], y[:n]
    means = torch.stack([xt_train[yt_train == c].mean(0) for c in range(10)])
    out = {"class_mean_x0_mse": float(((means[y] - x) ** 2).mean()),
           "global_mean_x0_mse": float(((xt_train.mean(0) - x) ** 2).mean()), "timesteps": {}}
    g = torch.Generator().manual_seed(seed)
    for t0 in timesteps:
        t = torch.full((len(x),), int(t0))
        noise = torch.randn(x.shape, generator=g)
        xt = d.q_sample(x, t, noise)
        tin = d.network_time(bb.learn_sigma, t, x.dtype)
        a = d._at("alphas_cumprod", t, xt)
        row = {}
        for key, lab in (("right", y), ("wrong", (y + 1) % 10), ("null", torch.full_like(y, bb.null_class))):
            eps = bb(xt, tin, lab)[:, :x.shape[1]]
            x0 = ((xt - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
            row[key] = round(float(((x0 - x) ** 2).mean()), 4)
        out["timesteps"][int(t0)] = row
    return out
