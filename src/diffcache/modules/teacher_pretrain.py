"""Teacher pretraining (``teach.py``, ``module=teacher_pretrain``): a DiT or U-ViT backbone from scratch on MNIST.

Why: pretrained DiT / U-ViT weights cannot be downloaded here, so the offline demo trains its own small
teachers. The recipe follows each family's reference: DiT's eps-MSE + variational bound with learned sigma on
the 1000-step linear schedule; U-ViT's eps-MSE; labels dropped to the null class with ``label_drop`` (0.1) so
the model also learns the unconditional score for classifier-free guidance. The EMA of the weights (what is
shipped and sampled from, as both references do) is Lightning's ``EMAWeightAveraging`` callback
(``callbacks.ema`` in ``conf/teach.yaml``): it swaps the average into this module for every validation and
copies it in at the end of training, so this module holds no second copy.

Every validation draws a class-conditional sample grid from the weights it holds then (the EMA) with the
family's sampler (DDIM-20 for DiT, DPM-Solver-2 NFE 20 for U-ViT, CFG on) and exports them as a plain state
dict with the official key names, which ``backbone.ckpt`` loads strictly; the raw weights are exported once
the callback has swapped them back (``raw_<name>`` in the log folder, for diagnosis).
"""
from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import torch

from ..sampling import sample
from ..solvers.ddim import DDIM
from ..solvers.dpm_solver import DPMSolver2
from ..utils.atomic import write_atomically
from ..utils.resolvers import conf_dir
from .diffusion_loss import GaussianDiffusionLoss

CONF = conf_dir()


def official_file_name(backbone, name: str) -> str:
    """The official file name: DiT ships ``.pt``, U-ViT ``nnet`` ``.pth`` (the backbone's checkpoint suffix)."""
    return f"{name}{backbone.checkpoint_suffix}"


def grid_solver(backbone, schedule: str, num_steps: int = 20, time_input: str = "scaled"):
    """The family's sampler for sample grids: DDIM-20 for learned-sigma DiTs, DPM-Solver-2 with 20 NFE (U-ViT)."""
    if backbone.learn_sigma:
        return DDIM(num_steps, schedule=schedule)
    return DPMSolver2(num_steps, schedule=schedule, prediction="x0", time_input=time_input)


class TeacherPretrain(L.LightningModule):
    def __init__(self, backbone, schedule: str = "linear", num_train_timesteps: int = 1000, lr: float = 3e-4,
                 weight_decay: float = 0.0, betas=(0.9, 0.999), warmup_steps: int = 500,
                 lr_schedule: str = "constant", max_steps: int | None = None,
                 label_drop: float = 0.1, guidance: float | None = None, time_input: str = "scaled",
                 grid_per_class: int = 8, out_dir: str | None = None, export_name: str | None = None,
                 grid_dir: str | None = None, seed: int = 0, loss_weight: str = "uniform",
                 weight_max: float = 1000.0):
        super().__init__()
        if backbone.text_conditioned:
            raise ValueError(f"teacher_pretrain trains class-conditional backbones, got {type(backbone).__name__}")
        if lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"module.lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
        if lr_schedule == "cosine" and not max_steps:
            raise ValueError("module.lr_schedule=cosine decays over module.max_steps; set it")
        self.backbone = backbone.train()
        self.diffusion = GaussianDiffusionLoss(schedule, num_train_timesteps, loss_weight, weight_max)
        self.schedule, self.time_input, self.guidance = schedule, time_input, guidance
        self.lr, self.weight_decay, self.betas, self.warmup_steps = lr, weight_decay, tuple(betas), warmup_steps
        self.lr_schedule, self.max_steps = lr_schedule, max_steps
        self.label_drop, self.grid_per_class, self.seed = label_drop, grid_per_class, seed
        self.out_dir = Path(out_dir) if out_dir else None
        self.grid_dir = Path(grid_dir) if grid_dir else (self.out_dir / "grids" if self.out_dir else None)
        self.export_name = export_name or official_file_name(backbone, getattr(backbone, "arch", "teacher"))
        self.last_losses: dict[str, float] = {}
        self.grids: list[str] = []

    def configure_optimizers(self):
        opt = torch.optim.AdamW([p for p in self.backbone.parameters() if p.requires_grad], lr=self.lr,
                                betas=self.betas, weight_decay=self.weight_decay)
        warm = max(int(self.warmup_steps), 1)
        total = max(int(self.max_steps or 0), warm + 1)

        def factor(s: int) -> float:
            # linear warm-up, then constant or a cosine to zero at max_steps: a short CPU run ends annealed
            if s < warm:
                return (s + 1) / warm
            if self.lr_schedule == "constant":
                return 1.0
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (s - warm) / (total - warm))))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _drop_labels(self, y: torch.Tensor) -> torch.Tensor:
        if self.label_drop <= 0:
            return y
        drop = torch.rand(y.shape, device=y.device) < self.label_drop
        return torch.where(drop, torch.full_like(y, self.backbone.null_class), y)

    def training_step(self, batch: dict, batch_idx: int):
        x0, y = batch["x0"], self._drop_labels(batch["cond"])
        t = self.diffusion.sample_t(x0.shape[0], device=x0.device)
        noise = torch.randn_like(x0)
        # learned sigma: DiT/ADM's eps-MSE + L_vlb; otherwise U-ViT's plain eps-MSE
        fn = self.diffusion.dit_loss if self.backbone.learn_sigma else self.diffusion.uvit_loss
        out = fn(self.backbone, x0, y, t, noise)
        self.log_dict({f"train/{k}": v for k, v in out.items()}, prog_bar=True, batch_size=x0.shape[0])
        self.last_losses = {k: float(v.detach()) for k, v in out.items()}
        return out["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if batch_idx == 0:
            self.sample_grid()

    def on_validation_epoch_end(self) -> None:
        """The raw weights, for diagnosis (not shipped): the EMA callback's hook ran first and swapped them back."""
        if self.out_dir is not None and self._trainer is not None and self.trainer.is_global_zero and self.trainer.log_dir:
            self.export(Path(self.trainer.log_dir) / f"raw_{self.export_name}")

    @torch.no_grad()
    def sample_grid(self) -> torch.Tensor:
        """A (grid_per_class x 10) grid from the weights held now (the EMA in a validation and after training),
        one column per class; saved as PNG, and those weights exported."""
        from torchvision.utils import save_image

        n = self.grid_per_class
        y = torch.arange(10, device=self.device).repeat(n)
        g = torch.Generator().manual_seed(self.seed + 1234)
        b = self.backbone
        noise = torch.randn((len(y), b.in_channels, b.input_size, b.input_size), generator=g).to(self.device)
        was_training = b.training  # the final grid runs after fit, outside Lightning's eval switch
        x = sample(b.eval(), grid_solver(b, self.schedule, time_input=self.time_input), None, noise, y, self.guidance)
        b.train(was_training)
        if self.out_dir is not None and (self._trainer is None or self.trainer.is_global_zero):
            self.grid_dir.mkdir(parents=True, exist_ok=True)
            path = self.grid_dir / f"{Path(self.export_name).stem}_step{self.global_step:06d}.png"
            save_image((x.clamp(-1, 1) + 1) / 2, str(path), nrow=10, padding=1)
            self.grids.append(str(path))
            self.export(self.out_dir / self.export_name)
        return x

    def export(self, path: Path) -> None:
        """The backbone's weights as a plain state dict with the official key names (atomic write)."""
        sd = {k: v.detach().cpu().clone() for k, v in self.backbone.state_dict().items()}
        write_atomically(path, lambda tmp: torch.save(sd, tmp))
