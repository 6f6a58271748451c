"""Router distillation (L2C): train a cache policy against its own frozen backbone.

One iteration, as L2C's ``router_training_losses`` does it:
1. draw cache evaluations (``module.draw``, :mod:`.distill_steps`): one ``m`` per device batch (L2C), one per
   sample, stratified so every router trains every iteration (the default), or every cache step of one
   trajectory;
2. put the state at the start of the previous solver step ``s``: forward-diffuse real latents there
   (``data=latents``, faithful) or run the student's own hard-cached trajectory from pure noise
   (``data=noise``, image-free: training sees the errors earlier cached steps cause);
3. run the evaluations ``s .. m-1`` with the full model under ``no_grad``; the policy records their
   branch outputs as the cache (for DPM-Solver-2 that ends on the midpoint: the shifted schedule);
4. teacher: the same backbone at ``m`` with the policy disabled; student: soft routing at ``m``;
5. loss ``MSE(student, teacher) + lam * sum(beta of router m)`` (MSE reduction mean or sum over
   C,H,W, then mean over the batch), each step's term divided by its fully-cached MSE
   (:func:`~.distill_steps.cached_step_scales`) so every step is on one scale (Adam trains the same routers).

How long: ``updates_per_router`` and the convergence rule (:mod:`.convergence`, a callback this module
brings), else ``trainer.max_steps``.

The backbone is held outside the module tree, so checkpoints hold policy keys only and DDP never
sees the frozen weights; ``requires_grad`` off and eval mode are asserted every step. The policy is
bound for the duration of each step only; the prefix runs through :func:`diffcache.sampling.advance`
(the sampling loop) and teacher / student through :meth:`Denoiser.raw` (the sampling evaluation path).
Soft routing comes from the module being in train mode; the image-free prefix routes hard
(``policy.inference()``), the recorded prefix under ``policy.recording()``, the teacher under
``policy.disabled()``.
"""
from __future__ import annotations

import logging
import math
from functools import partial
from typing import Callable

import lightning as L
import torch

from ..denoiser import Denoiser
from ..policies.base import require_trainable
from ..policies.l2c import provenance
from ..sampling import advance, compile_backbone, uncompile_backbone
from .convergence import DRAWS, RouterConvergence, logit_distance
from .distill_steps import cached_step_scales, step_mse, stratified_picks, trajectory_terms
from .objectives import OBJECTIVES, budget_shift, iepo_weights
from .trajectory import TrajectoryObjective
from .validation import QualityValidation

NONFINITE = ("error", "skip")
log = logging.getLogger(__name__)


