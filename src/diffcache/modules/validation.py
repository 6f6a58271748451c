"""Sample quality during training: every validation, a fixed seeded sample set is drawn with the current
*thresholded* policy (hard routing, as at inference) and with the uncached teacher from the same noise,
and FID / IS / precision-recall (against the reference statistics) and PSNR / MSE to the teacher are logged,
with the cached fraction, the MACs kept and a sample grid (cached | teacher).

A mixin for LightningModules that hold ``backbone``, ``solver`` and ``policy``. The metrics object is kept
outside the module tree (checkpoints stay policy-only); its torchmetrics states sync across DDP ranks in
``compute()``, so every rank logs the same numbers.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..data.seeded import seeded_inputs
from ..metrics.cost import policy_cost
from ..sampling import sample


class QualityValidation:
    """Set ``self.quality`` (a :class:`~diffcache.metrics.generative.QualityMetrics` or None), ``self.val_guidance``
    and ``self.val_seed`` in ``__init__``; Lightning calls the hooks below."""

    quality = None
    val_guidance: float | None = None
    val_seed: int = 12345

    def _set_quality(self, quality, guidance: float | None, seed: int) -> None:
        if quality is not None and self.backbone.in_channels not in (1, 3):
            raise ValueError(f"validation metrics need images: {type(self.backbone).__name__} samples "
                             f"{self.backbone.in_channels}-channel latents and no decoder is configured; set metrics=none (the "
                             f"default experiment=mnist_dit brings metrics=mnist: run other teachers with their own "
                             f"experiment or experiment=none)")
        object.__setattr__(self, "quality", quality)
        self.val_guidance, self.val_seed = guidance, int(seed)

    def on_validation_epoch_start(self) -> None:
        if self.quality is not None:
            self.quality.to(self.device)
            self.quality.reset()
        self._val_grid = None

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if self.quality is None:
            return
        noise, cond = seeded_inputs(self.backbone, batch["index"].tolist(), self.val_seed, self.device)
        g = torch.Generator().manual_seed(self.val_seed + int(batch["index"][0]))
        cached = sample(self.backbone, self.solver, self.policy, noise, cond, self.val_guidance, generator=g)
        g = torch.Generator().manual_seed(self.val_seed + int(batch["index"][0]))
        full = sample(self.backbone, self.solver, None, noise, cond, self.val_guidance, generator=g)
        self.quality.update(cached.clamp(-1, 1), full.clamp(-1, 1))
        if batch_idx == 0:
            self._val_grid = (cached[:8].detach().cpu(), full[:8].detach().cpu())

    def on_validation_epoch_end(self) -> None:
        if self.quality is None:
            return

        out = {f"val/{k}": v for k, v in self.quality.compute().items()}
        cost = policy_cost(self.backbone, self.solver, self.policy)
        out["val/macs_fraction"] = float(cost["macs_ratio"])
        if hasattr(self.policy, "cache_stats"):
            st = self.policy.cache_stats()
            out["val/cached_fraction"] = st["cached"] / max(st["cacheable"], 1)
        self.log_dict(out, sync_dist=False)  # already identical on every rank
        if self.trainer.is_global_zero and self._val_grid is not None:
            self._save_grid(*self._val_grid)

    def _save_grid(self, cached: torch.Tensor, full: torch.Tensor) -> None:
        from torchvision.utils import save_image

        step = self.trainer.global_step
        path = Path(self.trainer.default_root_dir) / "val_samples" / f"step_{step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid = torch.cat([cached, full]).float().clamp(-1, 1) * 0.5 + 0.5  # top row cached, bottom teacher
        save_image(torch.nn.functional.interpolate(grid, scale_factor=4, mode="nearest"), path, nrow=len(cached))
        for lg in self.trainer.loggers:
            name = type(lg).__name__
            if name == "WandbLogger":
                lg.log_image(key="val/samples", images=[str(path)], step=step, caption=["top: cached, bottom: teacher"])
            elif name == "TensorBoardLogger":
                from torchvision.io import read_image

                lg.experiment.add_image("val/samples", read_image(str(path)), step)
