"""What ``evaluate.py`` samples from and what it shows.

Conditioning (``eval.labels`` / ``eval.prompts``), seeded per sample index so results never depend on
the batch size:

* class-conditional backbones: ``eval.labels=null`` draws uniform real classes (the DiT evaluation
  convention); an int or a list (``eval.labels=[207,360,387]``) is cycled over the samples;
* text-conditional backbones (PixArt): ``eval.prompts=/path/prompts.pt`` as written by
  ``scripts/encode_prompts.py`` (``{"y": (N, L, C) T5 states, "mask": (N, L), "prompts"}``), cycled over
  the samples. Without it the samples use random embeddings, and the log says so.

Pictures: ``samples.png`` shows the first samples, the cached row above the uncached one, labelled (policy,
MACs, PSNR; a column per class) and captioned; ``samples_raw.png`` holds every sample as pixel-exact pairs
(two columns per sample, cached left). Both are decoded through a diffusers ``AutoencoderKL`` when ``backbone.vae=<local directory>`` is set
(latents divided by ``backbone.vae_scale``, 0.18215 for the SD VAE); pixel-space backbones (1 or 3
channels) are shown directly; other latents fall back to their first three channels, min-max scaled.
"""
from __future__ import annotations

import functools

import logging
from pathlib import Path

import torch

from ..backbones.base import cat_cond

log = logging.getLogger(__name__)


class Conditioning:
    """The conditioning of sample ``i`` (see the module docstring)."""

    def __init__(self, backbone, labels=None, prompts: str | None = None):
        self.backbone = backbone
        if labels is None:
            self.labels = None
        else:
            self.labels = [int(labels)] if isinstance(labels, (int, str)) else [int(v) for v in labels]
        self.text = None
        if backbone.text_conditioned:
            if self.labels is not None:
                raise ValueError("eval.labels is for class-conditional backbones; PixArt takes eval.prompts="
                                 "/path/prompts.pt (scripts/encode_prompts.py)")
            if prompts:
                self.text = _load_prompts(prompts, backbone)
            else:
                log.warning("evaluating a text-conditional backbone on RANDOM caption embeddings; pass "
                            "eval.prompts=/path/prompts.pt (scripts/encode_prompts.py) for real prompts")
        else:
            if prompts:
                raise ValueError(f"eval.prompts is for text-conditional backbones; {type(backbone).__name__} takes "
                                 f"class labels (eval.labels=[...])")
            n = int(backbone.null_class)
            bad = [v for v in self.labels or [] if not 0 <= v < n]
            if bad:
                raise ValueError(f"eval.labels {bad[:5]} outside the backbone's classes 0..{n - 1}")
        if self.labels is not None and not self.labels:
            raise ValueError("eval.labels is an empty list; give at least one class (or null for uniform classes)")

    def __call__(self, i: int, g: torch.Generator):
        if self.text is not None:
            j = i % len(self.text["y"])
            return {"y": self.text["y"][j:j + 1], "mask": self.text["mask"][j:j + 1]}
        cond = self.backbone.random_cond(1, g)  # always drawn, so the noise stream is the same either way
        if self.labels is not None and not self.backbone.text_conditioned:
            return torch.tensor([self.labels[i % len(self.labels)]], dtype=cond.dtype)
        return cond

    def batch(self, idx, gens):
        return cat_cond([self(i, g) for i, g in zip(idx, gens)])


def _load_prompts(path, backbone) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"eval.prompts={path} does not exist; write it with `python scripts/encode_prompts.py "
                                f"--t5 <local T5 dir> --prompts prompts.txt --out {path}`")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or "y" not in blob or "mask" not in blob:
        raise ValueError(f"eval.prompts={path}: expected {{'y', 'mask'}} from scripts/encode_prompts.py, got "
                         f"{list(blob)[:5] if isinstance(blob, dict) else type(blob).__name__}")
    y, mask = blob["y"].float(), blob["mask"].long()
    want = (int(backbone.token_num), int(backbone.caption_channels))
    if y.ndim != 3 or tuple(y.shape[1:]) != want or tuple(mask.shape) != tuple(y.shape[:2]):
        raise ValueError(f"eval.prompts={path}: embeddings {tuple(y.shape)} / mask {tuple(mask.shape)}, the backbone "
                         f"expects (N, {want[0]}, {want[1]}) and (N, {want[0]})")
    return {"y": y, "mask": mask}


@functools.lru_cache(maxsize=2)
def _vae(path: str):
    """The AutoencoderKL at ``path``, loaded once per process (sharded sampling decodes every shard)."""
    from diffusers import AutoencoderKL

    if not Path(path).is_dir():
        raise FileNotFoundError(f"backbone.vae={path} is not a local diffusers AutoencoderKL directory "
                                f"(nothing is downloaded)")
    return AutoencoderKL.from_pretrained(path).eval()


def decode(latents: torch.Tensor, vae: str | None = None, scale: float = 0.18215) -> torch.Tensor:
    """Images in [0, 1]: through the VAE at ``vae`` if given, pixels as they are, else latent channels 0..2."""
    x = latents.float()
    if vae:
        model = _vae(str(vae))
        x = x.to(next(model.parameters()).device)
        with torch.no_grad():
            img = torch.cat([model.decode(x[i:i + 4] / scale).sample for i in range(0, len(x), 4)])
        return ((img + 1) / 2).clamp(0, 1)
    if x.shape[1] in (1, 3):  # pixel-space backbones sample in [-1, 1]
        return ((x + 1) / 2).clamp(0, 1)
    x = x[:, :3]
    lo = x.flatten(1).min(1).values.view(-1, 1, 1, 1)
    hi = x.flatten(1).max(1).values.view(-1, 1, 1, 1)
    return (x - lo) / (hi - lo + 1e-8)


def save_grid(cached: torch.Tensor, path: Path, full: torch.Tensor | None = None, vae: str | None = None,
              scale: float = 0.18215, min_side: int = 128, per_row: int = 4) -> Path:
    """``samples.png``: cached | full pairs (cached left), upscaled (nearest) to at least ``min_side`` pixels."""
    import torch.nn.functional as F
    from torchvision.utils import save_image

    imgs = decode(cached, vae, scale)
    if full is not None:
        ref = decode(full, vae, scale)
        imgs = torch.stack([imgs, ref], 1).flatten(0, 1)  # c0 f0 c1 f1 ...
    side = imgs.shape[-1]
    if side < min_side:
        imgs = F.interpolate(imgs, scale_factor=-(-min_side // side), mode="nearest")
    nrow = 2 * per_row if full is not None else per_row
    save_image(imgs, path, nrow=nrow, padding=2, pad_value=1.0)
    return Path(path)
