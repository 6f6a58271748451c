"""Router statistics during training: cached fraction at theta, MACs saved, and a heatmap image
(routers x sites, like the L2C GIF) saved as PNG and sent to W&B / TensorBoard when present."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from ..metrics.cost import policy_cost
from ..utils.figures import save_figure


def router_heatmap(betas: torch.Tensor, row_labels: list[str], path: str | Path, title: str = "",
                   site_labels: list[str] | None = None, theta: float | None = None) -> Path:
    """Plot a (routers x sites) matrix of sigmoid(logit), and beside it the binary compute mask at
    ``theta`` (computed iff beta > theta, the released code's rule), columns labelled by site name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = betas.detach().float().cpu().numpy()
    panels = [("beta = sigmoid(logit)", b, "viridis")]
    if theta is not None:
        panels.append((f"computed at theta={theta:.3g} (white) / reused (black)", (b > theta).astype(float), "gray"))
    width = max(6.5, b.shape[1] * 0.16 + 1.5)
    fig, axes = plt.subplots(len(panels), 1, figsize=(width, len(panels) * max(2.2, b.shape[0] * 0.22 + 1.2)),
                             dpi=110, squeeze=False)
    for ax, (name, data, cmap) in zip(axes[:, 0], panels):
        im = ax.imshow(data, vmin=0, vmax=1, cmap=cmap, aspect="auto", interpolation="nearest")
        ax.set_yticks(range(len(row_labels)), row_labels, fontsize=6)
        ax.set_ylabel("cache step", fontsize=8)
        ax.set_title(name, fontsize=8)
        if site_labels is not None and len(site_labels) == b.shape[1]:
            ax.set_xticks(range(len(site_labels)), site_labels, fontsize=5, rotation=90)
        else:
            ax.set_xlabel("site", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.03)
    fig.suptitle(title or "router: 1 compute, 0 reuse", fontsize=8, wrap=True)
    fig.tight_layout()
    return save_figure(fig, path)


class RouterStats(L.Callback):
    def __init__(self, output_dir: str | None = None, every_n_steps: int | None = None):
        self.output_dir = output_dir
        self.every = every_n_steps

    def _emit(self, trainer: L.Trainer, module, in_step: bool = True) -> None:
        policy = module.policy
        stats = policy.summary()
        # whole-sampler MACs at the current theta (L2C convention, per image, no CFG doubling)
        stats["macs_saved"] = 1.0 - float(policy_cost(module.backbone, module.solver, policy)["macs_ratio"])
        metrics = {f"router/{k}": float(v) for k, v in stats.items()}
        if in_step:  # through self.log: the same logger row as the step's losses and learning rate
            module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)
        if not trainer.is_global_zero:
            return
        if not in_step:  # on_train_end allows no self.log: the last step's row (the CSV logger merges rows)
            for lg in trainer.loggers:
                lg.log_metrics(metrics, step=max(trainer.global_step - 1, 0))
        out = Path(self.output_dir or trainer.default_root_dir)
        betas, labels = policy.beta_table(module.solver)
        png = router_heatmap(betas, labels, out / "router_heatmaps" / f"step_{trainer.global_step:06d}.png",
                             title=f"step {trainer.global_step}: {stats.get('cached', 0):.0f}/"
                                   f"{stats.get('cacheable', 0):.0f} cached at theta={policy.theta}",
                             site_labels=policy.site_labels(), theta=policy.effective_theta())
        for lg in trainer.loggers:
            name = type(lg).__name__
            if name == "WandbLogger":
                lg.log_image(key="router/heatmap", images=[str(png)], step=trainer.global_step)
            elif name == "TensorBoardLogger":
                import numpy as np
                from PIL import Image

                img = np.asarray(Image.open(png).convert("RGB"))
                lg.experiment.add_image("router/heatmap", img, trainer.global_step, dataformats="HWC")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        every = self.every or getattr(module, "heatmap_every", 0)
        if every and trainer.global_step % every == 0:
            self._emit(trainer, module)

    def on_train_end(self, trainer, module) -> None:
        self._emit(trainer, module, in_step=False)