class RouterDistill(QualityValidation, L.LightningModule):
    """See the module docstring. ``quality`` (optional): validation metrics, see :mod:`.validation`."""

    def __init__(self, backbone, solver, policy, optimizer: Callable[..., torch.optim.Optimizer] | None = None,
                 lam: float = 1e-6, loss_reduction: str = "mean", label_drop: float = 0.1,
                 draw: str = "sample", updates_per_router: int | None = None, converge: dict | None = None,
                 heatmap_every: int = 50, seed: int = 0,
                 nonfinite: str = "error", quality=None, val_guidance: float | None = None, val_seed: int = 12345,
                 objective: str = "l2c", iepo_every: int = 500, iepo_samples: int = 8, iepo_normalize: bool = False,
                 budget_range: tuple[float, float] = (0.2, 1.0), budget_temperature: float = 1.0,
                 trajectory: dict | None = None, compile: str | None = None):
        super().__init__()
        if draw not in DRAWS:
            raise ValueError(f"module.draw must be one of {DRAWS}, got {draw!r}")
        if objective not in OBJECTIVES:
            raise ValueError(f"module.objective must be one of {OBJECTIVES}, got {objective!r}")
        lo, hi = (float(v) for v in budget_range)
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"module.budget_range must satisfy 0 <= lo <= hi <= 1, got {budget_range}")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"module.loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if nonfinite not in NONFINITE:
            raise ValueError(f"module.nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
        if not (math.isfinite(float(lam)) and float(lam) >= 0):
            raise ValueError(f"the L1 weight lam must be a finite number >= 0, got {lam}")
        require_trainable(policy)
        object.__setattr__(self, "backbone", backbone)
        backbone.requires_grad_(False).eval()
        policy.setup(backbone, solver)  # routers exist before the optimiser is built
        self.policy = policy
        self.solver = solver
        self.denoiser = Denoiser(backbone, guidance=None)  # L2C trains without CFG (label drop only)
        self.cache_evals = list(policy.trainable_evals(solver))
        if not self.cache_evals:
            raise ValueError(f"solver {solver.name} with {solver.num_evals} evaluations has no cache step to train")
        self.optimizer_factory = optimizer or partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.0)
        self.lam, self.loss_reduction, self.label_drop = float(lam), loss_reduction, label_drop
        self.draw, self.heatmap_every = draw, heatmap_every
        self.updates_per_router, self.converge = updates_per_router, dict(converge or {})
        self.scales: dict[int, float] = {}
        self.seed, self.nonfinite = seed, nonfinite
        self.skipped_steps = 0
        self._set_quality(quality, val_guidance, val_seed)
        self.objective, self.iepo_every, self.iepo_samples = objective, int(iepo_every), int(iepo_samples)
        self.iepo_normalize, self.budget_range, self.budget_temperature = iepo_normalize, (lo, hi), budget_temperature
        self.iepo: dict[int, float] | None = None
        self.traj = TrajectoryObjective(**dict(trajectory or {})) if objective == "trajectory" else None
        self.compile = compile

    # ------------------------------------------------------------------ lightning plumbing
    def on_fit_start(self) -> None:
        self.backbone.to(self.device)
        if self.traj is not None:
            self.traj.setup(self, fresh=self.global_step == 0)
        else:
            self.scales = cached_step_scales(self.denoiser, self.solver, self.policy, self.cache_evals,
                                             self.loss_reduction, seed=self.seed)
        if self.compile:  # after the one-off set-up: one graph per way a step calls the backbone
            compile_backbone(self.backbone, str(self.compile), max_graphs=self.solver.num_evals + 4)

    def configure_callbacks(self):
        """The run's length (:mod:`.convergence`): updates per router and the convergence rule."""
        c = self.converge
        lr = float(getattr(self.optimizer_factory, "keywords", {}).get("lr", 1e-3))
        floor = c.get("min_updates", math.ceil(logit_distance(self.policy.theta) / lr))
        return [RouterConvergence(self.updates_per_router, every=c.get("every"), patience=c.get("patience", 3),
                                  eps=c.get("eps", 1e-3), min_updates=floor)]

    def on_train_batch_start(self, batch, batch_idx) -> None:
        # Soft routing while training. Lightning >= 2.2 keeps each submodule's mode as it found it (and
        # restores it after validation), so the policy, built in eval (hard) mode, must be switched here:
        # under hard routing the MSE has no gradient and only the L1 term would move the logits.
        self.policy.train()

    def on_train_start(self) -> None:
        # a resumed run's checkpoint may hold unclamped logits: ModelCheckpoint saves before on_train_batch_end clamps
        self.policy.clamp_()

    def configure_optimizers(self):
        return self.optimizer_factory(self.policy.parameters())

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.policy.clamp_()

    def on_train_end(self) -> None:
        if self.compile:
            uncompile_backbone(self.backbone)
        if self.traj is not None:
            log.info("trajectory objective: router from %s", self.traj.finish(self))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        layout = self.backbone.layout
        checkpoint["diffcache"] = {"policy": self.policy.name, "solver": self.solver.name,
                                   "num_steps": self.solver.num_steps, "num_evals": self.solver.num_evals,
                                   "cache_interval": self.policy.cache_interval,
                                   "backbone": type(self.backbone).__name__, "depth": layout.depth,
                                   "site_kinds": list(layout.site_kinds), "cache_evals": self.cache_evals}
        if self.traj is not None:
            checkpoint["trajectory"] = self.traj.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Resuming: refuse a checkpoint made with another solver, interval or backbone (provenance)."""

        meta = checkpoint.get("diffcache")
        if self.traj is not None:
            self.traj.load_state_dict(checkpoint.get("trajectory"))
        provenance.check(provenance.file_record("lightning", lightning=meta) if meta else None,
                         provenance.run_record(self.backbone, self.solver, self.policy), "ckpt_path",
                         getattr(self.policy, "allow_mismatch", False))

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
            cond = _to(self.backbone.random_cond(B, g), self.device)
        return x0, self._drop_labels(cond, B, g), B

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
        if self.traj is not None:  # the final sample, CFG as sampling uses it: real labels, no label drop
            B = (batch["x0"] if "x0" in batch else batch["index"]).shape[0]
            cond = batch["cond"] if "cond" in batch else _to(self.backbone.random_cond(B, g), self.device)
            loss, logs = self.traj.step(self, B, cond, g)
            logs = {"train/mse": float(loss.detach()), "train/sum_beta": 0.0, **logs}
        else:
            x0, cond, B = self._inputs(batch, g)
            weights, shift = self._objective_terms(g)
            with self.policy.bound(self.backbone, self.solver), \
                    self.policy.soft_threshold(shift, self.budget_temperature):
                terms = self._terms(x0, cond, B, g)
            loss, logs = self._assemble(terms, weights)
        if not torch.isfinite(loss.detach()):
            if self.nonfinite == "error":
                raise FloatingPointError(
                    f"router training loss is {float(loss):g} at step {self.global_step} (mse {logs['train/mse_raw']:g}, "
                    f"sum_beta {logs['train/sum_beta']:g}, lam {self.lam:g}); stopping before a non-finite router is "
                    f"written. Lower policy.lam / module.optimizer.lr, or set module.nonfinite=skip")
            self.skipped_steps += 1
            self.log("train/skipped_steps", float(self.skipped_steps), batch_size=B)
            return None
        bar = {"train/loss": loss, "train/mse": logs.pop("train/mse"), "train/sum_beta": logs.pop("train/sum_beta")}
        self.log_dict(bar, prog_bar=True, batch_size=B)
        self.log_dict(logs, batch_size=B)
        return loss

    def _terms(self, x0, cond, B: int, g: torch.Generator) -> dict[int, tuple[torch.Tensor, torch.Tensor, float]]:
        """``{cache evaluation m: (MSE, sum beta of router m, share of the iteration)}`` by ``module.draw``."""
        if self.draw == "trajectory":
            solver = self.solver
            shape = (B, self.backbone.in_channels, self.backbone.input_size, self.backbone.input_size)
            eps = torch.randn(shape, generator=g).to(self.device)
            if x0 is not None:  # real data forward-diffused to the first evaluation
                a, s = solver.alpha_sigma(0)
                eps = a * x0 + s * eps
            self.policy.reset()
            terms = trajectory_terms(self.denoiser, solver, self.policy, solver.init(eps, 0), cond, self.cache_evals,
                                     self.loss_reduction, generator=g)
            return {m: (mse.mean(), l1, 1.0 / len(terms)) for m, (mse, l1) in terms.items()}
        M = len(self.cache_evals)
        picks = stratified_picks(B, M, g) if self.draw == "sample" else \
            torch.full((B,), int(torch.randint(M, (1,), generator=g)))
        out = {}
        for i in picks.unique().tolist():
            idx = (picks == i).nonzero().flatten()
            whole = len(idx) == B
            xs = None if x0 is None else (x0 if whole else x0[idx])
            cs = cond if whole else _index_cond(cond, idx.to(self.device))
            mse, l1 = self._distill_at(self.cache_evals[i], xs, cs, len(idx), g)
            out[self.cache_evals[i]] = (mse, l1, len(idx) / B)
        return out

    def _assemble(self, terms: dict, weights: dict[int, float]) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss (each step's term over its fully-cached MSE, see :mod:`.distill_steps`) and what is logged."""
        lam = 0.0 if self.objective == "budget" else self.lam  # a drawn budget, not the L1 term, sets the compute
        loss, logs = 0.0, {"train/mse": 0.0, "train/mse_raw": 0.0, "train/sum_beta": 0.0}
        for m, (mse, l1, share) in terms.items():
            scale = self.scales.get(m, 1.0)
            loss = loss + share * (weights.get(m, 1.0) * mse + lam * l1) / scale
            rel = float(mse.detach()) / scale
            logs["train/mse"] += share * rel
            logs["train/mse_raw"] += share * float(mse.detach())
            logs["train/sum_beta"] += share * float(l1.detach())
            logs[f"train/mse_step/e{m}"] = rel
        if self.draw == "batch":
            logs["train/cache_eval"] = float(next(iter(terms)))
        return loss, logs

    def _objective_terms(self, g: torch.Generator) -> tuple[dict[int, float], float]:
        """(loss weight per cache evaluation, soft-routing logit shift) of this iteration's objective."""
        if self.objective == "iepo":
            if self.iepo is None or self.global_step % self.iepo_every == 0:
                self.iepo = iepo_weights(self.backbone, self.solver, self.policy, self.iepo_samples, seed=self.seed)
                if self.iepo_normalize:
                    mean = sum(self.iepo.values()) / max(len(self.iepo), 1)
                    self.iepo = {m: w / mean if mean > 0 else 1.0 for m, w in self.iepo.items()}
                self.log_dict({f"iepo/lambda_{m}": w for m, w in self.iepo.items()}, batch_size=1)
            return self.iepo, 0.0
        if self.objective == "budget":
            lo, hi = self.budget_range
            b = lo + (hi - lo) * float(torch.rand((), generator=g))
            self.log("train/budget", b, batch_size=1)
            return {}, budget_shift(self.policy, b)
        return {}, 0.0

    def _distill_at(self, m: int, x0, cond, B: int, g: torch.Generator):
        solver, policy, den = self.solver, self.policy, self.denoiser
        start = solver.step_start(solver.step_of(m) - 1)
        shape = (B, self.backbone.in_channels, self.backbone.input_size, self.backbone.input_size)
        eps = torch.randn(shape, generator=g).to(self.device)
        policy.reset()
        with torch.no_grad():
            if x0 is None:  # image-free: the student's own hard-cached trajectory from pure noise
                with policy.inference():
                    state = advance(den, solver, solver.init(eps, 0), cond, stop=start, generator=g)
            else:  # faithful: forward-diffuse real latents to the full step before m
                a, s = solver.alpha_sigma(start)
                state = solver.init(a * x0 + s * eps, start)
            with policy.recording():
                state = advance(den, solver, state, cond, stop=m, generator=g)
            x = solver.model_input(state, m)
            with policy.disabled():
                teacher = den.raw(x, m, solver, cond)
        student = den.raw(x, m, solver, cond)
        return step_mse(student, teacher, self.loss_reduction).mean(), policy.sum_beta(m)


def _to(cond, device):
    return {k: v.to(device) for k, v in cond.items()} if isinstance(cond, dict) else cond.to(device)


def _index_cond(cond, idx: torch.Tensor):
    if isinstance(cond, dict):
        return {k: (None if v is None else v[idx]) for k, v in cond.items()}
    return cond[idx]
