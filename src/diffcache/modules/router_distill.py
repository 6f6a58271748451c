"""Router distillation (L2C): train a cache policy against its own frozen backbone.

One iteration, as L2C's ``router_training_losses`` does it:
1. draw a cache evaluation ``m`` (one per device batch, or one per sample);
2. put the state at the start of the previous solver step ``s``: forward-diffuse real latents there
   (``data=latents``, faithful) or run the student's own hard-cached trajectory from pure noise
   (``data=noise``, image-free: training sees the errors earlier cached steps cause);
3. run the evaluations ``s .. m-1`` with the full model under ``no_grad``; the policy records their
   branch outputs as the cache (for DPM-Solver-2 that ends on the midpoint: the shifted schedule);
4. teacher: the same backbone at ``m`` with the policy disabled; student: soft routing at ``m``;
5. loss ``MSE(student, teacher) + lam * sum(beta of router m)`` (MSE reduction mean or sum over
   C,H,W, then mean over the batch).

The backbone is held outside the module tree, so checkpoints hold policy keys only and DDP never
sees the frozen weights; ``requires_grad`` off and eval mode are asserted every step.
"""
from __future__ import annotations

from typing import Any

import lightning as L
import torch

from ..data.datamodule import random_cond
from ..policies.base import StepContext
from ..solvers.denoiser import Denoiser


