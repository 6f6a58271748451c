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

from ..data.seeded import seeded_inputs, step_generators
from ..metrics.cost import policy_cost
from ..sampling import sample
from ..utils.grids import class_labels, labelled_grid


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
        idx = batch["index"].tolist()
        noise, cond = seeded_inputs(self.backbone, idx, self.val_seed, self.device)
        cached = sample(self.backbone, self.solver, self.policy, noise, cond, self.val_guidance,
                        generator=step_generators(idx, self.val_seed))
        full = sample(self.backbone, self.solver, None, noise, cond, self.val_guidance,
                      generator=step_generators(idx, self.val_seed))
        self.quality.update(cached.clamp(-1, 1), full.clamp(-1, 1))
        if batch_idx == 0:
            self._val_grid = (cached[:8].detach().cpu(), full[:8].detach().cpu(), cond[:8].cpu())

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
            self._save_grid(*self._val_grid, out)

    def _save_grid(self, cached: torch.Tensor, full: torch.Tensor, cond, logged: dict) -> None:
        """``val_samples/step_*.png``: the router's row (its MACs and PSNR to the teacher) over the teacher's row,
        the same noise and class in each column."""

        step = self.trainer.global_step
        path = Path(self.trainer.default_root_dir) / "val_samples" / f"step_{step:06d}.png"
        psnr = logged.get("val/psnr")
        router = f"router ({self.policy.name}, hard routing)\n{logged['val/macs_fraction']:.2f} MACs" + (
            f", {float(psnr):.1f} dB to teacher" if psnr is not None else "")
        labelled_grid([x.float().clamp(-1, 1) * 0.5 + 0.5 for x in (cached, full)], [router, "teacher (uncached)\n1.00 MACs"],
                      class_labels(cond, len(cached)), path, f"validation at step {step}, seed {self.val_seed}")
        for lg in self.trainer.loggers:
            name = type(lg).__name__
            if name == "WandbLogger":
                lg.log_image(key="val/samples", images=[str(path)], step=step, caption=["top: router (cached), bottom: teacher"])
            elif name == "TensorBoardLogger":
                from torchvision.io import read_image

                lg.experiment.add_image("val/samples", read_image(str(path)), step)
