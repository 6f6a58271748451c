"""Router statistics during training: cached fraction at theta, MACs saved, and a heatmap image
(routers x sites, like the L2C GIF) saved as PNG and sent to W&B / TensorBoard when present."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import torch


def router_heatmap(betas: torch.Tensor, row_labels: list[str], path: str | Path, title: str = "") -> Path:
    """Plot a (routers x sites) matrix of sigmoid(logit) and save it as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = betas.detach().float().cpu().numpy()
    fig, ax = plt.subplots(figsize=(max(4, b.shape[1] * 0.18), max(2.5, b.shape[0] * 0.3)), dpi=100)
    im = ax.imshow(b, vmin=0, vmax=1, cmap="viridis", aspect="auto", interpolation="nearest")
    ax.set_yticks(range(len(row_labels)), row_labels, fontsize=7)
    ax.set_xlabel("site (layer x branch): 2l = attn, 2l+1 = mlp")
    ax.set_ylabel("cache step")
    ax.set_title(title or "router  beta = sigmoid(logit)   (1 compute, 0 reuse)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


class RouterStats(L.Callback):
    def __init__(self, output_dir: str | None = None, every_n_steps: int | None = None):
        self.output_dir = output_dir
        self.every = every_n_steps

    def _emit(self, trainer: L.Trainer, module) -> None:
        from ..metrics.cost import policy_cost

        policy = module.policy
        stats = policy.summary()
        # whole-sampler MACs at the current theta (L2C convention, per image, no CFG doubling)
        stats["macs_saved"] = 1.0 - float(policy_cost(module.backbone, module.solver, policy)["macs_ratio"])
        if not trainer.is_global_zero:
            return
        for lg in trainer.loggers:  # direct, so it also works in on_train_end where self.log is not allowed
            lg.log_metrics({f"router/{k}": float(v) for k, v in stats.items()}, step=trainer.global_step)
        out = Path(self.output_dir or trainer.default_root_dir)
        betas, labels = policy.beta_table(module.solver)
        png = router_heatmap(betas, labels, out / "router_heatmaps" / f"step_{trainer.global_step:06d}.png",
                             title=f"step {trainer.global_step}: {stats.get('cached', 0):.0f}/"
                                   f"{stats.get('cacheable', 0):.0f} cached at theta={policy.theta}")
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
        self._emit(trainer, module)