class RouterDistill(L.LightningModule):
    def __init__(self, backbone, solver, policy, lr: float = 1e-3, weight_decay: float = 0.0,
                 betas=(0.9, 0.999), lam: float = 1e-6, loss_reduction: str = "mean", label_drop: float = 0.1,
                 per_sample_steps: bool = False, heatmap_every: int = 50, data_mode: str = "noise",
                 seed: int = 0, **_: Any):
        super().__init__()
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"module.loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if not any(True for _ in policy.parameters()):
            raise ValueError(f"policy={policy.name} has no trainable parameters: router training needs policy=l2c "
                             f"(use evaluate.py to measure {policy.name})")
        object.__setattr__(self, "backbone", backbone)
        backbone.requires_grad_(False).eval()
        self.policy = policy
        policy.attach(backbone)
        self.solver = solver
        self.denoiser = Denoiser(backbone, guidance=None)  # L2C trains without CFG (label drop only)
        self.cache_evals = list(policy.trainable_evals(solver))
        if not self.cache_evals:
            raise ValueError(f"solver {solver.name} with {solver.num_evals} evaluations has no cache step to train")
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)
        self.lam, self.loss_reduction, self.label_drop = lam, loss_reduction, label_drop
        self.per_sample_steps, self.heatmap_every = per_sample_steps, heatmap_every
        self.data_mode, self.seed = data_mode, seed

    # ------------------------------------------------------------------ lightning plumbing
    def on_fit_start(self) -> None:
        self.backbone.to(self.device)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.policy.parameters(), lr=self.lr, betas=self.betas,
                                 weight_decay=self.weight_decay)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.policy.clamp_()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["diffcache"] = {"policy": self.policy.name, "solver": self.solver.name,
                                   "backbone": type(self.backbone).__name__, "cache_evals": self.cache_evals}

    def _assert_frozen(self) -> None:
        assert not self.backbone.training, "teacher backbone must stay in eval mode"
        assert not any(p.requires_grad for p in self.backbone.parameters()), "teacher backbone must stay frozen"

    def _generator(self) -> torch.Generator:
        """Randomness from (seed, global step, rank): identical after a resume, distinct across ranks."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.global_step * 1009 + self.global_rank)

    # ------------------------------------------------------------------ data
    def _inputs(self, batch: dict, g: torch.Generator):
        if "x0" in batch:
            x0, cond = batch["x0"], batch["cond"]
            B = x0.shape[0]
        else:
            x0 = None
            B = batch["index"].shape[0]
            cond = random_cond(self.backbone, B, g)
            cond = {k: v.to(self.device) for k, v in cond.items()} if isinstance(cond, dict) else cond.to(self.device)
        cond = self._drop_labels(cond, B, g)
        return x0, cond, B

    def _drop_labels(self, cond, B: int, g: torch.Generator):
        """L2C trains 'with CFG': 10% of labels become the null class (or the null caption)."""
        if self.label_drop <= 0:
            return cond
        drop = (torch.rand(B, generator=g) < self.label_drop).to(self.device)
        null = self.backbone.null_cond(cond)
        if isinstance(cond, dict):
            y = torch.where(drop[:, None, None], null["y"].to(cond["y"]), cond["y"])
            return {**cond, "y": y}
        return torch.where(drop, null.to(cond), cond)

    # ------------------------------------------------------------------ the step
    def training_step(self, batch: dict, batch_idx: int):
        self._assert_frozen()
        g = self._generator()
        x0, cond, B = self._inputs(batch, g)
        if self.per_sample_steps:
            picks = torch.randint(len(self.cache_evals), (B,), generator=g)
            groups = [(self.cache_evals[int(i)], (picks == i).nonzero().flatten()) for i in picks.unique()]
        else:
            m = self.cache_evals[int(torch.randint(len(self.cache_evals), (1,), generator=g))]
            groups = [(m, None)]
        mse_total, l1_total = 0.0, 0.0
        for m, idx in groups:
            xs = None if x0 is None else (x0 if idx is None else x0[idx])
            cs = cond if idx is None else _index_cond(cond, idx.to(self.device))
            n = B if idx is None else len(idx)
            mse, l1 = self._distill_at(m, xs, cs, n, g)
            mse_total = mse_total + mse * (n / B)
            l1_total = l1_total + l1 * (n / B)
        loss = mse_total + self.lam * l1_total
        self.log_dict({"train/loss": loss, "train/mse": mse_total, "train/sum_beta": l1_total,
                       "train/cache_eval": float(groups[0][0])}, prog_bar=True, batch_size=B)
        return loss

    def _distill_at(self, m: int, x0, cond, B: int, g: torch.Generator):
        solver, policy = self.solver, self.policy
        start = solver.step_start(solver.step_of(m) - 1)
        shape = (B, self.backbone.in_channels, self.backbone.input_size, self.backbone.input_size)
        eps = torch.randn(shape, generator=g).to(self.device)
        policy.reset()
        with torch.no_grad():
            if x0 is None:  # image-free: the student's own hard-cached trajectory from pure noise
                state = solver.init(eps, 0)
                policy.mode = "infer"
                for k in range(start):
                    state = self._eval(state, k, cond, g)
            else:  # faithful: forward-diffuse real latents to the full step before m
                a, s = solver.alpha_sigma(start)
                state = solver.init(a * x0 + s * eps, start)
            policy.mode = "record"
            for k in range(start, m):
                state = self._eval(state, k, cond, g)
            x = solver.model_input(state, m)
            t = torch.full((B,), float(solver.model_times()[m]), device=self.device)
            with policy.disabled():
                teacher = self.backbone(x, t, cond)
        policy.mode = "train"
        policy.begin(StepContext(nfe=m, step=solver.step_of(m), num_steps=solver.num_steps,
                                 num_evals=solver.num_evals, timestep=float(t[0])))
        student = self.backbone(x, t, cond)
        err = (student.float() - teacher.float()).pow(2).flatten(1)
        per_sample = err.mean(1) if self.loss_reduction == "mean" else err.sum(1)
        return per_sample.mean(), policy.sum_beta(m)

    def _eval(self, state, k: int, cond, g: torch.Generator):
        x = self.solver.model_input(state, k)
        out = self.denoiser(x, k, self.solver, cond, self.policy)
        return self.solver.update(state, out, k, generator=g)


def _index_cond(cond, idx: torch.Tensor):
    if isinstance(cond, dict):
        return {k: (None if v is None else v[idx]) for k, v in cond.items()}
    return cond[idx]
